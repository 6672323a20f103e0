"""`asymoe eval`: batched greedy generation over benchmark tasks for any transformers image-text-to-text model,
scored with the shipped `evaluate` modules; results as JSON + markdown (+ model-card `model-index`)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..cli import DTYPES
from ..io import atomic_write_text
from .generation import CachedGenerationMismatch, generate_batch
from .tasks import TASKS, Task, load_task_rows, resolve_tasks, score


@torch.no_grad()
def generate_answers(model, processor, task: Task, rows: list[dict], batch_size: int = 8,
                     max_new_tokens: int = 16, progress: bool = True, check_cache: bool = False) -> list[str]:
    """Greedy answers to the task's prompts, batched with left padding; only the new tokens, decoded and stripped.
    With `check_cache`, the first batch is also decoded without the KV cache (`check_cached_generation`)."""
    answers = []
    for start in tqdm(range(0, len(rows), batch_size), desc=task.name, disable=not progress, unit="batch"):
        batch = rows[start:start + batch_size]
        answers += generate_batch(model, processor, [task.prompt(row) for row in batch],
                                  [task.images(row) for row in batch], max_new_tokens,
                                  check_cache=check_cache and start == 0)
    return answers


def evaluate_model(model, processor, tasks: list[str], data: dict[str, str] | None = None, limit: int | None = None,
                   batch_size: int = 8, max_new_tokens: int = 16, output_dir: str | os.PathLike | None = None,
                   progress: bool = True) -> dict:
    """Run `tasks` (names or groups) and score them; with `output_dir`, write results.json, results.md and one
    `<task>.predictions.jsonl` per task (atomically). Returns {task: {"metrics": ..., "n": ..., "scoring": ...}},
    scoring naming the reference evaluator the task's metric followed (docs/evaluation.md).

    The first batch is also decoded without the KV cache: a model whose cached generation is wrong under the
    installed transformers stops the run (`CachedGenerationMismatch`) instead of producing a wrong table."""
    data = data or {}
    model.eval()
    results = {}
    for index, task in enumerate(resolve_tasks(tasks)):
        rows = list(load_task_rows(task, data.get(task.data_key or task.name), limit))
        predictions = generate_answers(model, processor, task, rows, batch_size, max_new_tokens, progress,
                                       check_cache=index == 0)
        results[task.name] = {"metrics": score(task, predictions, rows), "n": len(rows), "scoring": task.scoring}
        if output_dir is not None:
            lines = [json.dumps({"prompt": task.prompt(r), "prediction": p, "reference": task.reference(r)},
                                default=str) for r, p in zip(rows, predictions)]
            atomic_write_text(Path(output_dir) / f"{task.name}.predictions.jsonl", "\n".join(lines) + "\n")
    return results


def markdown_table(results: dict, headline_only: bool = False) -> str:
    """One row per task and metric (headline metrics only: no per-category breakdown)."""
    lines = ["| task | n | metric | value |", "|---|---|---|---|"]
    for name, entry in results.items():
        for metric, value in entry["metrics"].items():
            if headline_only and "/" in metric and "=" in metric:
                continue
            points = TASKS[name].metric == "mme" and not metric.endswith(("/acc", "/acc_plus"))
            shown = f"{value:.2f}" if points else f"{100 * value:.1f}"
            lines.append(f"| {name} | {entry['n']} | {metric} | {shown} |")
    return "\n".join(lines) + "\n\nMME scores and totals in MME points; all other metrics in %.\n"


def update_model_card(model_dir: str | os.PathLike, results: dict, model_name: str) -> Path:
    """Write the headline metrics into the model card's `model-index` (README.md in `model_dir`), keeping the rest."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    path = Path(model_dir) / "README.md"
    card = ModelCard.load(path) if path.is_file() else ModelCard(f"---\n---\n# {model_name}\n")
    data = card.data if isinstance(card.data, ModelCardData) else ModelCardData(**card.data.to_dict())
    task_names = set(results)
    kept = [r for r in (data.eval_results or []) if r.dataset_type not in task_names]
    for name, entry in results.items():
        for metric, value in entry["metrics"].items():
            if "=" in metric:
                continue
            kept.append(EvalResult(task_type="visual-question-answering", dataset_type=name, dataset_name=name,
                                   metric_type=metric, metric_value=round(float(value), 4)))
    data.eval_results = kept
    data.model_name = data.model_name or model_name
    card.data = data
    atomic_write_text(path, str(card))
    return path


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """`asymoe eval`'s arguments, on `parser` (the `asymoe` subcommand's) or a new parser."""
    parser = parser or argparse.ArgumentParser(prog="asymoe eval", description=__doc__)
    parser.add_argument("model", metavar="MODEL", help="model directory or Hub id (any image-text-to-text model)")
    parser.add_argument("--tasks", required=True,
                        help=f"comma-separated tasks or groups (grounding, standard); tasks: {', '.join(TASKS)}")
    parser.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                        help="local copy of a task's data (repeatable); grounding=DIR for the grounding benchmark")
    parser.add_argument("--limit", type=int, help="first N examples per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--output", default="outputs/eval", help="results directory (default: %(default)s)")
    parser.add_argument("--update-model-card", action="store_true", help="write model-index into MODEL/README.md")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES)
    return parser


def main(args: argparse.Namespace) -> int:
    """Evaluate MODEL on the tasks and write results.json + results.md."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        data = dict(item.split("=", 1) for item in args.data)
    except ValueError:
        print(f"asymoe eval: error: --data takes TASK=PATH, got {args.data}", file=sys.stderr)
        return 2
    try:
        tasks = resolve_tasks([t for t in args.tasks.split(",") if t])
        keys = {task.data_key or task.name for task in tasks}
        if unknown := sorted(set(data) - keys):
            raise ValueError(f"--data given for {unknown}, which the tasks {[t.name for t in tasks]} do not read "
                             f"(their keys: {sorted(keys)}).")
        for key, path in data.items():
            if not Path(path).exists():
                raise FileNotFoundError(f"--data {key}={path}: no such file or directory.")
        looks_local = args.model.startswith(("/", ".", "~")) or args.model.count("/") > 1
        if looks_local and not Path(args.model).expanduser().is_dir():
            raise FileNotFoundError(f"MODEL {args.model}: no such directory (give a checkpoint directory, or a Hub "
                                    "id such as llava-hf/llava-1.5-7b-hf).")
        model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True,
                                                            dtype=DTYPES[args.dtype]).to(args.device)
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
        output = Path(args.output)
        results = evaluate_model(model, processor, [t for t in args.tasks.split(",") if t], data, args.limit,
                                 args.batch_size, args.max_new_tokens, output)
    except (ValueError, OSError, CachedGenerationMismatch) as err:  # OSError: missing or unreadable checkpoints
        print(f"asymoe eval: error: {err}", file=sys.stderr)
        return 2
    import transformers

    record = {
        "model": args.model, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "asymoe eval " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["eval"] else None,
        "settings": {"limit": args.limit, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                     "device": args.device, "dtype": args.dtype, "data": data},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "results": results,
    }
    atomic_write_text(output / "results.json", json.dumps(record, indent=2))
    table = markdown_table(results)
    atomic_write_text(output / "results.md", f"# {args.model}\n\n{table}")
    print(markdown_table(results, headline_only=True))
    print(f"wrote {output / 'results.json'} and {output / 'results.md'}")
    if args.update_model_card:
        print(f"updated {update_model_card(args.model, results, Path(args.model).name)}")
    return 0
