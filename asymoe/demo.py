"""The main job, end to end on the embedded default: the paper's comparison at CPU scale.

1. data: the grounding benchmark (`asymoe.eval.grounding`): the fine-tuning set with a shape→colour prior and its
   validation and test splits (prior-consistent, counter-prior, hierarchy); easy-vqa's own train and test
   questions, the external check;
2. dense: the dense start (`asymoe.dense_start`): on balanced scenes (no prior), vision pretraining, then the TRL SFT
   script with the tower frozen; one dense start for every seed (the shipped copy at the default settings);
3. upcycle: the dense start into each MoE variant (copy mode: the dense model's function);
4. finetune: every model, the dense one too, for the same steps on the prior-biased set — the setting where a
   language prior can take over from the image (DESIGN §1); easy_vqa: the same starts fine-tuned on easy-vqa instead;
5. eval: accuracy on the validation splits, on the test splits (read once; not in tuning runs, `read_test=False`)
   and on easy-vqa's test questions; the mechanism traced on the validation splits (`asymoe.eval.analysis`):
   evidence sensitivity, attention on the image, routing, the evidence readout's gate and W_o, hyperbolic parameters;
6. report: markdown + PNG plots.

Each stage writes into its own directory atomically; a re-run skips finished stages. `experiments/compare.py` runs
the same stages over seeds and ablations.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .io import atomic_directory, atomic_save_figure, atomic_write_text

CHANCE = {"color": 1 / 6, "color_family": 1 / 2, "shape": 1 / 6, "shape_family": 1 / 3}
RECIPE = Path(importlib.import_module("asymoe.configuration").__file__).parent / "recipes" / "sft_tiny.yaml"
KINDS = {"balanced": "balanced", "prior": "prior-consistent", "counter": "counter-prior", "hierarchy": "hierarchy"}
START = "dense (start)"  # the dense model before fine-tuning, evaluated as a reference
# The dense start's CLIP tower: 8x8 patches of 4 pixels (64 image tokens), width 64, both layers read.
DENSE_VISION = {"image_size": 32, "patch_size": 4, "hidden_size": 64, "intermediate_size": 128}


def split_task(kind: str, part: str) -> str:
    """The evaluation task of a grounding split kind (`KINDS`) in `part` (test or validation)."""
    return f"grounding_{kind}" if part == "test" else f"grounding_validation_{kind}"


@dataclass
class ComparisonConfig:
    """Sizes and steps of one run of the comparison (defaults: the demo, minutes on 2 CPU cores).

    The dense-start fields (dense_seed to learning_rate) define the dense model; `dense_settings()` lists them."""

    output: str = "outputs/demo"
    seed: int = 0  # data, upcycling noise and fine-tuning of this run
    from_scratch: bool = False  # train the dense start even where the shipped one was trained with these settings
    read_test: bool = True  # False: a tuning run, evaluated on the validation splits only
    # The dense start: one checkpoint shared by every seed of the comparison, as upcycling starts from one
    # released dense model (`dense_seed` 0 at these settings: the shipped copy).
    dense_seed: int = 0
    vision: dict = field(default_factory=lambda: dict(DENSE_VISION))  # CLIP tower fields (asymoe.tiny.tiny_llava)
    vision_feature_layer: int = -1
    text_overrides: dict = field(default_factory=dict)  # decoder size of the dense model (tiny default)
    pretrain_size: int = 24000
    pretrain_distractor_rate: float = 0.8  # two-object scenes: where reading the right object is learnt
    vision_pretrain_steps: int = 1500
    vision_learning_rate: float = 2e-3
    pretrain_steps: int = 6000
    learning_rate: float = 2e-3
    # Prior fine-tuning.
    prior_strength: float = 1.0  # every fine-tuning scene agrees with the prior (chosen on validation: experiments.md)
    train_size: int = 3000
    finetune_steps: int = 150
    finetune_learning_rate: float = 4e-3
    noise_std: float = 0.01
    # easy-vqa, the external check.
    easy_vqa_train_size: int = 4800
    easy_vqa_steps: int = 150
    easy_vqa_test_size: int | None = 1000  # None: the whole test split (9,673 questions)
    # Evaluation and shared settings.
    validation_size: int = 240
    test_size: int = 240
    batch_size: int = 32
    variants: dict[str, dict] = field(default_factory=lambda: {
        "dense": {},
        "vanilla": {"moe_variant": "vanilla"},
        "modality": {"moe_variant": "modality"},
        "asymoe": {"moe_variant": "asymoe"},
    })
    eval_batch_size: int = 64
    analysis_rows: int = 96
    sft_args: list[str] = field(default_factory=list)  # more TRL SFT arguments, e.g. ["--bf16", "true"]

    def __post_init__(self):
        for name in ("vision_pretrain_steps", "pretrain_steps", "finetune_steps", "easy_vqa_steps", "batch_size",
                     "eval_batch_size", "analysis_rows", "validation_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        if not self.variants:
            raise ValueError("variants is empty: name at least one model, e.g. {'dense': {}}.")
        if START in self.variants:
            raise ValueError(f"{START!r} is the name of the reference row; call the variant something else.")

    def dense_settings(self) -> dict:
        """Everything the dense start depends on (the shipped copy is used only where these match)."""
        from .dense_start import vocabulary

        names = ("dense_seed", "vision", "vision_feature_layer", "text_overrides", "pretrain_size",
                 "pretrain_distractor_rate", "vision_pretrain_steps", "vision_learning_rate", "pretrain_steps",
                 "learning_rate", "batch_size", "sft_args")
        return {**{name: getattr(self, name) for name in names}, "vocabulary": vocabulary()}


def _stage(target: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp)` into a temporary sibling published as `target` (`atomic_directory`); skip when `target`
    exists."""
    if not target.exists():
        with atomic_directory(target) as temporary:
            build(temporary)
    return target


