"""AsyMoE expert math: the three experts implementations agree (values and gradients), hyperbolic inter experts at
zero Möbius bias are Euclidean SwiGLU experts, the evidence readout is causal and switched off at W_o = 0, the router
respects modality reachability, and the load-balancing / z losses match hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version

from asymoe import AsyMoEForConditionalGeneration
from asymoe.configuration import AsyMoETextConfig, ExpertLayout
from asymoe.modeling import modeling_asymoe
from asymoe.modeling.modeling_asymoe import (
    AsyMoEEvidenceReadout,
    AsyMoEExperts,
    AsyMoERotaryEmbedding,
    AsyMoESparseBlock,
    reach_masks,
    router_losses,
)
from asymoe.tiny import build_tokenizer, tiny_config

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
MANIFOLDS = ("poincare", "lorentz")
HIDDEN, MOE_INTERMEDIATE = 32, 48
EVIDENCE_LAYER = 3  # layout (vision, text, inter, evidence) = (1, 1, 2, 1): expert ids 0 | 1 | 2, 3 | 4
PLAIN_LAYER = 1  # layout (1, 1, 2, 0)
IMAGE_IDS, TEXT_IDS = {0, 2, 3}, {1, 2, 3, 4}


@pytest.fixture(autouse=True)
def seeded():
    """Deterministic global RNG for the tests that draw from it."""
    torch.manual_seed(0)


def text_config(**overrides) -> AsyMoETextConfig:
    """Tiny AsyMoE decoder config: 4 layers, MoE in layers 1 and 3, evidence experts in layer 3."""
    kwargs = dict(
        vocab_size=32,
        hidden_size=HIDDEN,
        intermediate_size=64,
        moe_intermediate_size=MOE_INTERMEDIATE,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
        experts_implementation="eager",
    )
    kwargs.update(overrides)
    return AsyMoETextConfig(**kwargs)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def init_experts(experts: AsyMoEExperts, seed: int = 0, bias_std: float = 0.0) -> None:
    """Random expert weights giving geodesic radii sqrt(c)|u/s| of 0.5-2 (the design's typical range) for
    unit-variance inputs at the default scales s = sqrt(map width); Möbius biases drawn with `bias_std` (0: the
    function-preserving init). Larger radii raise the ball's fp32 rounding floor (~s·eps·cosh²(r): at r = 3 a 1-ulp
    matmul difference already moves an output by ~1e-4), which would blur the 1e-5 comparisons below."""
    g = generator(seed)
    experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=g) * 0.3)
    experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g) * 0.07)
    if experts.is_hyperbolic:
        experts.mobius_bias_gate_up.copy_(torch.randn(experts.mobius_bias_gate_up.shape, generator=g) * bias_std)
        experts.mobius_bias_down.copy_(torch.randn(experts.mobius_bias_down.shape, generator=g) * bias_std)
        experts.log_scale_gate_up.fill_(math.log(math.sqrt(2 * experts.intermediate_dim)))
        experts.log_scale_down.fill_(math.log(math.sqrt(experts.hidden_dim)))
        experts.raw_curvature.fill_(math.log(math.expm1(0.8)))  # c = softplus(raw) = 0.8


def random_routing(num_tokens: int, num_experts: int, top_k: int, seed: int, exclude=()):
    """Distinct top-k expert ids per token (never those in `exclude`) and positive weights summing to 1."""
    g = generator(seed)
    allowed = torch.tensor([e for e in range(num_experts) if e not in exclude])
    index = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:top_k]] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=g) + 0.1
    return index, weights / weights.sum(-1, keepdim=True)


def swiglu_reference(experts: AsyMoEExperts, hidden, index, weights) -> torch.Tensor:
    """Hand-written Euclidean SwiGLU mixture: sum_k w_k · W_down[e_k] (silu(gate) * up), [gate; up] = W_gate_up[e_k] h.
    """
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for k in range(index.shape[1]):
            e = int(index[t, k])
            gate, up = (experts.gate_up_proj[e] @ hidden[t]).chunk(2)
            out[t] += weights[t, k] * (experts.down_proj[e] @ (F.silu(gate) * up))
    return out


def experts_and_inputs(num_tokens: int, with_evidence: bool = True, **config_overrides):
    """Experts of the evidence layer (every group) with random weights and Möbius biases, and random hidden / evidence
    inputs of `num_tokens` tokens."""
    config = text_config(**config_overrides)
    experts = AsyMoEExperts(config, config.expert_layout(EVIDENCE_LAYER))
    init_experts(experts, seed=1, bias_std=0.1)
    g = generator(2)
    hidden = torch.randn(num_tokens, HIDDEN, generator=g)
    evidence = hidden + 0.5 * torch.randn(num_tokens, HIDDEN, generator=g) if with_evidence else None
    return experts, hidden, evidence


def run_experts(experts, implementation, hidden, index, weights, evidence, module=None):
    """Forward + backward of a fixed random linear functional through `module` (default: the experts themselves);
    returns the output and every gradient."""
    experts.config._experts_implementation = implementation
    experts.zero_grad(set_to_none=True)
    hidden = hidden.clone().requires_grad_()
    evidence = None if evidence is None else evidence.clone().requires_grad_()
    out = (experts if module is None else module)(hidden, index, weights, evidence)
    (out * torch.randn(out.shape, generator=generator(123))).sum().backward()
    grads = {name: p.grad.clone() for name, p in experts.named_parameters() if p.grad is not None}
    grads["hidden_states"] = hidden.grad
    if evidence is not None:
        grads["evidence_states"] = evidence.grad
    return out.detach(), grads


def assert_grads_close(actual: dict, expected: dict) -> None:
    """Gradients equal up to fp32 summation order: 1e-4 of the tensor's largest entry; scalars (log-scales,
    curvature: sums over every row with cancellations) to 1e-3 relative."""
    assert actual.keys() == expected.keys()
    for name, reference in expected.items():
        if reference.numel() == 1:
            rtol, atol = 1e-3, 1e-5
        else:
            rtol, atol = 1e-4, 1e-4 * float(reference.abs().max()) + 1e-7
        torch.testing.assert_close(actual[name], reference, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# --- experts implementations --------------------------------------------------------------------------------------


@pytest.mark.parametrize("routing", ["all-experts", "empty-expert"])
@pytest.mark.parametrize("with_evidence", [True, False], ids=["evidence", "no-evidence"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "textbook"])
@pytest.mark.parametrize("manifold", MANIFOLDS)
def test_implementations_agree(manifold, residual, with_evidence, routing):
    """eager, grouped_mm and batched_mm: same outputs and same gradients for every expert parameter (Möbius biases,
    scales and curvature included) and for the hidden / evidence inputs, with nonzero Möbius biases."""
    experts, hidden, evidence = experts_and_inputs(24, with_evidence, manifold=manifold, mobius_residual=residual)
    exclude = (0,) if routing == "empty-expert" else ()
    index, weights = random_routing(24, experts.num_experts, 2, seed=3, exclude=exclude)
    assert set(index.unique().tolist()) == set(range(experts.num_experts)) - set(exclude)

    out_ref, grads_ref = run_experts(experts, "eager", hidden, index, weights, evidence)
    assert grads_ref["mobius_bias_gate_up"].abs().sum() > 0 and grads_ref["raw_curvature"].abs() > 0
    for implementation in IMPLEMENTATIONS[1:]:
        out, grads = run_experts(experts, implementation, hidden, index, weights, evidence)
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
        assert_grads_close(grads, grads_ref)


# transformers < 5.23: the CPU grouped-GEMM fallback's backward reads the offsets on the host (Tensor.tolist),
# which a fullgraph compile cannot trace; 5.23 made it a traceable custom op.
_GROUPED_BACKWARD_TRACEABLE = pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.23.0"),
    reason="transformers < 5.23: its CPU grouped-GEMM fallback's backward cannot be compiled with fullgraph=True",
)


@pytest.mark.parametrize("manifold, num_tokens, kernel", [
    pytest.param("poincare", 24, "grouped GEMM", marks=_GROUPED_BACKWARD_TRACEABLE),
    pytest.param("lorentz", 24, "grouped GEMM", marks=_GROUPED_BACKWARD_TRACEABLE),
    ("poincare", 3, "gather"),
])
def test_compiled_grouped_mm_agrees_with_eager(manifold, num_tokens, kernel, monkeypatch):
    """Compiled (`fullgraph=True`: no graph break, no host sync), `grouped_mm` maps every row with the identity for
    the other groups instead of reading the inter rows' bounds, and calls of at most `experts_gather_max_tokens`
    tokens take the gather kernel; values and gradients equal the eager loop's either way."""
    gathered = []
    gather = modeling_asymoe.asymoe_batched_mm_experts_forward
    monkeypatch.setattr(modeling_asymoe, "asymoe_batched_mm_experts_forward",
                        lambda *args: gathered.append(True) or gather(*args))
    experts, hidden, evidence = experts_and_inputs(num_tokens, manifold=manifold)
    assert experts.config.experts_gather_max_tokens == 4
    index, weights = random_routing(num_tokens, experts.num_experts, 2, seed=3)
    index[:3] = torch.tensor([[0, 2], [1, 3], [4, 2]])  # every group: vision | text | inter | evidence
    out_ref, grads_ref = run_experts(experts, "eager", hidden, index, weights, evidence)
    torch._dynamo.reset()
    compiled = torch.compile(experts, fullgraph=True, backend="aot_eager")
    out, grads = run_experts(experts, "grouped_mm", hidden, index, weights, evidence, module=compiled)
    assert bool(gathered) == (kernel == "gather")
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, grads_ref)


