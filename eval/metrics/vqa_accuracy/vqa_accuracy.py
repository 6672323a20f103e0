"""VQA accuracy (VQAv2, TextVQA, VizWiz): official answer normalisation and the 10-annotator leave-one-out score."""

import datasets
import evaluate

from asymoe.eval.answers import check_lengths, normalize_answer

_DESCRIPTION = """
For each question with n annotator answers, the prediction scores the mean over the n leave-one-out subsets of
min(1, #matching answers in the subset / 3), after the official VQA normalisation of prediction and answers.
With the usual 10 answers this is the VQAv2 metric; with 2-9 answers the same rule applies to what is there; with a
single answer (no subset to leave it out of) the prediction scores 1 if it matches it, else 0.
"""

_KWARGS = """
Args:
    predictions (`list[str]`): model answers.
    references (`list[list[str]]`): the annotators' answers of each question.
Returns:
    vqa_accuracy (`float`): mean accuracy in [0, 1].
"""

_CITATION = """@inproceedings{goyal2017making, title={Making the V in VQA Matter}, author={Goyal, Yash and others},
booktitle={CVPR}, year={2017}}"""


def question_accuracy(prediction: str, answers: list[str]) -> float:
    prediction = normalize_answer(prediction)
    answers = [normalize_answer(a) for a in answers]
    if len(answers) == 1:
        return float(prediction == answers[0])
    scores = []
    for left_out in range(len(answers)):
        matches = sum(a == prediction for i, a in enumerate(answers) if i != left_out)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


class VQAAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        count = check_lengths(predictions=predictions, references=references)
        if any(len(answers) == 0 for answers in references):
            raise ValueError("a question has no reference answers: give each at least one.")
        total = sum(question_accuracy(p, list(a)) for p, a in zip(predictions, references))
        return {"vqa_accuracy": total / count}
