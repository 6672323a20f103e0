"""`asymoe` command line: `asymoe demo`, `asymoe upcycle`, ... (one subcommand per job; `asymoe --help`)."""

from __future__ import annotations

import argparse
import sys

import torch

# The `--dtype` names of every command and bench.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _demo(args: argparse.Namespace) -> int:
    """The main job: grounding data → dense LLaVA → upcycled MoE variants → TRL fine-tuning → evaluation → report."""
    from .demo import ComparisonConfig, run_comparison

    config = ComparisonConfig(output=args.output, seed=args.seed)
    outcome = run_comparison(config)
    print(f"report: {outcome['report']}")
    return 0


def _upcycle(args: argparse.Namespace) -> int:
    """Upcycle a dense LLaVA checkpoint (directory or Hub id) into AsyMoE; report its deviation from the source."""
    from .upcycling import format_deviation_report, parameter_counts, report_from_checkpoints, upcycle

    overrides = {}
    if args.num_experts_per_tok is not None:
        overrides["num_experts_per_tok"] = args.num_experts_per_tok
    if args.moe_layers is not None:
        overrides["moe_layers"] = [int(i) for i in args.moe_layers.split(",") if i.strip()]
    try:
        experts = [int(n) for n in args.experts.split(",")] if args.experts else None
        output = upcycle(
            args.source, args.output, moe_variant=args.variant, mode=args.mode, experts=experts,
            num_slices=args.num_slices, seed=args.seed, noise_std=args.noise_std, drop_ratio=args.drop_ratio,
            revision=args.revision, max_shard_size=args.max_shard_size, overwrite=args.overwrite, progress=True,
            **overrides,
        )
    except (ValueError, OSError) as err:  # bad input, existing or unwritable output, missing source
        print(f"asymoe upcycle: error: {err}", file=sys.stderr)
        return 2
    from . import AsyMoEConfig

    config = AsyMoEConfig.from_pretrained(output)
    counts = parameter_counts(config)
    print(f"wrote {output} ({args.variant}, {args.mode} mode): {counts['total']:,} parameters; language model "
          f"activates {counts['language_model_activated']:,} per token (dense source: "
          f"{counts['dense_language_model']:,})")
    for layer, layout in config.upcycling["layers"].items():
        groups = ("vision", "text", "inter", "evidence", "slices")
        print(f"  MoE layer {layer}: " + ", ".join(f"{k} {layout[k]}" for k in groups if k in layout))
    if args.report:
        print("deviation from the source on a probe input (fp32):")
        print(format_deviation_report(report_from_checkpoints(args.source, output, revision=args.revision)))
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `asymoe` parser; a toolkit command's module is imported only when it is `command` (the one to run)."""
    parser = argparse.ArgumentParser(prog="asymoe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help=_demo.__doc__, description=_demo.__doc__)
    demo.add_argument("--output", default="outputs/demo", help="working directory (default: %(default)s); "
                      "finished stages in it are reused")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    up = commands.add_parser("upcycle", help=_upcycle.__doc__, description=_upcycle.__doc__)
    up.add_argument("source", metavar="SRC", help="dense LlavaForConditionalGeneration: checkpoint dir or Hub id")
    up.add_argument("output", metavar="DST", help="directory of the AsyMoE checkpoint (written atomically)")
    up.add_argument("--variant", default="asymoe", choices=["dense", "vanilla", "modality", "asymoe"])
    up.add_argument("--mode", default="copy", choices=["copy", "partition"],
                    help="copy: experts = dense FFN (same logits); partition: experts take slices of it")
    up.add_argument("--experts", metavar="V,T,I,E", help="vision,text,inter,evidence experts per MoE layer")
    up.add_argument("--num-experts-per-tok", type=int, help="top-k (default 2)")
    up.add_argument("--moe-layers", metavar="L,L,...", help="MoE layers (default every other layer)")
    up.add_argument("--num-slices", type=int, help="partition mode: slices of the dense FFN")
    up.add_argument("--seed", type=int, default=0)
    up.add_argument("--noise-std", type=float, default=0.0, help="expert noise, relative to each matrix's std")
    up.add_argument("--drop-ratio", type=float, default=0.0, help="Drop-Upcycling: fraction of neurons re-drawn")
    up.add_argument("--revision", help="Hub revision of SRC")
    up.add_argument("--max-shard-size", default="5GB")
    up.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    up.add_argument("--no-report", dest="report", action="store_false",
                    help="skip the deviation report (it loads the source and the result, one at a time, in fp32)")
    up.set_defaults(func=_upcycle)
    for name, (module_name, summary) in TOOLKIT_COMMANDS.items():
        if name == command:
            _add_module_command(commands, name, module_name)
        else:
            commands.add_parser(name, help=summary)
    return parser


# Commands that need the toolkit (datasets, evaluate, peft, trl): their module is imported only when the command
# runs, so `asymoe upcycle` works with the model-only install.
TOOLKIT_COMMANDS = {
    "grounding": ("asymoe.eval.grounding", "generate the grounding benchmark"),
    "eval": ("asymoe.eval.runner", "evaluate a model on the benchmark suite"),
    "analyze": ("asymoe.eval.analysis", "per-layer evidence sensitivity, attention on the image and routing"),
    "merge-lora": ("asymoe.finetune.lora", "merge a PEFT adapter into a remote-code checkpoint"),
}


def _add_module_command(commands, name: str, module_name: str) -> None:
    """A subcommand whose arguments and body live in `module_name` (`configure_parser`, `run`)."""
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise SystemExit(
            f"asymoe {name}: error: this command needs the asymoe toolkit ({err.name or err} is not installed): "
            "pip install 'asymoe[toolkit]'"
        ) from err
    command = commands.add_parser(name, help=module.run.__doc__, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    module.configure_parser(command)
    command.set_defaults(func=module.run)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(command=argv[0] if argv else None).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
