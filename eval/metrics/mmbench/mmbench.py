"""MMBench accuracy as lmms-eval scores it offline: rule-based letter matching, circular questions over main rows."""

from collections import defaultdict

import datasets
import evaluate

from asymoe.eval.answers import check_lengths, check_scoring, choice_references, mmbench_letter

SCORINGS = ("lmms-eval",)
CIRCULAR_OFFSET = 1_000_000  # a circular variant's index is its main row's index plus a multiple of this

_KWARGS = """
Args:
    predictions (`list[str]`): model answers.
    references (`list[str]`): the right option letter of each row ("A"-"D", any case).
    options (`list[list[str | None]]`): the texts of options A-D of each row (None or NaN for a missing option).
    indices (`list[int]`): MMBench's `index` column. Rows whose index is congruent modulo 1,000,000 are one
        question with shifted options (circular evaluation); the question counts right only if every such row is.
    scoring (`str`, *optional*): "lmms-eval" (the only one): its `mmbench_en_dev_static` scoring, see
        `asymoe.eval.answers.mmbench_letter` for how answers are read.
Returns:
    accuracy (`float`): share of main rows (index < 1,000,000) whose question is right, in [0, 1]; rows whose main
        row is absent do not count.
"""

_CITATION = """@inproceedings{liu2024mmbench, title={MMBench: Is Your Multi-modal Model an All-around Player?},
author={Liu, Yuan and others}, booktitle={ECCV}, year={2024}}"""


class MMBench(evaluate.Metric):
    def _info(self):
        text = datasets.Value("string")
        return evaluate.MetricInfo(
            description="MMBench circular accuracy as lmms-eval's static (no GPT judge) scoring computes it.",
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": text, "references": text}),
        )

    def _compute(self, predictions, references, options=None, indices=None, scoring="lmms-eval"):
        check_scoring(scoring, SCORINGS, "mmbench")
        if options is None or indices is None:
            raise ValueError("MMBench needs options (the texts of options A-D of each row) and indices (its `index` "
                             "column, which ties a question's circular variants together).")
        check_lengths(predictions=predictions, references=references, options=options, indices=indices)
        if too_many := [row for row in options if len(row) > 4]:
            raise ValueError(f"MMBench questions have options A-D; got {len(too_many[0])} options: {too_many[0]}.")
        try:
            indices = [int(index) for index in indices]
        except (TypeError, ValueError) as err:
            raise ValueError(f"MMBench indices must be integers (its `index` column): {err}.") from err
        truth = choice_references(references, "ABCD", "MMBench")
        right = defaultdict(list)  # main index -> [correct per row of the question]
        for prediction, answer, texts, index in zip(predictions, truth, options, indices):
            right[index % CIRCULAR_OFFSET].append(mmbench_letter(prediction, texts) == answer)
        main = [index for index in indices if index < CIRCULAR_OFFSET]
        if not main:
            raise ValueError("no MMBench main rows (index < 1,000,000): pass the questions, not only their circular "
                             "variants.")
        return {"accuracy": sum(all(right[index]) for index in main) / len(main)}
