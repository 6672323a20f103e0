"""What trains and how: freezing schemes and AsyMoE's own optimizer group.

Freezing (`--freeze`):
- `none`: everything trains;
- `moe`: MoE-LLaVA stage III — only the MoE blocks (experts, routers, evidence readouts, hyperbolic parameters);
- `projector`: only the multimodal projector (LLaVA stage I);
- `vision`: everything but the vision tower.

AsyMoE-specific parameters — hyperbolic curvature, Möbius biases and scales, evidence readout and gate — go to their
own optimizer group with their own learning rate (`asymoe_lr`); curvature, biases, scales, norms and embeddings get no
weight decay (decay would pull the curvature towards softplus(0) and the Möbius biases towards Euclidean).
"""

from __future__ import annotations

import re

from torch import nn

FREEZE_SCHEMES = ("none", "moe", "projector", "vision")
_ASYMOE_PATTERN = re.compile(r"\.mlp\.(experts\.(mobius_bias_\w+|log_scale_\w+|raw_curvature)|evidence\.)")
_NO_DECAY_PATTERN = re.compile(
    r"(bias|norm|layernorm|embed|embedding|mobius_bias_\w+|log_scale_\w+|raw_curvature|class_embedding)")
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
    for name, param in model.named_parameters():
        if name.endswith("raw_curvature") and not model.config.get_text_config().learn_curvature:
            param.requires_grad_(False)  # fixed by the config, whatever the scheme
            continue
        param.requires_grad_(trainable(name))
    if scheme == "moe" and not any(p.requires_grad for p in model.parameters()):
        raise ValueError("--freeze moe left nothing to train: the model has no MoE layers (dense variant?).")
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }


def is_asymoe_parameter(name: str) -> bool:
    return bool(_ASYMOE_PATTERN.search(name))


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, asymoe_lr: float | None) -> list[dict]:
    """Optimizer groups: (regular | AsyMoE-specific) × (decay | no decay), empty groups left out."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = (is_asymoe_parameter(name), not _NO_DECAY_PATTERN.search(name))
            groups.setdefault(key, []).append(param)
    return [
        {"params": params, "lr": (asymoe_lr or lr) if asymoe else lr,
         "weight_decay": weight_decay if decay else 0.0, "asymoe": asymoe}
        for (asymoe, decay), params in sorted(groups.items())
    ]
