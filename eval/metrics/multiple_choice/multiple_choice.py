"""Multiple-choice letter accuracy (ScienceQA-IMG, MMBench), with option extraction and MMBench circular scoring."""

from collections import defaultdict

import datasets
import evaluate

from asymoe.eval.answers import check_lengths, choice_letter

_KWARGS = """
Args:
    predictions (`list[str]`): answers: a letter ("B", "(B)", "B. text", "The answer is B") or an option's text.
    references (`list[str]`): the right letter ("A", "B", ...).
    options (`list[list[str]]`, *optional*): the option texts of each question, to read answers that give the
        text instead of the letter (an answer containing exactly one option's text picks it).
    question_ids (`list[str]`, *optional*): MMBench circular evaluation: the rows of one question with shifted
        options share an id; the question counts right only if every row is right.
Returns:
    accuracy (`float`), and circular_accuracy (`float`) when question_ids are given; in [0, 1].
"""


class MultipleChoice(evaluate.Metric):
    def _info(self):
        text = datasets.Value("string")
        return evaluate.MetricInfo(
            description="Accuracy of the option letter extracted from free-form answers.",
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": text, "references": text}),
        )

    def _compute(self, predictions, references, options=None, question_ids=None):
        count = check_lengths(predictions=predictions, references=references, options=options,
                              question_ids=question_ids)
        options = options or [None] * count
        right = [
            choice_letter(p, o) == r.strip().upper() for p, r, o in zip(predictions, references, options)
        ]
        results = {"accuracy": sum(right) / count}
        if question_ids is not None:
            by_question = defaultdict(list)
            for question, mark in zip(question_ids, right):
                by_question[question].append(mark)
            results["circular_accuracy"] = sum(all(m) for m in by_question.values()) / len(by_question)
        return results
