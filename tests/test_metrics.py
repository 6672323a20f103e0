"""The shipped `evaluate` metric modules, loaded by path offline, against hand-computed values."""

import pytest

from asymoe.eval.answers import choice_letter, normalize_answer, yes_no, yes_no_strict
from asymoe.eval.scoring import available_metrics, load_metric


@pytest.fixture(scope="module")
def metrics():
    return {name: load_metric(name) for name in available_metrics()}


def test_all_metrics_ship():
    assert available_metrics() == ["exact_match", "mme", "multiple_choice", "pope", "vqa_accuracy"]
    with pytest.raises(ValueError, match="shipped metrics"):
        load_metric("accuracy")


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [("Two", "2"), ("a dog.", "dog"), ("dont", "don't"), ("The Cat!", "cat"), ("1,000", "1000"),
     ("3.5", "3.5"), ("yes, it is", "yes it is"), ("left-hand", "left hand")],
)
def test_vqa_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_vqa_accuracy_leave_one_out(metrics):
    # Q1: "Two" -> "2"; 4 annotators said 2 ("two" normalises too), 6 said 3. Leaving out a "2" leaves 3 matches
    # (min(1, 3/3) = 1), leaving out a "3" leaves 4 (1): 1.0. Q2: 2 of 10 said "red": leaving out one of them
    # leaves 1 match (1/3, twice), otherwise 2 matches (2/3, 8 times): (2/3 + 16/3) / 10 = 0.6. Q3: no match: 0.
    result = metrics["vqa_accuracy"].compute(
        predictions=["Two", "red", "blue"],
        references=[["2"] * 3 + ["two"] + ["3"] * 6, ["red"] * 2 + ["pink"] * 8, ["green"] * 10],
    )
    assert result["vqa_accuracy"] == pytest.approx((1.0 + 0.6 + 0.0) / 3)
    single = metrics["vqa_accuracy"].compute(predictions=["unanswerable", "x"], references=[["Unanswerable"], ["y"]])
    assert single["vqa_accuracy"] == pytest.approx(0.5)


def test_exact_match(metrics):
    em = metrics["exact_match"]
    assert em.compute(predictions=["A red.", "blue", "2"], references=["red", "green", "two"])["exact_match"] == (
        pytest.approx(2 / 3))
    assert em.compute(predictions=["blue"], references=[["green", "blue"]])["exact_match"] == 1.0


def test_pope(metrics):
    # said: yes, no, no ("not"), yes, yes | truth: yes, yes, no, no, yes -> tp 2, fn 1, tn 1, fp 1.
    result = metrics["pope"].compute(
        predictions=["Yes, there is.", "No.", "There is not a dog", "yes", "I think so. No doubt"],
        references=["yes", "yes", "no", "no", "yes"],
    )
    assert result == pytest.approx(
        {"accuracy": 3 / 5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 3 / 5})
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        metrics["pope"].compute(predictions=["yes"], references=["maybe"])


def test_mme(metrics):
    # color: image a both right (acc 1, acc+ 1) -> 200. OCR: image b one right, "maybe" is wrong -> acc .5, acc+ 0
    # -> 50. code_reasoning: image c both wrong -> 0. perception = 250, cognition = 0.
    result = metrics["mme"].compute(
        predictions=["Yes", "No", "yes it is", "maybe", "no", "yes"],
        references=["Yes", "No", "Yes", "No", "Yes", "No"],
        question_ids=["a", "a", "b", "b", "c", "c"],
        categories=["color", "color", "OCR", "OCR", "code_reasoning", "code_reasoning"],
    )
    assert result["color/score"] == 200 and result["OCR/acc"] == 0.5 and result["OCR/acc_plus"] == 0
    assert result["perception"] == 250 and result["cognition"] == 0
    with pytest.raises(ValueError, match="unknown MME subtasks"):
        metrics["mme"].compute(predictions=["yes"], references=["Yes"], question_ids=["a"], categories=["colour"])


def test_multiple_choice(metrics):
    # B right; "The answer is A." right; "paris" is option B: right; "(C) x" vs D: wrong -> 3/4. Circular: q1
    # (rows 1, 2) all right, q2 (rows 3, 4) not -> 1/2.
    result = metrics["multiple_choice"].compute(
        predictions=["B", "The answer is A.", "paris", "(C) x"],
        references=["B", "A", "B", "D"],
        options=[["x", "y"], ["x", "y"], ["london", "paris"], ["a", "b", "c", "d"]],
        question_ids=["q1", "q1", "q2", "q2"],
    )
    assert result == pytest.approx({"accuracy": 0.75, "circular_accuracy": 0.5})


def test_answer_parsers():
    assert yes_no("No, there is not.") == "no" and yes_no("Yes. Not really") == "yes"
    assert yes_no_strict("Yes, it is") == "yes" and yes_no_strict("Nothing") is None
    assert choice_letter("B. a cat") == "B" and choice_letter("I'd say (C)") is None
    assert choice_letter("it is a cat", ["dog", "cat"]) == "B" and choice_letter("Z", ["a", "b"]) is None


def test_bad_inputs(metrics):
    with pytest.raises(ValueError, match="number of predictions"):
        metrics["exact_match"].compute(predictions=["a", "b"], references=["a"])
    with pytest.raises(ValueError, match="no predictions"):
        metrics["pope"].compute(predictions=[], references=[])
