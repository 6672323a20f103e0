"""Expert construction: every expert of an MoE layer from the dense FFN (copy or partition mode, optional noise and
Drop-Upcycling), and the layer's new parameters (routers, Möbius parameters, evidence readouts) from the model's own
`_init_weights`, made neutral so that copy mode keeps the dense function."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from ..modeling import AsyMoEForConditionalGeneration
from ..modeling import modeling_asymoe as _modeling_module


def derived_seed(seed: int, *tags: Any) -> int:
    digest = hashlib.sha256(repr((seed, *tags)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def expert_weights(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, neurons: slice, *, noise_std: float, drop_ratio: float,
    down_scale: float, generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's `gate_up [2I', H]` and `down [H, I']` from the dense FFN's neurons `neurons`."""
    if noise_std == 0.0 and drop_ratio == 0.0 and down_scale == 1.0:
        return torch.cat([gate[neurons], up[neurons]], dim=0), down[:, neurons].contiguous()
    dtype = gate.dtype
    g, u, d = gate[neurons].float(), up[neurons].float(), down[:, neurons].float() * down_scale
    if noise_std:
        g = g + noise_std * gate.float().std() * torch.randn(g.shape, generator=generator)
        u = u + noise_std * up.float().std() * torch.randn(u.shape, generator=generator)
        d = d + noise_std * down_scale * down.float().std() * torch.randn(d.shape, generator=generator)
    if drop_ratio:
        # Drop-Upcycling: re-initialise a random subset of the expert's neurons with the source statistics.
        width = g.shape[0]
        count = int(round(drop_ratio * width))
        if count:
            idx = torch.randperm(width, generator=generator)[:count]
            for matrix, source, rows in ((g, gate, True), (u, up, True), (d, down, False)):
                mean, std = source.float().mean(), source.float().std()
                shape = (count, matrix.shape[1]) if rows else (matrix.shape[0], count)
                fresh = mean + std * torch.randn(shape, generator=generator)
                if rows:
                    matrix[idx] = fresh
                else:
                    matrix[:, idx] = fresh * down_scale
    return torch.cat([g, u], dim=0).to(dtype), d.to(dtype).contiguous()


def fresh_block_tensors(
    meta_model: AsyMoEForConditionalGeneration, layer: int, dtype: torch.dtype, seed: int
) -> dict[str, torch.Tensor]:
    """The new (non-expert-weight) tensors of MoE layer `layer`, initialised by the model's own `_init_weights`:
    routers normal(0, initializer_range) in fp32 with zero balancing biases, hyperbolic scales and curvature, and the
    neutral parts that keep copy mode function-preserving (Möbius biases and the evidence readout's `W_o` zero)."""
    text = meta_model.config.text_config
    with torch.device("meta"):  # a detached copy: the meta model keeps no materialised tensors
        block = _modeling_module.AsyMoESparseBlock(text, text.expert_layout(layer))
    big = {"experts.gate_up_proj", "experts.down_proj"}
    fresh: dict[str, torch.Tensor] = {}
    for name, tensor in block.state_dict(keep_vars=True).items():  # parameters and saved buffers (router bias)
        if name in big:
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = block.get_submodule(owner_path)
        fresh[name] = torch.empty(tensor.shape, dtype=torch.float32)
        if isinstance(tensor, nn.Parameter):
            fresh[name] = nn.Parameter(fresh[name], requires_grad=tensor.requires_grad)
            setattr(owner, attr, fresh[name])
        else:
            owner.register_buffer(attr, fresh[name])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, "block", layer))
        for module in block.modules():
            meta_model._init_weights(module)
    prefix = f"model.language_model.layers.{layer}.mlp."
    return {
        prefix + name: param.detach().to(torch.float32 if name.startswith("router.") else dtype)
        for name, param in fresh.items()
    }
