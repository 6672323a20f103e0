"""The upcycled checkpoint's processor: `AsyMoEProcessor` from the source's tokenizer, image processor and chat
template, checked to prepare the same inputs as the source's own processor."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..configuration import AsyMoEConfig

_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json",
                    "tokenizer.model")


def convert_processor(source_directory: str | os.PathLike, config: AsyMoEConfig):
    """The source's processor as an `AsyMoEProcessor` (same tokenizer, image processor and chat template; anyres
    tiling for LLaVA-NeXT / OneVision), checked to expand `<image>` and preprocess images exactly like the source;
    `None` if the source has none."""
    from transformers import AutoProcessor

    from ..processing import AsyMoEProcessor

    directory = Path(source_directory)
    if not any((directory / name).is_file() for name in _PROCESSOR_FILES):
        warnings.warn(f"{directory} has no processor/tokenizer files: the upcycled checkpoint gets no processor.")
        return None
    model_type = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("model_type")
    try:
        source = AutoProcessor.from_pretrained(directory)
    except Exception as err:  # noqa: BLE001
        if model_type != "llava_onevision":
            raise ValueError(
                f"could not load the source processor from {directory}: {type(err).__name__}: {err}"
            ) from err
        # LlavaOnevisionProcessor also builds a video processor, which needs torchvision: use its image parts.
        source = _onevision_image_processor_parts(directory, config, err)
    tokenizer = getattr(source, "tokenizer", None)
    image_processor = getattr(source, "image_processor", None)
    if tokenizer is None or image_processor is None:
        warnings.warn(f"{directory} has no complete LLaVA processor (tokenizer + image processor): none is written.")
        return None
    image_token = getattr(source, "image_token", None) or tokenizer.convert_ids_to_tokens(config.image_token_id)
    if tokenizer.convert_tokens_to_ids(image_token) != config.image_token_id:
        raise ValueError(
            f"the source tokenizer maps {image_token!r} to id {tokenizer.convert_tokens_to_ids(image_token)}, but the "
            f"config's image_token_id is {config.image_token_id}."
        )
    anyres = {}
    if config.image_grid_pinpoints is not None:
        anyres = {"image_grid_pinpoints": config.image_grid_pinpoints, "patch_size": config.vision_config.patch_size,
                  "vision_aspect_ratio": config.vision_aspect_ratio}
    processor = AsyMoEProcessor(
        image_processor, tokenizer, num_image_tokens=config.num_image_tokens, image_token=image_token,
        chat_template=getattr(source, "chat_template", None), **anyres,
    )
    if isinstance(source, _ProcessorParts):
        warnings.warn(
            f"the source's LlavaOnevisionProcessor cannot be built here ({source.reason}); its image-token expansion "
            "is reproduced from the model config and processor_config.json, not compared with the source's output."
        )
    else:
        _check_same_processing(source, processor, config, image_token)
    return processor


@dataclass
class _ProcessorParts:
    """The image-side parts of a source processor that could not be built as a whole."""

    tokenizer: Any
    image_processor: Any
    chat_template: str | None
    image_token: str | None
    reason: str


def _onevision_image_processor_parts(directory: Path, config: AsyMoEConfig, error: Exception) -> _ProcessorParts:
    """Tokenizer, image processor and chat template of a OneVision checkpoint, checked against its model config."""
    from transformers import AutoImageProcessor, AutoTokenizer

    settings = {}
    if (directory / "processor_config.json").is_file():
        settings = json.loads((directory / "processor_config.json").read_text(encoding="utf-8"))
    template = settings.get("chat_template")
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    base = settings.get("num_image_tokens")
    if base is not None:
        base -= int(settings.get("vision_feature_select_strategy", config.vision_feature_select_strategy) == "default")
    if base not in (None, config.num_image_tokens) or settings.get(
            "vision_aspect_ratio", config.vision_aspect_ratio) != config.vision_aspect_ratio:
        raise ValueError(
            f"{directory}/processor_config.json disagrees with config.json: the processor gives {base} base-tile "
            f"image tokens and vision_aspect_ratio={settings.get('vision_aspect_ratio')!r}, the model "
            f"{config.num_image_tokens} and {config.vision_aspect_ratio!r}."
        )
    try:
        image_processor = AutoImageProcessor.from_pretrained(directory)
    except ImportError:  # transformers 5.17 resolves OneVision to its torchvision processor even for a PIL config
        from transformers import LlavaOnevisionImageProcessorPil

        image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(directory)
    return _ProcessorParts(
        tokenizer=tokenizer,
        image_processor=image_processor,
        chat_template=template or getattr(tokenizer, "chat_template", None),
        image_token=settings.get("image_token"),
        reason=f"{type(error).__name__}: {error}",
    )


def probe_image(size: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size + 7, size + 19, 3)) * 255).astype("uint8"))


def _check_same_processing(source, processor, config: AsyMoEConfig, image_token: str) -> None:
    image = probe_image(config.vision_config.image_size)
    text = f"{image_token}\nWhat is in the image?"
    expected = source(images=image, text=text, return_tensors="pt")
    got = processor(images=image, text=text, return_tensors="pt")
    size = config.vision_config.image_size
    if tuple(got["pixel_values"].shape[-2:]) != (size, size):
        raise ValueError(
            f"the source image processor gives {tuple(got['pixel_values'].shape[-2:])} images, but the vision tower "
            f"takes {size}x{size}: AsyMoE needs fixed-size images (tiles)."
        )
    same_pixels = expected["pixel_values"].shape == got["pixel_values"].shape and torch.allclose(
        expected["pixel_values"].float(), got["pixel_values"].float())
    same_pixels = same_pixels and all(
        torch.equal(torch.as_tensor(expected[key]), torch.as_tensor(got[key]))
        for key in ("image_sizes", "batch_num_images") if key in expected
    )
    if getattr(source, "patch_size", None) is None and config.image_grid_pinpoints is None:
        # Old checkpoints without processor_config.json: the source processor cannot expand `<image>` (it has no
        # patch_size), so only the image preprocessing can be compared; the expansion comes from the model config.
        warnings.warn("the source processor has no patch_size; <image> expansion follows the model config.")
        same_ids = True
    else:
        same_ids = torch.equal(expected["input_ids"], got["input_ids"])
    if not (same_ids and same_pixels):
        raise ValueError(
            "the converted processor does not reproduce the source's inputs: the source expands the probe image to "
            f"{int((expected['input_ids'] == config.image_token_id).sum())} image tokens, AsyMoE to "
            f"{int((got['input_ids'] == config.image_token_id).sum())}; pixel values "
            f"{'agree' if same_pixels else 'differ'} (patch_size / num_additional_image_tokens / "
            "vision_feature_select_strategy / image_grid_pinpoints of the source processor disagree with its model "
            "config)."
        )