def run_sft(model: Path, data: Path, output: Path, steps: int, learning_rate: float, seed: int,
            config: ComparisonConfig) -> None:
    """The TRL SFT script on `data`'s train split with the vision tower frozen (pretrained before, as LLaVA keeps
    CLIP); the throughput goes to `output/training.json`."""
    from .finetune.sft import main as sft_main

    trainer = sft_main([
        "--config", str(RECIPE), "--model_name_or_path", str(model), "--dataset_name", str(data),
        "--output_dir", str(output / "model"), "--max_steps", str(steps), "--learning_rate", str(learning_rate),
        "--asymoe_lr", str(learning_rate / 2), "--per_device_train_batch_size", str(config.batch_size),
        "--seed", str(seed), "--logging_steps", str(max(1, steps // 10)), "--disable_tqdm", "false",
        "--include_num_input_tokens_seen", "true",  # padded batch tokens (TrlParser reads the flag as a bool)
        "--freeze", "vision", *config.sft_args])
    summary = trainer.state.log_history[-1]  # the trainer's end-of-training record
    tokens = trainer.state.num_input_tokens_seen
    atomic_write_text(output / "training.json", json.dumps({
        "steps": trainer.state.global_step, "train_runtime": summary["train_runtime"],
        "samples_per_second": summary["train_samples_per_second"], "num_tokens": tokens,
        "tokens_per_second": tokens / summary["train_runtime"], "train_loss": summary["train_loss"]}, indent=2))


def _build_data(config: ComparisonConfig, target: Path) -> None:
    from datasets import DatasetDict

    from .eval.easy_vqa import load_easy_vqa
    from .eval.grounding import GroundingConfig, build_grounding, save_grounding

    grounding = GroundingConfig(seed=config.seed, prior_strength=config.prior_strength,
                                image_size=config.vision["image_size"], train_size=config.train_size,
                                validation_size=config.validation_size,
                                test_size=config.test_size if config.read_test else 0)
    save_grounding(build_grounding(grounding), target / "grounding", grounding)
    easy_train = load_easy_vqa("train", limit=config.easy_vqa_train_size, seed=config.seed)
    DatasetDict({"train": easy_train}).save_to_disk(str(target / "easy_vqa"))
    # One fixed sample of easy-vqa's test split for every seed (the whole split with easy_vqa_test_size=None).
    load_easy_vqa("test", limit=config.easy_vqa_test_size, seed=0).save_to_disk(str(target / "easy_vqa_test"))


def _build_dense(config: ComparisonConfig, target: Path, log: Callable[[str], None]) -> None:
    """The shipped dense start where it was trained with these settings, otherwise trained from scratch."""
    from .dense_start import shipped_dense_start, train_dense_start

    shipped = None if config.from_scratch else shipped_dense_start(config.dense_settings())
    if shipped is None:
        train_dense_start(config, target, log)
        return
    log(f"[dense] copying the shipped dense start {shipped} (trained with these settings; hash checked)")
    shutil.copytree(shipped, target / "model")


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
    dense = stage("dense", root / "dense", lambda tmp: _build_dense(config, tmp, log)) / "model"

    models = {START: (dense, None)}
    for name, overrides in config.variants.items():
        start = dense
        if overrides:
            start = stage(f"upcycle {name}", root / "upcycled" / name,
                          lambda tmp, o=overrides: _upcycle_variant(dense, o, config, tmp)) / "model"
        tuned = {}
        for branch, data_dir, steps in (("finetuned", data / "grounding", config.finetune_steps),
                                        ("easy_vqa", data / "easy_vqa", config.easy_vqa_steps)):
            tuned[branch] = stage(f"{branch} {name}", root / branch / name, lambda tmp, s=start, d=data_dir, n=steps:
                                  run_sft(s, d, tmp, n, config.finetune_learning_rate, config.seed, config)) / "model"
        models[name] = (tuned["finetuned"], tuned["easy_vqa"])

    results = {}
    evaluation = root / ("eval" if config.read_test else "eval-validation")
    for name, (model_dir, easy_dir) in models.items():
        target = stage(f"eval {name}", evaluation / _directory_name(name),
                       lambda tmp, m=model_dir, e=easy_dir: _evaluate(m, e, data, config, tmp))
        results[name] = json.loads((target / "results.json").read_text())
        if name != START:
            for branch, key in (("finetuned", "training"), ("easy_vqa", "easy_vqa_training")):
                results[name][key] = json.loads((root / branch / name / "training.json").read_text())
            results[name]["training_routing"] = _read_json(root / "finetuned" / name / "model" / "routing.json")
    stage("analysis", evaluation / "analysis",
          lambda tmp: _plot_analysis({name: record["analysis"]["counter"] for name, record in results.items()}, tmp))
    report = write_report(root, evaluation, config, results, timings, time.perf_counter() - started)
    log(f"[report] {report}")
    return {"results": results, "report": report}


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _directory_name(name: str) -> str:
    return name.replace(" ", "_").replace("(", "").replace(")", "")


def _load(model_dir: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return (AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True),
            AutoProcessor.from_pretrained(model_dir, trust_remote_code=True))


def _evaluate(model_dir: Path, easy_vqa_dir: Path | None, data: Path, config: ComparisonConfig, target: Path) -> None:
    """Accuracy on the grounding splits (in test runs also on easy-vqa's test questions, for the easy-vqa model),
    parameter counts, and the traces on the validation splits: counter-prior rows, and hierarchy rows per level."""
    from .eval.analysis import analyze
    from .eval.grounding import load_grounding
    from .eval.runner import evaluate_model
    from .upcycling import model_parameter_counts

    model, processor = _load(model_dir)
    tasks = ["grounding_validation", *(["grounding"] if config.read_test else [])]
    results = evaluate_model(model, processor, tasks, {"grounding": str(data / "grounding")},
                             batch_size=config.eval_batch_size, max_new_tokens=2, output_dir=target)
    splits = load_grounding(data / "grounding")
    hierarchy = splits["validation_hierarchy"]
    analysis = {"counter": analyze(model, processor, splits["validation_counter"], limit=config.analysis_rows,
                                   batch_size=config.eval_batch_size)}
    for level in ("leaf", "family"):
        rows = hierarchy.filter(lambda row, lv=level: row["level"] == lv, input_columns=None)
        analysis[level] = analyze(model, processor, rows, limit=config.analysis_rows // 2,
                                  batch_size=config.eval_batch_size)
    record = {"results": results, "parameters": model_parameter_counts(model), "analysis": analysis}
    if easy_vqa_dir is not None and config.read_test:  # easy-vqa has no validation split: test runs only
        model, processor = _load(easy_vqa_dir)
        record["results"].update(evaluate_model(
            model, processor, ["easy_vqa"], {"easy_vqa": str(data / "easy_vqa_test")},
            batch_size=config.eval_batch_size, max_new_tokens=2, output_dir=target))
    atomic_write_text(target / "results.json", json.dumps(record, indent=2))


def _plot_analysis(analyses: dict, target: Path) -> None:
    from .eval.analysis import plot_analysis

    plot_analysis(analyses, target)


def chance_accuracy() -> float:
    """Exact match of uniform guessing over each question's answer set, averaged over the question types."""
    return sum(CHANCE.values()) / len(CHANCE)


def accuracies(record: dict, part: str) -> dict[str, float]:
    """{column: exact match} of one model's record: the three split kinds, the hierarchy split's leaf and family
    questions (of `part`: test or validation) and easy-vqa (where the model has an easy-vqa branch)."""
    results = record["results"]
    values = {label: results[split_task(kind, part)]["metrics"]["exact_match"] for kind, label in KINDS.items()}
    hierarchy = results[split_task("hierarchy", part)]["metrics"]
    values.update({f"hierarchy {level}": hierarchy[f"exact_match/level={level}"] for level in ("leaf", "family")})
    if "easy_vqa" in results:
        values["easy-vqa"] = results["easy_vqa"]["metrics"]["exact_match"]
    return values


def deep_layers(num_layers: int) -> list[int]:
    """The deeper half of the decoder, where DESIGN §1 expects the language side to lose the image."""
    return list(range(num_layers // 2, num_layers))


def traces(record: dict, start: dict) -> dict[str, float | None]:
    """The mechanism of one model in numbers (validation splits), next to the dense start's `start` record:

    - `evidence share`: share of text tokens' top-k slots the evidence experts get (evidence layers, eval rows);
      `evidence share (training)`: the same over the prior fine-tuning (routing callback);
    - `gate g`, `injection`, `‖W_o‖`: the evidence readout's reliance gate, ‖g W_o r‖ / ‖h‖ and ‖W_o‖_F
      (W_o starts at 0), on text tokens after the image, averaged over evidence layers;
    - `ΔS deep`: evidence sensitivity of the deeper half of the decoder minus the dense start's (counter-prior rows):
      how much prior fine-tuning made the deep layers ignore the image;
    - `inter share family` / `leaf`: share of text tokens' top-k slots on the inter-modality experts on hierarchy
      questions at each level; `‖β‖`, `c`: mean Möbius-bias norm and curvature of the hyperbolic experts."""
    counter = record["analysis"]["counter"]
    layers = counter["layers"]
    deep = deep_layers(len(layers))

    def mean(values):
        values = [value for value in values if value is not None]
        return statistics.fmean(values) if values else None

    def sensitivity(analysis):
        return mean(analysis["layers"][layer]["evidence_sensitivity"] for layer in deep)

    def group_share(routing, group, layers_wanted=None):
        return mean(entry["text"]["group_load"].get(group) for entry in routing
                    if layers_wanted is None or entry["layer"] in layers_wanted)

    evidence_layers = counter["model"]["evidence_layers"]
    asymmetric = counter["model"]["moe_variant"] == "asymoe"  # vanilla MoE's shared experts are not inter experts
    readouts = [entry["evidence_readout"] for entry in layers if "evidence_readout" in entry]
    hyperbolic = [entry["hyperbolic"] for entry in layers if "hyperbolic" in entry]
    training = record.get("training_routing") or []
    return {
        "evidence share": group_share(counter["routing"], "evidence", evidence_layers) if evidence_layers else None,
        "evidence share (training)":
            group_share(training, "evidence", evidence_layers) if evidence_layers and training else None,
        "gate g": mean(r["gate"] for r in readouts),
        "injection": mean(r["injection"] for r in readouts),
        "‖W_o‖": mean(r["w_o_norm"] for r in readouts),
        "ΔS deep": sensitivity(counter) - sensitivity(start["analysis"]["counter"]),
        "inter share family": group_share(record["analysis"]["family"]["routing"], "inter") if asymmetric else None,
        "inter share leaf": group_share(record["analysis"]["leaf"]["routing"], "inter") if asymmetric else None,
        "‖β‖": mean(mean(h["mobius_bias_norm"].values()) for h in hyperbolic),
        "c": mean(h["curvature"] for h in hyperbolic),
    }


def _cell(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def accuracy_table(results: dict, part: str) -> list[str]:
    """Markdown rows: accuracy per split, hierarchy level and easy-vqa, LM parameters activated / total and
    fine-tuning throughput, per model."""
    columns = [*KINDS.values(), "hierarchy leaf", "hierarchy family", "easy-vqa"]
    lines = ["| model | " + " | ".join(columns) + " | LM params activated / total | fine-tuning samples/s |",
             "|---" * (len(columns) + 3) + "|"]
    for name, record in results.items():
        values = accuracies(record, part)
        counts = record["parameters"]
        training = record.get("training")
        throughput = f"{training['samples_per_second']:.0f}" if training else "–"
        lines.append(f"| {name} | " + " | ".join(_cell(values.get(column)) for column in columns) +
                     f" | {counts['language_model_activated']:,} / {counts['language_model']:,} | {throughput} |")
    return lines


def trace_table(rows: dict[str, dict]) -> list[str]:
    """Markdown rows of `traces` per model."""
    columns = list(next(iter(rows.values())))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(values[column]) for column in columns) + " |")
    return lines


def write_report(root: Path, evaluation: Path, config: ComparisonConfig, results: dict, timings: dict,
                 seconds: float) -> Path:
    """report.md: the accuracy table, the traces and the plots (accuracy per split, analysis per layer, routing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = "test" if config.read_test else "validation"
    names = list(results)
    columns = list(KINDS.values())
    figure, axis = plt.subplots(figsize=(7.5, 3.6))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = accuracies(results[name], part)
        axis.bar([j + i * width for j in range(len(columns))], [values[c] for c in columns], width, label=name)
    axis.axhline(chance_accuracy(), color="gray", linestyle="--", linewidth=1, label="chance")
    axis.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(columns))], columns)
    axis.set_ylabel(f"exact match ({part} splits)")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    figure.tight_layout()
    atomic_save_figure(figure, evaluation / "accuracy.png")

    start = results[START]
    plots = sorted(path.name for path in (evaluation / "analysis").glob("*.png"))
    relative = evaluation.relative_to(root)
    lines = [
        "# AsyMoE demo: dense vs vanilla MoE vs modality MoE vs AsyMoE (CPU scale)", "",
        f"`{START}`: a tiny dense LLaVA whose CLIP tower was pretrained on patch shape and colour labels "
        f"({config.vision_pretrain_steps} steps), then trained with the TRL SFT script for {config.pretrain_steps} "
        f"steps on {config.pretrain_size} balanced scenes (no colour prior), tower frozen. It is upcycled (copy mode, "
        f"expert noise {config.noise_std}) into each MoE variant; every model, the dense one too, is then fine-tuned "
        f"{config.finetune_steps} steps (batch {config.batch_size}, lr {config.finetune_learning_rate}) with the TRL "
        f"SFT script on {config.train_size} scenes where each shape has its default colour with probability "
        f"{config.prior_strength}, and, separately, {config.easy_vqa_steps} steps on easy-vqa's train questions "
        f"(easy-vqa column: its test questions). Seed {config.seed}; {part} splits of "
        f"{config.test_size if config.read_test else config.validation_size} rows; greedy answers, exact match. "
        f"Chance: {chance_accuracy():.3f} (uniform over each question's answers).",
        "", *accuracy_table(results, part), "", f"![accuracy per split]({relative}/accuracy.png)", "",
        "The mechanism on the validation splits (docs/experiments.md explains each column):", "",
        *trace_table({name: traces(record, start) for name, record in results.items() if name != START}), "",
        f"Per layer on {config.analysis_rows} validation counter-prior rows (text tokens after the image; "
        "`asymoe analyze`): how much the FFN / MoE output changes when the image is blanked to its mean colour, the "
        "attention mass on image tokens, and for MoE models the routing by modality and group.", "",
        *[f"![{name}]({relative}/analysis/{name})" for name in plots], "",
        "One seed; docs/experiments.md has the same protocol over seeds, with paired intervals.", "",
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
    parser.add_argument("--from-scratch", action="store_true",
                        help="train the dense start instead of using the shipped one (seed 0 at the defaults)")
    return parser


def main(args: argparse.Namespace) -> int:
    """The main job: grounding data → dense LLaVA → upcycled MoE variants → TRL fine-tuning → evaluation → report."""
    outcome = run_comparison(ComparisonConfig(output=args.output, seed=args.seed, from_scratch=args.from_scratch))
    print(f"report: {outcome['report']}")
    return 0
