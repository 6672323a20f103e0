"""Hyperbolic maps for AsyMoE's inter-modality experts (Poincaré ball and Lorentz hyperboloid, curvature -c).

The Möbius bias runs in fp32 or wider whatever the input dtype (bf16 maps overflow from a tangent norm of about 5)
and clamps the geodesic radius, so it returns finite values for any finite input. The model runs it in place on the
inter experts' rows of each projection's output, in closed form over per-row scalars (`mobius_bias_`); the maps
composed as written (`mobius_bias_reference`) define it. This file is part of the Hub bundle: it imports only torch
and NumPy (a dependency of transformers).
"""

from __future__ import annotations

import math

import numpy as np
import torch

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
    above (the readable definition; the model runs `mobius_bias_`, which the tests hold equal to it).

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


class _TensorMath:
    """The elementwise functions the map coefficients use, on tensors; `_NumpyMath` and `_FloatMath`: the same on
    NumPy arrays and on Python floats (forward only)."""

    sqrt, tanh, atanh, sinh, asinh, cosh = torch.sqrt, torch.tanh, torch.atanh, torch.sinh, torch.asinh, torch.cosh
    clamp_min, clamp_max, where, zeros_like = torch.clamp_min, torch.clamp_max, torch.where, torch.zeros_like


class _NumpyMath:
    sqrt, tanh, atanh, sinh, asinh, cosh = np.sqrt, np.tanh, np.arctanh, np.sinh, np.arcsinh, np.cosh
    clamp_min, clamp_max, where, zeros_like = np.maximum, np.minimum, np.where, np.zeros_like


class _FloatMath:
    sqrt, tanh, atanh, sinh, asinh = math.sqrt, math.tanh, math.atanh, math.sinh, math.asinh
    clamp_min, clamp_max = max, min


def _clamped_norm(squared, ops=_TensorMath):
    return ops.sqrt(ops.clamp_min(squared, _MIN_NORM**2))


def _clamped_norm_slope(squared, norm):
    """d `_clamped_norm(squared)` / d squared, given that norm."""
    return (squared >= _MIN_NORM**2) / (2 * norm)


