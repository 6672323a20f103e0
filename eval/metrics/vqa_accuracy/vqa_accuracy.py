"""VQA accuracy (VQAv2, TextVQA, VizWiz): official answer normalisation and the 10-annotator leave-one-out score."""

import datasets
import evaluate

from asymoe.eval.answers import check_lengths, normalize_answer

_DESCRIPTION = """
The VQAv2 accuracy. The prediction and every annotator answer get the official VQA normalisation (as TextVQA's
evaluator, which LLaVA uses, applies it; the official script only strips the answers' punctuation, and only when
annotators disagree). With n answers the prediction scores the mean over the n leave-one-out subsets of
min(1, #answers in the subset equal to it / k), k = min(3, n - 1): for the usual n = 10, the official
min(1, matches / 3) over the 10 subsets of 9. Fewer answers need fewer matches (k = 2 for three, 1 for two), so a
prediction every annotator gave scores 1; a single answer is an exact match.
"""

_KWARGS = """
Args:
    predictions (`list[str]`): model answers.
    references (`list[list[str]]`): the annotators' answers of each question (usually 10; at least 1).
Returns:
    vqa_accuracy (`float`): mean accuracy in [0, 1].
"""

_CITATION = """@inproceedings{goyal2017making, title={Making the V in VQA Matter}, author={Goyal, Yash and others},
booktitle={CVPR}, year={2017}}"""


def question_accuracy(prediction: str, answers: list[str]) -> float:
    """Leave-one-out accuracy of one prediction against its annotators' answers (see the description)."""
    prediction = normalize_answer(prediction)
    answers = [normalize_answer(answer) for answer in answers]
    matches = answers.count(prediction)
    if len(answers) == 1:
        return float(matches)
    needed = min(3, len(answers) - 1)
    return sum(min(1.0, (matches - (answer == prediction)) / needed) for answer in answers) / len(answers)


class VQAAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
            reference_urls=["https://visualqa.org/evaluation.html"],
        )

    def _compute(self, predictions, references):
        count = check_lengths(predictions=predictions, references=references)
        if any(len(answers) == 0 for answers in references):
            raise ValueError("a question has no reference answers: give each at least one.")
        total = sum(question_accuracy(p, list(a)) for p, a in zip(predictions, references))
        return {"vqa_accuracy": total / count}
