"""Benchmark task adapters: rows in each benchmark's public Hub parquet schema → prompt, images, reference, score.

Standard suite (schemas and splits of the lmms-lab copies lmms-eval uses; prompts as LLaVA-1.5's evaluation):
VQAv2, GQA, TextVQA, VizWiz, ScienceQA-IMG, POPE, MME, MMBench. Project tasks: the grounding benchmark's test
and validation splits, and easy-vqa. Every task reads a local copy with `--data task=PATH` (parquet file or
folder, JSON, or a `save_to_disk` directory); without one it loads the Hub copy (network). See docs/evaluation.md.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..finetune.data import SHORT_ANSWER_PROMPT
from .grounding import EVALUATION_KINDS
from .scoring import load_metric

OPTION_LETTERS = "ABCDEFGH"
CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
VIZWIZ_PROMPT = "When the provided information is insufficient, respond with 'Unanswerable'."


def _short(question: str) -> str:
    return f"{question}\n{SHORT_ANSWER_PROMPT}"


def _options_block(options: list[str]) -> str:
    return "\n".join(f"{OPTION_LETTERS[i]}. {option}" for i, option in enumerate(options))


def _mmbench_options(row: dict) -> list[str]:
    options = []
    for letter in OPTION_LETTERS[:4]:
        value = row.get(letter)
        if value is None or (isinstance(value, float) and value != value) or str(value).strip() in ("", "nan"):
            break
        options.append(str(value))
    return options


def _with_ocr(row: dict) -> str:
    """LLaVA-1.5's TextVQA question: the OCR tokens of the image follow the question."""
    tokens = row.get("ocr_tokens") or []
    return f"{row['question']}\nReference OCR token: {', '.join(tokens)}" if tokens else row["question"]


def _with_hint(hint, text: str) -> str:
    hint = "" if hint is None or str(hint).strip() in ("", "nan", "None") else str(hint).strip()
    return f"{hint}\n{text}" if hint else text


@dataclass(frozen=True)
class Task:
    """How one benchmark is read, prompted and scored."""

    name: str
    metric: str
    scoring: str  # the reference evaluator the metric follows (its `scoring` argument; docs/evaluation.md)
    prompt: Callable[[dict], str]
    reference: Callable[[dict], object]
    hub: tuple[str, str | None, str] | None = None  # (repo id, config, split)
    metric_inputs: Callable[[list[dict]], dict] = field(default=lambda rows: {})
    breakdown: tuple[str, ...] = ()  # columns whose values get their own score
    data_key: str | None = None  # the `--data` key (default: the task name)
    split: str | None = None  # split of a `save_to_disk` DatasetDict

    def images(self, row: dict) -> list:
        return [row["image"].convert("RGB")]


def _vqa_answers(row: dict) -> list[str]:
    answers = row["answers"]
    return [a["answer"] if isinstance(a, dict) else a for a in answers]


def _mmbench_scoring_inputs(rows: list[dict]) -> dict:
    """Options A-D as lmms-eval's MMBench scoring reads them (None/NaN: no such option) and the circular index."""
    return {"options": [[row.get(letter) for letter in OPTION_LETTERS[:4]] for row in rows],
            "indices": [int(row["index"]) for row in rows]}


def _grounding(split: str) -> Task:
    return Task(f"grounding_{split.removeprefix('test_')}", "exact_match", "vqa", lambda r: _short(r["question"]),
                lambda r: r["answer"], breakdown=("question_type", "level"), data_key="grounding", split=split)


TASKS: dict[str, Task] = {task.name: task for task in [
    Task("vqav2", "vqa_accuracy", "llava-1.5", lambda r: _short(r["question"]), _vqa_answers,
         hub=("lmms-lab/VQAv2", None, "validation")),
    Task("gqa", "gqa", "llava-1.5", lambda r: _short(r["question"]), lambda r: r["answer"],
         hub=("lmms-lab/GQA", "testdev_balanced_instructions", "testdev")),
    Task("textvqa", "vqa_accuracy", "m4c", lambda r: _short(_with_ocr(r)), _vqa_answers,
         hub=("lmms-lab/textvqa", None, "validation")),
    Task("vizwiz", "vqa_accuracy", "m4c", lambda r: f"{r['question']}\n{VIZWIZ_PROMPT}\n{SHORT_ANSWER_PROMPT}",
         _vqa_answers, hub=("lmms-lab/VizWiz-VQA", None, "val")),
    Task("scienceqa_img", "scienceqa", "llava-1.5",
         lambda r: _with_hint(f"Context: {r['hint']}" if r.get("hint") else None,
                              f"{r['question']}\n{_options_block(r['choices'])}\n{CHOICE_PROMPT}"),
         lambda r: OPTION_LETTERS[int(r["answer"])], hub=("lmms-lab/ScienceQA", "ScienceQA-IMG", "test")),
    Task("pope", "pope", "llava-1.5", lambda r: _short(r["question"]), lambda r: r["answer"].strip().lower(),
         hub=("lmms-lab/POPE", None, "test"), breakdown=("category",)),
    Task("mme", "mme", "llava-1.5", lambda r: _short(r["question"].replace(" Please answer yes or no.", "")),
         lambda r: r["answer"], hub=("lmms-lab/MME", None, "test"),
         metric_inputs=lambda rows: {"question_ids": [r["question_id"] for r in rows],
                                     "categories": [r["category"] for r in rows]}),
    Task("mmbench", "mmbench", "lmms-eval",
         lambda r: _with_hint(r.get("hint"),
                              f"{r['question']}\n{_options_block(_mmbench_options(r))}\n{CHOICE_PROMPT}"),
         lambda r: r["answer"], hub=("lmms-lab/MMBench", "en", "dev"),
         metric_inputs=_mmbench_scoring_inputs),
    *(_grounding(f"{part}_{kind}") for part in ("test", "validation") for kind in EVALUATION_KINDS),
    Task("easy_vqa", "exact_match", "vqa", lambda r: _short(r["question"]), lambda r: r["answer"],
         breakdown=("question_type",)),
]}
TASK_GROUPS = {"grounding": [f"grounding_{kind}" for kind in EVALUATION_KINDS],
               "grounding_validation": [f"grounding_validation_{kind}" for kind in EVALUATION_KINDS],
               "standard": ["vqav2", "gqa", "textvqa", "vizwiz", "scienceqa_img", "pope", "mme", "mmbench"]}


