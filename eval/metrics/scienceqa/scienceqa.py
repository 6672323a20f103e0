"""ScienceQA accuracy: the option letter read from each answer as the chosen reference reads it."""

import datasets
import evaluate

from asymoe.eval.answers import check_lengths, check_scoring, choice_references, scienceqa_letter

SCORINGS = ("llava-1.5", "lmms-eval")

_KWARGS = """
Args:
    predictions (`list[str]`): model answers.
    references (`list[str]`): the right option letter of each question ("A"-"E", any case).
    scoring (`str`, *optional*): "llava-1.5" (default, LLaVA's `eval_science_qa.py`): right only for "B", "B. text"
        or exactly one "The answer is B" followed by one more character; "(B)", "B) dog", "Answer: B", "b", "B." and
        option texts are wrong. "lmms-eval" (its scienceqa task): after stripping, a single letter in any case or
        an uppercase letter followed by ".".
Returns:
    accuracy (`float`): share of right answers, in [0, 1].
"""

_CITATION = """@inproceedings{lu2022learn, title={Learn to Explain: Multimodal Reasoning via Thought Chains for Science
Question Answering}, author={Lu, Pan and others}, booktitle={NeurIPS}, year={2022}}"""


class ScienceQA(evaluate.Metric):
    def _info(self):
        text = datasets.Value("string")
        return evaluate.MetricInfo(
            description="ScienceQA multiple-choice accuracy as LLaVA-1.5 (default) or lmms-eval score it.",
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": text, "references": text}),
        )

    def _compute(self, predictions, references, scoring="llava-1.5"):
        check_scoring(scoring, SCORINGS, "scienceqa")
        count = check_lengths(predictions=predictions, references=references)
        truth = choice_references(references, "ABCDE", "ScienceQA")
        return {"accuracy": sum(scienceqa_letter(p, scoring) == t for p, t in zip(predictions, truth)) / count}
