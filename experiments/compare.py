"""The paper's comparison over seeds: dense vs vanilla MoE vs modality MoE vs AsyMoE, plus AsyMoE ablations.

Every seed runs the demo's stages (`asymoe.demo.run_comparison`): grounding and easy-vqa data → the dense start
(one for all seeds: the shipped one at the default settings) → upcycled (copy mode) into every variant → each model
fine-tuned on the prior-biased split, and separately on easy-vqa, for the same steps → evaluated. Writes
comparison.md / comparison.json (mean ± std over seeds, per-seed values, paired differences to the dense model and
to modality MoE with 95% t-intervals, the traces of the mechanism) and paired_differences.png.

    python experiments/compare.py --seeds 0 1 2 3 4 --output outputs/compare-cpu          # the reported run
    python experiments/compare.py --seeds 0 1 2 3 4 --validation-only --output outputs/tune  # tuning: test unread
    python experiments/compare.py --set prior_strength=0.95 --set finetune_steps=300 ...  # other settings
    python experiments/compare.py --variant 'asymoe-k1={"moe_variant": "asymoe", "num_experts_per_tok": 1}' ...

`--set FIELD=VALUE` overrides a `ComparisonConfig` field (VALUE as JSON); `--variant NAME=OVERRIDES` adds a model
upcycled with those config overrides. Finished stages are reused, so an interrupted run continues where it stopped.
`--scale gpu`: a wider, deeper decoder with more data and steps (bf16, one GPU; not run yet).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, fields
from pathlib import Path

from asymoe.demo import START, ComparisonConfig, accuracies, chance_accuracy, run_comparison, traces
from asymoe.io import atomic_save_figure, atomic_write_text
from asymoe.tiny import TINY_TEXT

SCALES = {
    "cpu": {},
    "gpu": {
        "pretrain_size": 40000, "pretrain_steps": 6000, "train_size": 20000, "test_size": 1000,
        "validation_size": 1000, "finetune_steps": 1000, "easy_vqa_steps": 1000, "easy_vqa_train_size": 38575,
        "easy_vqa_test_size": None, "batch_size": 64, "eval_batch_size": 128, "analysis_rows": 256,
        "text_overrides": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
                           "num_attention_heads": 8, "num_key_value_heads": 4},
        "sft_args": ["--use_cpu", "false", "--bf16", "true"],
    },
}
REFERENCES = ("dense", "modality")  # paired differences are taken to these models of the same seed
PAIRED_METRICS = ("counter-prior", "prior-consistent", "balanced", "hierarchy", "easy-vqa")


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


def t_quantile(probability: float, df: int) -> float:
    """Student-t quantile (0.5 < probability < 1) by bisection on its CDF, integrated with Simpson's rule."""
    constant = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))

    def cdf(x: float, intervals: int = 2000) -> float:
        density = [constant * (1 + (x * i / intervals) ** 2 / df) ** (-(df + 1) / 2) for i in range(intervals + 1)]
        weights = [1 if i in (0, intervals) else 4 if i % 2 else 2 for i in range(intervals + 1)]
        return 0.5 + sum(w * d for w, d in zip(weights, density)) * x / intervals / 3

    low, high = 0.0, 1000.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < probability else (low, middle)
    return (low + high) / 2


