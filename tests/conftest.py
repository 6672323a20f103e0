"""Shared fixtures: a tiny word-level tokenizer and processor, processor inputs built from small random PIL images,
tiny models, and a fixed RNG seed for every test. Nothing here downloads anything."""

from __future__ import annotations

import logging
import random
import sys
import warnings
from pathlib import Path

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
REPO = Path(__file__).resolve().parents[1]


# The libraries whose deprecations our code must act on. Not torch: tracing under torch.compile, torch warns about
# its own internals (dynamo instantiating an autograd.Function), and the first frame outside torch is the caller.
WATCHED = {"transformers", "trl", "peft", "accelerate", "datasets", "evaluate", "huggingface_hub", "PIL"}


def _package(frame) -> str:
    return frame.f_globals.get("__name__", "").split(".")[0]


def _on_our_code_path(frame) -> str | None:
    """`file:line` of the first frame outside the package that `frame` belongs to (the deprecated API's caller),
    if that caller is this repository's code; None otherwise (a third-party library calling its dependencies)."""
    while frame is not None and _package(frame) == "logging":
        frame = frame.f_back
    library = _package(frame) if frame is not None else None
    while frame is not None and _package(frame) == library:
        frame = frame.f_back
    if frame is None:
        return None
    path = Path(frame.f_code.co_filename)
    if REPO not in path.parents or "site-packages" in path.parts:
        return None
    return f"{path.relative_to(REPO)}:{frame.f_lineno}"


class DeprecationOnOurPath(Exception):
    """A library deprecated something this repository calls: rename it now, while both names still work."""


def _fail_deprecations_on_our_code_path() -> None:
    """Turn every deprecation that a `WATCHED` library raises on this repository's code paths into an error: Python
    warnings (FutureWarning, DeprecationWarning; transformers' `deprecate_kwarg` among them) and transformers' logged
    ones ("... is deprecated ..." through `logger.warning_once`). Deprecations a third-party library triggers in its
    own calls (TRL or PEFT using a transformers name that transformers deprecated) stay ordinary warnings."""
    original_warn = warnings.warn

    def warn(message, category=None, stacklevel=1, source=None, **kwargs):
        category = type(message) if isinstance(message, Warning) else (category or UserWarning)
        if issubclass(category, (FutureWarning, DeprecationWarning)) and _package(sys._getframe(1)) in WATCHED:
            caller = _on_our_code_path(sys._getframe(1))
            if caller is not None:
                raise DeprecationOnOurPath(f"{caller} uses a deprecated API: {message}")
        original_warn(message, category, stacklevel + 1, source, **kwargs)

    class LoggedDeprecations(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "deprecated" in record.getMessage().lower():
                caller = _on_our_code_path(sys._getframe(1))
                if caller is not None:
                    raise DeprecationOnOurPath(f"{caller} uses a deprecated API: {record.getMessage()}")

    warnings.warn = warn
    logging.getLogger("transformers").addHandler(LoggedDeprecations())


def pytest_configure(config):
    _fail_deprecations_on_our_code_path()


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
    """Under `root`: a tiny AsyMoE with its processor (`model/`) and a grounding training set (`data/`,
    `GroundingConfig(**grounding)` without validation and test splits)."""
    from asymoe.eval.grounding import GroundingConfig, build_grounding, grounding_vocabulary, save_grounding
    from asymoe.finetune.data import SHORT_ANSWER_PROMPT

    tokenizer = build_tokenizer(grounding_vocabulary() + SHORT_ANSWER_PROMPT.split())
    config = tiny_config(tokenizer)
    torch.manual_seed(0)
    AsyMoEForConditionalGeneration(config).save_pretrained(root / "model")
    tiny_processor(config, tokenizer).save_pretrained(root / "model")
    save_grounding(build_grounding(GroundingConfig(validation_size=0, test_size=0, **grounding)), root / "data")
    return root


PROMPT_A = "USER: <image>\nwhat color is the shape ? ASSISTANT:"
PROMPT_B = "USER: <image>\nis the red circle left , the blue square right ? yes no . what shape is green ? ASSISTANT:"
ANSWER_A = " red circle"
ANSWER_B = " a blue square"


def wake(model: AsyMoEForConditionalGeneration, std: float = 0.1, mobius_std: float = 0.05, seed: int = 1):
    """Move the decoder and projector weights away from their init, the zero-initialised ones included (evidence W_o,
    Möbius biases): routing becomes decisive, the evidence readout and the hyperbolic maps are live, greedy decoding
    gives varied tokens. Norm weights, tangent scales, curvature and the vision tower keep their init. The Möbius
    biases draw from their own generator, so the other weights do not depend on whether the model has them."""
    generator, mobius_generator = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("model.vision_tower") or ".log_scale_" in name or "curvature" in name or "norm" in name:
                continue
            if ".mobius_bias_" in name:
                param.copy_(torch.randn(param.shape, generator=mobius_generator) * mobius_std)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def new_tokens(sequences: torch.Tensor, prompt: dict) -> torch.Tensor:
    return sequences[:, prompt["input_ids"].shape[1] :]