@pytest.mark.parametrize("with_evidence", [True, False], ids=["evidence", "no-evidence"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "textbook"])
@pytest.mark.parametrize("manifold", MANIFOLDS)
def test_few_token_inference_agrees_with_eager(manifold, residual, with_evidence, monkeypatch):
    """Eager inference calls of at most `experts_gather_max_tokens` tokens (decoding steps) run each (token, expert)
    pair through its expert's weights with the maps on single rows; they equal the eager loop for every group, and
    larger calls or calls under autograd take the grouped GEMM."""
    taken = []
    few_tokens = AsyMoEExperts.few_tokens_inference
    monkeypatch.setattr(AsyMoEExperts, "few_tokens_inference", lambda *args: taken.append(True) or few_tokens(*args))
    experts, hidden, evidence = experts_and_inputs(5, with_evidence, manifold=manifold, mobius_residual=residual)
    index, weights = random_routing(5, experts.num_experts, 2, seed=3)
    index[:3] = torch.tensor([[0, 2], [1, 3], [4, 2]])  # every group: vision | text | inter | evidence
    for num_tokens, expected_path in ((1, True), (4, True), (5, False)):
        rows = slice(0, num_tokens)
        args = (hidden[rows], index[rows], weights[rows], None if evidence is None else evidence[rows])
        with torch.no_grad():
            experts.config._experts_implementation = "eager"
            reference = experts(*args)
            experts.config._experts_implementation = "grouped_mm"
            taken.clear()
            out = experts(*args)
        assert bool(taken) == expected_path, num_tokens
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    taken.clear()
    run_experts(experts, "grouped_mm", hidden[:1], index[:1], weights[:1], None)
    assert not taken


