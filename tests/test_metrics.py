"""The shipped `evaluate` metric modules, loaded by path offline, against hand-computed values."""

import os
import shutil
import subprocess
import sys

import pytest

from asymoe.eval import scoring
from asymoe.eval.answers import evalai_answer, mmbench_letter, mme_yes_no, normalize_answer, pope_yes_no, scienceqa_letter
from asymoe.eval.scoring import available_metrics, load_metric

NAMES = ["exact_match", "gqa", "mmbench", "mme", "pope", "scienceqa", "vqa_accuracy"]


@pytest.fixture(scope="module")
def metrics():
    return {name: load_metric(name) for name in available_metrics()}


def test_all_metrics_ship():
    assert available_metrics() == NAMES
    with pytest.raises(ValueError, match=r"unknown metric 'accuracy'; the shipped metrics are \['exact_match'"):
        load_metric("accuracy")


def test_inputs_kept_in_memory_unless_distributed():
    assert load_metric("pope").keep_in_memory is True
    assert load_metric("pope", keep_in_memory=False).keep_in_memory is False
    # evaluate refuses keep_in_memory with several processes: the default follows num_process.
    assert load_metric("pope", num_process=2, process_id=0, experiment_id="t").keep_in_memory is False


def test_load_reads_the_install_only(tmp_path, monkeypatch):
    """Loading and computing write nothing next to the modules (a read-only install works)."""
    shutil.copytree(scoring.METRICS_DIR, tmp_path / "metrics")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.setattr(scoring, "METRICS_DIR", tmp_path / "metrics")
    assert load_metric("pope").compute(predictions=["yes"], references=["yes"])["accuracy"] == 1.0
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_load_offline_with_an_empty_cache(tmp_path):
    """A fresh Hugging Face home (empty modules cache) and HF_HUB_OFFLINE=1: the modules still load by path."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_MODULES_CACHE", "HF_EVALUATE_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    code = ("from asymoe.eval.scoring import load_metric; "
            "print(load_metric('vqa_accuracy').compute(predictions=['two'], references=[['2'] * 10]))")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "{'vqa_accuracy': 1.0}" in result.stdout
    assert (tmp_path / "hf_home" / "modules" / "evaluate_modules" / "metrics").is_dir()


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [("Two", "2"), ("a dog.", "dog"), ("dont", "don't"), ("The Cat!", "cat"), ("ten", "10"), ("none", "0"),
     ("1,000", "1000"),  # a comma between digits: every mark is deleted, not spaced
     ("3.5", "3.5"), ("yes, it is", "yes it is"), ("left-hand", "left hand"), ("whats\tthat", "what's that"),
     ("oclock", "o'clock"),
     # Spacing or deleting is decided on the answer as given: "-" is next to no space in it, so both become spaces
     # (deciding after "/" became a space would delete them: "x y zw").
     ("x/-y z-w", "x y z w"),
     ("its", "its"), ("Im", "im"),  # not in the official table (its "Im" never matches a lowercased word)
     ("a" + "." * 40, "a" + "." * 8)],  # the references remove at most 32 periods (re.UNICODE passed as the count)
)
def test_vqa_normalisation(raw, normalised):
    assert normalize_answer(raw) == normalised


@pytest.mark.parametrize(
    ("raw", "processed"),
    [("What's", "what 's"), ("coca,cola", "cocacola"), ("Why?", "why"), ("1,000", "1000"), ("A t-shirt.", "t shirt"),
     ("the cat's", "cat 's"), ("whats", "what's"), ("Two\tdogs", "2 dogs")],
)
def test_evalai_answer_processor(raw, processed):
    assert evalai_answer(raw) == processed


def test_vqa_accuracy_leave_one_out(metrics):
    # Q1: "Two" -> "2"; 4 of 10 said 2 ("two" normalises too), 6 said 3. Leaving out a "2" leaves 3 matches
    # (min(1, 3/3) = 1), leaving out a "3" leaves 4 (1): 1.0. Q2: 2 of 10 said "red": leaving out one of them
    # leaves 1 match (1/3, twice), otherwise 2 (2/3, 8 times): (2/3 + 16/3) / 10 = 0.6. Q3: no match: 0.
    result = metrics["vqa_accuracy"].compute(
        predictions=["Two", "red", "blue"],
        references=[["2"] * 3 + ["two"] + ["3"] * 6, ["red"] * 2 + ["pink"] * 8, ["green"] * 10],
    )
    assert result["vqa_accuracy"] == pytest.approx((1.0 + 0.6 + 0.0) / 3)


def test_vqa_accuracy_with_fewer_answers(metrics):
    # The references' formula for any number n of answers: mean over the n subsets of n - 1 of min(1, matches / 3).
    # Three "red" (2 matches per subset): 2/3. Four, two "red": leaving a red out leaves 1 (1/3, twice), else 2
    # (2/3, twice): 0.5. One answer: no other answers to match, 0.
    result = metrics["vqa_accuracy"].compute(
        predictions=["red", "red", "red"], references=[["red"] * 3, ["red", "red", "blue", "pink"], ["red"]],
        scoring="m4c",
    )
    assert result["vqa_accuracy"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)


def test_exact_match(metrics):
    em = metrics["exact_match"]
    # "A red." -> "red" right, "blue" vs "green" wrong, "2" vs "two" -> "2" right: 2/3.
    assert em.compute(predictions=["A red.", "blue", "2"], references=["red", "green", "two"])["exact_match"] == (
        pytest.approx(2 / 3))
    # A list accepts any of its answers; single and list references mix: 2/2.
    assert em.compute(predictions=["blue", "red"], references=[["green", "blue"], "red"])["exact_match"] == 1.0
    em.add(prediction="no", reference="yes")
    em.add_batch(predictions=["Yes"], references=[["yes", "y"]])
    assert em.compute()["exact_match"] == 0.5
    with pytest.raises(ValueError, match="no reference answer"):
        em.compute(predictions=["a"], references=[[]])


def test_pope(metrics):
    # LLaVA's reading: yes, no, no ("not"), yes ("NO" is not "no"), yes (first sentence only) |
    # truth: yes, yes, no, no, yes -> tp 2, fn 1, tn 1, fp 1.
    result = metrics["pope"].compute(
        predictions=["Yes, there is.", "No.", "There is not a dog", "NO", "I think so. No doubt"],
        references=["yes", "yes", "no", "No", "yes"],
    )
    assert result == pytest.approx(
        {"accuracy": 3 / 5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 3 / 5})
    # No "yes" reading: precision, recall and F1 are 0, not a division error.
    none = metrics["pope"].compute(predictions=["no"], references=["yes"])
    assert none == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    with pytest.raises(ValueError, match=r"POPE references must be 'yes' or 'no'.*'maybe'"):
        metrics["pope"].compute(predictions=["yes"], references=["maybe"])


def test_mme(metrics):
    # color: image a both right -> acc 1, acc+ 1 -> 200. OCR: image b: "yes it is" right, "maybe" (neither) wrong;
    # image d: "Nothing" reads "no" (first four characters), right, and "No." right -> acc 3/4, acc+ 1/2 -> 125.
    # code_reasoning: image c both wrong -> 0. perception = 325, cognition = 0.
    result = metrics["mme"].compute(
        predictions=["Yes", "No", "yes it is", "maybe", "Nothing", "No.", "no", "yes"],
        references=["Yes", "No", "Yes", "No", "No", "No", "Yes", "No"],
        question_ids=["a", "a", "b", "b", "d", "d", "c", "c"],
        categories=["color"] * 2 + ["OCR"] * 4 + ["code_reasoning"] * 2,
    )
    assert result == pytest.approx({
        "color/acc": 1.0, "color/acc_plus": 1.0, "color/score": 200.0,
        "OCR/acc": 0.75, "OCR/acc_plus": 0.5, "OCR/score": 125.0,
        "code_reasoning/acc": 0.0, "code_reasoning/acc_plus": 0.0, "code_reasoning/score": 0.0,
        "perception": 325.0, "cognition": 0.0,
    })
    with pytest.raises(ValueError, match="unknown MME subtasks"):
        metrics["mme"].compute(predictions=["yes"], references=["Yes"], question_ids=["a"], categories=["colour"])
    with pytest.raises(ValueError, match=r"MME references must be 'yes' or 'no'.*'y'"):
        metrics["mme"].compute(predictions=["yes"], references=["Y"], question_ids=["a"], categories=["OCR"])
    with pytest.raises(ValueError, match="needs question_ids"):
        metrics["mme"].compute(predictions=["yes"], references=["Yes"])
    with pytest.raises(ValueError, match=r"the two questions of each image together; images \['OCR/b'\]"):
        metrics["mme"].compute(predictions=["yes"] * 3, references=["Yes"] * 3, question_ids=["a", "a", "b"],
                               categories=["OCR"] * 3)


def test_mmbench_circular(metrics):
    # Question 0: main row and its variant (index + 1,000,000) right -> right. Question 1: variant wrong -> wrong.
    # Index 2,000,005 is a variant whose main row (5) is absent: it does not count, right or wrong. 1/2.
    options = [["cat", "dog", None, None]] * 5
    result = metrics["mmbench"].compute(
        predictions=["A", "B", "B", "A", "A"], references=["A", "B", "B", "B", "B"], options=options,
        indices=[0, 1_000_000, 1, 1_000_001, 2_000_005],
    )
    assert result == {"accuracy": 0.5}
    with pytest.raises(ValueError, match="no MMBench main rows"):
        metrics["mmbench"].compute(predictions=["A"], references=["A"], options=options[:1], indices=[1_000_000])
    with pytest.raises(ValueError, match="needs options"):
        metrics["mmbench"].compute(predictions=["A"], references=["A"])
    with pytest.raises(ValueError, match=r"references must be option letters \(ABCD\), got \['E'\]"):
        metrics["mmbench"].compute(predictions=["A"], references=["E"], options=options[:1], indices=[0])
    with pytest.raises(ValueError, match="indices must be integers"):
        metrics["mmbench"].compute(predictions=["A"], references=["A"], options=options[:1], indices=["q1"])


def test_scoring_choices(metrics):
    with pytest.raises(ValueError, match=r"scienceqa has no scoring 'llava'; choose one of \['llava-1.5', 'lmms-eval'\]"):
        metrics["scienceqa"].compute(predictions=["A"], references=["A"], scoring="llava")
    with pytest.raises(ValueError, match=r"references must be option letters \(ABCDE\), got \['F'\]"):
        metrics["scienceqa"].compute(predictions=["A"], references=["F"])
    with pytest.raises(ValueError, match="pope has no scoring 'lmms-eval'"):
        metrics["pope"].compute(predictions=["yes"], references=["yes"], scoring="lmms-eval")


def test_answer_parsers():
    assert pope_yes_no("No, there is not.") == "no" and pope_yes_no("Yes. Not really") == "yes"
    assert pope_yes_no("Not really") == "yes"  # LLaVA matches "no", "No" and "not", not "Not"
    assert mme_yes_no("Yes, it is") == "yes" and mme_yes_no("not") == "no" and mme_yes_no("It is") is None
    assert mme_yes_no("y") is None and mme_yes_no("y", "lmms-eval") == "yes"
    assert scienceqa_letter("The answer is F.") is None  # LLaVA's options are A-E
    assert scienceqa_letter("B. cat") == "B" and scienceqa_letter("B.", "lmms-eval") == "B"
    # The matcher, the option texts, then the extractor, which ranks an opening letter over "the answer is".
    assert mmbench_letter("(C)", ["x", "y", "z"]) == "C" and mmbench_letter("a z", ["x", "y", "z"]) == "C"
    assert mmbench_letter("B then the answer is C", ["x", "y", "z"]) == "B"
    assert mmbench_letter("nothing", [None, None]) is None


@pytest.mark.parametrize("name", NAMES)
def test_empty_input(metrics, name):
    extra = {"mme": {"question_ids": [], "categories": []}, "mmbench": {"options": [], "indices": []}}.get(name, {})
    with pytest.raises(ValueError, match="no predictions"):
        metrics[name].compute(predictions=[], references=[], **extra)


def test_mismatched_lengths(metrics):
    with pytest.raises(ValueError, match="number of predictions"):
        metrics["exact_match"].compute(predictions=["a", "b"], references=["a"])
    with pytest.raises(ValueError, match="inputs differ in length"):
        metrics["mmbench"].compute(predictions=["A", "B"], references=["A", "B"], options=[[], []], indices=[0])
    with pytest.raises(ValueError, match="inputs differ in length"):
        metrics["mme"].compute(predictions=["yes"], references=["Yes"], question_ids=["a", "b"], categories=["OCR"])
    with pytest.raises(ValueError, match="no reference answers"):
        metrics["vqa_accuracy"].compute(predictions=["a"], references=[[]])