def _poincare_span(uu, ub, bb, sqrt_c, c, residual, grads, ops=_TensorMath):
    """Poincaré case of `_map_coefficients` (x = u/s given by uu = |x|², ub = <x, beta>); see there."""
    nu, nb = _clamped_norm(uu, ops), _clamped_norm(bb, ops)
    rx, ry = sqrt_c * nu, sqrt_c * nb
    # exp0 then the ball projection: |exp0(v)| = min(tanh(sqrt(c)|v|), 1 - BALL_EPS) / sqrt(c).
    hx, hy = ops.tanh(ops.clamp_max(rx, POINCARE_MAX_RADIUS)), ops.tanh(ops.clamp_max(ry, POINCARE_MAX_RADIUS))
    ax, ay = ops.clamp_max(hx, 1.0 - BALL_EPS) / rx, ops.clamp_max(hy, 1.0 - BALL_EPS) / ry
    x2, y2, xy = c * (ax * ax * uu), c * (ay * ay * bb), c * (ax * ay * ub)  # c|x|², c|y|², c<x, y>
    # Möbius addition x ⊕ y = (P x + Q y) / denominator, of squared norm c|x ⊕ y|² = (x2 + 2 xy + y2) / denominator;
    # then the projection and log0 (artanh), which rescale it by log_scale · denominator.
    raw_denominator = 1 + 2 * xy + x2 * y2
    denominator = ops.clamp_min(raw_denominator, _MIN_NORM)
    w = (x2 + 2 * xy + y2) / denominator
    z = _clamped_norm(w, ops)
    zc = ops.clamp_max(z, 1.0 - BALL_EPS)
    log_scale = ops.atanh(zc) / (z * denominator)
    p, q = 1 + 2 * xy + y2, 1 - x2
    a, b = log_scale * p * ax, log_scale * q * ay
    if residual:  # beta's terms dropped: denominator = 1, z² = x2 (so a - round_trip is exactly 0 at beta = 0)
        zr = _clamped_norm(x2, ops)
        zrc = ops.clamp_max(zr, 1.0 - BALL_EPS)
        g = ops.atanh(zrc) / zr
        a = 1 + (a - g * ax)
    if grads is None:
        return a, b, None
    a_bar, b_bar = grads
    # Reverse mode through the steps above (clamps pass gradient where the value is within bounds, as in autograd).
    log_bar = a_bar * p * ax + b_bar * q * ay
    p_bar, q_bar = a_bar * log_scale * ax, b_bar * log_scale * ay
    ax_bar, ay_bar = a_bar * log_scale * p, b_bar * log_scale * q
    xy_bar, y2_bar, x2_bar = 2 * p_bar, p_bar, -q_bar
    if residual:
        g_bar = -a_bar * ax
        ax_bar = ax_bar - a_bar * g
        zr_bar = g_bar * ((zr <= 1.0 - BALL_EPS) / ((1 - zrc * zrc) * zr) - g / zr)
        x2_bar = x2_bar + zr_bar * _clamped_norm_slope(x2, zr)
    z_bar = log_bar * ((z <= 1.0 - BALL_EPS) / ((1 - zc * zc) * z * denominator) - log_scale / z)
    w_bar = z_bar * _clamped_norm_slope(w, z)
    denominator_bar = ((raw_denominator >= _MIN_NORM) * -(log_bar * log_scale + w_bar * w)) / denominator
    n_bar = w_bar / denominator
    x2_bar = x2_bar + n_bar + denominator_bar * y2
    y2_bar = y2_bar + n_bar + denominator_bar * x2
    xy_bar = xy_bar + 2 * (n_bar + denominator_bar)
    c_bar = x2_bar * (ax * ax * uu) + y2_bar * (ay * ay * bb) + xy_bar * (ax * ay * ub)
    ax_bar = ax_bar + c * (2 * ax * uu * x2_bar + ay * ub * xy_bar)
    ay_bar = ay_bar + c * (2 * ay * bb * y2_bar + ax * ub * xy_bar)
    uu_bar, bb_bar, ub_bar = c * ax * ax * x2_bar, c * ay * ay * y2_bar, c * ax * ay * xy_bar
    # a_ = min(tanh(min(r, R)), 1 - eps) / r with r = sqrt(c)·n
    rx_bar = ax_bar * (((hx <= 1.0 - BALL_EPS) & (rx <= POINCARE_MAX_RADIUS)) * (1 - hx * hx) - ax) / rx
    ry_bar = ay_bar * (((hy <= 1.0 - BALL_EPS) & (ry <= POINCARE_MAX_RADIUS)) * (1 - hy * hy) - ay) / ry
    uu_bar = uu_bar + rx_bar * sqrt_c * _clamped_norm_slope(uu, nu)
    bb_bar = bb_bar + ry_bar * sqrt_c * _clamped_norm_slope(bb, nb)
    sqrt_c_bar = rx_bar * nu + ry_bar * nb
    return a, b, (uu_bar, ub_bar, bb_bar, sqrt_c_bar, c_bar)