@pytest.mark.parametrize("value", [-1, 2.5, None])
def test_gather_threshold_is_validated(value):
    with pytest.raises(ValueError, match="experts_gather_max_tokens must be an integer >= 0"):
        text_config(experts_gather_max_tokens=value)


@pytest.mark.parametrize("manifold", MANIFOLDS)
def test_full_model_implementations_agree(manifold):
    """`set_experts_implementation` on the tiny VLM: same logits and parameter gradients for all three, with random
    Möbius biases, a nonzero evidence readout and a mix of image and text positions."""
    tokenizer = build_tokenizer("red blue green circle square".split())
    torch.manual_seed(0)
    model = AsyMoEForConditionalGeneration(tiny_config(tokenizer, manifold=manifold)).eval()
    with torch.no_grad():
        for block in model.moe_blocks():
            if block.experts.is_hyperbolic:
                block.experts.mobius_bias_gate_up.normal_(0.0, 0.1)
                block.experts.mobius_bias_down.normal_(0.0, 0.1)
            if block.evidence is not None:
                block.evidence.o_proj.weight.normal_(0.0, 0.2)
    g = generator(5)
    image_id, num_image_tokens = model.config.image_token_id, model.config.num_image_tokens
    text_ids = torch.randint(5, len(tokenizer), (2, 6), generator=g)  # ids 0-4 are the special tokens and <image>
    input_ids = torch.cat([text_ids[:, :2], torch.full((2, num_image_tokens), image_id), text_ids[:, 2:]], dim=1)
    pixel_values = torch.randn(2, 3, 32, 32, generator=g)
    probe = torch.randn(*input_ids.shape, model.config.text_config.vocab_size, generator=g)

    results = {}
    for implementation in IMPLEMENTATIONS:
        model.set_experts_implementation(implementation)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=False).logits
        (logits * probe).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "experts" in n}
        results[implementation] = logits.detach(), grads
    logits_ref, grads_ref = results["eager"]
    assert any("mobius_bias" in name for name in grads_ref)
    for implementation in IMPLEMENTATIONS[1:]:
        logits, grads = results[implementation]
        torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
        assert_grads_close(grads, grads_ref)


