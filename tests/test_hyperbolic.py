"""Hyperbolic maps of the inter-modality experts (`hyperbolic_asymoe`): exp/log round trips and closed forms, Möbius
addition and Lorentz boosts, finite values and gradients for tangent norms up to 1e18 (fp32 and bf16 autocast), and
the Möbius bias at and around beta = 0."""

from __future__ import annotations

import math

import pytest
import torch

from asymoe.modeling.hyperbolic_asymoe import (
    FEW_ROWS,
    _map_coefficients,
    lorentz_boost,
    lorentz_expmap0,
    lorentz_logmap0,
    mobius_add,
    mobius_bias,
    mobius_bias_,
    mobius_bias_reference,
    mobius_bias_row_,
    mobius_translate,
    poincare_expmap0,
    poincare_logmap0,
    round_trip,
)

MANIFOLDS = ("poincare", "lorentz")
DIM = 16
EXPMAP = {"poincare": poincare_expmap0, "lorentz": lorentz_expmap0}
LOGMAP = {"poincare": poincare_logmap0, "lorentz": lorentz_logmap0}


@pytest.fixture(autouse=True)
def seeded():
    """Deterministic global RNG for the tests that draw from it."""
    torch.manual_seed(0)


def tangents(norms, seed: int = 0, dim: int = DIM) -> torch.Tensor:
    """Rows of the given Euclidean norms along random directions (fp32)."""
    generator = torch.Generator().manual_seed(seed)
    norms = torch.as_tensor(norms, dtype=torch.float32).reshape(-1, 1)
    directions = torch.randn(norms.shape[0], dim, generator=generator)
    return directions / directions.norm(dim=-1, keepdim=True) * norms


def ball_points(n: int, c: torch.Tensor, seed: int, max_radius: float = 2.0) -> torch.Tensor:
    """Points of the Poincaré ball at geodesic tangent radii sqrt(c)|v| spread over (0, max_radius]."""
    radii = torch.linspace(0.05, max_radius, n) / c.sqrt()
    return poincare_expmap0(tangents(radii, seed), c)


def lorentz_time(xs: torch.Tensor) -> torch.Tensor:
    """Time coordinate of a point of the unit hyperboloid from its spatial part."""
    return (1 + (xs * xs).sum(-1, keepdim=True)).sqrt()


