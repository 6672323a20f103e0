"""The main job, end to end on the embedded default: the paper's comparison at CPU scale.

1. data: the grounding benchmark (`asymoe.eval.grounding`): a balanced pre-training set (no colour prior) and the
   fine-tuning set with a strong shape→colour prior, plus its prior / counter-prior / hierarchy test splits;
2. dense: a tiny dense transformers LLaVA trained from scratch on the balanced set with the TRL SFT script, so it
   learns to read colours from the image;
3. upcycle: the dense checkpoint into each MoE variant (copy mode: the dense model's function);
4. finetune: every model — the dense one too — for the same steps on the prior-biased set: the setting where a
   language prior can take over from the image (DESIGN §1);
5. eval: every model (and the dense start) on the test splits; analysis: evidence sensitivity, attention on the
   image and routing per layer on the counter-prior split;
6. report: markdown + PNG plots.

Each stage writes into its own directory atomically; a re-run skips finished stages. `experiments/compare.py` runs
the same stages over seeds and ablations.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .io import atomic_directory, atomic_write_text

CHANCE = {"color": 1 / 6, "color_family": 1 / 2, "shape": 1 / 6, "shape_family": 1 / 3}
RECIPE = Path(importlib.import_module("asymoe.configuration").__file__).parent / "recipes" / "sft_tiny.yaml"
SPLITS = {"grounding_prior": "prior-consistent", "grounding_counter": "counter-prior",
          "grounding_hierarchy": "hierarchy"}
START = "dense (start)"  # the dense model before fine-tuning, evaluated as a reference


@dataclass
class ComparisonConfig:
    """Sizes and steps of one run of the comparison (defaults: the demo, a few minutes on 2 CPU cores)."""

    output: str = "outputs/demo"
    seed: int = 0
    pretrain_size: int = 6000
    pretrain_steps: int = 800
    prior_strength: float = 0.9
    train_size: int = 3000
    test_size: int = 240
    finetune_steps: int = 150
    batch_size: int = 32
    learning_rate: float = 2e-3
    finetune_learning_rate: float = 1e-3
    noise_std: float = 0.01
    variants: dict[str, dict] = field(default_factory=lambda: {
        "dense": {},
        "vanilla": {"moe_variant": "vanilla"},
        "modality": {"moe_variant": "modality"},
        "asymoe": {"moe_variant": "asymoe"},
    })
    text_overrides: dict = field(default_factory=dict)  # decoder size of the dense model (tiny default)
    eval_batch_size: int = 64
    analysis_rows: int = 96
    sft_args: list[str] = field(default_factory=list)  # more TRL SFT arguments, e.g. ["--bf16", "true"]

    def __post_init__(self):
        for name in ("pretrain_steps", "finetune_steps", "batch_size", "eval_batch_size", "analysis_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        if not self.variants:
            raise ValueError("variants is empty: name at least one model, e.g. {'dense': {}}.")
        if START in self.variants:
            raise ValueError(f"{START!r} is the name of the reference row; call the variant something else.")


def _stage(target: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp)` into a temporary sibling published as `target` (`atomic_directory`); skip when `target`
    exists."""
    if not target.exists():
        with atomic_directory(target) as temporary:
            build(temporary)
    return target


