"""GQA accuracy: exact match after the light cleaning of the chosen reference (no VQA normalisation)."""

import datasets
import evaluate

from asymoe.eval.answers import check_lengths, check_scoring, gqa_llava_answer, lmms_eval_exact_answer

SCORINGS = ("llava-1.5", "lmms-eval")

_KWARGS = """
Args:
    predictions (`list[str]`): model answers.
    references (`list[str]`): GQA's answer of each question.
    scoring (`str`, *optional*): "llava-1.5" (default: LLaVA's `convert_gqa_for_eval.py` removes trailing periods
        and lowercases the prediction; GQA's `eval.py` compares it with the answer as it stands) or "lmms-eval" (its
        gqa task: both lowercased, ASCII punctuation deleted, then compared).
Returns:
    accuracy (`float`): share of exact matches, in [0, 1].
"""

_CITATION = """@inproceedings{hudson2019gqa, title={GQA: A New Dataset for Real-World Visual Reasoning and
Compositional Question Answering}, author={Hudson, Drew A and Manning, Christopher D}, booktitle={CVPR},
year={2019}}"""


class GQA(evaluate.Metric):
    def _info(self):
        text = datasets.Value("string")
        return evaluate.MetricInfo(
            description="GQA accuracy as LLaVA-1.5 (default) or lmms-eval score it.",
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": text, "references": text}),
            reference_urls=["https://cs.stanford.edu/people/dorarad/gqa/evaluate.html"],
        )

    def _compute(self, predictions, references, scoring="llava-1.5"):
        check_scoring(scoring, SCORINGS, "gqa")
        count = check_lengths(predictions=predictions, references=references)
        if scoring == "llava-1.5":
            hits = sum(gqa_llava_answer(p) == r for p, r in zip(predictions, references))
        else:
            hits = sum(lmms_eval_exact_answer(p) == lmms_eval_exact_answer(r) for p, r in zip(predictions, references))
        return {"accuracy": hits / count}
