"""The paper's comparison over seeds: dense vs vanilla MoE vs modality MoE vs AsyMoE, plus AsyMoE ablations.

Every seed runs the demo's stages (`asymoe.demo.run_comparison`): grounding data → a dense LLaVA trained without a
colour prior → upcycled (copy mode) into every variant → each model fine-tuned on the prior-biased split for the
same steps → evaluated on the prior-consistent, counter-prior and hierarchy splits. The table reports mean ± std
over seeds, per-seed values in comparison.json.

    python experiments/compare.py --scale cpu --seeds 0 1 2 --output outputs/compare-cpu
    python experiments/compare.py --scale gpu --seeds 0 1 2 --output outputs/compare-gpu   # one H100/H200

`--scale cpu` is the demo's size (minutes per seed on 2 cores); `--scale gpu` a wider, deeper decoder with more
data and steps (bf16, one GPU). Finished stages are reused, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

from asymoe.io import atomic_write_text
from asymoe.demo import SPLITS, START, ComparisonConfig, chance_accuracy, run_comparison
from asymoe.tiny import TINY_TEXT

SCALES = {
    "cpu": {},
    "gpu": {
        "pretrain_size": 40000, "pretrain_steps": 3000, "train_size": 20000, "test_size": 1000,
        "finetune_steps": 1000, "batch_size": 64, "eval_batch_size": 128, "analysis_rows": 256,
        "text_overrides": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
                           "num_attention_heads": 8, "num_key_value_heads": 4},
        "sft_args": ["--use_cpu", "false", "--bf16", "true"],
    },
}


def variants(num_layers: int) -> dict[str, dict]:
    """The baselines and the ablations of DESIGN §5, all upcycled from the same dense model."""
    moe_layers = list(range(1, num_layers, 2))
    return {
        "dense": {},
        "vanilla": {"moe_variant": "vanilla"},
        "modality": {"moe_variant": "modality"},
        "asymoe": {"moe_variant": "asymoe"},
        "asymoe-euclidean": {"moe_variant": "asymoe", "hyperbolic_inter": False},  # no hyperbolic
        "asymoe-no-evidence": {"moe_variant": "asymoe", "evidence_experts": False},
        "asymoe-lorentz": {"moe_variant": "asymoe", "manifold": "lorentz"},  # default: Poincaré
        "asymoe-evidence-all": {"moe_variant": "asymoe", "evidence_layers": moe_layers},  # default: deeper half
    }


def summarise(per_seed: dict[int, dict]) -> dict[str, dict]:
    """{model: {metric: {"mean", "std", "values"}}} over the seeds (std 0 with one seed)."""
    models = next(iter(per_seed.values()))
    summary = {}
    for model in models:
        metrics = {}
        for seed, results in per_seed.items():
            record = results[model]
            for split in SPLITS:
                values = record["results"][split]["metrics"]
                metrics.setdefault(split, []).append(values["exact_match"])
                if split == "grounding_hierarchy":
                    for level in ("leaf", "family"):
                        metrics.setdefault(f"hierarchy {level}", []).append(values[f"exact_match/level={level}"])
            if "training" in record:
                metrics.setdefault("samples/s", []).append(record["training"]["samples_per_second"])
        summary[model] = {name: {"mean": statistics.fmean(values),
                                 "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
                          for name, values in metrics.items()}
        summary[model]["parameters"] = results[model]["parameters"]
    return summary


def markdown(summary: dict, seeds: list[int]) -> str:
    columns = [*SPLITS, "hierarchy leaf", "hierarchy family", "samples/s"]
    header = [SPLITS.get(name, name) for name in columns]
    lines = [f"| model | {' | '.join(header)} | LM params activated / total |",
             "|---" * (len(columns) + 2) + "|"]
    for model, metrics in summary.items():
        cells = []
        for name in columns:
            if name not in metrics:
                cells.append("–")
            elif name == "samples/s":  # median: robust to a seed that shared the machine with another job
                cells.append(f"{statistics.median(metrics[name]['values']):,.0f}")
            else:
                cells.append(f"{metrics[name]['mean']:.3f} ± {metrics[name]['std']:.3f}")
        counts = metrics["parameters"]
        lines.append(f"| {model} | {' | '.join(cells)} | {counts['language_model_activated']:,} / "
                     f"{counts['language_model']:,} |")
    lines += ["", f"Mean ± sample std over seeds {seeds}; exact match; chance {chance_accuracy():.3f}. "
              f"`{START}`: the dense model before fine-tuning. samples/s: fine-tuning throughput (median over seeds)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/compare", help="one sub-directory per seed, tables at the top")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--only", nargs="+", metavar="MODEL", help="a subset of the models (names as in the table)")
    args = parser.parse_args(argv)

    base = ComparisonConfig()
    scale = SCALES[args.scale]
    num_layers = scale.get("text_overrides", {}).get("num_hidden_layers", TINY_TEXT["num_hidden_layers"])
    chosen = variants(num_layers)
    if args.only:
        unknown = [name for name in args.only if name not in chosen]
        if unknown:
            parser.error(f"--only {unknown}: not a model of the comparison; choose from {list(chosen)}")
        chosen = {name: chosen[name] for name in args.only}
    output = Path(args.output)
    per_seed = {}
    for seed in args.seeds:
        config = ComparisonConfig(**{**asdict(base), **scale, "output": str(output / f"seed{seed}"), "seed": seed,
                                     "variants": chosen})
        per_seed[seed] = run_comparison(config)["results"]
    summary = summarise(per_seed)
    atomic_write_text(output / "comparison.json", json.dumps(
        {"scale": args.scale, "seeds": args.seeds, "summary": summary, "command": " ".join(sys.argv)}, indent=2))
    table = markdown(summary, args.seeds)
    atomic_write_text(output / "comparison.md", table)
    print(table)
    print(f"wrote {output / 'comparison.md'} and comparison.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
