"""Upcycling LLaVA-NeXT and LLaVA-OneVision checkpoints (Llama, Mistral, Qwen2, Qwen3 backbones): anyres tiling,
unpadding, image newlines and OneVision's feature pooling are kept, so copy mode gives the source's logits and greedy
generations on the same processor outputs; the upcycled checkpoint loads as isolated remote code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from isolated import AUTO_CLASSES, ISOLATED_SCRIPT, remote_generations, run_isolated
from test_upcycling import BACKBONES, CLIP, TEMPLATE, TEXT, WORDS, _check_same_function, _generate, _rewrite_keys
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    ProcessorMixin,
    SiglipVisionConfig,
)

from asymoe import AsyMoEConfig, AsyMoEForConditionalGeneration
from asymoe.configuration.configuration_asymoe import anyres_layout
from asymoe.processing import AsyMoEProcessor
from asymoe.tiny import build_tokenizer
from asymoe.upcycling import upcycle

VARIANTS = ("dense", "vanilla", "modality", "asymoe")
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96]]
SIGLIP = {k: v for k, v in CLIP.items() if k != "projection_dim"}
ONEVISION_ASPECT = "anyres_max_2"  # grids of more than ~2 tiles of features are pooled


def _images() -> list[Image.Image]:
    """Images whose tile grids lose letterbox rows (40x64: 2x2 tiles, pooled by OneVision) or columns (30x80: 1x3
    tiles), and a tall one (61x25: 2x1 tiles)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random(shape) * 255).astype("uint8")) for shape in
            ((40, 64, 3), (30, 80, 3), (61, 25, 3))]


def _texts_and_images():
    """A left-padded batch: one image in the first prompt, two in the second (OneVision does not tile those)."""
    single, wide, tall = _images()
    texts = ["USER : <image> what color is the shape ? ASSISTANT :", "USER : <image> <image> shape ? ASSISTANT :"]
    return texts, [[single], [wide, tall]]


def _inputs(processor) -> dict:
    texts, images = _texts_and_images()
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images")
            if k in batch}


def _randomise(model) -> None:
    """Larger-than-init weights, so that every tensor (image_newline and biases too) visibly matters."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.ndim == 1 and name.endswith("weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))


def _onevision_processor(**kwargs) -> LlavaOnevisionProcessor:
    """LlavaOnevisionProcessor without its video processor (that needs torchvision, absent here)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, value: None)
        return LlavaOnevisionProcessor(video_processor=None, **kwargs)


