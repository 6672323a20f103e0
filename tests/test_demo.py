"""The main job at toy scale: every stage runs through the public pieces, the report is written, a re-run reuses
the finished stages, and the upcycled models start from the dense model's function."""

import json
import math

import pytest
import torch
from conftest import needs_trl_vision_masks
from transformers import AutoModelForImageTextToText

from asymoe.demo import START, ComparisonConfig, run_comparison

pytestmark = needs_trl_vision_masks


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = ComparisonConfig(output=str(tmp_path_factory.mktemp("demo") / "out"), pretrain_size=32, train_size=32,
                              test_size=8, pretrain_steps=2, finetune_steps=1, batch_size=8, analysis_rows=4,
                              variants={"dense": {}, "asymoe": {"moe_variant": "asymoe"}})
    messages = []
    outcome = run_comparison(config, log=messages.append)
    return config, outcome, messages


def test_stages_and_report(run):
    config, outcome, messages = run
    assert list(outcome["results"]) == [START, "dense", "asymoe"]
    report = outcome["report"].read_text()
    for name in outcome["results"]:
        assert f"| {name} |" in report
    root = outcome["report"].parent
    for plot in ("accuracy.png", "analysis/evidence_sensitivity.png", "analysis/routing_asymoe.png"):
        assert (root / plot).read_bytes()[:4] == b"\x89PNG" and f"({plot})" in report
    assert not (root / "analysis" / "routing_dense.png").exists()
    assert all(m.startswith("[") for m in messages) and any("building" in m for m in messages)
    counts = outcome["results"]["asymoe"]["parameters"]
    assert counts["language_model_activated"] < counts["language_model"]
    layers = outcome["results"]["asymoe"]["analysis"]["layers"]
    # Blanking the image changes what every layer's FFN computes on the text after it (a broken blanking, or an
    # analysis that read the unblanked run twice, gives exactly 0).
    assert len(layers) == 4 and all(0 < entry["evidence_sensitivity"] < math.inf for entry in layers)
    assert not list(root.rglob(".*"))  # no temporary stage directory or file left behind


def test_rerun_reuses_finished_stages(run):
    config, outcome, _ = run
    messages = []
    again = run_comparison(config, log=messages.append)
    assert not any("building" in m for m in messages)
    assert again["results"] == outcome["results"]


def test_upcycled_model_equals_the_dense_model_before_finetuning(run):
    config, outcome, _ = run
    root = outcome["report"].parent
    dense = AutoModelForImageTextToText.from_pretrained(root / "dense" / "model").eval()
    asymoe = AutoModelForImageTextToText.from_pretrained(root / "upcycled" / "asymoe" / "model").eval()
    manifest = json.loads((root / "upcycled" / "asymoe" / "model" / "config.json").read_text())["upcycling"]
    assert manifest["mode"] == "copy" and manifest["noise_std"] == config.noise_std
    ids = torch.tensor([[2] + [dense.config.image_token_index] * 16 + [5, 6, 7]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        difference = (dense(input_ids=ids, pixel_values=pixels).logits
                      - asymoe(input_ids=ids, pixel_values=pixels).logits).abs().max()
    assert difference < 0.05  # copy mode + 1% expert noise: close to, not exactly, the dense function


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="finetune_steps"):
        ComparisonConfig(finetune_steps=0)
    with pytest.raises(ValueError, match="variants is empty"):
        ComparisonConfig(variants={})
