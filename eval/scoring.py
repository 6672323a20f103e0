"""Load the metric modules shipped in `eval/metrics/` with `evaluate.load` by path (works offline)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import evaluate

METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def available_metrics() -> list[str]:
    """Names of the shipped metric modules (folders `metrics/<name>/` holding `<name>.py`)."""
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` of the shipped metric `name` by path: no Hub access; evaluate copies the module into its
    modules cache and only reads the install. `kwargs` go to `evaluate.load`; single-process modules keep their
    inputs in memory unless `keep_in_memory=False` (no cache files or locks to wait on)."""
    import evaluate

    if name not in available_metrics():
        raise ValueError(f"unknown metric {name!r}; the shipped metrics are {available_metrics()}.")
    kwargs.setdefault("keep_in_memory", kwargs.get("num_process", 1) == 1)
    return evaluate.load(str(METRICS_DIR / name), **kwargs)
