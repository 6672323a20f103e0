"""POPE object-hallucination metrics: accuracy, precision, recall, F1 (positive = "yes") and the yes ratio."""

import datasets
import evaluate

from asymoe.eval.answers import check_lengths, check_scoring, pope_yes_no, yes_no_references

SCORINGS = ("llava-1.5",)

_KWARGS = """
Args:
    predictions (`list[str]`): free-form answers, read as LLaVA's POPE evaluation does: "no" if the first sentence
        has the word "no", "No" or "not", otherwise "yes".
    references (`list[str]`): "yes" or "no" (any case).
    scoring (`str`, *optional*): "llava-1.5" (the only one): LLaVA's `eval_pope.py`.
Returns:
    accuracy, precision, recall, f1 (positive class "yes"; 0 when undefined), yes_ratio (share of "yes" readings),
    all `float` in [0, 1].
"""

_CITATION = """@inproceedings{li2023evaluating, title={Evaluating Object Hallucination in Large Vision-Language
Models}, author={Li, Yifan and others}, booktitle={EMNLP}, year={2023}}"""


class Pope(evaluate.Metric):
    def _info(self):
        text = datasets.Value("string")
        return evaluate.MetricInfo(
            description="POPE: yes/no object-existence questions scored as binary classification.",
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": text, "references": text}),
        )

    def _compute(self, predictions, references, scoring="llava-1.5"):
        check_scoring(scoring, SCORINGS, "pope")
        count = check_lengths(predictions=predictions, references=references)
        truth = yes_no_references(references, "POPE")
        said = [pope_yes_no(prediction) for prediction in predictions]
        tp = sum(s == "yes" and t == "yes" for s, t in zip(said, truth))
        fp = sum(s == "yes" and t == "no" for s, t in zip(said, truth))
        fn = sum(s == "no" and t == "yes" for s, t in zip(said, truth))
        tn = count - tp - fp - fn
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "accuracy": (tp + tn) / count,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "yes_ratio": (tp + fp) / count,
        }