def interval(values: list[float], confidence: float = 0.95) -> dict:
    """Mean, sample std and the t-interval of the mean (None with one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "std": 0.0, "low": None, "high": None, "values": values}
    std = statistics.stdev(values)
    half = t_quantile((1 + confidence) / 2, len(values) - 1) * std / math.sqrt(len(values))
    return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "values": values}


def summarise(per_seed: dict[int, dict], part: str) -> dict:
    """Per model: accuracies (and the traces) with mean/std/interval over seeds; paired differences of each model
    to each reference, seed by seed, with their t-intervals; the dense model's drop from the start."""
    models = list(next(iter(per_seed.values())))
    values = {model: {} for model in models}
    for results in per_seed.values():
        for model in models:
            record = results[model]
            row = accuracies(record, part)
            if model != START:
                row.update(traces(record, results[START]))
                row["samples/s"] = record["training"]["samples_per_second"]
            for name, value in row.items():
                values[model].setdefault(name, []).append(value)
    summary = {model: {name: interval(series) for name, series in metrics.items() if None not in series}
               for model, metrics in values.items()}
    for model in models:
        summary[model]["parameters"] = next(iter(per_seed.values()))[model]["parameters"]
    paired = {}
    for reference in (r for r in REFERENCES if r in models):
        paired[reference] = {}
        for model in models:
            if model in (reference, START):
                continue
            paired[reference][model] = {
                metric: interval([a - b for a, b in zip(values[model][metric], values[reference][metric])])
                for metric in (*PAIRED_METRICS, "ΔS deep") if metric in values[model] and metric in values[reference]
                and None not in values[model][metric] + values[reference][metric]}
    if "dense" in models:
        paired["start"] = {"dense": {metric: interval([a - b for a, b in zip(values["dense"][metric],
                                                                           values[START][metric])])
                                     for metric in ("counter-prior", "prior-consistent", "balanced", "hierarchy")}}
    return {"models": summary, "paired": paired}


def _mean_std(stats: dict, digits: int = 3) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _paired_cell(stats: dict) -> str:
    if stats["low"] is None:
        return f"{stats['mean']:+.3f}"
    return f"{stats['mean']:+.3f} [{stats['low']:+.3f}, {stats['high']:+.3f}]"


def markdown(summary: dict, seeds: list[int], part: str) -> str:
    models = summary["models"]
    columns = ["balanced", "prior-consistent", "counter-prior", "hierarchy", "hierarchy leaf", "hierarchy family",
               "easy-vqa"]
    lines = [f"| model | {' | '.join(columns)} | samples/s | LM params activated / total |",
             "|---" * (len(columns) + 3) + "|"]
    for model, metrics in models.items():
        cells = [_mean_std(metrics[c]) if c in metrics else "–" for c in columns]
        speed = f"{statistics.median(metrics['samples/s']['values']):,.0f}" if "samples/s" in metrics else "–"
        counts = metrics["parameters"]
        lines.append(f"| {model} | {' | '.join(cells)} | {speed} | {counts['language_model_activated']:,} / "
                     f"{counts['language_model']:,} |")
    lines += ["", f"Mean ± sample std over seeds {seeds}; exact match on the {part} splits (easy-vqa: its test "
              f"questions); chance {chance_accuracy():.3f}. `{START}`: the dense model before fine-tuning. "
              "samples/s: prior fine-tuning throughput (median over seeds).", ""]
    for reference, rows in summary["paired"].items():
        title = "the dense start (the drop under prior fine-tuning)" if reference == "start" else reference
        metrics = [m for m in (*PAIRED_METRICS, "ΔS deep") if any(m in row for row in rows.values())]
        lines += [f"Paired differences to {title}, seed by seed: mean [95% t-interval].", "",
                  f"| model | {' | '.join(metrics)} |", "|---" * (len(metrics) + 1) + "|"]
        for model, row in rows.items():
            cells = [_paired_cell(row[m]) if m in row else "–" for m in metrics]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Counter-prior accuracy per seed:", "", f"| model | {' | '.join(f'seed {s}' for s in seeds)} |",
              "|---" * (len(seeds) + 1) + "|"]
    lines += [f"| {model} | " + " | ".join(f"{v:.3f}" for v in metrics["counter-prior"]["values"]) + " |"
              for model, metrics in models.items()]
    trace_names = ["evidence share", "evidence share (training)", "gate g", "injection", "‖W_o‖", "ΔS deep",
                   "inter share family", "inter share leaf", "‖β‖", "c"]
    lines += ["", "Traces (validation splits), mean ± std over seeds (– : the model has no such part):", "",
              f"| model | {' | '.join(trace_names)} |", "|---" * (len(trace_names) + 1) + "|"]
    for model, metrics in models.items():
        if model != START:
            lines.append(f"| {model} | " + " | ".join(_mean_std(metrics[t]) if t in metrics else "–"
                                                      for t in trace_names) + " |")
    return "\n".join(lines) + "\n"