def _build_source(directory: Path, family: str, backbone: str, seed: int = 0):
    """A tiny random LLaVA-NeXT or OneVision model saved to `directory`, and its (source) processor."""
    text_cls, text_extra, vision, top_extra = BACKBONES[backbone]
    tokenizer = build_tokenizer(WORDS)
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    text_config = text_cls(vocab_size=len(tokenizer), **TEXT, **special, **text_extra)
    common = dict(text_config=text_config, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                  image_grid_pinpoints=PINPOINTS, tie_word_embeddings=text_extra.get("tie_word_embeddings", False))
    if family == "next":
        clip = vision == "clip"
        config = LlavaNextConfig(
            vision_config=CLIPVisionConfig(**CLIP) if clip else SiglipVisionConfig(**SIGLIP), **common, **top_extra)
        size = {"shortest_edge": 32} if clip else {"height": 32, "width": 32}
        image_processor = LlavaNextImageProcessorPil(
            size=size, crop_size={"height": 32, "width": 32}, do_center_crop=clip, image_grid_pinpoints=PINPOINTS)
        processor = LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=8, chat_template=TEMPLATE,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=int(clip),
        )
        model_cls = LlavaNextForConditionalGeneration
    else:  # OneVision as released: SigLIP tower, all its features, last layer
        config = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**SIGLIP), vision_feature_select_strategy="full",
            vision_feature_layer=-1, vision_aspect_ratio=ONEVISION_ASPECT, **common)
        image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                                          image_grid_pinpoints=PINPOINTS)
        settings = {"num_image_tokens": 16, "vision_feature_select_strategy": "full",
                    "vision_aspect_ratio": ONEVISION_ASPECT, "image_token": "<image>"}
        processor = _onevision_processor(image_processor=image_processor, tokenizer=tokenizer,
                                         chat_template=TEMPLATE, **settings)
        model_cls = LlavaOnevisionForConditionalGeneration
    torch.manual_seed(seed)
    model = model_cls(config)
    _randomise(model)
    model.save_pretrained(directory)
    if family == "next":
        processor.save_pretrained(directory)
    else:  # what a OneVision Hub checkpoint holds for images: tokenizer, image processor, processor settings
        tokenizer.save_pretrained(directory)
        image_processor.save_pretrained(directory)
        (directory / "chat_template.jinja").write_text(TEMPLATE)
        (directory / "processor_config.json").write_text(
            json.dumps({"processor_class": "LlavaOnevisionProcessor", **settings}))
    return model.eval(), processor


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Per (family, backbone): source directory, source inputs, logits and greedy continuation."""
    root = tmp_path_factory.mktemp("anyres-sources")
    result = {}
    for family in ("next", "onevision"):
        for backbone in BACKBONES:
            model, processor = _build_source(root / f"{family}-{backbone}", family, backbone)
            inputs = _inputs(processor)
            with torch.no_grad():
                logits = model(**inputs).logits
            result[family, backbone] = {"dir": root / f"{family}-{backbone}", "model": model, "inputs": inputs,
                                        "logits": logits, "generated": _generate(model, inputs)}
    return result


@pytest.mark.filterwarnings("ignore:the source's LlavaOnevisionProcessor cannot be built here")
@pytest.mark.parametrize("family", ["next", "onevision"])
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_copy_mode_keeps_logits_and_generation(family, backbone, sources, tmp_path):
    """Every variant upcycled in copy mode computes the source's logits and greedy generations on the same
    processor outputs (tiles, unpadding, image newlines, OneVision pooling and multi-image samples included)."""
    source = sources[family, backbone]
    for variant in VARIANTS:
        output = upcycle(source["dir"], tmp_path / variant, moe_variant=variant, seed=3)
        _check_same_function(source, output, _inputs)
        config = json.loads((output / "config.json").read_text())
        assert config["image_grid_pinpoints"] == PINPOINTS
        assert config["vision_aspect_ratio"] == (ONEVISION_ASPECT if family == "onevision" else None)
        manifest = config["upcycling"]
        assert manifest["source_architecture"] == type(source["model"]).__name__
        assert manifest["function_preserving"] and manifest["source_text_model_type"] == backbone
        processor_config = json.loads((output / "processor_config.json").read_text())
        assert processor_config["image_grid_pinpoints"] == PINPOINTS and processor_config["patch_size"] == 8


def test_onevision_conversion_warns_that_the_source_processor_cannot_be_built(sources, tmp_path):
    with pytest.warns(UserWarning, match="LlavaOnevisionProcessor cannot be built here"):
        upcycle(sources["onevision", "qwen2"]["dir"], tmp_path / "out", moe_variant="dense")


def test_legacy_top_level_image_newline_key(sources, tmp_path):
    """Checkpoints saved before transformers 4.52 keep `image_newline` (and the towers) at the top level."""
    source = sources["next", "llama"]
    legacy = {"model.image_newline": "image_newline", "model.language_model.": "language_model.model.",
              "model.vision_tower.": "vision_tower.", "model.multi_modal_projector.": "multi_modal_projector.",
              "lm_head.": "language_model.lm_head."}

    def rename(key: str) -> str:
        return next((new + key[len(old):] for old, new in legacy.items() if key.startswith(old)), key)

    directory = _rewrite_keys(source["dir"], tmp_path / "legacy-src", rename)
    assert "image_newline" in load_file(directory / "model.safetensors")
    _check_same_function(source, upcycle(directory, tmp_path / "out", moe_variant="asymoe"), _inputs)


@pytest.mark.filterwarnings("ignore:the source's LlavaOnevisionProcessor cannot be built here")
def test_copy_mode_generation_through_remote_code(sources, tmp_path):
    """Where asymoe is not installed, every family x backbone x variant loads with `trust_remote_code`, and its greedy
    tokens with the KV cache equal those without it and the dense source's (transformers' LLaVA-NeXT / OneVision)."""
    checkpoints = {
        str(upcycle(sources[key]["dir"], tmp_path / f"{key[0]}-{key[1]}-{variant}", moe_variant=variant)): key
        for key in sources for variant in VARIANTS
    }
    generations = remote_generations(tmp_path, {directory: sources[key]["inputs"]
                                                for directory, key in checkpoints.items()})
    for directory, key in checkpoints.items():
        expected = sources[key]["generated"].tolist()
        assert generations[directory]["cached"] == generations[directory]["uncached"] == expected, directory


def test_anyres_geometry_matches_transformers():
    """`anyres_layout` (shared by the processor and the model) against transformers' own feature counts."""
    tokenizer = build_tokenizer(WORDS)
    next_processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(image_grid_pinpoints=PINPOINTS), tokenizer=tokenizer,
        patch_size=8, vision_feature_select_strategy="full")
    onevision_processor = _onevision_processor(
        image_processor=LlavaOnevisionImageProcessorPil(image_grid_pinpoints=PINPOINTS), tokenizer=tokenizer,
        num_image_tokens=16, vision_feature_select_strategy="full", vision_aspect_ratio=ONEVISION_ASPECT)
    for height in (9, 30, 32, 47, 64, 70, 111):
        for width in (9, 25, 41, 64, 75, 96, 300):
            layout = anyres_layout((height, width), PINPOINTS, 32, 4)
            assert 16 + layout.num_grid_features == next_processor._get_number_of_features(height, width, 32, 32)
            pooled = anyres_layout((height, width), PINPOINTS, 32, 4, max_tiles=2)
            expected = onevision_processor._get_number_of_features(height, width, 32, 32)
            assert 16 + pooled.num_grid_features == expected
    # The images of the end-to-end tests cover both unpadding directions and the pooling.
    layout = anyres_layout((40, 64), PINPOINTS, 32, 4, max_tiles=2)
    assert layout.tiles == (2, 2) and layout.unpadded == (6, 8) and layout.pooled == (4, 6)
    assert layout.num_tiles == 5 and layout.num_grid_features == 4 * 7
    layout = anyres_layout((30, 80), PINPOINTS, 32, 4)
    assert layout.tiles == (1, 3) and layout.unpadded == (4, 10) and layout.pooled is None