def _lorentz_span(uu, ub, bb, sqrt_c, c, residual, grads, ops=_TensorMath):
    """Lorentz case of `_map_coefficients` (x = u/s given by uu = |x|², ub = <x, beta>); see there."""
    nu, nb = _clamped_norm(uu, ops), _clamped_norm(bb, ops)
    rx, ry = ops.clamp_max(sqrt_c * nu, LORENTZ_MAX_RADIUS), ops.clamp_max(sqrt_c * nb, LORENTZ_MAX_RADIUS)
    # exp0 on the unit sheet (spatial part sinh(sqrt(c)|v|) v/|v|), the boost by exp0(beta), then log0 (arsinh).
    ax, ab = ops.sinh(rx) / nu, ops.sinh(ry) / nb
    x_sq = ax * ax * uu
    x0, b0 = ops.sqrt(1 + x_sq), ops.sqrt(1 + ab * ab * bb)
    k = ax * ab * ub / (1 + b0)
    bc = (x0 + k) * ab
    raw_sq = x_sq + 2 * ax * bc * ub + bc * bc * bb
    nz = _clamped_norm(ops.clamp_min(raw_sq, 0.0), ops)
    log_scale = ops.asinh(nz) / (sqrt_c * nz)
    a, b = log_scale * ax, log_scale * bc
    if residual:  # beta's terms dropped: |boosted|² = x_sq (so a - round_trip is exactly 0 at beta = 0)
        nzr = _clamped_norm(ops.clamp_min(x_sq, 0.0), ops)
        g = ops.asinh(nzr) / (sqrt_c * nzr)
        a = 1 + (a - g * ax)
    if grads is None:
        return a, b, None
    a_bar, b_bar = grads
    log_bar = a_bar * ax + b_bar * bc
    ax_bar, bc_bar = a_bar * log_scale, b_bar * log_scale
    x_sq_bar = ops.zeros_like(x_sq)
    sqrt_c_bar = -(log_bar * log_scale) / sqrt_c
    if residual:
        g_bar = -a_bar * ax
        ax_bar = ax_bar - a_bar * g
        nzr_bar = g_bar * (1 / (ops.sqrt(1 + nzr * nzr) * sqrt_c * nzr) - g / nzr)
        sqrt_c_bar = sqrt_c_bar - g_bar * g / sqrt_c
        x_sq_bar = (x_sq >= 0) * nzr_bar * _clamped_norm_slope(ops.clamp_min(x_sq, 0.0), nzr)
    nz_bar = log_bar * (1 / (ops.sqrt(1 + nz * nz) * sqrt_c * nz) - log_scale / nz)
    sq_bar = (raw_sq >= 0) * nz_bar * _clamped_norm_slope(ops.clamp_min(raw_sq, 0.0), nz)
    x_sq_bar = x_sq_bar + sq_bar
    ax_bar = ax_bar + sq_bar * 2 * bc * ub
    bc_bar = bc_bar + sq_bar * 2 * (ax * ub + bc * bb)
    ub_bar, bb_bar = sq_bar * 2 * ax * bc, sq_bar * bc * bc
    k_bar = bc_bar * ab  # bc = (x0 + k)·ab
    x_sq_bar = x_sq_bar + k_bar / (2 * x0)  # x0 = sqrt(1 + x_sq), d bc / d x0 = ab = d bc / d k
    ab_bar = bc_bar * (x0 + k) + k_bar * ax * ub / (1 + b0)
    ax_bar = ax_bar + k_bar * ab * ub / (1 + b0)
    ub_bar = ub_bar + k_bar * ax * ab / (1 + b0)
    b0_bar = -k_bar * k / (1 + b0)
    ab_bar = ab_bar + b0_bar * ab * bb / b0
    bb_bar = bb_bar + b0_bar * ab * ab / (2 * b0)
    ax_bar = ax_bar + x_sq_bar * 2 * ax * uu
    uu_bar = x_sq_bar * ax * ax
    # a_ = sinh(min(sqrt(c)·n, R)) / n
    rx_bar = (sqrt_c * nu <= LORENTZ_MAX_RADIUS) * ax_bar * ops.cosh(rx) / nu
    ry_bar = (sqrt_c * nb <= LORENTZ_MAX_RADIUS) * ab_bar * ops.cosh(ry) / nb
    nu_bar, nb_bar = rx_bar * sqrt_c - ax_bar * ax / nu, ry_bar * sqrt_c - ab_bar * ab / nb
    uu_bar = uu_bar + nu_bar * _clamped_norm_slope(uu, nu)
    bb_bar = bb_bar + nb_bar * _clamped_norm_slope(bb, nb)
    sqrt_c_bar = sqrt_c_bar + rx_bar * nu + ry_bar * nb
    return a, b, (uu_bar, ub_bar, bb_bar, sqrt_c_bar, ops.zeros_like(uu))


_SPANS = {"poincare": _poincare_span, "lorentz": _lorentz_span}