def lorentz_inner(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Minkowski inner product <x, y>_L = -x0 y0 + xs . ys of unit-hyperboloid points given by spatial parts."""
    return -(lorentz_time(xs) * lorentz_time(ys)).squeeze(-1) + (xs * ys).sum(-1)


# --- exp/log maps -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("manifold, max_radius", [("poincare", 4.0), ("lorentz", 4.0), ("lorentz", 15.0)])
def test_round_trip_is_identity_below_clamp(manifold, max_radius, c):
    """log0(exp0(v)) == v in fp32 for geodesic radii sqrt(c)|v| up to 4 (Poincaré) / 15 (Lorentz)."""
    c = torch.tensor(c)
    v = tangents(torch.linspace(0.0, max_radius, 61) / c.sqrt())
    composed = LOGMAP[manifold](EXPMAP[manifold](v, c), c)
    torch.testing.assert_close(composed, v, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(round_trip(v, c, manifold), v, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_expmap0_closed_form_norms(c):
    """|exp0(v)| = tanh(sqrt(c)|v|)/sqrt(c) on the ball and sinh(sqrt(c)|v|) on the unit sheet; direction kept."""
    c = torch.tensor(c)
    norms = torch.linspace(0.1, 3.0, 11)
    v = tangents(norms / c.sqrt())
    radius = c.sqrt() * v.norm(dim=-1)
    ball, sheet = poincare_expmap0(v, c), lorentz_expmap0(v, c)
    torch.testing.assert_close(ball.norm(dim=-1), torch.tanh(radius) / c.sqrt(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sheet.norm(dim=-1), torch.sinh(radius), rtol=1e-5, atol=1e-7)
    unit = v / v.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(ball / ball.norm(dim=-1, keepdim=True), unit)
    torch.testing.assert_close(sheet / sheet.norm(dim=-1, keepdim=True), unit)


def test_poincare_points_stay_inside_ball():
    """Beyond the clamp radius the Poincaré exp map and Möbius addition stay strictly inside the ball."""
    c = torch.tensor(1.7)
    x = poincare_expmap0(tangents([5.0, 10.0, 1e2, 1e4]), c)
    y = poincare_expmap0(tangents([7.0, 1e3, 1e4, 20.0], seed=1), c)
    assert (c.sqrt() * x.norm(dim=-1) < 1).all()
    assert (c.sqrt() * mobius_add(x, y, c).norm(dim=-1) < 1).all()


# --- Möbius addition and Lorentz boosts ---------------------------------------------------------------------------


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_mobius_add_identities(c):
    """x ⊕ 0 = x, 0 ⊕ y = y, (-x) ⊕ x = 0 and left cancellation (-x) ⊕ (x ⊕ y) = y."""
    c = torch.tensor(c)
    x, y = ball_points(12, c, seed=0), ball_points(12, c, seed=1)
    zero = torch.zeros_like(x)
    torch.testing.assert_close(mobius_add(x, zero, c), x, rtol=0, atol=0)
    torch.testing.assert_close(mobius_add(zero, y, c), y, rtol=0, atol=0)
    torch.testing.assert_close(mobius_add(-x, x, c), zero, rtol=0, atol=1e-6)
    torch.testing.assert_close(mobius_add(-x, mobius_add(x, y, c), c), y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_mobius_add_collinear_is_velocity_addition(c):
    """For collinear a·e, b·e: (a e) ⊕ (b e) = (a + b) / (1 + c a b) e (relativistic velocity addition)."""
    c = torch.tensor(c)
    e = tangents([1.0])
    a = torch.tensor([0.3, -0.5, 0.9, 0.1]).reshape(-1, 1) / c.sqrt()
    b = torch.tensor([0.4, 0.8, -0.2, -0.95]).reshape(-1, 1) / c.sqrt()
    expected = (a + b) / (1 + c * a * b) * e
    torch.testing.assert_close(mobius_add(a * e, b * e, c), expected, rtol=1e-5, atol=1e-6)


def test_lorentz_boost_identities_and_isometry():
    """Boost by the origin is the identity, boosting the origin gives b, the inverse boost is the boost by -b, and a
    boost preserves the Minkowski inner product (an isometry of the hyperboloid)."""
    xs = lorentz_expmap0(tangents(torch.linspace(0.1, 3.0, 10), seed=0), torch.tensor(1.0))
    ys = lorentz_expmap0(tangents(torch.linspace(0.2, 2.5, 10), seed=1), torch.tensor(1.0))
    bs = lorentz_expmap0(tangents(torch.linspace(0.3, 2.0, 10), seed=2), torch.tensor(1.0))
    zero = torch.zeros_like(xs)
    torch.testing.assert_close(lorentz_boost(xs, zero), xs, rtol=0, atol=0)
    torch.testing.assert_close(lorentz_boost(zero, bs), bs, rtol=0, atol=0)
    torch.testing.assert_close(lorentz_boost(lorentz_boost(xs, bs), -bs), xs, rtol=1e-4, atol=1e-4)
    moved = lorentz_inner(lorentz_boost(xs, bs), lorentz_boost(ys, bs))
    torch.testing.assert_close(moved, lorentz_inner(xs, ys), rtol=1e-4, atol=1e-4)


def test_translations_agree_across_models():
    """The Lorentz boost at curvature 4c is the left Möbius translation exp0(β) ⊕ exp0(u) of the ball at curvature c
    (the ball's exp0 has conformal factor 2); the ball's right translation exp0(u) ⊕ exp0(β) differs from it by a
    gyration, a rotation, so their tangent norms agree."""
    c = torch.tensor(0.7)
    u = tangents(torch.linspace(0.1, 2.0, 12) / c.sqrt(), seed=0)
    beta = tangents(torch.linspace(0.05, 1.0, 12) / c.sqrt(), seed=1)
    lorentz = mobius_translate(u, beta, 4 * c, "lorentz")
    left = poincare_logmap0(mobius_add(poincare_expmap0(beta, c), poincare_expmap0(u, c), c), c)
    right = mobius_translate(u, beta, c, "poincare")
    torch.testing.assert_close(lorentz, left, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(right.norm(dim=-1), lorentz.norm(dim=-1), rtol=1e-4, atol=1e-5)
    assert (right - lorentz).abs().max() > 1e-2  # not the same map: the test above is not vacuous


def test_unknown_manifold_raises():
    with pytest.raises(ValueError, match="manifold"):
        mobius_translate(torch.zeros(1, DIM), torch.zeros(DIM), torch.tensor(1.0), "sphere")


# --- mobius_bias: finiteness ------------------------------------------------------------------------------------

HUGE_NORMS = [0.0, 1e-8, 1e-3, 0.5, 1.0, 5.0, 10.0, 100.0, 1e3, 1e4, 1e8, 1e12, 1e16, 1e18]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "textbook"])
@pytest.mark.parametrize("manifold", MANIFOLDS)
@pytest.mark.parametrize("beta_norm", [0.0, 1e-3, 1.0, 10.0, 1e4])
def test_mobius_bias_finite_values_and_gradients(manifold, residual, autocast, beta_norm):
    """Outputs and gradients wrt u, beta, scale and curvature are finite for tangent norms 0..1e18 (zero rows
    included), in fp32 and with bf16 inputs under CPU autocast; the output keeps u's dtype. (Beyond ~1.8e19 a row's
    squared norm overflows fp32: docs/design.md.)"""
    dtype = torch.bfloat16 if autocast else torch.float32
    u = torch.cat([tangents(HUGE_NORMS, seed=s) for s in range(3)]).to(dtype).requires_grad_()
    beta = tangents([beta_norm], seed=7)[0].to(dtype).requires_grad_()
    scale = torch.tensor(1.5, dtype=dtype, requires_grad=True)
    c = torch.tensor(0.8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = mobius_bias(u, beta, scale, c, manifold, residual)
    assert out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out.float() * weights).sum().backward()
    for name, tensor in (("u", u), ("beta", beta), ("scale", scale), ("curvature", c)):
        assert tensor.grad is not None, name
        assert torch.isfinite(tensor.grad.float()).all(), f"non-finite gradient wrt {name}"


@pytest.mark.parametrize("manifold", MANIFOLDS)
def test_mobius_bias_zero_input_is_zero_with_unit_gradient(manifold):
    """u = 0, beta = 0: the output is exactly 0 and d out / d u is the identity (no clamp-induced dead gradient)."""
    u = torch.zeros(3, DIM, requires_grad=True)
    out = mobius_bias(u, torch.zeros(DIM), torch.tensor(2.0), torch.tensor(1.0), manifold, residual=False)
    assert torch.equal(out, torch.zeros_like(out))
    weights = torch.randn(3, DIM)
    (out * weights).sum().backward()
    torch.testing.assert_close(u.grad, weights, rtol=1e-5, atol=1e-6)


# --- mobius_bias: values around beta = 0 ------------------------------------------------------------------------


@pytest.mark.parametrize("manifold", MANIFOLDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mobius_bias_residual_is_exact_at_zero_beta(manifold, dtype):
    """Residual form at beta = 0 returns u bitwise, also far beyond the clamp radius (function-preserving)."""
    u = torch.cat([tangents(HUGE_NORMS, seed=s) for s in range(3)]).to(dtype)
    out = mobius_bias(u, torch.zeros(DIM), torch.tensor(1.3), torch.tensor(0.7), manifold, residual=True)
    assert out.dtype == dtype
    assert torch.equal(out, u)


@pytest.mark.parametrize("manifold", MANIFOLDS)
def test_mobius_bias_textbook_is_close_at_zero_beta(manifold):
    """Textbook form at beta = 0 equals u up to fp32 rounding below the clamp (geodesic radius of u/s up to 4)."""
    scale, c = torch.tensor(1.3), torch.tensor(0.7)
    u = tangents(torch.linspace(0.0, 4.0, 41) * scale / c.sqrt())
    out = mobius_bias(u, torch.zeros(DIM), scale, c, manifold, residual=False)
    torch.testing.assert_close(out, u, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("manifold", MANIFOLDS)
def test_residual_and_textbook_agree_below_clamp(manifold):
    """With a nonzero bias both forms give the same value wherever the round trip is exact."""
    scale, c = torch.tensor(2.0), torch.tensor(1.0)
    u = tangents(torch.linspace(0.1, 3.0, 16) * scale, seed=0)
    beta = tangents([0.8], seed=1)[0]
    residual = mobius_bias(u, beta, scale, c, manifold, residual=True)
    textbook = mobius_bias(u, beta, scale, c, manifold, residual=False)
    torch.testing.assert_close(residual, textbook, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "textbook"])
@pytest.mark.parametrize("manifold", MANIFOLDS)
def test_nonzero_beta_changes_output_and_has_gradient(manifold, residual):
    """A nonzero beta moves the output; at beta = 0 the gradient wrt beta is nonzero, and at u = 0 it is s·I
    (translation of the origin: out = s·beta to first order)."""
    scale, c = torch.tensor(1.5), torch.tensor(0.9)
    u = tangents(torch.linspace(0.2, 4.0, 8) * scale, seed=0)
    beta = tangents([0.5], seed=1)[0]
    moved = mobius_bias(u, beta, scale, c, manifold, residual)
    assert (moved - u).norm(dim=-1).min() > 1e-2

    zero_beta = torch.zeros(DIM, requires_grad=True)
    (mobius_bias(u, zero_beta, scale, c, manifold, residual) * torch.randn(u.shape)).sum().backward()
    assert zero_beta.grad.abs().sum() > 1e-3

    zero_beta = torch.zeros(DIM, requires_grad=True)
    weights = torch.randn(DIM)
    (mobius_bias(torch.zeros(1, DIM), zero_beta, scale, c, manifold, residual) * weights).sum().backward()
    torch.testing.assert_close(zero_beta.grad, scale * weights, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("manifold", MANIFOLDS)
def test_mobius_bias_at_origin_is_scaled_beta(manifold):
    """u = 0: log0(0 ⊕ exp0(beta)) = beta, so the map returns s·beta (any beta below the clamp)."""
    scale, c = torch.tensor(1.5), torch.tensor(0.9)
    beta = tangents([2.0 / math.sqrt(0.9)], seed=3)[0]
    out = mobius_bias(torch.zeros(2, DIM), beta, scale, c, manifold, residual=False)
    torch.testing.assert_close(out, (scale * beta).expand(2, DIM), rtol=1e-4, atol=1e-5)


# --- the per-row coefficients' hand-written derivatives ------------------------------------------------------------


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "textbook"])
@pytest.mark.parametrize("manifold", MANIFOLDS)
def test_coefficient_derivatives_equal_autograd(manifold, residual):
    """The map's backward differentiates its per-row coefficients (A, B) by hand; in fp64 that equals autograd through
    their forward, for tangent and bias radii below and beyond the clamps, zero rows and zero biases, any angle."""
    u = torch.cat([tangents([0.0, 1e-9, 0.3, 1.0, 2.5, 7.0, 40.0, 1e3], seed=s) for s in range(4)]).double()
    beta = torch.cat([tangents([0.0, 0.2, 1.5, 12.0], seed=10 + s) for s in range(8)]).double()
    uu, ub, bb = (u * u).sum(-1, keepdim=True), (u * beta).sum(-1, keepdim=True), (beta * beta).sum(-1, keepdim=True)
    scale, c = torch.tensor([1.7], dtype=torch.float64), torch.tensor([0.8], dtype=torch.float64)
    cotangents = torch.randn(2, len(u), 1, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (uu, ub, bb, scale, c)]
    a, b, _ = _map_coefficients(*leaves, manifold, residual)
    ((a * cotangents[0]).sum() + (b * cotangents[1]).sum()).backward()
    a_by_hand, b_by_hand, by_hand = _map_coefficients(uu, ub, bb, scale, c, manifold, residual, tuple(cotangents))
    assert torch.equal(a_by_hand, a.detach()) and torch.equal(b_by_hand, b.detach())
    for name, leaf, grad in zip(("uu", "ub", "bb", "scale", "curvature"), leaves, by_hand):
        torch.testing.assert_close(grad, leaf.grad, rtol=1e-9, atol=1e-12, msg=name)


# --- mobius_bias (span form, what the model runs) equals mobius_bias_reference (the composed maps) ----------------


def table_reference(u, table, scale, c, manifold, residual, index):
    """`mobius_bias_reference` with each row's bias looked up in `table`; rows with a negative index stay u."""
    moved = mobius_bias_reference(u, table[index.clamp_min(0)], scale, c, manifold, residual)
    return torch.where((index >= 0).unsqueeze(-1), moved, u)


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "textbook"])
@pytest.mark.parametrize("manifold", MANIFOLDS)
def test_fast_mobius_bias_equals_reference(manifold, residual):
    """Values and gradients (u, bias table, scale, curvature) of the fp32 span form agree with the composed maps in
    fp64 below the clamp, with a table of biases (one of them zero) chosen per row and rows left out (index -1:
    returned unchanged, identity gradient); the scalar parameters' gradients sum hundreds of rounding differences
    amplified near the ball's edge: 3e-3 relative (the composed maps in fp32 are 1.9e-3 and 3.2e-3 off on the
    Poincaré curvature here). Beyond the Poincaré clamp, where artanh at the ball's edge amplifies 1-ulp differences
    ~5e4-fold, both in fp32 to 5e-3."""
    scale, c = torch.tensor(1.7), torch.tensor(0.8)
    below = tangents(torch.linspace(0.0, 3.0, 24) * scale / c.sqrt(), seed=0)
    table = torch.cat([torch.zeros(1, DIM), tangents(torch.linspace(0.01, 1.0, 4), seed=1)])
    index = torch.arange(24) % 6 - 1  # -1 (left out), then each of the 5 biases
    grads = []
    for implementation, dtype in ((table_reference, torch.float64), (mobius_bias, torch.float32)):
        leaves = [t.to(dtype).requires_grad_() for t in (below, table, scale, c)]
        out = implementation(*leaves, manifold, residual, index=index)
        (out * torch.linspace(-1.0, 1.0, DIM, dtype=dtype)).sum().backward()
        grads.append((out.detach().float(), *(leaf.grad.float() for leaf in leaves)))
    for name, fast, reference in zip(("out", "u", "beta", "scale", "curvature"), grads[1], grads[0]):
        rtol = 3e-3 if name in ("scale", "curvature") else 1e-4
        torch.testing.assert_close(fast, reference, rtol=rtol, atol=1e-4, msg=name)
    assert torch.equal(grads[1][0][index < 0], below[index < 0])

    beyond = tangents(HUGE_NORMS, seed=2)
    beta = tangents([0.5], seed=3)[0]
    torch.testing.assert_close(mobius_bias(beyond, beta, scale, c, manifold, residual),
                               mobius_bias_reference(beyond, beta, scale, c, manifold, residual), rtol=5e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "textbook"])