# --- hyperbolic inter experts at zero bias ------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "residual, input_scale",
    [(True, 1.0), (True, 30.0), (False, 1.0)],  # the textbook map saturates beyond the clamp by design
    ids=["residual-typical", "residual-beyond-clamp", "textbook-typical"],
)
@pytest.mark.parametrize("manifold", MANIFOLDS)
def test_hyperbolic_inter_at_zero_bias_is_swiglu(manifold, residual, input_scale, implementation):
    """Zero Möbius biases: hyperbolic inter experts equal Euclidean ones with the same weights (bitwise in the
    residual form, at any input norm; close in the textbook form below the clamp), and both equal a hand-written
    SwiGLU mixture."""
    layout_kwargs = dict(manifold=manifold, mobius_residual=residual, experts_implementation=implementation)
    hyperbolic_config = text_config(**layout_kwargs)
    euclidean_config = text_config(hyperbolic_inter=False, **layout_kwargs)
    layout = hyperbolic_config.expert_layout(PLAIN_LAYER)
    assert layout == euclidean_config.expert_layout(PLAIN_LAYER)
    hyperbolic, euclidean = AsyMoEExperts(hyperbolic_config, layout), AsyMoEExperts(euclidean_config, layout)
    assert hyperbolic.is_hyperbolic and not euclidean.is_hyperbolic
    init_experts(hyperbolic, seed=4)
    euclidean.load_state_dict(
        {"gate_up_proj": hyperbolic.gate_up_proj.detach(), "down_proj": hyperbolic.down_proj.detach()}
    )
    hidden = torch.randn(16, HIDDEN, generator=generator(6)) * input_scale
    index, weights = random_routing(16, layout.num_experts, 2, seed=7)
    index[:4] = torch.tensor([2, 3])  # some tokens use only the inter experts

    with torch.no_grad():
        out_hyperbolic = hyperbolic(hidden, index, weights)
        out_euclidean = euclidean(hidden, index, weights)
        reference = swiglu_reference(euclidean, hidden, index, weights)
    torch.testing.assert_close(out_euclidean, reference, rtol=1e-5, atol=1e-5 * input_scale**2)
    if residual:
        assert torch.equal(out_hyperbolic, out_euclidean)
    else:
        torch.testing.assert_close(out_hyperbolic, out_euclidean, rtol=1e-4, atol=1e-4)


def test_nonzero_mobius_bias_only_changes_inter_experts():
    """A Möbius bias moves the output of tokens routed to an inter expert and leaves the others bitwise unchanged."""
    config = text_config()
    experts = AsyMoEExperts(config, config.expert_layout(PLAIN_LAYER))
    init_experts(experts, seed=8)
    hidden = torch.randn(6, HIDDEN, generator=generator(9))
    index = torch.tensor([[0, 1], [1, 0], [2, 0], [0, 3], [2, 3], [1, 0]])
    weights = torch.full((6, 2), 0.5)
    with torch.no_grad():
        before = experts(hidden, index, weights)
        experts.mobius_bias_gate_up.normal_(0.0, 0.3)
        experts.mobius_bias_down.normal_(0.0, 0.3)
        after = experts(hidden, index, weights)
    inter = (index >= 2).any(dim=-1)
    assert torch.equal(after[~inter], before[~inter])
    assert ((after[inter] - before[inter]).norm(dim=-1) > 1e-3).all()


# --- evidence readout ---------------------------------------------------------------------------------------------


@pytest.fixture
def evidence_setup():
    """A readout with random q/gate weights and W_o = 0, plus keys/values, RoPE and hidden states of 2 x 10 tokens."""
    config = text_config()
    torch.manual_seed(10)
    readout = AsyMoEEvidenceReadout(config)
    with torch.no_grad():
        readout.o_proj.weight.zero_()
    batch, seq, kv_heads, head_dim = 2, 10, config.num_key_value_heads, config.head_dim
    g = generator(11)
    hidden = torch.randn(batch, seq, HIDDEN, generator=g)
    key = torch.randn(batch, kv_heads, seq, head_dim, generator=g)
    value = torch.randn(batch, kv_heads, seq, head_dim, generator=g)
    position_ids = torch.arange(seq).unsqueeze(0)
    rope = AsyMoERotaryEmbedding(config)(hidden, position_ids)
    evidence_mask = torch.zeros(batch, seq, dtype=torch.bool)
    evidence_mask[0, 3:6] = True
    evidence_mask[1, 6:8] = True
    return config, readout, hidden, (key, value), rope, evidence_mask


def test_readout_with_zero_output_projection_is_identity(evidence_setup):
    """W_o = 0: the readout returns the hidden state bitwise (the readout starts switched off)."""
    _, readout, hidden, key_value, rope, evidence_mask = evidence_setup
    with torch.no_grad():
        assert torch.equal(readout(hidden, key_value, rope, evidence_mask, 0), hidden)