def test_anyres_inputs_fail_clearly(sources, tmp_path):
    output = upcycle(sources["next", "mistral"]["dir"], tmp_path / "out", moe_variant="dense")
    model = AsyMoEForConditionalGeneration.from_pretrained(output).eval()
    inputs = dict(sources["next", "mistral"]["inputs"])
    with pytest.raises(ValueError, match="needs `image_sizes`"):
        model(**{k: v for k, v in inputs.items() if k != "image_sizes"})
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(**{**inputs, "image_sizes": inputs["image_sizes"].flip(-1)})
    processor = AsyMoEProcessor.from_pretrained(output)
    with pytest.raises(ValueError, match="tiles with image_grid_pinpoints"):
        AsyMoEProcessor(processor.image_processor, processor.tokenizer, num_image_tokens=16,
                        image_grid_pinpoints=[[32, 32]], patch_size=8)
    config = AsyMoEConfig.from_pretrained(output).to_dict()
    with pytest.raises(ValueError, match="multiple of the vision tower's image_size"):
        AsyMoEConfig(**{**config, "image_grid_pinpoints": [[32, 48]]})
    with pytest.raises(ValueError, match="anyres_max_9"):
        AsyMoEConfig(**{**config, "vision_aspect_ratio": "anyres"})


def test_upcycled_next_checkpoint_loads_in_isolated_interpreter(sources, tmp_path):
    """The upcycled LLaVA-NeXT checkpoint runs as remote code where only torch/transformers/safetensors/pillow
    are importable, and computes there what it computes here."""
    output = upcycle(sources["next", "llama"]["dir"], tmp_path / "upcycled", moe_variant="asymoe")
    proc = run_isolated(tmp_path, ISOLATED_SCRIPT, str(output), ",".join(AUTO_CLASSES))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    models = result["models"]
    assert {models[name]["class"] for name in AUTO_CLASSES} == {"AsyMoEForConditionalGeneration"}
    assert all(models[name]["module"].startswith("transformers_modules") for name in AUTO_CLASSES)
    assert result["pipeline"]["role"] == "assistant"
    model = AsyMoEForConditionalGeneration.from_pretrained(output).eval()
    processor = AsyMoEProcessor.from_pretrained(output)
    image = Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype("uint8"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color ?"}]}]
    inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")
    assert "image_sizes" in inputs
    with torch.no_grad():
        local = float(model(**inputs).logits.double().sum())
    sums = {models[name]["logits_sum"] for name in AUTO_CLASSES}
    assert len(sums) == 1 and sums.pop() == pytest.approx(local, rel=1e-6)
