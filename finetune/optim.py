"""What trains and how: freezing schemes and AsyMoE's own optimizer groups.

Freezing (`--freeze`):
- `none`: everything trains;
- `moe`: MoE-LLaVA stage III — only the MoE blocks (experts, routers, evidence readouts, hyperbolic parameters);
- `projector`: only the multimodal projector (LLaVA stage I);
- `vision`: everything but the vision tower.

AsyMoE-specific parameters — hyperbolic curvature, Möbius biases and scales, evidence readout and gate — go to
their own optimizer groups with their own learning rate (`asymoe_lr`). Curvature, Möbius biases and scales get no
weight decay (decay would pull the curvature towards softplus(0), the Möbius biases towards Euclidean and the scales
towards 1), like the Trainer's biases and norms.
"""

from __future__ import annotations

import re

import torch
from torch import nn

FREEZE_SCHEMES = ("none", "moe", "projector", "vision")
_ASYMOE_PATTERN = re.compile(r"\.mlp\.(experts\.(mobius_bias_\w+|log_scale_\w+|raw_curvature)|evidence\.)")
_NO_DECAY_PATTERN = re.compile(r"\.(mobius_bias_\w+|log_scale_\w+|raw_curvature)$")
_TRAINABLE = {
    "none": lambda name: True,
    "moe": lambda name: bool(re.search(r"\.mlp\.(experts|router|evidence)\b", name)),
    "projector": lambda name: "multi_modal_projector" in name,
    "vision": lambda name: "vision_tower" not in name,
}


def apply_freezing(model: nn.Module, scheme: str) -> dict[str, int]:
    """Set `requires_grad` by `scheme`; returns trainable and total parameter counts."""
    if scheme not in FREEZE_SCHEMES:
        raise ValueError(f"unknown freeze scheme {scheme!r}; use one of {FREEZE_SCHEMES}.")
    trainable = _TRAINABLE[scheme]
    learn_curvature = getattr(model.config.get_text_config(), "learn_curvature", True)
    for name, param in model.named_parameters():
        # A curvature the config fixes stays fixed, whatever the scheme.
        param.requires_grad_(trainable(name) and (learn_curvature or not name.endswith("raw_curvature")))
    if scheme == "moe" and not any(p.requires_grad for p in model.parameters()):
        raise ValueError("--freeze moe left nothing to train: the model has no MoE layers (dense variant?).")
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }


def is_asymoe_parameter(name: str) -> bool:
    """Curvature, Möbius biases/scales and evidence readouts: the parameters `asymoe_lr` applies to."""
    return bool(_ASYMOE_PATTERN.search(name))


def without_asymoe_decay(decay_names: list[str]) -> list[str]:
    """`Trainer.get_decay_parameter_names`' list less curvature, Möbius biases and scales."""
    return [name for name in decay_names if not _NO_DECAY_PATTERN.search(name)]


def separate_asymoe_groups(optimizer: torch.optim.Optimizer, model: nn.Module, lr: float) -> None:
    """Before the first step: split every param group into its regular parameters and its AsyMoE-specific ones, the
    latter in a copy of the group (same weight decay and other settings) at learning rate `lr`; groups are marked
    `asymoe` True/False."""
    asymoe = {id(param) for name, param in model.named_parameters() if is_asymoe_parameter(name)}
    groups = []
    for group in optimizer.param_groups:
        for is_asymoe in (False, True):
            params = [param for param in group["params"] if (id(param) in asymoe) == is_asymoe]
            if params:
                groups.append({**group, "params": params, "asymoe": is_asymoe, **({"lr": lr} if is_asymoe else {})})
    optimizer.param_groups = groups
