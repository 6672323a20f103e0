"""Peak memory of `asymoe upcycle` vs checkpoint size (DESIGN §3: about one source shard, never two models).

Builds a multi-shard dense LLaVA checkpoint (Llama backbone, random bf16 weights, ~300 MB by default), then runs in
fresh subprocesses, each reporting its own peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`):

- baseline: importing torch, transformers and `asymoe.upcycling` (what any run pays before touching weights);
- upcycle: `asymoe upcycle SRC DST --no-report` (the CLI, streaming);
- reference: `LlavaForConditionalGeneration.from_pretrained(SRC)` (one dense model in memory).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/upcycle_memory.py [--hidden 1024 --layers 8 --shard-size 50MB]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

MEASURE = textwrap.dedent(
    """
    import json, resource, sys, time

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return None

    kind, src, dst, variant, mode, out_shard = sys.argv[1:7]
    import torch, transformers, asymoe.upcycling  # noqa: F401
    after_imports = status("VmRSS")
    start = time.perf_counter()
    if kind == "upcycle":
        from asymoe.cli import main
        assert main(["upcycle", src, dst, "--variant", variant, "--mode", mode, "--max-shard-size", out_shard,
                     "--no-report"]) == 0
    elif kind == "from_pretrained":
        from transformers import LlavaForConditionalGeneration
        model = LlavaForConditionalGeneration.from_pretrained(src)
        sum(p.float().sum().item() for p in model.parameters())  # touch every weight
    print("RESULT " + json.dumps({
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # kB -> bytes (Linux)
        "vm_hwm": status("VmHWM"), "after_imports": after_imports, "seconds": time.perf_counter() - start,
    }))
    """
)


def build_checkpoint(directory: Path, args: argparse.Namespace) -> None:
    """Runs in its own process (see `main`), so that this process stays small: a forked child's ru_maxrss starts
    from its parent's RSS."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate or int(args.hidden * 2.75),
        num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
    )
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                              image_size=64, patch_size=16, projection_dim=256)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=args.vocab - 1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size=args.shard_size)


def measure(kind: str, src: Path, dst: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, kind, str(src), str(dst), args.variant, args.mode, args.out_shard_size],
        capture_output=True, text=True, env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def size(path: Path, pattern: str = "*.safetensors") -> tuple[int, int, int]:
    files = [p.stat().st_size for p in path.glob(pattern)]
    return sum(files), max(files), len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where to build the checkpoints (default: a temporary directory)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=None, help="default 2.75 x hidden")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-size", default="50MB")
    parser.add_argument("--out-shard-size", default="100MB")
    parser.add_argument("--variant", default="asymoe")
    parser.add_argument("--build", help=argparse.SUPPRESS)  # internal: build the checkpoint into this directory
    parser.add_argument("--mode", default="copy")
    args = parser.parse_args()

    if args.build:
        build_checkpoint(Path(args.build), args)
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        src, dst = Path(work) / "dense", Path(work) / "upcycled"
        start = time.perf_counter()
        subprocess.run([sys.executable, *sys.argv, "--build", str(src)], check=True, capture_output=True)
        print(f"built the dense checkpoint in {time.perf_counter() - start:.1f} s")
        baseline = measure("baseline", src, dst, args)
        upcycled = measure("upcycle", src, dst, args)
        reference = measure("from_pretrained", src, dst, args)
        src_total, src_largest, src_count = size(src)
        dst_total, dst_largest, dst_count = size(dst)

    mb = 1e6
    stream = upcycled["vm_hwm"] - upcycled["after_imports"]
    loaded = reference["vm_hwm"] - reference["after_imports"]
    ffn_bytes = 3 * args.hidden * (args.intermediate or int(args.hidden * 2.75)) * 2  # bf16
    rows = [
        ("dense checkpoint", f"{src_total / mb:,.0f} MB in {src_count} shards (largest {src_largest / mb:,.0f} MB)"),
        ("upcycled checkpoint", f"{dst_total / mb:,.0f} MB in {dst_count} shards ({args.variant}, {args.mode})"),
        ("RSS after imports (torch, transformers, asymoe)", f"{upcycled['after_imports'] / mb:,.0f} MB"),
        ("upcycle: peak RSS (ru_maxrss)", f"{upcycled['ru_maxrss'] / mb:,.0f} MB ({upcycled['seconds']:.1f} s)"),
        ("one layer's dense FFN (3 matrices)", f"{ffn_bytes / mb:,.0f} MB"),
        ("upcycle: peak RSS above imports", f"{stream / mb:,.0f} MB = {stream / src_largest:.2f} x largest source "
                                            f"shard = {stream / src_total:.2f} x dense checkpoint"),
        ("imports only: peak RSS (ru_maxrss)", f"{baseline['ru_maxrss'] / mb:,.0f} MB"),
        ("from_pretrained(dense): peak RSS", f"{reference['ru_maxrss'] / mb:,.0f} MB ({loaded / mb:,.0f} MB above "
                                             "imports; one model in memory)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