def resolve_tasks(names: list[str]) -> list[Task]:
    """Task names (or groups: grounding, standard) → tasks, in order, without repeats."""
    resolved = []
    for name in names:
        for member in TASK_GROUPS.get(name, [name]):
            if member not in TASKS:
                raise ValueError(f"unknown task {member!r}; known tasks: {sorted(TASKS)} and groups "
                                 f"{sorted(TASK_GROUPS)}.")
            if TASKS[member] not in resolved:
                resolved.append(TASKS[member])
    if not resolved:
        raise ValueError("no tasks given: pass --tasks, e.g. --tasks grounding,easy_vqa.")
    return resolved


def load_task_rows(task: Task, path: str | os.PathLike | None = None, limit: int | None = None):
    """The task's rows as a `datasets.Dataset`: from `path` (local copy) or the Hub copy, first `limit` rows."""
    import datasets

    if limit is not None and limit <= 0:
        raise ValueError(f"--limit {limit}: give a positive number of examples.")
    if path is not None:
        source = Path(path)
        if (source / "dataset_dict.json").is_file():
            dataset = datasets.load_from_disk(str(source))
            split = task.split or (next(iter(dataset)) if len(dataset) == 1 else None)
            if split not in dataset:
                raise ValueError(f"{source} holds splits {list(dataset)}; task {task.name} needs "
                                 f"{split or 'a single split'}: save that split alone.")
            dataset = dataset[split]
        elif (source / "dataset_info.json").is_file():
            dataset = datasets.load_from_disk(str(source))
        elif source.suffix in (".json", ".jsonl"):
            dataset = datasets.load_dataset("json", data_files=str(source), split="train")
        elif source.suffix == ".parquet" or source.is_dir():
            files = [str(source)] if source.is_file() else sorted(str(p) for p in source.glob("**/*.parquet"))
            if not files:
                raise FileNotFoundError(f"no parquet files in {source} for task {task.name}.")
            dataset = datasets.load_dataset("parquet", data_files=files, split="train")
        else:
            raise FileNotFoundError(f"data for task {task.name} not found at {source}.")
    elif task.name == "easy_vqa":
        from .easy_vqa import load_easy_vqa

        dataset = load_easy_vqa("test", limit=limit)
    elif task.hub is not None:
        repo, config, split = task.hub
        try:
            dataset = datasets.load_dataset(repo, config, split=split)
        except Exception as err:  # offline, missing access, ...: say how to run from a local copy
            raise ValueError(f"could not load {repo} ({config}, {split}) for task {task.name}: {err}. Download a "
                             f"copy and pass --data {task.name}=PATH.") from err
        if task.name == "gqa":  # GQA keeps images in a separate config, keyed by imageId
            images = datasets.load_dataset(repo, "testdev_balanced_images", split=split)
            by_id = dict(zip(images["id"], range(len(images))))
            dataset = dataset.map(lambda r: {"image": images[by_id[r["imageId"]]]["image"]})
    else:
        raise ValueError(f"task {task.name} has no public copy: pass --data {task.data_key or task.name}=PATH "
                         "(for the grounding benchmark: the directory `asymoe grounding` wrote).")
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    return dataset


def score(task: Task, predictions: list[str], rows: list[dict]) -> dict[str, float]:
    """The task's metric, as its reference evaluator scores, on these predictions (+ the metric per value of each
    breakdown column)."""
    metric = load_metric(task.metric)
    references = [task.reference(row) for row in rows]
    results = metric.compute(predictions=predictions, references=references, scoring=task.scoring,
                             **task.metric_inputs(rows))
    for column in task.breakdown:
        groups = defaultdict(list)
        for index, row in enumerate(rows):
            if row.get(column) not in (None, ""):
                groups[row[column]].append(index)
        for value, indices in sorted(groups.items()):
            part = [rows[i] for i in indices]
            sub = metric.compute(predictions=[predictions[i] for i in indices],
                                 references=[references[i] for i in indices], scoring=task.scoring,
                                 **task.metric_inputs(part))
            results.update({f"{key}/{column}={value}": number for key, number in sub.items()})
    return results
