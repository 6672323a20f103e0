"""Each benchmark's metric against its reference evaluator, through the public API (`load_metric(...).compute`), on
the case tables of reference_cases.py (worked through each reference's rules; see its docstring)."""

import pytest

from asymoe.eval.scoring import load_metric

from reference_cases import (
    EXACT_MATCH, GQA, GQA_LMMS_EVAL, MMBENCH, MME, MME_LMMS_EVAL, POPE, SCIENCEQA, SCIENCEQA_LMMS_EVAL, TEXTVQA, VIZWIZ,
    VQAV2, VQAV2_OPTIONS,
)


@pytest.fixture(scope="module")
def metric():
    loaded = {}

    def get(name):
        if name not in loaded:
            loaded[name] = load_metric(name)
        return loaded[name]

    return get


@pytest.mark.parametrize(("prediction", "answers", "expected"), VQAV2)
def test_vqav2_llava(metric, prediction, answers, expected):
    result = metric("vqa_accuracy").compute(predictions=[prediction], references=[answers])
    assert result["vqa_accuracy"] == pytest.approx(expected)


@pytest.mark.parametrize(("prediction", "answers", "expected"), VQAV2_OPTIONS)
def test_vqav2_options(metric, prediction, answers, expected):
    for scoring, value in expected.items():
        result = metric("vqa_accuracy").compute(predictions=[prediction], references=[answers], scoring=scoring)
        assert result["vqa_accuracy"] == pytest.approx(value), scoring


@pytest.mark.parametrize(("prediction", "answers", "expected"), TEXTVQA)
def test_textvqa_m4c(metric, prediction, answers, expected):
    result = metric("vqa_accuracy").compute(predictions=[prediction], references=[answers], scoring="m4c")
    assert result["vqa_accuracy"] == pytest.approx(expected)


@pytest.mark.parametrize(("prediction", "answers", "expected"), VIZWIZ)
def test_vizwiz_m4c(metric, prediction, answers, expected):
    result = metric("vqa_accuracy").compute(predictions=[prediction], references=[answers], scoring="m4c")
    assert result["vqa_accuracy"] == pytest.approx(expected)


@pytest.mark.parametrize(("prediction", "answer", "expected"), GQA)
def test_gqa_llava(metric, prediction, answer, expected):
    assert metric("gqa").compute(predictions=[prediction], references=[answer]) == {"accuracy": expected}


@pytest.mark.parametrize(("prediction", "answer", "expected"), GQA_LMMS_EVAL)
def test_gqa_lmms_eval(metric, prediction, answer, expected):
    result = metric("gqa").compute(predictions=[prediction], references=[answer], scoring="lmms-eval")
    assert result == {"accuracy": expected}


@pytest.mark.parametrize(("prediction", "letter", "expected"), SCIENCEQA)
def test_scienceqa_llava(metric, prediction, letter, expected):
    assert metric("scienceqa").compute(predictions=[prediction], references=[letter]) == {"accuracy": expected}


@pytest.mark.parametrize(("prediction", "letter", "expected"), SCIENCEQA_LMMS_EVAL)
def test_scienceqa_lmms_eval(metric, prediction, letter, expected):
    result = metric("scienceqa").compute(predictions=[prediction], references=[letter], scoring="lmms-eval")
    assert result == {"accuracy": expected}


@pytest.mark.parametrize(("prediction", "reading"), POPE)
def test_pope_llava(metric, prediction, reading):
    result = metric("pope").compute(predictions=[prediction], references=[reading])
    assert result["accuracy"] == 1.0 and result["yes_ratio"] == (reading == "yes")


def _mme_both(metric, prediction, reference, scoring):
    """acc of one image whose two questions get the same prediction and reference."""
    result = metric("mme").compute(predictions=[prediction] * 2, references=[reference] * 2, question_ids=["a"] * 2,
                                   categories=["OCR"] * 2, scoring=scoring)
    return result["OCR/acc"]


@pytest.mark.parametrize(("prediction", "reading"), MME)
def test_mme_llava(metric, prediction, reading):
    for reference in ("yes", "no"):
        assert _mme_both(metric, prediction, reference, "llava-1.5") == (reading == reference), reference


@pytest.mark.parametrize(("prediction", "reading"), MME_LMMS_EVAL)
def test_mme_lmms_eval(metric, prediction, reading):
    for reference in ("yes", "no"):
        assert _mme_both(metric, prediction, reference, "lmms-eval") == (reading == reference), reference


@pytest.mark.parametrize(("prediction", "letter", "expected"), MMBENCH)
def test_mmbench_lmms_eval(metric, prediction, letter, expected):
    result = metric("mmbench").compute(predictions=[prediction], references=[letter],
                                       options=[["cat", "dog", "bird", "fish"]], indices=[7])
    assert result == {"accuracy": expected}


@pytest.mark.parametrize(("prediction", "answers", "expected"), EXACT_MATCH)
def test_exact_match(metric, prediction, answers, expected):
    assert metric("exact_match").compute(predictions=[prediction], references=[answers]) == {"exact_match": expected}
