"""`asymoe analyze`: per-layer evidence sensitivity, attention on evidence and routing, for every variant."""

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from asymoe import AsyMoEForConditionalGeneration
from asymoe.eval.analysis import (
    analyze,
    make_parser,
    mean_colour_image,
    plot_analysis,
    relative_change,
    text_after_image_mask,
)
from asymoe.eval.analysis import (
    main as analyze_main,
)
from asymoe.finetune.data import SHORT_ANSWER_PROMPT, vqa_messages
from asymoe.tiny import build_tokenizer, tiny_config, tiny_llava, tiny_processor

WORDS = "what colour is the shape circle square red blue ?".split() + SHORT_ANSWER_PROMPT.split()
QUESTIONS = ["what colour is the shape ?", "what shape ?", "is the circle red or blue ?"]
VARIANTS = ("dense", "vanilla", "modality", "asymoe")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(WORDS)


@pytest.fixture(scope="module")
def dataset():
    """Three rows in the project's VQA schema, questions of different lengths (so batches are padded)."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in QUESTIONS]
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "question": QUESTIONS, "answer": ["red"] * 3}, features)


def tiny_model(tokenizer, variant: str = "asymoe") -> AsyMoEForConditionalGeneration:
    torch.manual_seed(0)
    return AsyMoEForConditionalGeneration(tiny_config(tokenizer, variant)).eval()


@pytest.fixture(scope="module")
def analyses(tokenizer, dataset):
    processor = tiny_processor(tiny_config(tokenizer), tokenizer)
    return {variant: analyze(tiny_model(tokenizer, variant), processor, dataset, batch_size=2) for variant in VARIANTS}


def test_math_helpers():
    original = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    blanked = torch.tensor([[0.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    assert relative_change(original, blanked).tolist() == pytest.approx([0.6, 0.0, 0.0])
    image = 9
    input_ids = torch.tensor([[0, 0, 2, image, image, 5, 6], [2, image, image, 5, 6, 7, 8], [0, 2, 5, 6, 7, 8, 9]])
    attention_mask = (input_ids != 0).long()
    expected = [[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1, 1], [0] * 7]  # no image: no text "after the image"
    assert text_after_image_mask(input_ids, attention_mask, image).long().tolist() == expected
    picture = Image.fromarray(np.array([[[0, 10, 200], [100, 30, 0]]], dtype=np.uint8))
    blank = mean_colour_image(picture)
    assert blank.size == picture.size and np.all(np.asarray(blank) == [50, 20, 100])


def test_curves_routing_and_plots_for_every_variant(analyses, tmp_path):
    for variant, results in analyses.items():
        layers = results["layers"]
        assert [entry["layer"] for entry in layers] == [0, 1, 2, 3]
        assert results["examples"] == 3 and results["image_tokens"] == 3 * 16
        for entry in layers:
            # Untrained models: text after the image depends on it from layer 0 on (attention mixes it in).
            assert 0.0 < entry["evidence_sensitivity"] < 10.0
            assert 0.0 < entry["attention_on_evidence"] < 1.0
            if entry["moe"]:
                groups = entry["sensitivity_by_group"]
                assert "vision" not in groups
                assert sum(stats["tokens"] for stats in groups.values()) == results["text_tokens"]
        routing = results["routing"]
        assert [entry["layer"] for entry in routing] == results["model"]["moe_layers"]
        assert [entry["layer"] for entry in layers if entry["moe"]] == results["model"]["moe_layers"]
        for entry in routing:
            assert entry["image"]["tokens"] == 3 * 16
            for modality in ("image", "text"):
                assert sum(entry[modality]["group_load"].values()) == pytest.approx(1.0)
            assert entry["image"]["group_load"].get("text", 0.0) == 0.0
            assert entry["image"]["group_load"].get("evidence", 0.0) == 0.0
            assert entry["text"]["group_load"].get("vision", 0.0) == 0.0
    assert analyses["dense"]["routing"] == []
    assert set(analyses["asymoe"]["layers"][3]["sensitivity_by_group"]) == {"text", "inter", "evidence"}
    # A fresh AsyMoE: W_o = 0 (the readout adds nothing), Möbius biases 0 at curvature softplus(0) init.
    readouts = {entry["layer"]: entry.get("evidence_readout") for entry in analyses["asymoe"]["layers"]}
    assert readouts[1] is None and readouts[3]["w_o_norm"] == 0.0 and readouts[3]["injection"] == 0.0
    assert 0.0 < readouts[3]["gate"] < 1.0
    for layer in (1, 3):
        hyperbolic = analyses["asymoe"]["layers"][layer]["hyperbolic"]
        assert hyperbolic["mobius_bias_norm"] == {"gate_up": 0.0, "down": 0.0} and hyperbolic["curvature"] > 0
    assert not any("evidence_readout" in entry or "hyperbolic" in entry
                   for variant in ("dense", "vanilla", "modality") for entry in analyses[variant]["layers"])
    paths = plot_analysis(analyses, tmp_path)
    assert sorted(path.name for path in paths) == sorted(
        ["evidence_sensitivity.png", "attention_on_evidence.png", "sensitivity_by_group.png",
         "routing_vanilla.png", "routing_modality.png", "routing_asymoe.png"])
    assert all(path.read_bytes()[:4] == b"\x89PNG" for path in paths)


@pytest.mark.parametrize("blank", ["mean", "zero"])
def test_sensitivity_is_zero_without_image_features(tokenizer, dataset, blank):
    model = tiny_model(tokenizer)
    with torch.no_grad():
        for parameter in model.model.multi_modal_projector.linear_2.parameters():
            parameter.zero_()
    results = analyze(model, tiny_processor(model.config, tokenizer), dataset, batch_size=2, blank=blank)
    assert [entry["evidence_sensitivity"] for entry in results["layers"]] == [0.0] * 4
    for entry in results["layers"]:
        for stats in entry.get("sensitivity_by_group", {}).values():
            assert stats["value"] in (0.0, None)


def test_evidence_readout_by_hand(tokenizer, dataset):
    """With W_o = I·a and the gate's weights 0 and bias b, the readout adds σ(b)·a·r: the gate reads σ(b) and the
    injection ‖σ(b)·a·r‖ / ‖h‖ grows linearly with a."""
    model = tiny_model(tokenizer)
    readout = model.model.language_model.layers[3].mlp.evidence
    processor = tiny_processor(model.config, tokenizer)
    injections = []
    for scale in (1.0, 2.0):
        with torch.no_grad():
            readout.o_proj.weight.copy_(scale * torch.eye(*readout.o_proj.weight.shape))
            readout.gate.weight.zero_()
            readout.gate.bias.fill_(0.5)
        entry = analyze(model, processor, dataset, batch_size=2)["layers"][3]["evidence_readout"]
        assert entry["gate"] == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item(), rel=1e-6)
        assert entry["w_o_norm"] == pytest.approx(scale * readout.o_proj.weight.shape[0] ** 0.5, rel=1e-6)
        injections.append(entry["injection"])
    assert injections[0] > 0 and injections[1] == pytest.approx(2 * injections[0], rel=1e-4)


def test_attention_mass_equals_uniform_attention_by_hand(tokenizer, dataset):
    """With zero query projections every token attends uniformly to the tokens up to itself, so a text token at
    position k puts 16 / (k + 1) of its attention on the 16 image tokens; padded batches give what rows alone give."""
    model = tiny_model(tokenizer)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.zero_()
    processor = tiny_processor(model.config, tokenizer)
    masses = []
    for row in dataset:
        prompt = processor.apply_chat_template(vqa_messages(row["question"]), add_generation_prompt=True)
        ids = processor(images=[row["image"]], text=prompt)["input_ids"][0]
        last_image = max(i for i, token in enumerate(ids) if token == model.config.image_token_id)
        masses += [16 / (position + 1) for position in range(last_image + 1, len(ids))]
    expected = sum(masses) / len(masses)
    by_batch_size = {batch_size: analyze(model, processor, dataset, batch_size=batch_size) for batch_size in (1, 2)}
    for results in by_batch_size.values():
        assert results["text_tokens"] == len(masses)
        for entry in results["layers"]:
            assert entry["attention_on_evidence"] == pytest.approx(expected, rel=1e-5)
    alone, padded = (by_batch_size[size]["layers"] for size in (1, 2))
    assert [entry["evidence_sensitivity"] for entry in padded] == pytest.approx(
        [entry["evidence_sensitivity"] for entry in alone], rel=1e-4)


def test_command_line_compares_models(tokenizer, dataset, tmp_path):
    asymoe = tiny_model(tokenizer)
    asymoe.save_pretrained(tmp_path / "asymoe")
    tiny_processor(asymoe.config, tokenizer).save_pretrained(tmp_path / "asymoe")
    llava, llava_processor = tiny_llava(tokenizer)
    llava.save_pretrained(tmp_path / "llava")
    llava_processor.save_pretrained(tmp_path / "llava")
    datasets.DatasetDict({"test_counter": dataset}).save_to_disk(str(tmp_path / "grounding"))
    parser = make_parser()

    def main(*argv):
        return analyze_main(parser.parse_args([str(arg) for arg in argv]))

    output = tmp_path / "analysis"
    assert main(tmp_path / "asymoe", tmp_path / "llava", "--data", tmp_path / "grounding", "--limit", 2,
                "--blank", "zero", "--output", output) == 0
    record = json.loads((output / "analysis.json").read_text())
    assert list(record["results"]) == ["asymoe", "llava"]
    assert record["results"]["llava"]["model"]["model_type"] == "llava"
    assert record["results"]["llava"]["routing"] == [] and record["results"]["asymoe"]["examples"] == 2
    assert {path.name for path in output.glob("*.png")} == {
        "evidence_sensitivity.png", "attention_on_evidence.png", "sensitivity_by_group.png", "routing_asymoe.png"}


def test_command_line_errors(tmp_path, capsys, dataset):
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "grounding"))
    parser = make_parser()
    assert analyze_main(parser.parse_args(["m", "--data", str(tmp_path / "missing")])) == 2
    assert "asymoe grounding" in capsys.readouterr().err
    assert analyze_main(parser.parse_args(["m", "--data", str(tmp_path / "grounding")])) == 2
    assert "--split" in capsys.readouterr().err
    assert analyze_main(parser.parse_args(["a", "b", "--names", "x", "--data", str(tmp_path / "grounding")])) == 2
    assert "--names" in capsys.readouterr().err