@pytest.mark.parametrize("manifold", MANIFOLDS)
def test_few_row_inference_equals_batched_rows(manifold, residual, dtype):
    """Inference on at most FEW_ROWS rows computes the coefficients on the host, in Python floats (fp64), one row at a
    time (`mobius_bias_row_`); it agrees with the batched fp32 path on the same rows (which it takes for more rows):
    rows left out (index -1) untouched, a zero bias returning u bitwise in the residual form, finite for huge norms
    (where both agree to the fp32 precision of the saturated map)."""
    scale, c = torch.tensor([1.7]), torch.tensor([0.8])
    table = torch.cat([torch.zeros(1, DIM), tangents([0.05, 0.4, 1.0], seed=1)])
    rows = torch.cat([tangents(torch.linspace(0.0, 3.0, 6) * 1.7 / 0.8**0.5, seed=0), tangents([1e4, 1e18], seed=2)])
    index = torch.tensor([0, 1, 2, 3, -1, 0, 1, 2])
    assert len(rows) == FEW_ROWS
    with torch.no_grad():
        few = mobius_bias_(rows.to(dtype, copy=True), table, scale, c, manifold, residual, index)
        padded = torch.cat([rows, tangents(torch.ones(FEW_ROWS), seed=5)]).to(dtype)  # more rows: batched path
        batched = mobius_bias_(padded, table, scale, c, manifold, residual, torch.cat([index, index]))[:FEW_ROWS]
    assert few.dtype == dtype and torch.isfinite(few.float()).all()
    # Beyond the Poincaré clamp (the last two rows) artanh at the ball's edge amplifies fp32 rounding ~5e4-fold.
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(few[:6], batched[:6], rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(few[6:], batched[6:], rtol=5e-3 if dtype != torch.float64 else 1e-9, atol=tolerance)
    assert torch.equal(few[index == -1], rows.to(dtype)[index == -1])
    if residual:
        assert torch.equal(few[index == 0], rows.to(dtype)[index == 0])
    single = rows[1:2].to(dtype, copy=True)  # the bias row in fp32 whatever u's dtype: computed in u's compute dtype
    assert mobius_bias_row_(single, table[1:2], float(scale), float(c), manifold, residual) is single
    assert torch.equal(single, few[1:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("manifold", MANIFOLDS)
def test_mobius_bias_keeps_only_its_output_for_backward(manifold, dtype):
    """The map runs in place and recovers its input from its output in the backward: of the tensors autograd saves,
    the only full-width one is the output itself, in u's dtype (which the next op of an expert keeps anyway), never
    u or a wider copy; the bias table is read through [rows, n] products, never gathered per row."""
    rows, n = 64, 3
    u = (torch.randn(rows, DIM) * 2.0).to(dtype).requires_grad_()
    table = (torch.randn(n, DIM) * 0.1).requires_grad_()
    index = torch.arange(rows) % (n + 1) - 1
    full_width = []

    def pack(tensor):
        if tensor.numel() >= rows * DIM:
            full_width.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = mobius_bias(u, table, torch.tensor([1.5]), torch.tensor([0.8]), manifold, True, index)
    assert full_width and all(t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr() for t in full_width)
    assert all(t.dtype == dtype for t in full_width)
    out.float().sum().backward()
    assert u.grad.dtype == dtype and torch.isfinite(u.grad.float()).all()
    assert torch.isfinite(table.grad).all() and table.grad.abs().sum() > 0


@pytest.mark.parametrize("manifold", MANIFOLDS)
def test_in_place_map_on_rows_of_a_projection(manifold):
    """`mobius_bias_` on a slice of a projection's output (the model's inter rows) gives the values and gradients of
    the out-of-place map spliced into the same rows."""
    x, weight = torch.randn(12, DIM, requires_grad=True), torch.randn(DIM, DIM) * 0.5
    table = (torch.randn(2, DIM) * 0.3).requires_grad_()
    scale, c = torch.tensor([1.5], requires_grad=True), torch.tensor([0.8], requires_grad=True)
    index, probe = torch.tensor([0, 1, 1, 0, 1]), torch.randn(12, DIM)
    results = []
    for in_place in (True, False):
        for leaf in (x, table, scale, c):
            leaf.grad = None
        out = x @ weight
        if in_place:
            mobius_bias_(out[4:9], table, scale, c, manifold, True, index)
        else:
            out = torch.cat([out[:4], mobius_bias(out[4:9], table, scale, c, manifold, True, index), out[9:]])
        (out * probe).sum().backward()
        results.append([out.detach(), *(leaf.grad.clone() for leaf in (x, table, scale, c))])
    for name, actual, expected in zip(("out", "x", "beta", "scale", "curvature"), *results):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=name)