def plot_paired(summary: dict, path: Path) -> Path:
    """Per reference (columns) and metric (rows: counter-prior, easy-vqa): each model's paired differences, the
    seeds as dots and the mean with its 95% t-interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    references = [r for r in REFERENCES if r in summary["paired"]]
    metrics = ("counter-prior", "easy-vqa")
    figure, axes = plt.subplots(len(metrics), len(references), figsize=(5.2 * len(references), 3.4 * len(metrics)),
                                squeeze=False)
    for column, reference in enumerate(references):
        rows = summary["paired"][reference]
        for row, metric in enumerate(metrics):
            axis = axes[row][column]
            names = [name for name, stats in rows.items() if metric in stats]
            for y, name in enumerate(names):
                stats = rows[name][metric]
                axis.scatter(stats["values"], [y] * len(stats["values"]), s=12, color="gray", alpha=0.7)
                low, high = stats["low"], stats["high"]
                error = None if low is None else [[stats["mean"] - low], [high - stats["mean"]]]
                axis.errorbar(stats["mean"], y, xerr=error, fmt="o", color="C0", capsize=3)
            axis.axvline(0, color="black", linewidth=0.8)
            axis.set_yticks(range(len(names)), names, fontsize=8)
            axis.set_title(f"{metric}: model − {reference}", fontsize=10)
            axis.set_xlabel("paired difference (exact match)")
    figure.suptitle("Per-seed paired differences (dots) and mean with 95% t-interval", fontsize=10)
    figure.tight_layout()
    return atomic_save_figure(figure, path)


def _key_value(text: str) -> tuple[str, object]:
    key, separator, value = text.partition("=")
    if not separator:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/compare", help="one sub-directory per seed, tables at the top")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--only", nargs="+", metavar="MODEL", help="a subset of the models (names as in the table)")
    parser.add_argument("--validation-only", action="store_true",
                        help="a tuning run: evaluate on the validation splits, never read the test splits")
    parser.add_argument("--from-scratch", action="store_true",
                        help="train the dense start instead of copying the shipped one")
    parser.add_argument("--set", type=_key_value, action="append", default=[], metavar="FIELD=VALUE",
                        help="override a ComparisonConfig field (VALUE as JSON)")
    parser.add_argument("--variant", type=_key_value, action="append", default=[], metavar="NAME=OVERRIDES",
                        help="add a model upcycled with these config overrides (JSON object)")
    args = parser.parse_args(argv)

    scale = SCALES[args.scale]
    settings = {**scale, **dict(args.set)}
    known = {f.name for f in fields(ComparisonConfig)} - {"output", "seed", "variants", "read_test", "from_scratch"}
    if unknown := sorted(set(dict(args.set)) - known):
        parser.error(f"--set {unknown}: not a ComparisonConfig field; choose from {sorted(known)}")
    num_layers = settings.get("text_overrides", {}).get("num_hidden_layers", TINY_TEXT["num_hidden_layers"])
    chosen = {**variants(num_layers), **dict(args.variant)}
    if args.only:
        if unknown := [name for name in args.only if name not in chosen]:
            parser.error(f"--only {unknown}: not a model of the comparison; choose from {list(chosen)}")
        chosen = {name: chosen[name] for name in args.only}
    output = Path(args.output)
    per_seed = {}
    for seed in args.seeds:
        config = ComparisonConfig(**{**asdict(ComparisonConfig()), **settings, "output": str(output / f"seed{seed}"),
                                     "seed": seed, "variants": chosen, "read_test": not args.validation_only,
                                     "from_scratch": args.from_scratch})
        per_seed[seed] = run_comparison(config)["results"]
    part = "validation" if args.validation_only else "test"
    summary = summarise(per_seed, part)
    atomic_write_text(output / "comparison.json", json.dumps(
        {"scale": args.scale, "seeds": args.seeds, "part": part, "settings": settings, "variants": chosen,
         "summary": summary, "command": " ".join(sys.argv)}, indent=2))
    table = markdown(summary, args.seeds, part)
    atomic_write_text(output / "comparison.md", table)
    if any(reference in summary["paired"] for reference in REFERENCES):
        plot_paired(summary, output / "paired_differences.png")
    print(table)
    print(f"wrote {output / 'comparison.md'}, comparison.json and paired_differences.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
