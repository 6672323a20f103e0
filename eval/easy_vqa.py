"""The real `easy-vqa` data set (PyPI `easy-vqa`, MIT: 64×64 shape images, 13 answers) in the project's VQA schema.

An external check next to the procedural grounding benchmark: images and questions the project did not generate.
Columns as in `asymoe.eval.grounding`: `image`, `question`, `answer`, `question_type` (color, shape or yes_no),
`level` ("leaf" for color/shape questions, "" for yes/no), `prior_consistent` (False: easy-vqa has no designed
prior) and `scene` (JSON with the source image id).
"""

from __future__ import annotations

import json
import random
import re

from .grounding import vqa_features


def _question_type(question: str, answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes_no"
    return "color" if "color" in question else "shape"


def question_tokens(question: str) -> list[str]:
    """Words as the tiny word-level tokenizer splits them (punctuation apart)."""
    return re.findall(r"\w+|[^\w\s]", question)


def load_easy_vqa(split: str = "test", limit: int | None = None, seed: int = 0):
    """easy-vqa's `train` (38,575 questions) or `test` (9,673) split as a `datasets.Dataset`; with `limit`, a
    seeded random subset of that many questions. Questions get a space before "?" to match the project's prompts."""
    import datasets
    import easy_vqa

    loaders = {"train": (easy_vqa.get_train_questions, easy_vqa.get_train_image_paths),
               "test": (easy_vqa.get_test_questions, easy_vqa.get_test_image_paths)}
    if split not in loaders:
        raise ValueError(f"easy-vqa has splits 'train' and 'test', not {split!r}.")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit={limit}: give a positive number of questions (or None for all).")
    get_questions, get_paths = loaders[split]
    questions, answers, image_ids = get_questions()
    paths = get_paths()
    order = list(range(len(questions)))
    if limit is not None and limit < len(order):
        order = sorted(random.Random(seed).sample(order, limit))
    rows = {key: [] for key in ("image", "question", "answer", "question_type", "level", "prior_consistent", "scene")}
    for index in order:
        kind = _question_type(questions[index], answers[index])
        rows["image"].append(paths[image_ids[index]])
        rows["question"].append(" ".join(question_tokens(questions[index])))
        rows["answer"].append(answers[index])
        rows["question_type"].append(kind)
        rows["level"].append("" if kind == "yes_no" else "leaf")
        rows["prior_consistent"].append(False)
        rows["scene"].append(json.dumps({"easy_vqa_image": image_ids[index]}))
    return datasets.Dataset.from_dict(rows, features=vqa_features())


def easy_vqa_vocabulary() -> list[str]:
    """Every word of easy-vqa's questions (as split by `load_easy_vqa`) and answers."""
    import easy_vqa

    words = list(easy_vqa.get_answers())
    for get_questions in (easy_vqa.get_train_questions, easy_vqa.get_test_questions):
        for question in get_questions()[0]:
            words += question_tokens(question)
    return list(dict.fromkeys(words))
