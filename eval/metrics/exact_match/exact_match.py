"""Exact match after the official VQA answer normalisation (the project's tasks: the grounding benchmark, easy-vqa)."""

import datasets
import evaluate

from asymoe.eval.answers import check_lengths, check_scoring, normalize_answer

SCORINGS = ("vqa",)

_KWARGS = """
Args:
    predictions (`list[str]`): model answers.
    references (`list[str]` or `list[list[str]]`): the answer, or the accepted answers, of each question; both
        forms may be mixed.
    scoring (`str`, *optional*): "vqa" (the only one): both sides get the official VQA normalisation.
Returns:
    exact_match (`float`): share of predictions equal to a reference after normalisation, in [0, 1].
"""


def _as_answer_list(reference):
    return [reference] if isinstance(reference, str) else reference


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Exact match after the VQA answer normalisation (lowercase, punctuation, articles, number "
            "words to digits, contractions); a list of references accepts any of them.",
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    # A single reference is stored as a one-answer list: one Arrow schema for both forms and mixes of them.
    # (evaluate appends the inputs description to the docstrings of add and add_batch, so they must have one.)
    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one prediction and its reference (a str or a list of accepted answers)."""
        super().add(prediction=prediction, reference=_as_answer_list(reference), **kwargs)

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add predictions and their references (each a str or a list of accepted answers)."""
        references = None if references is None else [_as_answer_list(r) for r in references]
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions, references, scoring="vqa"):
        check_scoring(scoring, SCORINGS, "exact_match")
        count = check_lengths(predictions=predictions, references=references)
        if any(len(accepted) == 0 for accepted in references):
            raise ValueError("a question has no reference answer: give each at least one.")
        hits = sum(
            normalize_answer(prediction) in {normalize_answer(answer) for answer in accepted}
            for prediction, accepted in zip(predictions, references)
        )
        return {"exact_match": hits / count}
