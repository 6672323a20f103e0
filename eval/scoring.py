"""Load the metric modules shipped in `eval/metrics/` with `evaluate.load` by path (works offline)."""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def available_metrics() -> list[str]:
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def load_metric(name: str, **kwargs):
    """`evaluate.load` of the shipped metric `name` (vqa_accuracy, exact_match, pope, mme, multiple_choice)."""
    import evaluate

    if name not in available_metrics():
        raise ValueError(f"unknown metric {name!r}; the shipped metrics are {available_metrics()}.")
    return evaluate.load(str(METRICS_DIR / name), **kwargs)