def _sft(model: Path, data: Path, output: Path, steps: int, learning_rate: float, config: ComparisonConfig) -> None:
    """The TRL SFT script on `data`'s train split; the throughput goes to `output/training.json`."""
    from .finetune.sft import main as sft_main

    trainer = sft_main([
        "--config", str(RECIPE), "--model_name_or_path", str(model), "--dataset_name", str(data),
        "--output_dir", str(output / "model"), "--max_steps", str(steps), "--learning_rate", str(learning_rate),
        "--asymoe_lr", str(learning_rate / 2), "--per_device_train_batch_size", str(config.batch_size),
        "--seed", str(config.seed), "--logging_steps", str(max(1, steps // 10)), "--disable_tqdm", "false",
        "--include_num_input_tokens_seen", "true",  # padded batch tokens (TrlParser reads the flag as a bool)
        *config.sft_args])
    summary = trainer.state.log_history[-1]  # the trainer's end-of-training record
    tokens = trainer.state.num_input_tokens_seen
    atomic_write_text(output / "training.json", json.dumps({
        "steps": trainer.state.global_step, "train_runtime": summary["train_runtime"],
        "samples_per_second": summary["train_samples_per_second"], "num_tokens": tokens,
        "tokens_per_second": tokens / summary["train_runtime"], "train_loss": summary["train_loss"]}, indent=2))


def _build_data(config: ComparisonConfig, target: Path) -> None:
    from .eval.grounding import GroundingConfig, build_grounding, save_grounding

    # Pre-training scenes: colours uniform (prior strength 1/6), drawn from their own seed.
    pretrain = GroundingConfig(seed=config.seed + 10_000, prior_strength=1 / 6, train_size=config.pretrain_size,
                               validation_size=0, test_size=0)
    save_grounding(build_grounding(pretrain), target / "pretrain", pretrain)
    grounding = GroundingConfig(seed=config.seed, prior_strength=config.prior_strength, train_size=config.train_size,
                                validation_size=0, test_size=config.test_size)
    save_grounding(build_grounding(grounding), target / "grounding", grounding)


def _build_dense(data: Path, config: ComparisonConfig, target: Path) -> None:
    from .eval.grounding import grounding_vocabulary
    from .finetune.data import SHORT_ANSWER_PROMPT
    from .tiny import build_tokenizer, tiny_llava

    tokenizer = build_tokenizer(grounding_vocabulary() + SHORT_ANSWER_PROMPT.split())
    torch.manual_seed(config.seed)
    model, processor = tiny_llava(tokenizer, **config.text_overrides)
    initial = target / "init"
    model.save_pretrained(initial)
    processor.save_pretrained(initial)
    _sft(initial, data, target, config.pretrain_steps, config.learning_rate, config)
    shutil.rmtree(initial)


def _upcycle_variant(dense: Path, overrides: dict, config: ComparisonConfig, target: Path) -> None:
    from .upcycling import upcycle

    upcycle(dense, target / "model", mode="copy", seed=config.seed, noise_std=config.noise_std, **overrides)


def _print(message: str) -> None:
    print(message, flush=True)  # in order with the progress bars (stderr) when stdout is a file


def run_comparison(config: ComparisonConfig, log: Callable[[str], None] = _print) -> dict:
    """All stages; returns {"results": {model: eval record}, "report": path}."""
    root = Path(config.output)
    started = time.perf_counter()
    timings = {}

    def stage(name: str, target: Path, build: Callable[[Path], None]) -> Path:
        done = target.exists()
        log(f"[{name}] {'reusing' if done else 'building'} {target}")
        t0 = time.perf_counter()
        _stage(target, build)
        if not done:
            timings[name] = round(time.perf_counter() - t0, 1)
        return target

    data = stage("data", root / "data", lambda tmp: _build_data(config, tmp))
    test_data = data / "grounding"
    dense = stage("dense", root / "dense", lambda tmp: _build_dense(data / "pretrain", config, tmp)) / "model"

    models = {START: dense}
    for name, overrides in config.variants.items():
        start = dense
        if overrides:
            start = stage(f"upcycle {name}", root / "upcycled" / name,
                          lambda tmp, o=overrides: _upcycle_variant(dense, o, config, tmp)) / "model"
        models[name] = stage(
            f"finetune {name}", root / "finetuned" / name,
            lambda tmp, s=start: _sft(s, test_data, tmp, config.finetune_steps,
                                      config.finetune_learning_rate, config)) / "model"

    results = {}
    for name, model_dir in models.items():
        target = stage(f"eval {name}", root / "eval" / _directory_name(name),
                       lambda tmp, m=model_dir: _evaluate(m, test_data, config, tmp))
        results[name] = json.loads((target / "results.json").read_text())
        if name != START:
            results[name]["training"] = json.loads((root / "finetuned" / name / "training.json").read_text())
    stage("analysis", root / "analysis", lambda tmp: _plot_analysis(root, results, tmp))
    report = write_report(root, config, results, timings, time.perf_counter() - started)
    log(f"[report] {report}")
    return {"results": results, "report": report}


def _directory_name(name: str) -> str:
    return name.replace(" ", "_").replace("(", "").replace(")", "")


def _evaluate(model_dir: Path, data: Path, config: ComparisonConfig, target: Path) -> None:
    """Accuracy on the test splits, parameter counts and the per-layer analysis on the counter-prior split."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .eval.analysis import analyze
    from .eval.grounding import load_grounding
    from .eval.runner import evaluate_model
    from .upcycling import model_parameter_counts

    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    results = evaluate_model(model, processor, ["grounding"], {"grounding": str(data)},
                             batch_size=config.eval_batch_size, max_new_tokens=2, output_dir=target)
    analysis = analyze(model, processor, load_grounding(data)["test_counter"], limit=config.analysis_rows,
                       batch_size=config.eval_batch_size)
    record = {"results": results, "parameters": model_parameter_counts(model), "analysis": analysis}
    atomic_write_text(target / "results.json", json.dumps(record, indent=2))


def _plot_analysis(root: Path, results: dict, target: Path) -> None:
    from .eval.analysis import plot_analysis

    plot_analysis({name: record["analysis"] for name, record in results.items()}, target)


def chance_accuracy() -> float:
    """Exact match of uniform guessing over each question's answer set, averaged over the question types."""
    return sum(CHANCE.values()) / len(CHANCE)


def accuracy_table(results: dict) -> list[str]:
    """Markdown rows: accuracy per split and hierarchy level, LM parameters activated / total and fine-tuning
    throughput, per model."""
    lines = ["| model | " + " | ".join(SPLITS.values()) + " | hierarchy leaf | hierarchy family | "
             "LM params activated / total | fine-tuning samples/s (tokens/s) |", "|---|---|---|---|---|---|---|---|"]
    for name, record in results.items():
        metrics = {split: record["results"][split]["metrics"] for split in SPLITS}
        hierarchy = metrics["grounding_hierarchy"]
        counts = record["parameters"]
        training = record.get("training")
        throughput = f"{training['samples_per_second']:.0f} ({training['tokens_per_second']:,.0f})" if training else "–"
        lines.append(
            f"| {name} | " + " | ".join(f"{metrics[s]['exact_match']:.3f}" for s in SPLITS) +
            f" | {hierarchy['exact_match/level=leaf']:.3f} | {hierarchy['exact_match/level=family']:.3f} | "
            f"{counts['language_model_activated']:,} / {counts['language_model']:,} | {throughput} |")
    return lines


def write_report(root: Path, config: ComparisonConfig, results: dict, timings: dict, seconds: float) -> Path:
    """report.md: the accuracy table and the plots (accuracy per split, analysis per layer, routing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    figure, axis = plt.subplots(figsize=(7.5, 3.6))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [results[name]["results"][split]["metrics"]["exact_match"] for split in SPLITS]
        axis.bar([j + i * width for j in range(len(SPLITS))], values, width, label=name)
    axis.axhline(chance_accuracy(), color="gray", linestyle="--", linewidth=1, label="chance")
    axis.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(SPLITS))], list(SPLITS.values()))
    axis.set_ylabel("exact match")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    figure.tight_layout()
    figure.savefig(root / "accuracy.png", dpi=120)
    plt.close(figure)

    plots = sorted(path.name for path in (root / "analysis").glob("*.png"))
    lines = [
        "# AsyMoE demo: dense vs vanilla MoE vs modality MoE vs AsyMoE (CPU scale)", "",
        f"A tiny dense LLaVA trained from scratch for {config.pretrain_steps} steps on {config.pretrain_size} "
        f"grounding scenes without a colour prior, upcycled (copy mode, expert noise {config.noise_std}) into each "
        f"MoE variant; every model, the dense one too, then fine-tuned {config.finetune_steps} steps (batch "
        f"{config.batch_size}, lr {config.finetune_learning_rate}) with the TRL SFT script on {config.train_size} "
        f"scenes where each shape has its default colour with probability {config.prior_strength} (seed "
        f"{config.seed}). Test splits of {config.test_size} rows; greedy answers, exact match. `{START}` is the "
        f"dense model before fine-tuning. Chance: {chance_accuracy():.3f} (uniform over each question's answers).",
        "", *accuracy_table(results), "", "![accuracy per split](accuracy.png)", "",
        f"Per layer on {config.analysis_rows} counter-prior rows (text tokens after the image; `asymoe analyze`): "
        "how much the FFN / MoE output changes when the image is blanked to its mean colour, the attention mass on "
        "image tokens, and for MoE models the routing by modality and group.", "",
        *[f"![{name}](analysis/{name})" for name in plots], "",
        "One seed, one run: differences of a few points between models are within seed noise at this scale "
        "(docs/experiments.md has several seeds).", "",
        f"Stage timings (s, this run): {json.dumps(timings)}; total {seconds:.0f} s.", "",
        "Configuration: `" + json.dumps(asdict(config)) + "`", "",
    ]
    return atomic_write_text(root / "report.md", "\n".join(lines))


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """`asymoe demo`'s arguments, on `parser` (the `asymoe` subcommand's) or a new parser."""
    parser = parser or argparse.ArgumentParser(prog="asymoe demo", description=__doc__)
    parser.add_argument("--output", default="outputs/demo", help="working directory (default: %(default)s); "
                        "finished stages in it are reused")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(args: argparse.Namespace) -> int:
    """The main job: grounding data → dense LLaVA → upcycled MoE variants → TRL fine-tuning → evaluation → report."""
    outcome = run_comparison(ComparisonConfig(output=args.output, seed=args.seed))
    print(f"report: {outcome['report']}")
    return 0
