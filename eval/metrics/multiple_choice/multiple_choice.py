"""Multiple-choice letter accuracy (ScienceQA-IMG, MMBench), with option extraction and MMBench circular scoring."""

import string
from collections import defaultdict

import datasets
import evaluate

from asymoe.eval.answers import check_lengths, choice_letter

_KWARGS = """
Args:
    predictions (`list[str]`): answers: a letter ("B", "(B)", "B."), an answer starting with one ("B. text",
        "(B) text"), "The answer is B" / "Answer: B", or (given options) an option's text; anything else is wrong.
    references (`list[str]`): the right letter ("A", "B", ...; any case), one of the options' when they are given.
    options (`list[list[str]]`, *optional*): the option texts of each question, to read answers that give the
        text instead of the letter (the answer is an option's text, or contains exactly one as whole words).
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
        letters = [reference.strip().upper() for reference in references]
        for letter, choices in zip(letters, options):
            valid = string.ascii_uppercase if choices is None else string.ascii_uppercase[: len(choices)]
            if len(letter) != 1 or letter not in valid:
                raise ValueError(f"reference {letter!r} is not an option letter (one of {valid!r}).")
        right = [choice_letter(p, o) == r for p, o, r in zip(predictions, options, letters)]
        results = {"accuracy": sum(right) / count}
        if question_ids is not None:
            by_question = defaultdict(list)
            for question, mark in zip(question_ids, right):
                by_question[question].append(mark)
            results["circular_accuracy"] = sum(all(m) for m in by_question.values()) / len(by_question)
        return results