def _map_coefficients(uu, ub, bb, scale, c, manifold, residual, grads=None, ops=_TensorMath):
    """(A, B) with Möbius map output = A·u + B·beta, from the row scalars uu = |u|², ub = <u, beta> and bb = |beta|²
    ([rows, 1] tensors, or Python floats with `ops=_FloatMath`); with `grads` = (dL/dA, dL/dB), also (dL/duu, dL/dub,
    dL/dbb, dL/dscale, dL/dc), written out by hand (autograd over these few-element tensors costs several times more
    per op).

    Every map is radial (exp0, log0 and the ball projection rescale their input), and Möbius addition and the Lorentz
    boost combine their two inputs linearly, so log0(exp0(x) ⊕ exp0(beta)) = a·x + b·beta with per-row scalars a, b
    (x = u/s): three reductions instead of a dozen full-width passes. Textbook map: A = a, B = s·b. Residual form:
    A = 1 + (a - a_rt) with a_rt the round trip's log0(exp0(x)) = a_rt·x, computed by the translation's own steps with
    beta's terms (exactly 0 at beta = 0) left out, so that A is exactly 1 (and the map exactly u) at beta = 0.
    """
    if manifold not in _SPANS:
        raise ValueError(f"unknown manifold {manifold!r}; use 'poincare' or 'lorentz'")
    sqrt_c = ops.sqrt(c)
    xx, xb = uu / (scale * scale), ub / scale
    a, b, span_grads = _SPANS[manifold](xx, xb, bb, sqrt_c, c, residual, None if grads is None else
                                        (grads[0], grads[1] * scale), ops)
    if grads is None:
        return a, scale * b, None
    xx_bar, xb_bar, bb_bar, sqrt_c_bar, c_bar = span_grads
    scale_bar = (grads[1] * b - (2 * xx_bar * xx + xb_bar * xb) / scale).sum().reshape(scale.shape)
    c_bar = (c_bar + sqrt_c_bar / (2 * sqrt_c)).sum().reshape(c.shape)
    return a, scale * b, (xx_bar / (scale * scale), xb_bar / scale, bb_bar, scale_bar, c_bar)


def _coefficients(uu, ub, bb, scale, c, selected, manifold, residual, grads=None):
    """`_map_coefficients` for the selected rows, the identity (A, B) = (1, 0), a constant, for the others. Eager on
    CPUs the [rows, 1] arithmetic runs in NumPy (same dtype, zero-copy views), whose ops cost a fraction of a torch
    op's dispatch here; compiled graphs and other devices run it in torch."""
    if uu.device.type == "cpu" and not torch.compiler.is_compiling():
        arrays = [t.detach().numpy() for t in (uu, ub, bb, scale, c, selected, *(grads or ()))]
        with np.errstate(all="ignore"):  # overflow to inf is handled by the clamps, as in torch
            a, b, grads = _selected_coefficients(*arrays[:6], manifold, residual, arrays[6:] or None, _NumpyMath)
        to_tensor = torch.from_numpy
        return to_tensor(a), to_tensor(b), grads and tuple(to_tensor(np.asarray(grad)) for grad in grads)
    return _selected_coefficients(uu, ub, bb, scale, c, selected, manifold, residual, grads, _TensorMath)


def _selected_coefficients(uu, ub, bb, scale, c, selected, manifold, residual, grads, ops):
    if grads is not None:
        grads = (grads[0] * selected, grads[1] * selected)
    a, b, grads = _map_coefficients(uu, ub, bb, scale, c, manifold, residual, grads, ops)
    return ops.where(selected, a, 1.0), ops.where(selected, b, 0.0), grads


def _spread(values: torch.Tensor, chosen: torch.Tensor, n: int) -> torch.Tensor:
    """[rows, n] matrix holding each row's value in the column of its bias (so that `@ table` adds value·beta_row)."""
    return values.new_zeros(values.shape[0], n).scatter_(-1, chosen, values)


