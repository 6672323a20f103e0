"""The main job at toy scale: every stage runs through the public pieces, the report is written, a re-run reuses
the finished stages, and the upcycled models start from the dense model's function. The shipped dense start is the
one the defaults ask for, and nothing else; the comparison's statistics are right on known numbers."""

import importlib.util
import json
import math
import shutil

import pytest
import torch
from conftest import REPO, needs_trl_vision_masks
from transformers import AutoModelForImageTextToText

from asymoe.demo import START, ComparisonConfig, run_comparison, traces
from asymoe.dense_start import RECORD, SHIPPED, pretrain_vision, shipped_dense_start
from asymoe.io import file_sha256

TOY = dict(pretrain_size=32, train_size=32, validation_size=8, test_size=8, vision_pretrain_steps=2,
           pretrain_steps=2, finetune_steps=1, easy_vqa_steps=1, easy_vqa_train_size=16, easy_vqa_test_size=8,
           batch_size=8, analysis_rows=4)


def _compare_module():
    spec = importlib.util.spec_from_file_location("compare", REPO / "experiments" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = ComparisonConfig(output=str(tmp_path_factory.mktemp("demo") / "out"), **TOY,
                              variants={"dense": {}, "vanilla": {"moe_variant": "vanilla"},
                                        "asymoe": {"moe_variant": "asymoe"}})
    messages = []
    outcome = run_comparison(config, log=messages.append)
    return config, outcome, messages


@needs_trl_vision_masks
def test_stages_and_report(run):
    config, outcome, messages = run
    assert list(outcome["results"]) == [START, "dense", "vanilla", "asymoe"]
    report = outcome["report"].read_text()
    for name in outcome["results"]:
        assert f"| {name} |" in report
    root = outcome["report"].parent
    for plot in ("eval/accuracy.png", "eval/analysis/evidence_sensitivity.png", "eval/analysis/routing_asymoe.png"):
        assert (root / plot).read_bytes()[:4] == b"\x89PNG" and f"({plot})" in report
    assert not (root / "eval" / "analysis" / "routing_dense.png").exists()
    assert all(m.startswith("[") for m in messages) and any("building" in m for m in messages)
    assert not any("shipped" in m for m in messages)  # toy settings: the dense start is trained
    asymoe = outcome["results"]["asymoe"]
    counts = asymoe["parameters"]
    assert counts["language_model_activated"] < counts["language_model"]
    assert {"grounding_prior", "grounding_validation_counter", "easy_vqa"} <= set(asymoe["results"])
    assert "easy_vqa" not in outcome["results"][START]["results"]
    layers = asymoe["analysis"]["counter"]["layers"]
    # Blanking the image changes what every layer's FFN computes on the text after it (a broken blanking, or an
    # analysis that read the unblanked run twice, gives exactly 0).
    assert len(layers) == 4 and all(0 < entry["evidence_sensitivity"] < math.inf for entry in layers)
    assert "evidence_readout" in layers[3] and "hyperbolic" in layers[1]
    assert "| model | evidence share | evidence share (training) | gate g |" in report
    start = outcome["results"][START]
    asymoe_traces, vanilla_traces = (traces(outcome["results"][name], start) for name in ("asymoe", "vanilla"))
    assert 0 <= asymoe_traces["inter share leaf"] <= 1 and 0 < asymoe_traces["gate g"] < 1
    # Vanilla MoE's experts are reachable by both modalities, but they are not inter-modality experts.
    assert vanilla_traces["inter share leaf"] is None and vanilla_traces["gate g"] is None
    record = json.loads((root / "dense" / "model" / RECORD).read_text())
    assert record["settings"] == json.loads(json.dumps(config.dense_settings()))
    assert record["sha256"] == file_sha256(root / "dense" / "model" / "model.safetensors")
    assert not list(root.rglob(".*"))  # no temporary stage directory or file left behind


@needs_trl_vision_masks
def test_rerun_reuses_finished_stages(run):
    config, outcome, _ = run
    messages = []
    again = run_comparison(config, log=messages.append)
    assert not any("building" in m for m in messages)
    assert again["results"] == outcome["results"]


@needs_trl_vision_masks
def test_upcycled_model_equals_the_dense_model_before_finetuning(run):
    config, outcome, _ = run
    root = outcome["report"].parent
    dense = AutoModelForImageTextToText.from_pretrained(root / "dense" / "model").eval()
    asymoe = AutoModelForImageTextToText.from_pretrained(root / "upcycled" / "asymoe" / "model").eval()
    manifest = json.loads((root / "upcycled" / "asymoe" / "model" / "config.json").read_text())["upcycling"]
    assert manifest["mode"] == "copy" and manifest["noise_std"] == config.noise_std
    size, patch = config.vision["image_size"], config.vision["patch_size"]
    ids = torch.tensor([[2] + [dense.config.image_token_index] * (size // patch) ** 2 + [5, 6, 7]])
    pixels = torch.randn(1, 3, size, size)
    with torch.no_grad():
        difference = (dense(input_ids=ids, pixel_values=pixels).logits
                      - asymoe(input_ids=ids, pixel_values=pixels).logits).abs().max()
    assert difference < 0.05  # copy mode + 1% expert noise: close to, not exactly, the dense function


def test_shipped_dense_start_is_the_one_the_defaults_ask_for(tmp_path):
    """The demo copies the shipped checkpoint only for exactly its settings, whatever the run's seed, and refuses a
    copy whose weights do not have the recorded hash."""
    settings = ComparisonConfig(seed=3).dense_settings()
    assert shipped_dense_start(settings) == SHIPPED
    model = AutoModelForImageTextToText.from_pretrained(SHIPPED)
    assert model.config.vision_feature_layer == -1 and model.config.vision_config.patch_size == 4
    assert shipped_dense_start({**settings, "dense_seed": 1}) is None
    assert shipped_dense_start({**settings, "pretrain_steps": 1}) is None
    copy = tmp_path / "dense_start"
    shutil.copytree(SHIPPED, copy)
    with open(copy / "model.safetensors", "r+b") as handle:
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    with pytest.raises(ValueError, match="SHA-256.*re-train it"):
        shipped_dense_start(settings, shipped=copy)


def test_dense_start_from_scratch_is_deterministic(tmp_path):
    """What makes the shipped checkpoint reproducible by its command: the same settings give the same weights."""
    from asymoe.dense_start import train_dense_start

    config = ComparisonConfig(**TOY)
    first, second = (train_dense_start(config, tmp_path / name, log=lambda message: None) for name in ("a", "b"))
    record = json.loads((first / RECORD).read_text())
    assert record == json.loads((second / RECORD).read_text())
    assert record["sha256"] == file_sha256(first / "model.safetensors")
    assert not (tmp_path / "a" / "scenes").exists() and not list(first.glob("checkpoint-*"))


def test_vision_pretraining_trains_the_tower_only():
    from asymoe.eval.grounding import GroundingConfig, build_grounding
    from asymoe.tiny import build_tokenizer, tiny_llava

    scenes = build_grounding(GroundingConfig(image_size=24, train_size=8, validation_size=0, test_size=0))["train"]
    model, processor = tiny_llava(build_tokenizer(["red"]), vision={"image_size": 24, "patch_size": 6},
                                  vision_feature_layer=-1)
    before = {name: parameter.clone() for name, parameter in model.named_parameters()}
    history = pretrain_vision(model, processor.image_processor, scenes, steps=3, batch_size=4, learning_rate=1e-2,
                              seed=0, log=lambda message: None)
    assert [record["step"] for record in history] == [1, 2, 3]
    changed = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}
    assert changed and all("vision_tower" in name for name in changed)
    assert any("layers.1." in name for name in changed)  # the last layer, which the projector reads (-1)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="finetune_steps"):
        ComparisonConfig(finetune_steps=0)
    with pytest.raises(ValueError, match="variants is empty"):
        ComparisonConfig(variants={})


def test_paired_intervals():
    compare = _compare_module()
    assert compare.t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)
    assert compare.t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-3)
    stats = compare.interval([0.1, 0.2, 0.3, 0.4, 0.5])
    half = 2.7764 * stats["std"] / 5 ** 0.5
    assert stats["mean"] == pytest.approx(0.3) and stats["low"] == pytest.approx(0.3 - half, abs=1e-4)
    assert compare.interval([0.2])["low"] is None