def test_evidence_experts_with_zero_output_projection_are_plain_ffn(evidence_setup):
    """W_o = 0 in a sparse block: its output equals the experts run on the hidden state alone (evidence experts are
    the plain FFN), for text tokens that do route to the evidence expert."""
    config, _, hidden, key_value, rope, evidence_mask = evidence_setup
    block = AsyMoESparseBlock(config, config.expert_layout(EVIDENCE_LAYER))
    init_experts(block.experts, seed=12)
    with torch.no_grad():
        block.router.weight.normal_(0.0, 0.5, generator=generator(13))
        block.router.weight[4] += 2.0 * hidden.reshape(-1, HIDDEN).mean(0)  # favour the evidence expert
        block.evidence.o_proj.weight.zero_()
        block.evidence.q_proj.weight.normal_(0.0, 0.3)
        image_mask = evidence_mask.clone()
        out = block(hidden, image_mask, key_value, rope, evidence_mask, 0)
        flat = hidden.reshape(-1, HIDDEN)
        _, weights, index = block.router(flat, image_mask.reshape(-1))
        assert (index[~image_mask.reshape(-1)] == 4).any(), "no text token reached the evidence expert"
        expected = block.experts(flat, index, weights, None).view_as(hidden)
    assert torch.equal(out, expected)


def test_readout_is_causal_over_evidence(evidence_setup):
    """Nonzero W_o: a token's readout depends only on evidence positions at or before it. Tokens before the first
    evidence get exactly h; changing a later evidence key/value leaves earlier tokens unchanged and changes the
    token at that position; changing a non-evidence key/value changes nothing."""
    _, readout, hidden, (key, value), rope, evidence_mask = evidence_setup
    with torch.no_grad():
        readout.o_proj.weight.normal_(0.0, 0.3, generator=generator(14))
        out = readout(hidden, (key, value), rope, evidence_mask, 0)
        assert torch.equal(out[0, :3], hidden[0, :3]) and torch.equal(out[1, :6], hidden[1, :6])
        assert ((out[0, 3:] - hidden[0, 3:]).norm(dim=-1) > 1e-4).all()

        later_key, later_value = key.clone(), value.clone()
        later_key[0, :, 5] += 3.0
        later_value[0, :, 5] -= 2.0
        changed = readout(hidden, (later_key, later_value), rope, evidence_mask, 0)
        torch.testing.assert_close(changed[0, :5], out[0, :5], rtol=0, atol=1e-6)
        torch.testing.assert_close(changed[1], out[1], rtol=0, atol=1e-6)
        assert ((changed[0, 5:] - out[0, 5:]).norm(dim=-1) > 1e-4).all()

        other_key, other_value = key.clone(), value.clone()
        other_key[:, :, [0, 1, 8, 9]] += 5.0
        other_value[:, :, [0, 1, 8, 9]] -= 5.0
        torch.testing.assert_close(readout(hidden, (other_key, other_value), rope, evidence_mask, 0), out, rtol=0,
                                   atol=1e-6)


