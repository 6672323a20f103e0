"""Exact match after the VQA answer normalisation (GQA, the grounding benchmark, easy-vqa)."""

import datasets
import evaluate

from asymoe.eval.answers import check_lengths, normalize_answer

_KWARGS = """
Args:
    predictions (`list[str]`): model answers.
    references (`list[str]` or `list[list[str]]`): the answer, or several accepted answers, per question.
Returns:
    exact_match (`float`): share of predictions equal to a reference after normalisation, in [0, 1].
"""


class ExactMatch(evaluate.Metric):
    def _info(self):
        single = {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
        several = {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
        return evaluate.MetricInfo(
            description="Exact match after lowercasing and the VQA normalisation (punctuation, articles, numbers).",
            citation="",
            inputs_description=_KWARGS,
            features=[datasets.Features(single), datasets.Features(several)],
        )

    def _compute(self, predictions, references):
        count = check_lengths(predictions=predictions, references=references)
        hits = 0
        for prediction, accepted in zip(predictions, references):
            accepted = [accepted] if isinstance(accepted, str) else accepted
            hits += normalize_answer(prediction) in {normalize_answer(a) for a in accepted}
        return {"exact_match": hits / count}
