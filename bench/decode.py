"""Decode speed of an upcycled AsyMoE vs its dense transformers LLaVA source, batch 1, in one process.

Builds a randomly initialised dense LLaVA (`asymoe.tiny.tiny_llava`, decoder size from the flags), upcycles it in
memory into each variant (`--mode`, default copy) and times greedy `generate` for one image + prompt. Decode
tokens/s is (N - 1) / (t(N new tokens) - t(1 new token)), so the prefill cancels out; medians of `--repeat` rounds
after a warm-up, every variant timed in turn within each round.
`--cache static` uses a static KV cache (`cache_implementation="static"`), `--compile` adds `torch.compile` of the
decoding forward (transformers' `compile_config`, inductor, one graph; on CPUs too). Prints ratios to the dense source and writes JSON.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/decode.py --device cpu --dtype fp32 --hidden 256 --layers 4
    HF_HUB_OFFLINE=1 .venv/bin/python bench/decode.py --device cuda --dtype bf16 --hidden 2048 --layers 16 --cache static
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import transformers
from PIL import Image

from asymoe import AsyMoEForConditionalGeneration
from asymoe.benchmarking import interleaved_median_seconds, write_bench_record
from asymoe.cli import DTYPES
from asymoe.tiny import build_tokenizer, tiny_llava

VARIANTS = ("dense", "vanilla", "modality", "asymoe")


def generate_call(model, inputs: dict, new_tokens: int, args):
    """A greedy generate of exactly `new_tokens` tokens, as a function to time."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if args.cache == "static":
        kwargs["cache_implementation"] = "static"

    def generate():
        with torch.no_grad():
            model.generate(**inputs, **kwargs)

    return generate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, help="dense FFN width (default 2.75 x hidden)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    parser.add_argument("--mode", choices=["copy", "partition"], default="copy",
                        help="upcycling mode: copy (every expert = the dense FFN, same logits; top-k reads k FFNs per "
                             "token) or partition (experts are slices of it: about the dense FFN's weights per token)")
    parser.add_argument("--cache", choices=["dynamic", "static"], default="dynamic")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoding forward")
    parser.add_argument("--experts-implementation", default="grouped_mm", choices=["grouped_mm", "batched_mm", "eager"],
                        help="MoE experts kernel of the upcycled models (batched_mm gathers each token's experts)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--output", default="bench/results/decode.json")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "dense" not in variants:
        parser.error(f"--variants {args.variants}: use names from {VARIANTS}, including dense (the reference)")
    if args.compile and args.cache != "static":
        parser.error("--compile needs --cache static (a dynamic cache recompiles as it grows)")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    torch.manual_seed(0)
    tokenizer = build_tokenizer("what is in the image ? describe it".split())
    heads = max(1, args.hidden // 64)
    dense, processor = tiny_llava(
        tokenizer, hidden_size=args.hidden, intermediate_size=args.intermediate or int(2.75 * args.hidden),
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image ?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)

    calls = {}
    for variant in variants:
        model = dense if variant == "dense" else AsyMoEForConditionalGeneration.from_dense(
            dense, moe_variant=variant, mode=args.mode)
        model = model.to(device=device, dtype=dtype).eval()
        if variant != "dense":
            model.set_experts_implementation(args.experts_implementation)
        if args.compile:  # one graph per decoding step (fullgraph); CUDA graphs on GPUs as transformers does
            config = transformers.CompileConfig(fullgraph=True, mode="reduce-overhead" if device.type == "cuda" else None)
            config._compile_all_devices = True  # transformers compiles on accelerators only otherwise
            model.generation_config.compile_config = config
        for tokens in (1, args.new_tokens):
            calls[variant, tokens] = generate_call(model, inputs, tokens, args)
    # Every variant in turn, round after round: load that drifts during the run slows all of them alike.
    times = interleaved_median_seconds(calls, device, args.warmup, args.repeat)
    results = {}
    for variant in variants:
        one, many = times[variant, 1], times[variant, args.new_tokens]
        if many <= one:
            raise SystemExit(f"{variant}: {args.new_tokens} tokens took no longer than 1 ({many:.4f} s vs "
                             f"{one:.4f} s); the machine is too noisy for this size: raise --new-tokens or --repeat.")
        results[variant] = {"decode_tokens_per_s": (args.new_tokens - 1) / (many - one), "prefill_s": one}
    reference = results["dense"]["decode_tokens_per_s"]
    print(f"{'model':10s} {'decode tok/s':>13s} {'x dense':>8s} {'prefill+1 ms':>13s}")
    for variant, entry in results.items():
        print(f"{variant:10s} {entry['decode_tokens_per_s']:13.1f} {entry['decode_tokens_per_s'] / reference:8.2f} "
              f"{entry['prefill_s'] * 1e3:13.1f}")
    print(f"wrote {write_bench_record(args.output, args, args.device, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
