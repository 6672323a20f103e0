"""`asymoe` command line: `asymoe demo`, `asymoe upcycle`, ... (one subcommand per job; `asymoe --help`).

Every command lives in its own module as a `make_parser(parser)` + `main(args)` pair (as TRL's scripts do); only
the module of the command being run is imported, so `asymoe upcycle` works with the model-only install and no
command pays for another's imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

# The `--dtype` names of every command and bench.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# name -> (module with make_parser/main, one line for `asymoe --help`)
COMMANDS = {
    "demo": ("asymoe.demo", "the main job: the paper's comparison end to end on the embedded default"),
    "upcycle": ("asymoe.upcycling.command", "dense LLaVA / LLaVA-NeXT / LLaVA-OneVision -> AsyMoE checkpoint"),
    "grounding": ("asymoe.eval.grounding", "generate the grounding benchmark"),
    "eval": ("asymoe.eval.runner", "evaluate a model on the benchmark suite"),
    "analyze": ("asymoe.eval.analysis", "per-layer evidence sensitivity, attention on the image and routing"),
    "merge-lora": ("asymoe.finetune.lora", "merge a PEFT adapter into a remote-code checkpoint"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `asymoe` parser; only `command`'s module (the one to run) is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="asymoe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, summary) in COMMANDS.items():
        if name != command:
            commands.add_parser(name, help=summary)
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise SystemExit(
                f"asymoe {name}: error: this command needs the asymoe toolkit ({err.name or err} is not installed): "
                "pip install 'asymoe[toolkit]'"
            ) from err
        subparser = commands.add_parser(name, help=summary, description=module.__doc__,
                                        formatter_class=argparse.RawDescriptionHelpFormatter)
        module.make_parser(subparser).set_defaults(func=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(command=argv[0] if argv else None).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
