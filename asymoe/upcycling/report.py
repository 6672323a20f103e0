"""The deviation report: per-layer max |source - upcycled| of image features, hidden states and logits on a probe
input, to check an upcycle (copy mode: ~0)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..configuration import AsyMoEConfig
from ..configuration.configuration_asymoe import anyres_layout
from ..modeling import AsyMoEForConditionalGeneration
from .processor import probe_image
from .source import SOURCE_ARCHITECTURES, load_source_config, resolve_source

# What the processors return that the models take (OneVision's `batch_num_images` included).
_MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images")


def probe_inputs(config: AsyMoEConfig, processor=None, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed probe (one image + a short question) for `deviation_report`: through `processor` if given, else
    synthetic token ids with the image placeholders already expanded."""
    if processor is not None:
        image = probe_image(config.vision_config.image_size, seed)
        text = f"{processor.image_token}\nWhat is shown in this image? Describe it."
        batch = processor(images=image, text=text, return_tensors="pt")
        return {k: batch[k] for k in _MODEL_INPUTS if k in batch}
    generator = torch.Generator().manual_seed(seed)
    text = config.text_config
    vision = config.vision_config
    words = torch.randint(0, text.vocab_size, (12,), generator=generator)
    words[words == config.image_token_id] = (config.image_token_id + 1) % text.vocab_size
    num_features, tiles, extra = config.num_image_tokens, (), {}
    if config.image_grid_pinpoints is not None:  # an image of the first pinpoint's size
        size = config.image_grid_pinpoints[0]
        layout = anyres_layout(size, config.image_grid_pinpoints, vision.image_size,
                               vision.image_size // vision.patch_size, config.max_anyres_tiles)
        num_features += layout.num_grid_features
        tiles, extra = (layout.num_tiles,), {"image_sizes": torch.tensor([size])}
    image = torch.full((num_features,), config.image_token_id)
    input_ids = torch.cat([words[:2], image, words[2:]]).unsqueeze(0)
    pixels = torch.randn(1, *tiles, vision.num_channels, vision.image_size, vision.image_size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels, **extra}


@torch.no_grad()
def model_states(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Image features, per-layer hidden states and logits of `model` on `inputs` (fp64, on CPU)."""
    model.eval()
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in inputs.items()}
    out = model(**batch, output_hidden_states=True)
    states: dict[str, torch.Tensor] = {}
    # Projected image features: LLaVA keeps them in `image_outputs.pooler_output` from transformers 5.24 (one tensor
    # per image; `image_hidden_states` is deprecated there), in `image_hidden_states` before, as AsyMoE does.
    image_features = out.image_outputs.pooler_output if "image_outputs" in out else out.get("image_hidden_states")
    if image_features is not None:
        features = image_features if isinstance(image_features, (list, tuple)) else [image_features]
        states["image features"] = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    hidden = out.hidden_states or ()
    for i, h in enumerate(hidden):
        if i == 0:
            name = "embeddings"
        elif i == len(hidden) - 1:
            name = f"layer {i - 1} (final norm)"
        else:
            name = f"layer {i - 1}"
        states[name] = h
    states["logits"] = out.logits
    return {k: v.detach().to("cpu", torch.float64) for k, v in states.items()}


def compare_states(source: Mapping[str, torch.Tensor], upcycled: Mapping[str, torch.Tensor]) -> list[dict]:
    rows = []
    for name, reference in source.items():
        if name not in upcycled:
            continue
        other = upcycled[name]
        if other.shape != reference.shape:
            raise ValueError(f"{name}: source {tuple(reference.shape)} vs upcycled {tuple(other.shape)}")
        rows.append({
            "name": name,
            "max_abs": float((other - reference).abs().max()),
            "ref_max_abs": float(reference.abs().max()),
        })
    return rows


def deviation_report(
    source_model: nn.Module, upcycled_model: nn.Module, inputs: Mapping[str, torch.Tensor]
) -> list[dict]:
    """Per-layer max |source - upcycled| of hidden states (and image features, logits) on `inputs`.

    Returns rows `{"name", "max_abs", "ref_max_abs"}` in layer order; `format_deviation_report` prints them.
    """
    return compare_states(model_states(source_model, inputs), model_states(upcycled_model, inputs))


def format_deviation_report(rows: list[dict]) -> str:
    width = max(len(row["name"]) for row in rows)
    lines = [f"{'tensor':<{width}}  max|source - upcycled|  max|source|"]
    for row in rows:
        lines.append(f"{row['name']:<{width}}  {row['max_abs']:>21.3e}  {row['ref_max_abs']:>11.3e}")
    return "\n".join(lines)


def report_from_checkpoints(
    source: str | os.PathLike, upcycled: str | os.PathLike, *, revision: str | None = None, seed: int = 0
) -> list[dict]:
    """`deviation_report` between a dense source checkpoint and its upcycled checkpoint, loading one model at a time
    (fp32, CPU) so that peak memory is one model, on the upcycled processor's probe (synthetic if it has none)."""
    import gc

    import transformers

    from ..processing import AsyMoEProcessor

    src_dir, _ = resolve_source(source, revision)
    source_class = getattr(transformers, SOURCE_ARCHITECTURES[load_source_config(src_dir).model_type])
    config = AsyMoEConfig.from_pretrained(upcycled)
    processor = None
    if (Path(upcycled) / "processor_config.json").is_file():
        processor = AsyMoEProcessor.from_pretrained(upcycled)
    inputs = probe_inputs(config, processor, seed)
    model = source_class.from_pretrained(src_dir, dtype=torch.float32)
    reference = model_states(model, inputs)
    del model
    gc.collect()
    model = AsyMoEForConditionalGeneration.from_pretrained(upcycled, dtype=torch.float32)
    states = model_states(model, inputs)
    del model
    gc.collect()
    return compare_states(reference, states)