def _chosen_products(x: torch.Tensor, table: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """<x_i, table[chosen_i]> as [rows, 1], from the [n, rows] products (table @ xᵀ runs ~2x faster on CPUs than
    x @ tableᵀ for these shapes)."""
    return (table @ x.T).gather(0, chosen.T).T


def _row_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """<x_i, y_i> per row as [rows, 1], without a [rows, D] temporary."""
    return torch.bmm(x.unsqueeze(-2), y.unsqueeze(-1)).view(-1, 1)


def _map_rows_(u, table, scale, c, index, manifold, residual) -> tuple[torch.Tensor, ...]:
    """u <- A·u + B·beta_row in place (u: [rows, D], any dtype; the rest in the compute dtype); returns the row data
    the backward needs."""
    wide = u.to(table.dtype)  # u itself when it is already in the compute dtype
    chosen, selected = index.clamp_min(0).unsqueeze(-1), (index >= 0).unsqueeze(-1)
    uu = torch.linalg.vector_norm(wide, dim=-1, keepdim=True).square()
    ub = _chosen_products(wide, table, chosen)
    bb = (table * table).sum(-1)[chosen]
    a, b, _ = _coefficients(uu, ub, bb, scale, c, selected, manifold, residual)
    if wide is u:
        u.mul_(a).addmm_(_spread(b, chosen, table.shape[0]), table)
    else:
        u.copy_(torch.addmm(wide * a, _spread(b, chosen, table.shape[0]), table))
    return chosen, selected, uu, ub, bb, a, b


# Up to this many rows, inference maps on CPUs compute their coefficients on the host (`mobius_bias_row_`); on GPUs
# each host read would stall the launch queue.
FEW_ROWS = 8


def mobius_bias_row_(u: torch.Tensor, beta: torch.Tensor, scale: float, c: float, manifold: str,
                     residual: bool = True) -> torch.Tensor:
    """`mobius_bias_` of one row u [1, D] with its bias beta [1, D], in place, without autograd (eager decoding
    steps): |u|², <u, beta> and |beta|² go to the host in one read and A, B are computed in Python floats (fp64) by
    the same `_map_coefficients`; the ~60 [rows, 1] tensor ops of the batched path cost far more than one row's own
    work. The row is updated in fp32 (fp64 for fp64 inputs), like `mobius_bias_`. Returns u."""
    compute = _compute_dtype(u)
    wide, beta = u.to(compute), beta.to(compute)
    vectors = torch.cat([wide, beta])
    (uu, ub), (_, bb) = (vectors @ vectors.T).tolist()
    a, b, _ = _map_coefficients(uu, ub, bb, scale, c, manifold, residual, ops=_FloatMath)
    result = wide.mul_(a).add_(beta, alpha=b)
    return u if result is u else u.copy_(result)


class _MobiusBias(torch.autograd.Function):
    """Rows start:stop of u [R, D] <- A·u + B·beta_row in place, with biases `table` [n, D] chosen by `index` (-1: row
    left unchanged); the other rows are untouched. The backward keeps the output (which the next op keeps anyway),
    never the input: u is recovered as (out - B·beta_row) / A, and the per-row scalars' derivatives come from
    `_coefficients` run again on them with the cotangents (a [rows, 1] computation). Working on the whole tensor
    rather than on a view of the rows spares autograd's copies of the gradient around an in-place op on a view."""

    @staticmethod
    def forward(ctx, u, table, scale, c, index, manifold, residual, start, stop):
        scalars = _map_rows_(u[start:stop], table, scale, c, index, manifold, residual)
        ctx.mark_dirty(u)
        ctx.save_for_backward(u, table, scale, c, *scalars)
        ctx.manifold, ctx.residual, ctx.rows = manifold, residual, slice(start, stop)
        return u

    @staticmethod
    def backward(ctx, grad):
        out, table, scale, c, chosen, selected, uu, ub, bb, a, b = ctx.saved_tensors
        n, rows = table.shape[0], ctx.rows
        grad_u = torch.empty_like(out)
        for others in (slice(None, rows.start), slice(rows.stop, None)):  # rows the map did not touch
            grad_u[others] = grad[others]
        g, out = grad[rows].to(table.dtype), out[rows].to(table.dtype)
        # u = (out - b·beta) / a. a > 0, but it underflows where a map all but collapses a row onto its bias (a
        # Lorentz bias of geodesic radius >~ 10): the output no longer resolves u there; the floor keeps it finite.
        inverse_a = 1 / a.clamp_min(torch.finfo(a.dtype).eps)
        g_beta = _chosen_products(g, table, chosen)  # <g, beta_row> = dL/db
        g_u = (_row_dot(g, out) - b * g_beta) * inverse_a  # <g, u> = dL/da
        _, _, (d_uu, d_ub, d_bb, d_scale, d_c) = _coefficients(
            uu, ub, bb, scale, c, selected, ctx.manifold, ctx.residual, (g_u, g_beta))
        # d/du of <g, a·u + b·beta> = a·g + 2·d_uu·u + d_ub·beta.
        p = 2 * d_uu * inverse_a
        beta_term = _spread(d_ub - p * b, chosen, n)
        if grad_u.dtype == g.dtype:
            torch.mul(g, a, out=grad_u[rows]).addcmul_(p, out).addmm_(beta_term, table)
        else:
            grad_u[rows] = torch.addmm(torch.addcmul(g * a, p, out), beta_term, table)
        grad_table = None
        if ctx.needs_input_grad[1]:
            # Per bias e, over its rows: b·g + d_ub·u + 2·d_bb·beta_e.
            q = d_ub * inverse_a
            total = _spread(2 * d_bb - q * b, chosen, n).sum(0).unsqueeze(-1)
            grad_table = torch.addmm(torch.addmm(total * table, _spread(b, chosen, n).T, g), _spread(q, chosen, n).T,
                                     out)
        return grad_u, grad_table, d_scale, d_c, None, None, None, None, None


def mobius_bias_(
    u: torch.Tensor,
    beta: torch.Tensor,
    scale: torch.Tensor,
    c: torch.Tensor,
    manifold: str,
    residual: bool = True,
    index: torch.Tensor | None = None,
    rows: slice = slice(None),
) -> torch.Tensor:
    """`mobius_bias_reference` computed in span(u, beta), in place: rows `rows` of u [R, D] (a contiguous range) <-
    A·u + B·beta with per-row scalars A, B of |u|², <u, beta> and |beta|² (same value to rounding, exactly u at
    beta = 0 in the residual form). Returns u.

    `beta` is one bias [D] for every row, or a table [n, D] with `index` (one entry per mapped row) choosing each row's
    bias; rows whose index is negative stay unchanged (the model's rows of other expert groups). The table is read
    through [rows, n] products, never gathered to [rows, D], and the bias gradient is a matmul (deterministic, no
    scatter-add). Computed in fp32 (fp64 for fp64 inputs). For the backward only the result is kept, which the op
    after a projection keeps anyway: u must be a tensor autograd does not need (e.g. a projection's output).
    """
    start, stop, _ = rows.indices(u.shape[0])
    compute = _compute_dtype(u)
    table = beta.to(compute).reshape(-1, beta.shape[-1])
    if index is None:
        if table.shape[0] != 1:
            raise ValueError(f"beta of shape {tuple(beta.shape)} needs an index choosing each row's bias")
        index = torch.zeros(stop - start, dtype=torch.long, device=u.device)
    args = (table, scale.to(compute), c.to(compute), index.reshape(-1), manifold, residual)
    with torch.autocast(device_type=u.device.type, enabled=False):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (u, *args[:3])):
            _MobiusBias.apply(u, *args, start, stop)
        elif stop - start <= FEW_ROWS and u.device.type == "cpu" and not torch.compiler.is_compiling():
            host_scale, host_c = float(args[1]), float(args[2])
            for row, expert in enumerate(args[3].tolist(), start):
                if expert >= 0:
                    mobius_bias_row_(u[row : row + 1], table[expert : expert + 1], host_scale, host_c, manifold,
                                     residual)
        else:  # inference: no autograd record (which compiled graphs could not trace without one either)
            _map_rows_(u[start:stop], *args)
    return u


def mobius_bias(u: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`mobius_bias_` on a copy of u [..., D] (every row), returned in u's shape and dtype."""
    return mobius_bias_(u.reshape(-1, u.shape[-1]).clone(), *args, **kwargs).view(u.shape)


__all__ = [
    "lorentz_boost",
    "lorentz_expmap0",
    "lorentz_logmap0",
    "mobius_add",
    "mobius_bias",
    "mobius_bias_",
    "mobius_bias_reference",
    "mobius_bias_row_",
    "mobius_translate",
    "poincare_expmap0",
    "poincare_logmap0",
    "round_trip",
]
