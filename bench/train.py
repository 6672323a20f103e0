"""Training throughput and MFU of each upcycled variant vs its dense transformers LLaVA source, in one process.

Builds a randomly initialised dense LLaVA (Llama decoder of the given size; a small frozen CLIP tower giving
`--image-tokens` tokens per image, as LLaVA fine-tuning freezes the tower), upcycles it in memory into each variant and
times full training steps (forward with labels + router loss, backward, AdamW step) on random token ids, one image per
sample. Tokens/s counts every position of the batch (image tokens too: they run through the decoder).

MFU = achieved model FLOP/s / peak FLOP/s, with model FLOPs per token = 6·N + 12·L·H·S (PaLM, appendix B): N the
decoder's parameters a token activates (attention, its top-k experts, routers, evidence readouts, LM head; not the
embedding lookup), L layers, H hidden size, S sequence length; the vision tower (frozen, small) is not counted. Peak:
`--peak-tflops`, else the dense bf16 tensor-core peak of a known GPU, else (CPU) the best fp32 matmul rate measured
here, reported as such. Step peak memory: the most allocated during one more step above what was allocated before it
(weights and AdamW state), i.e. gradients, activations and transients (`asymoe.benchmarking.peak_memory_mib`: the
CUDA allocator's peak, or on CPUs the torch profiler's allocation events).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/train.py --device cuda --dtype bf16 --hidden 2048 --layers 16 --seq-len 2048
    HF_HUB_OFFLINE=1 .venv/bin/python bench/train.py --device cpu --dtype fp32 --hidden 256 --layers 4 --seq-len 256 \\
        --image-tokens 64 --batch-size 4
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from asymoe import AsyMoEForConditionalGeneration
from asymoe.benchmarking import median_seconds, peak_memory_mib, write_bench_record
from asymoe.cli import DTYPES
from asymoe.compat import enable_activation_checkpointing
from asymoe.upcycling import model_parameter_counts

VARIANTS = ("dense", "vanilla", "modality", "asymoe")
# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
GPU_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 125.0}
PATCH = 14


def dense_source(args) -> LlavaForConditionalGeneration:
    side = int(math.isqrt(args.image_tokens))
    if side * side != args.image_tokens:
        raise SystemExit(f"--image-tokens {args.image_tokens}: use a square number (a grid of patches), e.g. 576")
    heads = max(1, args.hidden // 128)
    text = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate or int(2.75 * args.hidden),
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=args.seq_len, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                              image_size=side * PATCH, patch_size=PATCH, projection_dim=64)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                     image_token_index=args.vocab - 1))


def flops_per_token(model, args) -> float:
    """6·N + 12·L·H·S with N the decoder parameters one token activates (see the module docstring)."""
    embedding = model.model.language_model.embed_tokens.weight
    activated = model_parameter_counts(model)["language_model_activated"]
    if model.lm_head.weight is not embedding:
        activated -= embedding.numel()  # a lookup costs no FLOPs; a tied matrix still runs as the LM head
    return 6 * activated + 12 * args.layers * args.hidden * args.seq_len


def batch(args, device: torch.device, image_token: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab - 1, (args.batch_size, args.seq_len), generator=generator)
    ids[:, 0] = 1
    ids[:, 1 : 1 + args.image_tokens] = image_token
    side = int(math.isqrt(args.image_tokens)) * PATCH
    pixels = torch.randn(args.batch_size, 3, side, side, generator=generator)
    return {"input_ids": ids.to(device), "labels": ids.to(device), "pixel_values": pixels.to(device)}


def cpu_matmul_tflops(size: int = 2048, repeat: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeat))
    return 2 * size**3 / best / 1e12


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_tflops(args, device: torch.device) -> tuple[float, str]:
    if args.peak_tflops:
        return args.peak_tflops, "given (--peak-tflops)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return value, f"{key} dense bf16 data-sheet peak"
        raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops (its dense bf16 peak)")
    return cpu_matmul_tflops(), "best fp32 2048² matmul measured on this CPU"


def training_step(model, inputs: dict, args, device: torch.device):
    """A closure running one optimizer step (autocast forward with labels, backward, AdamW); it stops the bench on a
    non-finite loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                  fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")
    steps_done = 0

    def step() -> None:
        nonlocal steps_done
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise SystemExit(f"loss is {loss.item()} at step {steps_done}")
        steps_done += 1

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES, help="autocast dtype (weights stay fp32)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, help="dense FFN width (default 2.75 x hidden)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--image-tokens", type=int, default=64, help="image tokens per sample (a square number)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    parser.add_argument("--mode", default="partition", choices=["copy", "partition"],
                        help="upcycling mode: partition keeps activated FLOPs near dense, copy multiplies them by k")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model (inductor)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (default: known GPU or measured)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--output", default="bench/results/train.json")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if sorted(set(variants) - set(VARIANTS)) or "dense" not in variants:
        parser.error(f"--variants {args.variants}: use names from {VARIANTS}, including dense (the reference)")
    if args.image_tokens + 2 > args.seq_len:
        parser.error(f"--seq-len {args.seq_len} must exceed --image-tokens {args.image_tokens} + 2")
    device = torch.device(args.device)
    peak, peak_source = peak_tflops(args, device)

    torch.manual_seed(0)
    source = dense_source(args)
    inputs = batch(args, device, source.config.image_token_id)
    results = {}
    for variant in variants:
        model = copy.deepcopy(source) if variant == "dense" else AsyMoEForConditionalGeneration.from_dense(
            source, moe_variant=variant, mode=args.mode)  # the source stays on the CPU, out of the peak
        model = model.to(device).train()
        model.model.vision_tower.requires_grad_(False)
        if variant != "dense":
            model.config.text_config.output_router_logits = True  # the router loss is part of the training step
        if args.gradient_checkpointing:
            enable_activation_checkpointing(model)
        flops = flops_per_token(model, args)
        if args.compile:
            model.compile()
        step = training_step(model, inputs, args, device)
        seconds = median_seconds(step, device, args.warmup, args.steps)
        tokens_per_s = args.batch_size * args.seq_len / seconds
        results[variant] = {
            "step_s": seconds, "tokens_per_s": tokens_per_s, "flops_per_token": flops,
            "mfu": tokens_per_s * flops / (peak * 1e12), "step_peak_mib": peak_memory_mib(step, device),
        }
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    reference = results["dense"]["tokens_per_s"]
    print(f"peak {peak:.3f} TFLOP/s ({peak_source})")
    dense_peak = results["dense"]["step_peak_mib"]
    print(f"{'model':10s} {'tokens/s':>10s} {'x dense':>8s} {'GFLOP/token':>12s} {'MFU':>7s} {'step peak MiB':>14s} "
          f"{'x dense':>8s}")
    for variant, entry in results.items():
        print(f"{variant:10s} {entry['tokens_per_s']:10.0f} {entry['tokens_per_s'] / reference:8.2f} "
              f"{entry['flops_per_token'] / 1e9:12.3f} {entry['mfu']:7.1%} {entry['step_peak_mib']:14.1f} "
              f"{entry['step_peak_mib'] / dense_peak:8.2f}")
    path = write_bench_record(args.output, args, args.device, results, peak_tflops=peak, peak_source=peak_source)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
