"""Planning an upcycle: which source tensor (any key layout transformers has saved LLaVA in) feeds which target
tensor, in which dtype; the tensors no source holds (routers, Möbius parameters, evidence readouts) are marked new."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..configuration import AsyMoEConfig
from .safetensors_io import TORCH_DTYPES, TensorSpec
from .source import SUPPORTED_SOURCE

# Source keys of the dense FFN pieces, after the key layout is normalised.
_MLP_KEY = re.compile(r"^model\.language_model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
# Buffers some (old) checkpoints saved that the models recompute.
_IGNORED_SOURCE_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")
_PREFIX_RULES = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("model.language_model.", "model.language_model."),
    ("language_model.", "model.language_model."),
    ("model.vision_tower.", "model.vision_tower."),
    ("vision_tower.", "model.vision_tower."),
    ("model.multi_modal_projector.", "model.multi_modal_projector."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("lm_head.", "lm_head."),
    ("model.image_newline", "model.image_newline"),
    ("image_newline", "model.image_newline"),
)


def normalise_key(key: str) -> str | None:
    """A source key in the v5 LLaVA(-NeXT/-OneVision) layout (old `language_model.model.*`, `vision_tower.*`,
    `multi_modal_projector.*`, `image_newline` top-level keys included); `None` if it belongs to no known part."""
    for old, new in _PREFIX_RULES:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def _vision_candidates(key: str) -> list[str]:
    """Names a vision-tower key may have in the target (with or without the `vision_model.` wrapper)."""
    tower = "model.vision_tower."
    if not key.startswith(tower):
        return [key]
    rest = key[len(tower):]
    if rest.startswith("vision_model."):
        return [key, tower + rest[len("vision_model."):]]
    return [key, tower + "vision_model." + rest]


def target_specs(model: nn.Module, config: AsyMoEConfig) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes the upcycled checkpoint holds (the tied LM head is not stored)."""
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


@dataclass
class Plan:
    copies: dict[str, str] = field(default_factory=dict)  # source key -> target name
    mlp: dict[str, tuple[int, str]] = field(default_factory=dict)  # source key -> (layer, gate_proj|up_proj|down_proj)
    skipped: list[str] = field(default_factory=list)
    specs: dict[str, TensorSpec] = field(default_factory=dict)  # every target tensor, in target order


def plan_tensors(config: AsyMoEConfig, headers: dict[str, dict], target_shapes: dict[str, tuple[int, ...]]) -> Plan:
    text = config.text_config
    moe_layers = set(text.moe_layers)
    plan = Plan()
    unknown, mismatched = [], []
    dtypes: dict[str, torch.dtype] = {}
    mlp_dtype: dict[int, torch.dtype] = {}
    for key, info in headers.items():
        dtype = TORCH_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"source tensor {key} has dtype {info['dtype']}, which upcycling does not handle.")
        name = normalise_key(key)
        mlp = _MLP_KEY.match(name) if name is not None else None
        if mlp and int(mlp.group(1)) in moe_layers:
            layer = int(mlp.group(1))
            plan.mlp[key] = (layer, mlp.group(2))
            mlp_dtype.setdefault(layer, dtype)
            if mlp_dtype[layer] != dtype:
                raise ValueError(f"layer {layer}'s FFN weights have mixed dtypes; upcycling needs one dtype per FFN.")
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            plan.skipped.append(key)
            continue
        target = None if name is None else next((c for c in _vision_candidates(name) if c in target_shapes), None)
        if target is None:
            if key.endswith(_IGNORED_SOURCE_SUFFIXES):
                plan.skipped.append(key)
            else:
                unknown.append(key)
            continue
        if tuple(info["shape"]) != target_shapes[target]:
            mismatched.append(f"{key} {tuple(info['shape'])} -> {target} {target_shapes[target]}")
            continue
        if target in dtypes:
            raise ValueError(f"two source tensors map to {target}; is the checkpoint's key layout mixed?")
        plan.copies[key] = target
        dtypes[target] = dtype
    if unknown:
        raise ValueError(
            f"{len(unknown)} source tensors have no place in the upcycled model (e.g. {unknown[:4]}); supported "
            f"sources are {SUPPORTED_SOURCE} checkpoints with SwiGLU language models."
        )
    if mismatched:
        raise ValueError(f"source and upcycled shapes differ: {mismatched[:4]}")
    pieces = {layer: set() for layer in moe_layers}
    for layer, which in plan.mlp.values():
        pieces[layer].add(which)
    incomplete = {layer: sorted({"gate_proj", "up_proj", "down_proj"} - got) for layer, got in pieces.items()
                  if len(got) != 3}
    if incomplete:
        raise ValueError(f"the source lacks FFN weights of MoE layers: {incomplete}")

    for target, shape in target_shapes.items():
        match = re.match(r"^model\.language_model\.layers\.(\d+)\.mlp\.(.+)$", target)
        layer = int(match.group(1)) if match else None
        if target in dtypes:
            plan.specs[target] = TensorSpec(dtypes[target], shape)
        elif layer in moe_layers:
            rest = match.group(2)
            if rest in ("experts.gate_up_proj", "experts.down_proj"):
                plan.specs[target] = TensorSpec(mlp_dtype[layer], shape, parts=shape[0])
            elif rest.startswith("router."):
                plan.specs[target] = TensorSpec(torch.float32, shape)
            else:
                plan.specs[target] = TensorSpec(mlp_dtype[layer], shape)
        else:
            raise ValueError(f"the source has no tensor for {target} (is the checkpoint complete?)")
    return plan
