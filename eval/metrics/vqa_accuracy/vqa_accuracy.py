"""VQA accuracy (VQAv2, TextVQA, VizWiz): the annotators' leave-one-out score, answers read as a chosen reference."""

import datasets
import evaluate

from asymoe.eval.answers import check_lengths, check_scoring, evalai_answer, normalize_answer, official_vqa_answers

SCORINGS = ("llava-1.5", "m4c", "vqa", "lmms-eval")

_DESCRIPTION = """
VQA accuracy: over the n leave-one-out subsets of the annotators' answers (n - 1 each), min(1, matches / 3),
averaged; with the usual ten answers, a prediction three annotators gave scores 1. How answers are read depends on
`scoring`, the reference evaluator followed:
- "llava-1.5" (VQAv2 as LLaVA-1.5 reported it): the prediction goes through the EvalAI answer processor of LLaVA's
  `m4c_evaluator.py` (its `convert_vqav2_for_submission.py`), then the official VQA evaluation (`vqaEval.py`), which
  normalises prediction and answers only when the annotators disagree;
- "m4c" (TextVQA and VizWiz: LLaVA's `m4c_evaluator.py`, lmms-eval's textvqa and vizwiz_vqa): the EvalAI answer
  processor on prediction and answers;
- "vqa": the official `vqaEval.py` on the raw prediction;
- "lmms-eval" (its vqav2 task): the official normalisation, with EvalAI's comma rule, on prediction and answers.
"""

_KWARGS = """
Args:
    predictions (`list[str]`): model answers.
    references (`list[list[str]]`): the annotators' answers of each question (usually 10; at least 1).
    scoring (`str`, *optional*): "llava-1.5" (default), "m4c", "vqa" or "lmms-eval"; see the description.
Returns:
    vqa_accuracy (`float`): mean accuracy in [0, 1].
"""

_CITATION = """@inproceedings{goyal2017making, title={Making the V in VQA Matter}, author={Goyal, Yash and others},
booktitle={CVPR}, year={2017}}"""


def question_accuracy(prediction: str, answers: list[str], scoring: str = "llava-1.5") -> float:
    """Leave-one-out accuracy of one prediction against its annotators' answers (see the description)."""
    if scoring == "m4c":  # the EvalAI processor on both sides
        prediction, answers = evalai_answer(prediction), [evalai_answer(answer) for answer in answers]
    elif scoring == "lmms-eval":  # the official normalisation on both sides, always
        prediction = normalize_answer(prediction, comma_runs=True)
        answers = [normalize_answer(answer, comma_runs=True) for answer in answers]
    else:  # the official evaluation, of the raw prediction or of the one LLaVA-1.5's upload processed
        if scoring == "llava-1.5":
            prediction = evalai_answer(prediction)
        prediction, answers = official_vqa_answers(prediction, answers)
    matches = answers.count(prediction)
    return sum(min(1.0, (matches - (answer == prediction)) / 3) for answer in answers) / len(answers)


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

    def _compute(self, predictions, references, scoring="llava-1.5"):
        check_scoring(scoring, SCORINGS, "vqa_accuracy")
        count = check_lengths(predictions=predictions, references=references)
        if any(len(answers) == 0 for answers in references):
            raise ValueError("a question has no reference answers: give each at least one.")
        total = sum(question_accuracy(p, list(a), scoring) for p, a in zip(predictions, references))
        return {"vqa_accuracy": total / count}
