"""`asymoe` command line: `asymoe demo`, ... (one subcommand per job; `asymoe --help`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    """Build the embedded tiny AsyMoE, save it as a Hub bundle, reload it with trust_remote_code and generate."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from . import AsyMoEForConditionalGeneration
    from .tiny import build_tokenizer, tiny_config, tiny_processor

    output = Path(args.output)
    tokenizer = build_tokenizer("what color is the shape red green blue circle square triangle".split())
    config = tiny_config(tokenizer, moe_variant=args.variant)
    torch.manual_seed(args.seed)
    model = AsyMoEForConditionalGeneration(config)
    processor = tiny_processor(config, tokenizer)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    print(f"saved a tiny {args.variant} AsyMoE to {output} ({model.num_parameters():,} parameters)")

    model = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    image = Image.fromarray((np.random.default_rng(args.seed).random((48, 48, 3)) * 255).astype("uint8"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape ?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"reloaded with trust_remote_code; untrained answer: {answer!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asymoe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help=_demo.__doc__, description=_demo.__doc__)
    demo.add_argument("--output", default="outputs/demo", help="where to write the checkpoint (default: %(default)s)")
    demo.add_argument("--variant", default="asymoe", choices=["dense", "vanilla", "modality", "asymoe"])
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
