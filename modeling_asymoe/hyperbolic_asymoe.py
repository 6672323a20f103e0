"""Hyperbolic maps for AsyMoE's inter-modality experts (Poincaré ball and Lorentz hyperboloid, curvature -c).

The Möbius bias runs in fp32 or wider whatever the input dtype (bf16 maps overflow from a tangent norm of about 5) and clamp the
geodesic radius, so they return finite values for any finite input. This file is part of the Hub bundle: it
imports only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Largest geodesic radius sqrt(c)*|v| kept by the maps. Poincaré: tanh saturates in fp32 beyond ~9, and the ball is
# clamped to radius (1 - BALL_EPS)/sqrt(c), i.e. artanh caps at ~6.1. Lorentz: sinh stays exact far beyond that.
POINCARE_MAX_RADIUS = 15.0
LORENTZ_MAX_RADIUS = 20.0
BALL_EPS = 1e-5
_MIN_NORM = 1e-7


def _norm(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over the last dim, clamped away from 0 so that its gradient stays finite."""
    return (x * x).sum(-1, keepdim=True).clamp_min(_MIN_NORM**2).sqrt()


def poincare_expmap0(v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Exponential map at the origin of the Poincaré ball: tangent vector -> point of the ball."""
    sqrt_c = c.sqrt()
    norm = _norm(v)
    radius = (sqrt_c * norm).clamp_max(POINCARE_MAX_RADIUS)
    return poincare_project(torch.tanh(radius) * v / (sqrt_c * norm), c)


def poincare_logmap0(y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Logarithmic map at the origin of the Poincaré ball: point of the ball -> tangent vector."""
    sqrt_c = c.sqrt()
    norm = _norm(y)
    scaled = (sqrt_c * norm).clamp_max(1.0 - BALL_EPS)
    return torch.atanh(scaled) * y / (sqrt_c * norm)


def poincare_project(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Pull points back inside the ball of radius (1 - BALL_EPS)/sqrt(c)."""
    max_norm = (1.0 - BALL_EPS) / c.sqrt()
    norm = _norm(x)
    return torch.where(norm > max_norm, x * (max_norm / norm), x)


def mobius_add(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Möbius addition x ⊕_c y on the Poincaré ball."""
    xy = (x * y).sum(-1, keepdim=True)
    x2 = (x * x).sum(-1, keepdim=True)
    y2 = (y * y).sum(-1, keepdim=True)
    numerator = (1 + 2 * c * xy + c * y2) * x + (1 - c * x2) * y
    denominator = (1 + 2 * c * xy + c * c * x2 * y2).clamp_min(_MIN_NORM)
    return poincare_project(numerator / denominator, c)


def lorentz_expmap0(v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Exponential map at the origin of the hyperboloid, returned as the spatial part of sqrt(c)·x (unit sheet)."""
    norm = _norm(v)
    radius = (c.sqrt() * norm).clamp_max(LORENTZ_MAX_RADIUS)
    return torch.sinh(radius) * v / norm


def lorentz_logmap0(xs: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Inverse of `lorentz_expmap0`: spatial part of a point on the unit sheet -> tangent vector at the origin."""
    norm = _norm(xs)
    return torch.asinh(norm) * xs / (c.sqrt() * norm)


def lorentz_boost(xs: torch.Tensor, bs: torch.Tensor) -> torch.Tensor:
    """Lorentz boost (hyperbolic translation) of points `xs` by the one taking the origin to `bs` (spatial parts)."""
    x0 = (1 + (xs * xs).sum(-1, keepdim=True)).sqrt()
    b0 = (1 + (bs * bs).sum(-1, keepdim=True)).sqrt()
    return xs + (x0 + (bs * xs).sum(-1, keepdim=True) / (1 + b0)) * bs


def mobius_translate(u: torch.Tensor, beta: torch.Tensor, c: torch.Tensor, manifold: str) -> torch.Tensor:
    """Tangent vector of the hyperbolic translation of exp0(u) by exp0(beta): log0(exp0(u) ⊕ exp0(beta))."""
    if manifold == "poincare":
        return poincare_logmap0(mobius_add(poincare_expmap0(u, c), poincare_expmap0(beta, c), c), c)
    if manifold == "lorentz":
        return lorentz_logmap0(lorentz_boost(lorentz_expmap0(u, c), lorentz_expmap0(beta, c)), c)
    raise ValueError(f"unknown manifold {manifold!r}; use 'poincare' or 'lorentz'")


def round_trip(u: torch.Tensor, c: torch.Tensor, manifold: str) -> torch.Tensor:
    """log0(exp0(u)): equals u below the clamp radius, saturates beyond it."""
    if manifold == "poincare":
        # Projected twice, like `mobius_translate` (mobius_add re-projects): then it equals the translation by
        # exp0(0) bitwise, also beyond the clamp radius, where fp32 artanh at the ball's edge (slope ~5e4) turns the
        # 1-ulp change of a second projection into a ~6e-3 change of the tangent norm.
        return poincare_logmap0(poincare_project(poincare_expmap0(u, c), c), c)
    return lorentz_logmap0(lorentz_expmap0(u, c), c)


def mobius_bias_reference(
    u: torch.Tensor,
    beta: torch.Tensor,
    scale: torch.Tensor,
    c: torch.Tensor,
    manifold: str,
    residual: bool = True,
) -> torch.Tensor:
    """Output of a Möbius linear map given its Euclidean part u = W v and Möbius bias `beta`, composed from the maps
    above (the readable definition; the model runs `mobius_bias`, which the tests hold equal to it).

    `residual=False` is the textbook map s·log0(exp0(u/s) ⊕ exp0(beta)). `residual=True` returns
    u + s·[log0(exp0(u/s) ⊕ exp0(beta)) - log0(exp0(u/s))]: the same value wherever the round trip is exact
    (geodesic radius below the clamp), exactly u at beta = 0 (function-preserving upcycling), and it keeps the
    Euclidean magnitude of u where the textbook map saturates. Computed in fp32 (fp64 for fp64 inputs), returned in
    u's dtype.
    """
    dtype, compute = u.dtype, _compute_dtype(u)
    with torch.autocast(device_type=u.device.type, enabled=False):
        scale, cf = scale.to(compute), c.to(compute)
        uf = u.to(compute) / scale
        moved = mobius_translate(uf, beta.to(compute), cf, manifold)
        if residual:
            out = u.to(compute) + scale * (moved - round_trip(uf, cf, manifold))
        else:
            out = scale * moved
    return out.to(dtype)


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    """fp32, or u's dtype where it is wider."""
    return torch.promote_types(u.dtype, torch.float32)


def _clamped_norm(squared: torch.Tensor) -> torch.Tensor:
    return squared.clamp_min(_MIN_NORM**2).sqrt()


def _translate_coefficients(
    uu: torch.Tensor, ub: torch.Tensor, bb: torch.Tensor, c: torch.Tensor, manifold: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with log0(exp0(u) ⊕ exp0(beta)) = a·u + b·beta, from the row scalars |u|², <u, beta>, |beta|².

    Every map is radial (exp0, log0 and the ball projection rescale their input), and Möbius addition and the Lorentz
    boost combine their two inputs linearly, so the result stays in span(u, beta) and only per-row scalars are
    needed: three reductions instead of a dozen full-width passes. With ub = bb = 0 it gives the round trip's
    coefficient through the same operations (bitwise what a zero bias gives).
    """
    sqrt_c = c.sqrt()
    nu, nb = _clamped_norm(uu), _clamped_norm(bb)
    if manifold == "poincare":
        max_norm = (1.0 - BALL_EPS) / sqrt_c

        def shrink(squared_norm):  # the factor `poincare_project` rescales a point of this squared norm by
            norm = _clamped_norm(squared_norm)
            return torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm))

        ax = torch.tanh((sqrt_c * nu).clamp_max(POINCARE_MAX_RADIUS)) / (sqrt_c * nu)
        ay = torch.tanh((sqrt_c * nb).clamp_max(POINCARE_MAX_RADIUS)) / (sqrt_c * nb)
        ax, ay = ax * shrink(ax * ax * uu), ay * shrink(ay * ay * bb)
        x2, y2, xy = ax * ax * uu, ay * ay * bb, ax * ay * ub
        denominator = (1 + 2 * c * xy + c * c * x2 * y2).clamp_min(_MIN_NORM)
        a = (1 + 2 * c * xy + c * y2) * ax / denominator
        b = (1 - c * x2) * ay / denominator
        factor = shrink((a * a * uu + 2 * a * b * ub + b * b * bb).clamp_min(0.0))
        a, b = a * factor, b * factor
        nz = _clamped_norm((a * a * uu + 2 * a * b * ub + b * b * bb).clamp_min(0.0))
        log_scale = torch.atanh((sqrt_c * nz).clamp_max(1.0 - BALL_EPS)) / (sqrt_c * nz)
    elif manifold == "lorentz":
        ax = torch.sinh((sqrt_c * nu).clamp_max(LORENTZ_MAX_RADIUS)) / nu
        ab = torch.sinh((sqrt_c * nb).clamp_max(LORENTZ_MAX_RADIUS)) / nb
        x0 = (1 + ax * ax * uu).sqrt()
        b0 = (1 + ab * ab * bb).sqrt()
        a, b = ax, (x0 + ax * ab * ub / (1 + b0)) * ab
        nz = _clamped_norm((a * a * uu + 2 * a * b * ub + b * b * bb).clamp_min(0.0))
        log_scale = torch.asinh(nz) / (sqrt_c * nz)
    else:
        raise ValueError(f"unknown manifold {manifold!r}; use 'poincare' or 'lorentz'")
    return log_scale * a, log_scale * b


class _RowStatistics(torch.autograd.Function):
    """|u|² and u·tableᵀ per row, computed in the table's dtype; keeps u itself for the backward, not the wider copy
    (half the saved bytes for bf16 u)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(u, table)
        wide = u.to(table.dtype)
        return (wide * wide).sum(-1, keepdim=True), wide @ table.T

    @staticmethod
    def backward(ctx, grad_squared: torch.Tensor, grad_products: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, table = ctx.saved_tensors
        wide = u.to(table.dtype)
        grad_u = torch.addmm(2 * grad_squared * wide, grad_products, table)
        return grad_u.to(u.dtype), grad_products.T @ wide


def mobius_bias(
    u: torch.Tensor,
    beta: torch.Tensor,
    scale: torch.Tensor,
    c: torch.Tensor,
    manifold: str,
    residual: bool = True,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """`mobius_bias_reference` computed in span(u, beta): out = A·u + B·beta with per-row scalars A, B of |u|², <u, beta>
    and |beta|² (same value to rounding, exactly u at beta = 0 in the residual form).

    `beta` is one bias [D] for every row, or a table [n, D] with `index` [rows] choosing each row's bias; rows whose
    index is negative are returned unchanged (the model's rows of other expert groups). The table is read through
    [rows, n] products, never gathered to [rows, D]: autograd keeps only u itself (in its own dtype) and per-row
    scalars for the backward, and the bias gradient is a matmul (deterministic, no scatter-add).
    """
    dtype, compute = u.dtype, _compute_dtype(u)
    with torch.autocast(device_type=u.device.type, enabled=False):
        rows, scale, cf = u.reshape(-1, u.shape[-1]), scale.to(compute), c.to(compute)
        table = beta.to(compute).reshape(-1, beta.shape[-1])
        if index is None:
            if table.shape[0] != 1:
                raise ValueError(f"beta of shape {tuple(beta.shape)} needs an index choosing each row's bias")
            index = torch.zeros(rows.shape[0], dtype=torch.long, device=u.device)
        index = index.reshape(-1)
        selected = index >= 0
        choice = F.one_hot(index.clamp_min(0), table.shape[0]).to(compute) * selected.unsqueeze(-1)
        squared, products = _RowStatistics.apply(rows, table)
        uu = squared / (scale * scale)
        ub = (products * choice).sum(-1, keepdim=True) / scale
        bb = choice @ (table * table).sum(-1, keepdim=True)
        a, b = _translate_coefficients(uu, ub, bb, cf, manifold)
        if residual:
            zero = torch.zeros_like(uu)
            round_trip_a, _ = _translate_coefficients(uu, zero, zero, cf, manifold)
            coef_u = 1 + (a - round_trip_a)
        else:
            coef_u = a
        coef_u = torch.where(selected.unsqueeze(-1), coef_u, torch.ones_like(coef_u))
        out = torch.addmm(rows * coef_u, choice * (scale * b), table)  # rows * coef_u: in `compute`, u kept as is
    return out.reshape(u.shape).to(dtype)


__all__ = [
    "lorentz_boost",
    "lorentz_expmap0",
    "lorentz_logmap0",
    "mobius_add",
    "mobius_bias",
    "mobius_bias_reference",
    "mobius_translate",
    "poincare_expmap0",
    "poincare_logmap0",
    "round_trip",
]
