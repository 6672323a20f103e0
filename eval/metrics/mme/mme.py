"""MME: per-subtask accuracy and accuracy+ (both questions of an image right), scores and the two totals."""

from collections import defaultdict

import datasets
import evaluate

from asymoe.eval.answers import check_lengths, check_scoring, mme_yes_no, yes_no_references

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SCORINGS = ("llava-1.5", "lmms-eval")

_KWARGS = """
Args:
    predictions (`list[str]`): model answers.
    references (`list[str]`): "Yes" or "No" (any case).
    question_ids (`list[str]`): the image each question is about; MME asks exactly two questions per image.
    categories (`list[str]`): the subtask of each question (MME's 14 names, e.g. "existence", "OCR").
    scoring (`str`, *optional*): how answers are read. "llava-1.5" (default, the MME tool's `calculation.py`):
        lowercased; "yes"/"no" if that is the whole answer, else whichever its first four characters hold ("yes"
        first); else wrong. "lmms-eval" (its mme task): lowercased, stripped, periods removed first, and a lone
        "y" / "n" reads yes / no.
Returns:
    `<subtask>/acc`, `<subtask>/acc_plus` in [0, 1], `<subtask>/score` = 100·(acc + acc_plus) in [0, 200],
    `perception` and `cognition`: sums of the subtask scores of each group that is present.
"""

_CITATION = """@article{fu2023mme, title={MME: A Comprehensive Evaluation Benchmark for Multimodal Large Language
Models}, author={Fu, Chaoyou and others}, journal={arXiv:2306.13394}, year={2023}}"""


class MME(evaluate.Metric):
    def _info(self):
        text = datasets.Value("string")
        return evaluate.MetricInfo(
            description="MME perception and cognition scores.",
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": text, "references": text}),
        )

    def _compute(self, predictions, references, question_ids=None, categories=None, scoring="llava-1.5"):
        check_scoring(scoring, SCORINGS, "mme")
        if question_ids is None or categories is None:
            raise ValueError("MME needs question_ids (the image of each question) and categories (its subtask).")
        check_lengths(predictions=predictions, references=references, question_ids=question_ids, categories=categories)
        if unknown := sorted(set(categories) - set(PERCEPTION) - set(COGNITION)):
            raise ValueError(f"unknown MME subtasks {unknown}; expected {PERCEPTION + COGNITION}.")
        truth = yes_no_references(references, "MME")
        right = defaultdict(list)  # (subtask, image) -> [correct per question]
        for prediction, answer, image, subtask in zip(predictions, truth, question_ids, categories):
            right[subtask, image].append(mme_yes_no(prediction, scoring) == answer)
        if unpaired := sorted(f"{s}/{i}" for (s, i), marks in right.items() if len(marks) != 2):
            raise ValueError(f"MME scores the two questions of each image together; images {unpaired[:5]} have "
                             "another number. Pass both questions of every image (with --limit: an even number, "
                             "as MME's data lists an image's questions together).")
        results, totals = {}, {"perception": 0.0, "cognition": 0.0}
        for subtask in sorted({s for s, _ in right}):
            images = [marks for (s, _), marks in right.items() if s == subtask]
            acc = sum(sum(m) for m in images) / (2 * len(images))
            acc_plus = sum(all(m) for m in images) / len(images)
            results[f"{subtask}/acc"] = acc
            results[f"{subtask}/acc_plus"] = acc_plus
            results[f"{subtask}/score"] = 100 * (acc + acc_plus)
            totals["perception" if subtask in PERCEPTION else "cognition"] += 100 * (acc + acc_plus)
        return {**results, **totals}
