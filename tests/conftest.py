"""Shared fixtures: a tiny word-level tokenizer and processor, processor inputs built from small random PIL images,
tiny models, and a fixed RNG seed for every test. Nothing here downloads anything."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version
from PIL import Image

from asymoe import AsyMoEForConditionalGeneration
from asymoe.tiny import build_tokenizer, tiny_config, tiny_processor

# TRL refuses assistant-only loss on image data before transformers 5.18 (its processors' masks were wrong there).
needs_trl_vision_masks = pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.18.0.dev0"),
    reason="TRL's SFT with assistant-only loss on images needs transformers >= 5.18",
)
WORDS = "what color shape is the a red blue green yellow circle square triangle left right yes no".split()


def seed_everything(seed: int = 0) -> None:
    """Seed torch, numpy and `random`."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_image(seed: int = 0, size: int = 32) -> Image.Image:
    """A `size`×`size` RGB image of uniform noise, reproducible from `seed`."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(autouse=True)
def fixed_seed():
    """Every test starts from the same RNG state."""
    seed_everything(0)


@pytest.fixture(scope="session")
def tokenizer():
    """Word-level tokenizer (left padding) over the special tokens, the chat words and `WORDS`."""
    return build_tokenizer(WORDS)


@pytest.fixture(scope="session")
def processor(tokenizer):
    """The tiny processor (32×32 CLIP preprocessing, 16 image tokens per `<image>`); same for every tiny variant."""
    return tiny_processor(tiny_config(tokenizer), tokenizer)


@pytest.fixture(scope="session")
def make_inputs(processor):
    """`make_inputs(texts, image_seed=0, **processor_kwargs)`: processor outputs (pt, padded) for a str or a list of
    str, with one fresh noise image per `<image>` placeholder (seeds image_seed, image_seed + 1, ...)."""

    def make(texts, image_seed: int = 0, **kwargs):
        texts = [texts] if isinstance(texts, str) else list(texts)
        count = sum(text.count(processor.image_token) for text in texts)
        images = [make_image(image_seed + i) for i in range(count)] or None
        kwargs = {"return_tensors": "pt", "padding": True, **kwargs}
        return processor(images=images, text=texts, **kwargs)

    return make


@pytest.fixture(scope="session")
def make_model(tokenizer):
    """`make_model(moe_variant="asymoe", seed=0, **text_overrides)`: a freshly initialised tiny model in eval mode."""

    def make(moe_variant: str = "asymoe", seed: int = 0, **text_overrides) -> AsyMoEForConditionalGeneration:
        seed_everything(seed)
        return AsyMoEForConditionalGeneration(tiny_config(tokenizer, moe_variant, **text_overrides)).eval()

    return make


def save_training_setup(root, **grounding):
    """Under `root`: a tiny AsyMoE with its processor (`model/`; router logits on, so TRL treats it as MoE) and a
    grounding training set (`data/`, `GroundingConfig(**grounding)` without validation and test splits)."""
    from asymoe.eval.grounding import GroundingConfig, build_grounding, grounding_vocabulary, save_grounding
    from asymoe.finetune.data import SHORT_ANSWER_PROMPT

    tokenizer = build_tokenizer(grounding_vocabulary() + SHORT_ANSWER_PROMPT.split())
    config = tiny_config(tokenizer, output_router_logits=True)
    torch.manual_seed(0)
    AsyMoEForConditionalGeneration(config).save_pretrained(root / "model")
    tiny_processor(config, tokenizer).save_pretrained(root / "model")
    save_grounding(build_grounding(GroundingConfig(validation_size=0, test_size=0, **grounding)), root / "data")
    return root
