"""`asymoe upcycle SRC DST`: upcycle a dense LLaVA / LLaVA-NeXT / LLaVA-OneVision checkpoint (directory or Hub id)
into AsyMoE and report its deviation from the source. Needs only the model install (torch, transformers)."""

from __future__ import annotations

import argparse
import sys


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """`asymoe upcycle`'s arguments, on `parser` (the `asymoe` subcommand's) or a new parser."""
    parser = parser or argparse.ArgumentParser(prog="asymoe upcycle", description=__doc__)
    parser.add_argument("source", metavar="SRC", help="dense LlavaForConditionalGeneration: checkpoint dir or Hub id")
    parser.add_argument("output", metavar="DST", help="directory of the AsyMoE checkpoint (written atomically)")
    parser.add_argument("--variant", default="asymoe", choices=["dense", "vanilla", "modality", "asymoe"])
    parser.add_argument("--mode", default="copy", choices=["copy", "partition"],
                        help="copy: experts = dense FFN (same logits); partition: experts take slices of it")
    parser.add_argument("--experts", metavar="V,T,I,E", help="vision,text,inter,evidence experts per MoE layer")
    parser.add_argument("--num-experts-per-tok", type=int, help="top-k (default 2)")
    parser.add_argument("--moe-layers", metavar="L,L,...", help="MoE layers (default every other layer)")
    parser.add_argument("--num-slices", type=int, help="partition mode: slices of the dense FFN")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-std", type=float, default=0.0, help="expert noise, relative to each matrix's std")
    parser.add_argument("--drop-ratio", type=float, default=0.0, help="Drop-Upcycling: fraction of neurons re-drawn")
    parser.add_argument("--revision", help="Hub revision of SRC")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="skip the deviation report (it loads the source and the result, one at a time, in fp32)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Upcycle SRC into an AsyMoE checkpoint at DST; print its layout and (unless --no-report) its deviation."""
    from .. import AsyMoEConfig
    from . import format_deviation_report, parameter_counts, report_from_checkpoints, upcycle

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