def test_first_evidence_reader():
    """The readout's first used position: the earliest text token over the batch with evidence at or before it
    (positions count the cached ones), the last position when there is none, 0 for one-token steps."""
    reader = modeling_asymoe._first_evidence_reader
    image = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    assert reader(image, image, 0) == 3
    assert reader(torch.zeros_like(image), image, 0) == 5  # no evidence: capped at the last position
    text_evidence = torch.tensor([[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert reader(text_evidence, torch.zeros_like(image), 0) == 4  # evidence that is text reads itself
    # Two new positions after four cached ones, evidence among the cached: both read it.
    history = torch.tensor([[0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert reader(history, torch.zeros(2, 2, dtype=torch.bool), 4) == 0
    assert reader(history, torch.zeros(2, 1, dtype=torch.bool), 5) == 0


def test_readout_without_evidence_has_finite_gradients(evidence_setup):
    """A sequence without evidence (text only) reads r = 0 at every token; the backward through the readout stays
    finite (its attention has no key to attend for these rows) and gives the query projection no gradient."""
    _, readout, hidden, (key, value), rope, evidence_mask = evidence_setup
    evidence_mask[1] = False
    with torch.no_grad():
        readout.o_proj.weight.normal_(0.0, 0.3, generator=generator(17))
    hidden, key, value = (t.clone().requires_grad_() for t in (hidden, key, value))
    out = readout(hidden[1:], (key[1:], value[1:]), rope, evidence_mask[1:], 0)
    assert torch.equal(out, hidden[1:])
    (out * torch.randn(out.shape, generator=generator(18))).sum().backward()
    for tensor in (hidden.grad, key.grad, value.grad, *(p.grad for p in readout.parameters())):
        assert tensor is not None and torch.isfinite(tensor).all()
    assert not readout.q_proj.weight.grad.any()


def test_readout_single_evidence_value_by_hand(evidence_setup):
    """One evidence position j: every token t >= j attends only to it, so r_t is value[j] per head (GQA-repeated)
    and the output is h + sigmoid(w_g·[h; r] + b_g) · W_o r; tokens before j get h."""
    config, readout, hidden, (key, value), rope, _ = evidence_setup
    j = 4
    evidence_mask = torch.zeros(2, 10, dtype=torch.bool)
    evidence_mask[:, j] = True
    with torch.no_grad():
        readout.o_proj.weight.normal_(0.0, 0.3, generator=generator(15))
        out = readout(hidden, (key, value), rope, evidence_mask, 0)
        groups = config.num_attention_heads // config.num_key_value_heads
        r = value[:, :, j].repeat_interleave(groups, dim=1).reshape(2, 1, -1).expand(2, 10 - j, -1)
        h = hidden[:, j:]
        gate = torch.sigmoid(readout.gate(torch.cat([h, r], dim=-1)))
        expected = h + gate * readout.o_proj(r)
    torch.testing.assert_close(out[:, j:], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[:, :j], hidden[:, :j])


def test_readout_decoding_step_matches_full_sequence(evidence_setup):
    """The last token read with `past_length = seq - 1` (a decoding step over the cache) equals the full forward."""
    _, readout, hidden, key_value, (cos, sin), evidence_mask = evidence_setup
    with torch.no_grad():
        readout.o_proj.weight.normal_(0.0, 0.3, generator=generator(16))
        full = readout(hidden, key_value, (cos, sin), evidence_mask, 0)
        step = readout(hidden[:, -1:], key_value, (cos[:, -1:], sin[:, -1:]), evidence_mask, hidden.shape[1] - 1)
    torch.testing.assert_close(step, full[:, -1:], rtol=1e-5, atol=1e-6)


# --- router -------------------------------------------------------------------------------------------------------


def test_reach_masks_follow_layout():
    """Layer 3 stores experts as vision 0 | text 1 | inter 2, 3 | evidence 4; image tokens reach {0, 2, 3}, text
    tokens {1, 2, 3, 4}; layer 1 has no evidence expert."""
    config = text_config()
    assert config.expert_layout(EVIDENCE_LAYER) == ExpertLayout(1, 1, 2, 1)
    assert config.expert_layout(PLAIN_LAYER) == ExpertLayout(1, 1, 2, 0)
    assert config.expert_layout(0) is None
    layout = config.expert_layout(EVIDENCE_LAYER)
    assert set(layout.reachable("image")) == IMAGE_IDS and set(layout.reachable("text")) == TEXT_IDS
    image_reach, text_reach = reach_masks(layout, "cpu")
    assert set(image_reach.nonzero().flatten().tolist()) == IMAGE_IDS
    assert set(text_reach.nonzero().flatten().tolist()) == TEXT_IDS


def test_reach_masks_shared_from_inference_mode_serve_training():
    """The masks are shared between calls; a first call under `torch.inference_mode` (evaluation) must not leave an
    inference tensor that a later training loss cannot save for its backward (`router_losses` indexes with them)."""
    config = text_config()
    block = AsyMoESparseBlock(config, config.expert_layout(EVIDENCE_LAYER))
    image_mask, valid = torch.tensor([True, False, False, True]), torch.ones(4, dtype=torch.bool)
    modeling_asymoe._shared_reach_masks.cache_clear()
    with torch.inference_mode():
        reach_masks(block.layout, "cpu")
    logits = torch.randn(4, block.layout.num_experts, requires_grad=True)
    aux_loss, z_loss = router_losses((logits,), [block], image_mask, valid)
    (aux_loss + z_loss).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("layer, text_ids", [(EVIDENCE_LAYER, TEXT_IDS), (PLAIN_LAYER, {1, 2, 3})])
@pytest.mark.parametrize("logit_std", [0.5, 100.0], ids=["typical", "extreme"])
def test_router_respects_reachability(layer, text_ids, logit_std):
    """Image tokens pick only vision/inter experts, text tokens only text/inter/evidence experts (also when extreme
    logits underflow every other probability to 0); ids are distinct, weights >= 0, sum to 1, and equal the
    renormalised softmax over the reachable experts."""
    config = text_config(num_experts_per_tok=3)
    block = AsyMoESparseBlock(config, config.expert_layout(layer))
    g = generator(17)
    with torch.no_grad():
        block.router.weight.copy_(torch.randn(block.router.weight.shape, generator=g) * logit_std)
    hidden = torch.randn(512, HIDDEN, generator=g)
    image_mask = torch.rand(512, generator=g) < 0.5
    logits, weights, index = block.router(hidden, image_mask)
    reachable = reach_masks(block.layout, "cpu")[(~image_mask).long()]

    assert logits.dtype == torch.float32 and logits.shape == (512, block.layout.num_experts)
    image_picks, text_picks = set(index[image_mask].unique().tolist()), set(index[~image_mask].unique().tolist())
    assert image_picks <= IMAGE_IDS and text_picks <= text_ids
    if logit_std < 1:
        assert image_picks == IMAGE_IDS and text_picks == text_ids
    assert (index.sort(dim=-1).values.diff(dim=-1) > 0).all()
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(512))
    probs = F.softmax(logits.masked_fill(~reachable, float("-inf")), dim=-1)
    chosen = probs.gather(-1, index)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))


# --- router losses ------------------------------------------------------------------------------------------------


def three_expert_block(top_k: int = 1) -> AsyMoESparseBlock:
    """Sparse block of one vision, one text and one inter expert: image tokens reach {0, 2}, text tokens {1, 2}."""
    config = text_config(
        num_vision_experts=1, num_text_experts=1, num_inter_experts=1, evidence_experts=False,
        num_experts_per_tok=top_k,
    )
    return AsyMoESparseBlock(config, config.expert_layout(PLAIN_LAYER))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_router_losses_uniform_router(top_k):
    """Zero logits (uniform routing): balance loss exactly 1 for any top-k; z-loss is the mean of log(|R_m|)^2 over
    the image (|R| = 3) and text (|R| = 4) groups; padding tokens change neither."""
    config = text_config(num_experts_per_tok=top_k)
    block = AsyMoESparseBlock(config, config.expert_layout(EVIDENCE_LAYER))
    image_mask = torch.tensor([[True, True, False, False, False, True]])
    valid = torch.ones_like(image_mask)
    aux, z = router_losses((torch.zeros(6, 5),), [block], image_mask, valid)
    torch.testing.assert_close(aux, torch.tensor(1.0))
    torch.testing.assert_close(z, torch.tensor((math.log(3) ** 2 + math.log(4) ** 2) / 2))

    padded_logits = torch.cat([torch.zeros(6, 5), torch.randn(3, 5, generator=generator(18)) * 5])
    padded_image = torch.cat([image_mask, torch.tensor([[True, False, False]])], dim=1)
    padded_valid = torch.cat([valid, torch.zeros(1, 3, dtype=torch.bool)], dim=1)
    aux_padded, z_padded = router_losses((padded_logits,), [block], padded_image, padded_valid)
    torch.testing.assert_close(aux_padded, aux)
    torch.testing.assert_close(z_padded, z)


def test_router_losses_hand_computed():
    """Experts 0 (vision), 1 (text), 2 (inter), top-1. Layer A:
    image tokens: reachable logits (ln 3, 0) -> p = (.75, .25) and (ln 7, 0) -> (.875, .125), both pick expert 0:
        f = (1, 0), P = (.8125, .1875) -> 2 * .8125 = 1.625;
    text token: (0, ln 4) -> p = (.2, .8), picks expert 2: f = (0, 1), P = (.2, .8) -> 2 * .8 = 1.6.
    Layer B: zero logits -> 1 and 1. Balance = mean(1.625, 1.6, 1, 1); z = mean of squared logsumexps.
    Unreachable logits (set to 50) and padding tokens must not matter."""
    ln3, ln4, ln7 = math.log(3), math.log(4), math.log(7)
    layer_a = torch.tensor([
        [ln3, 50.0, 0.0],  # image
        [ln7, 50.0, 0.0],  # image
        [50.0, 0.0, ln4],  # text
        [9.0, -4.0, 7.0],  # padding (image)
        [-3.0, 8.0, 1.0],  # padding (text)
    ])
    layer_b = torch.zeros(5, 3)
    image_mask = torch.tensor([[True, True, False, True, False]])
    valid = torch.tensor([[True, True, True, False, False]])
    blocks = [three_expert_block(), three_expert_block()]
    aux, z = router_losses((layer_a, layer_b), blocks, image_mask, valid)

    torch.testing.assert_close(aux, torch.tensor((1.625 + 1.6 + 1.0 + 1.0) / 4))
    z_a_image = (math.log(4) ** 2 + math.log(8) ** 2) / 2
    z_a_text = math.log(5) ** 2
    z_b = math.log(2) ** 2
    torch.testing.assert_close(z, torch.tensor((z_a_image + z_a_text + 2 * z_b) / 4))
    unpadded = router_losses((layer_a[:3], layer_b[:3]), blocks, image_mask[:, :3], valid[:, :3])
    torch.testing.assert_close(unpadded, (aux, z))

    # Only text tokens valid: the image group has no tokens and drops out of the average.
    text_only = torch.tensor([[False, False, True, False, False]])
    aux_text, _ = router_losses((layer_a, layer_b), blocks, image_mask, text_only)
    torch.testing.assert_close(aux_text, torch.tensor((1.6 + 1.0) / 2))


# --- loss-free load balancing -------------------------------------------------------------------------------------


def test_balancing_bias_sign_rule_by_hand():
    """Layer 3 (vision 0 | text 1 | inter 2, 3 | evidence 4), rate 0.01. Image loads over {0, 2, 3} = (6, 0, 3):
    mean 3 -> biases (-.01, +.01, 0); text loads over {1, 2, 3, 4} = (1, 1, 5, 1): mean 2 -> (+.01, +.01, -.01,
    +.01); experts a modality cannot reach keep their bias."""
    config = text_config(router_bias_update_rate=0.01)
    router = AsyMoESparseBlock(config, config.expert_layout(EVIDENCE_LAYER)).router
    load = torch.tensor([[6.0, 9.0, 0.0, 3.0, 9.0], [9.0, 1.0, 1.0, 5.0, 1.0]])
    router.update_bias(load)
    expected = torch.tensor([[-0.01, 0.0, 0.01, 0.0, 0.0], [0.0, 0.01, 0.01, -0.01, 0.01]])
    torch.testing.assert_close(router.e_score_correction_bias, expected)
    router.update_bias(torch.tensor([[0.0] * 5, [2.0] * 5]))  # no image tokens, balanced text: nothing moves
    torch.testing.assert_close(router.e_score_correction_bias, expected)


def test_bias_steers_selection_not_weights():
    """The bias picks the experts; their weights stay the renormalised softmax of the unbiased logits."""
    config = text_config(num_experts_per_tok=2)
    router = AsyMoESparseBlock(config, config.expert_layout(PLAIN_LAYER)).router  # experts 0 | 1 | 2, 3
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = torch.tensor([3.0, 0.0, 2.0, 1.0])  # image token logits (3, -, 2, 1) for x = e_0
        router.e_score_correction_bias[0, 3] = 1.5  # lifts expert 3 (1 + 1.5) above expert 2 (2) for image tokens
    hidden = torch.zeros(1, HIDDEN)
    hidden[0, 0] = 1.0
    _, weights, index = router(hidden, torch.tensor([True]))
    assert sorted(index[0].tolist()) == [0, 3]
    expected = F.softmax(torch.tensor([3.0, 1.0]), dim=-1)
    torch.testing.assert_close(weights[0][index[0].argsort()], expected)


def test_bias_moves_once_per_optimizer_step_while_the_router_trains(make_model, make_inputs):
    """Forwards record loads only in training with gradients and a trainable router; each optimizer step (after any
    number of accumulated micro-batches) moves each reachable expert's bias by exactly the rate, or not at all."""
    model = make_model("asymoe", router_bias_update_rate=0.05).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: only the balancing changes anything
    inputs = make_inputs(["<image> what color ?", "what shape is the <image> ?"])
    routers = [block.router for block in model.moe_blocks()]

    def biases():
        return [router.e_score_correction_bias.clone() for router in routers]

    start = biases()
    for _ in range(3):  # gradient accumulation: three micro-batches, one step
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    after_forwards = biases()
    optimizer.step()
    stepped = biases()
    assert all(torch.equal(a, b) for a, b in zip(start, after_forwards))
    for router, before, after in zip(routers, start, stepped):
        moved = (after - before).abs()
        assert moved.sum() > 0 and ((moved == 0) | torch.isclose(moved, torch.tensor(0.05))).all()
        reach = reach_masks(router.layout, "cpu")
        assert (moved[~reach] == 0).all()
    optimizer.step()  # no forward since the last step: nothing to balance
    assert all(torch.equal(a, b) for a, b in zip(stepped, biases()))

    with torch.no_grad():
        model(**inputs)  # no gradients: inference
    model.eval()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()  # eval mode
    model.train()
    for router in routers:
        router.weight.requires_grad_(False)  # a frozen router (LoRA keeps the routing it was given)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(stepped, biases()))
