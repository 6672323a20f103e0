"""Behaviour of the AsyMoE model through its public API: training steps, router losses, label masking, determinism and
batch invariance, attention/experts backends, gradient checkpointing, dtypes, and the errors bad inputs raise.
Generation and save/load: test_generation.py."""

from __future__ import annotations

import pytest
import torch

from asymoe.compat import enable_activation_checkpointing
from asymoe.modeling import modeling_asymoe
from asymoe.tiny import tiny_config

from conftest import ANSWER_A, ANSWER_B, PROMPT_A, PROMPT_B, make_image, wake

VARIANTS = {
    "dense": ("dense", {}),
    "vanilla": ("vanilla", {}),
    "modality": ("modality", {}),
    "asymoe": ("asymoe", {}),
    "asymoe-euclidean-inter": ("asymoe", {"hyperbolic_inter": False}),
    "asymoe-no-evidence": ("asymoe", {"evidence_experts": False}),
    "asymoe-lorentz": ("asymoe", {"manifold": "lorentz"}),
    "asymoe-evidence-in-all-moe-layers": ("asymoe", {"evidence_layers": [1, 3]}),
}


def train_batch(make_inputs):
    """Two left-padded image+question+answer samples and their labels (padding ignored)."""
    inputs = make_inputs([PROMPT_A + ANSWER_A, PROMPT_B + ANSWER_B])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return inputs, labels


# --------------------------------------------------------------------------------------------------------------------
# Every variant and ablation: builds, trains a step, generates.


def gradient_exception(name: str, config) -> str | None:
    """Why parameter `name` legitimately gets no gradient, or an all-zero one, on the first step from init; None when
    it must get a finite, nonzero-somewhere gradient.

    - "unused": the vision tower's layers after the one `vision_feature_layer` reads (-2: the last layer), and its
      post-layernorm (it only feeds the pooled output), are not in the graph: grad stays None.
    - "evidence-off": the evidence readout's W_o starts at zero, so its output is zero whatever its query projection
      and reliance gate do: their grads are exactly zero (W_o itself gets a gradient and moves first).
    - "euclidean-at-init": with zero Möbius biases the hyperbolic map is the Euclidean one for every tangent scale and
      curvature: their grads are zero up to rounding (the Möbius biases themselves get a gradient).
    """
    vision = config.vision_config
    layer = config.vision_feature_layer
    first_unused = layer + vision.num_hidden_layers + 1 if layer < 0 else layer  # hidden_states[k] = after layer k-1
    if name.startswith("model.vision_tower.post_layernorm."):
        return "unused"
    prefix = "model.vision_tower.encoder.layers."
    if name.startswith(prefix) and int(name[len(prefix) :].split(".")[0]) >= first_unused:
        return "unused"
    if ".evidence.q_proj." in name or ".evidence.q_norm." in name or ".evidence.gate." in name:
        return "evidence-off"
    if ".log_scale_" in name or name.endswith(".raw_curvature"):
        return "euclidean-at-init"
    return None


def check_gradients(model, first_step: bool) -> dict[str, list[str]]:
    """Assert every parameter that should learn has a finite, nonzero-somewhere grad; return the exceptions met."""
    met: dict[str, list[str]] = {}
    for name, param in model.named_parameters():
        reason = gradient_exception(name, model.config)
        if reason == "unused":
            assert param.grad is None, f"{name} is outside the graph but got a gradient"
        elif reason is not None and first_step:
            assert param.grad is not None and param.grad.abs().max() < 1e-6, f"{name}: expected ~0 grad ({reason})"
        else:
            assert param.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
            assert (param.grad != 0).any(), f"{name} has an all-zero gradient"
            if reason == "euclidean-at-init":  # well above the ~1e-10 rounding it gets at init
                assert param.grad.abs().max() > 1e-6, f"{name}: gradient still at rounding level"
        if reason is not None:
            met.setdefault(reason, []).append(name)
    return met


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_and_generates(variant, make_model, make_inputs):
    moe_variant, overrides = VARIANTS[variant]
    model = make_model(moe_variant, **overrides).train()
    text = model.config.text_config
    inputs, labels = train_batch(make_inputs)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    out = model(**inputs, labels=labels, output_router_logits=True)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    met = check_gradients(model, first_step=True)
    assert set(met) == {"unused"} | ({"evidence-off"} if text.evidence_layers else set()) | (
        {"euclidean-at-init"} if text.hyperbolic_inter else set()
    )
    assert len([n for n in met.get("evidence-off", []) if n.endswith(".gate.weight")]) == len(text.evidence_layers)

    # One step later the exceptions that exist only at init learn as well: W_o and the Möbius biases have moved.
    optimizer.step()
    optimizer.zero_grad()
    out = model(**inputs, labels=labels, output_router_logits=True)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    check_gradients(model, first_step=False)

    model.eval()
    prompt = make_inputs(PROMPT_A)
    sequences = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert sequences.shape[0] == 1 and sequences.shape[1] > prompt["input_ids"].shape[1]
    assert torch.equal(sequences[:, : prompt["input_ids"].shape[1]], prompt["input_ids"])


def test_variants_have_their_expert_groups(make_model):
    """The variants differ where they should: MoE blocks in `moe_layers`, groups per layer, the ablations' switches."""
    widths = {}
    for variant, (moe_variant, overrides) in VARIANTS.items():
        model = make_model(moe_variant, **overrides)
        widths[variant] = [block.layout for block in model.moe_blocks()]
    assert widths["dense"] == []
    assert [(l.num_vision, l.num_text, l.num_inter, l.num_evidence) for l in widths["vanilla"]] == [(0, 0, 4, 0)] * 2
    assert [(l.num_vision, l.num_text, l.num_inter, l.num_evidence) for l in widths["modality"]] == [(2, 2, 0, 0)] * 2
    assert [l.num_evidence for l in widths["asymoe"]] == [0, 1]  # evidence experts in the deeper half by default
    assert [l.num_evidence for l in widths["asymoe-evidence-in-all-moe-layers"]] == [1, 1]
    assert [l.num_evidence for l in widths["asymoe-no-evidence"]] == [0, 0]


def test_hyperbolic_and_evidence_experts_are_function_preserving_at_init(make_model, make_inputs):
    """Zero Möbius biases = Euclidean experts; zero W_o = the evidence readout is off (the evidence mask is moot)."""
    inputs = make_inputs([PROMPT_A, PROMPT_B])
    with torch.no_grad():
        poincare = make_model("asymoe")(**inputs).logits
        lorentz = make_model("asymoe", manifold="lorentz")(**inputs).logits
        euclidean = make_model("asymoe", hyperbolic_inter=False)(**inputs).logits
        model = make_model("asymoe")
        nothing = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
        no_evidence = model(**inputs, evidence_mask=nothing).logits
    torch.testing.assert_close(poincare, euclidean, atol=1e-5, rtol=0)
    torch.testing.assert_close(lorentz, euclidean, atol=1e-5, rtol=0)
    torch.testing.assert_close(no_evidence, poincare, atol=0, rtol=0)
    # Once W_o is nonzero the evidence matters.
    wake(model)
    with torch.no_grad():
        with_evidence = model(**inputs).logits
        without = model(**inputs, evidence_mask=nothing).logits
    assert (with_evidence - without).abs().max() > 1e-3


def test_evidence_readout_skips_only_tokens_that_read_nothing(make_model, make_inputs, monkeypatch):
    """Eager, the readout starts at the first text token after an image over the batch (tokens before it read r = 0,
    image tokens never reach evidence experts): the loss and every gradient equal those of the readout run on every
    position."""
    model = wake(make_model("asymoe")).train()
    inputs, labels = train_batch(make_inputs)
    is_image = inputs["input_ids"] == model.config.image_token_id
    positions = torch.arange(is_image.shape[1])
    after_images = int(torch.where(is_image, positions, -1).amax(dim=1).min()) + 1
    starts = []

    def first_evidence_reader(*args):
        starts.append(reader(*args))
        return starts[-1]

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**inputs, labels=labels, output_router_logits=True).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reader = modeling_asymoe._first_evidence_reader
    monkeypatch.setattr(modeling_asymoe, "_first_evidence_reader", first_evidence_reader)
    loss, grads = loss_and_grads()
    assert starts == [after_images] and after_images > 16
    reader = lambda *args: 0  # noqa: E731
    loss_everywhere, grads_everywhere = loss_and_grads()
    assert starts[-1] == 0
    torch.testing.assert_close(loss, loss_everywhere, atol=1e-6, rtol=0)
    assert grads.keys() == grads_everywhere.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_everywhere[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("manifold", ["poincare", "lorentz"])
def test_zero_mobius_bias_is_euclidean_for_large_activations(manifold, make_model, make_inputs):
    """Exactly Euclidean at zero Möbius bias also where the tangent vectors pass the maps' clamp radius (large
    weights), i.e. the residual form cancels bitwise instead of leaving fp32 noise from the ball's edge."""
    inputs = make_inputs([PROMPT_A, PROMPT_B])
    hyperbolic = wake(make_model("asymoe", manifold=manifold), std=0.3, mobius_std=0.0)
    euclidean = wake(make_model("asymoe", hyperbolic_inter=False), std=0.3)
    with torch.no_grad():
        expected = euclidean(**inputs).logits
        got = hyperbolic(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# Router losses and labels.


def test_aux_loss_is_returned_and_added(make_model, make_inputs):
    inputs, labels = train_batch(make_inputs)
    model = make_model("asymoe", router_aux_loss_coef=0.25)
    text = model.config.text_config
    with torch.no_grad():
        plain = model(**inputs, labels=labels, output_router_logits=False)
        out = model(**inputs, labels=labels, output_router_logits=True)
    assert plain.aux_loss is None and plain.router_logits is None
    assert torch.isfinite(out.aux_loss) and out.aux_loss > 0 and torch.isfinite(out.z_loss)
    torch.testing.assert_close(out.loss - plain.loss, 0.25 * out.aux_loss)
    text.router_z_loss_coef = 0.01  # the optional z-loss adds on top
    with torch.no_grad():
        with_z = model(**inputs, labels=labels, output_router_logits=True)
    torch.testing.assert_close(with_z.loss - plain.loss, 0.25 * out.aux_loss + 0.01 * out.z_loss)
    text.router_z_loss_coef = 0.0

    # One entry per MoE layer, one row per token, one column per expert of that layer (+1 evidence expert in layer 3).
    tokens = inputs["input_ids"].numel()
    assert text.moe_layers == [1, 3] and text.evidence_layers == [3]
    assert [tuple(r.shape) for r in out.router_logits] == [(tokens, 4), (tokens, 5)]
    assert all(r.dtype == torch.float32 for r in out.router_logits)

    # `output_router_logits=None` follows the config (what TRL reads); the dense variant has no router losses.
    model.config.text_config.output_router_logits = True
    with torch.no_grad():
        by_config = model(**inputs, labels=labels)
    torch.testing.assert_close(by_config.loss, out.loss)
    dense = make_model("dense")(**inputs, labels=labels, output_router_logits=True)
    assert dense.aux_loss is None and dense.router_logits is None


def test_aux_loss_ignores_padding(make_model, make_inputs):
    """Padding tokens are routed (dropless) but do not count in the load-balancing loss."""
    model = make_model("asymoe")
    alone = make_inputs(PROMPT_A)
    padded = {k: v.clone() for k, v in alone.items()}
    pad = model.config.text_config.pad_token_id
    padded["input_ids"] = torch.cat([torch.full((1, 5), pad), alone["input_ids"]], dim=1)
    padded["attention_mask"] = torch.cat([torch.zeros(1, 5, dtype=torch.long), alone["attention_mask"]], dim=1)
    with torch.no_grad():
        a = model(**alone, output_router_logits=True)
        b = model(**padded, output_router_logits=True)
    torch.testing.assert_close(a.aux_loss, b.aux_loss)
    torch.testing.assert_close(a.z_loss, b.z_loss)


def test_labels_on_image_positions_are_ignored(make_model, make_inputs):
    model = make_model("asymoe")
    inputs, _ = train_batch(make_inputs)
    labels = inputs["input_ids"].clone()
    image = inputs["input_ids"] == model.config.image_token_id
    assert image.sum() == 2 * model.config.num_image_tokens
    with torch.no_grad():
        full = model(**inputs, labels=labels).loss
        masked = model(**inputs, labels=labels.masked_fill(image, -100)).loss
        other = model(**inputs, labels=torch.where(image, torch.randint_like(labels, 0, 10), labels)).loss
        text_masked = model(**inputs, labels=labels.masked_fill(~image, -100))
    torch.testing.assert_close(full, masked, atol=0, rtol=0)
    torch.testing.assert_close(full, other, atol=0, rtol=0)
    assert torch.isnan(text_masked.loss) or text_masked.loss == 0  # nothing left to train on


# --------------------------------------------------------------------------------------------------------------------
# Determinism, batch invariance, backends.


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("experts", ["eager", "grouped_mm"])
def test_batch_invariance(experts, attn, make_model, make_inputs):
    """A sample's logits are the same alone and inside a left-padded batch with a longer sample (fp32)."""
    model = wake(make_model("asymoe"))
    model.set_attn_implementation(attn)
    model.set_experts_implementation(experts)
    alone_a, alone_b = make_inputs(PROMPT_A, image_seed=0), make_inputs(PROMPT_B, image_seed=1)
    batch = make_inputs([PROMPT_A, PROMPT_B], image_seed=0)
    length_a = alone_a["input_ids"].shape[1]
    assert batch["attention_mask"][0, :-length_a].eq(0).all() and batch["attention_mask"][0].sum() == length_a
    with torch.no_grad():
        logits_a = model(**alone_a).logits
        again = model(**alone_a).logits
        logits_b = model(**alone_b).logits
        batched = model(**batch).logits
    assert torch.equal(logits_a, again)
    torch.testing.assert_close(batched[0, -length_a:], logits_a[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[1], logits_b[0], atol=1e-5, rtol=0)


def test_attention_and_experts_backends_agree(make_model, make_inputs):
    model = wake(make_model("asymoe"))
    inputs = make_inputs([PROMPT_A, PROMPT_B])
    results = {}
    for attn in ("sdpa", "eager"):
        for experts in ("eager", "grouped_mm", "batched_mm"):
            model.set_attn_implementation(attn)
            model.set_experts_implementation(experts)
            with torch.no_grad():
                results[attn, experts] = model(**inputs).logits
    real = inputs["attention_mask"].bool()  # padding rows attend to nothing: their logits are arbitrary
    reference = results["eager", "eager"][real]
    for key, logits in results.items():
        torch.testing.assert_close(logits[real], reference, atol=1e-5, rtol=0, msg=f"{key} differs from eager/eager")


def test_gradient_checkpointing_gives_same_loss_and_gradients(make_model, make_inputs):
    model = wake(make_model("asymoe")).train()
    inputs, labels = train_batch(make_inputs)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**inputs, labels=labels, output_router_logits=True).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    enable_activation_checkpointing(model)
    assert any(layer.gradient_checkpointing for layer in model.model.language_model.layers)
    loss_ckpt, grads_ckpt = loss_and_grads()
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-6, rtol=0)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_fp32_by_default(make_model):
    model = make_model("asymoe")
    assert model.dtype == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_finite(dtype, make_model, make_inputs):
    model = wake(make_model("asymoe"), std=0.1).to(dtype)
    inputs, labels = train_batch(make_inputs)
    with torch.no_grad():
        out = model(**inputs, labels=labels, output_router_logits=True)
    assert out.logits.dtype == dtype
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss) and torch.isfinite(out.aux_loss)
    assert all(r.dtype == torch.float32 for r in out.router_logits)  # routing stays fp32


def test_bf16_autocast_training_step(make_model, make_inputs):
    """fp32 weights under bf16 autocast (what Trainer's `bf16=True` does): masks must fit the autocast dtype."""
    model = wake(make_model("asymoe"), std=0.1).train()
    inputs, labels = train_batch(make_inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs, labels=labels, output_router_logits=True)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)



# --------------------------------------------------------------------------------------------------------------------
# Bad inputs.


def test_model_rejects_mismatched_images(make_model, make_inputs):
    model = make_model("asymoe")
    one = make_inputs(PROMPT_A)
    two_images = make_inputs([PROMPT_A, PROMPT_B])["pixel_values"]
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(input_ids=one["input_ids"], pixel_values=two_images)
    text_only = make_inputs("USER: what color ? ASSISTANT:")
    with pytest.raises(ValueError, match="do not match: the text holds 0 image tokens"):
        model(input_ids=text_only["input_ids"], pixel_values=one["pixel_values"])
    with pytest.raises(ValueError, match="no `pixel_values` were given"):
        model(input_ids=one["input_ids"])
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(input_ids=one["input_ids"], pixel_values=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(input_ids=one["input_ids"], pixel_values=one["pixel_values"][0])


def test_model_rejects_misshapen_masks(make_model, make_inputs):
    """A mask or token types that do not cover the inputs stop the forward with the shapes and the fix, instead of
    changing the logits silently (a short attention_mask) or failing somewhere else."""
    model = make_model("asymoe")
    inputs = make_inputs([PROMPT_A, PROMPT_B])
    length = inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match=rf"attention_mask has shape \[2, {length - 3}\].*need \[2, {length}\]"):
        model(**{**inputs, "attention_mask": inputs["attention_mask"][:, 3:]})
    with pytest.raises(ValueError, match=r"attention_mask has shape \[1, "):
        model(**{**inputs, "attention_mask": inputs["attention_mask"][:1]})
    types = (inputs["input_ids"] == model.config.image_token_id).long()
    with pytest.raises(ValueError, match=rf"mm_token_type_ids has shape \[2, {length - 1}\].*one type per input"):
        model(**inputs, mm_token_type_ids=types[:, 1:])
    with torch.no_grad():  # longer types (the whole sequence's, as older transformers pass) are cut to the inputs
        longer = torch.cat([torch.zeros_like(types[:, :2]), types], dim=1)
        torch.testing.assert_close(model(**inputs, mm_token_type_ids=longer).logits, model(**inputs).logits)


def test_processor_rejects_mismatched_images(processor):
    with pytest.raises(ValueError, match=r"2 '<image>' placeholder\(s\) but 1 image"):
        processor(images=[make_image()], text="<image> <image> what ?")
    with pytest.raises(ValueError, match=r"0 '<image>' placeholder\(s\) but 1 image"):
        processor(images=make_image(), text="what color ?")
    with pytest.raises(ValueError, match=r"1 '<image>' placeholder\(s\) but 0 image"):
        processor(text="<image> what color ?")


def test_processor_checks_per_text_image_lists(processor):
    """One list of images per text must match that text's placeholders (a flat count could hand an image to the
    wrong sample); a data set column or any other sequence of lists works like lists."""
    texts = ["<image> <image> what ?", "<image> what ?"]
    a, b, c = make_image(0), make_image(1), make_image(2)
    with pytest.raises(ValueError, match=r"text 0 holds 2 '<image>' placeholder\(s\) but its list holds 1"):
        processor(images=[[a], [b, c]], text=texts)
    with pytest.raises(ValueError, match="images holds 3 lists for 2 text"):
        processor(images=[[a], [b], [c]], text=texts)
    nested = processor(images=[[a, b], [c]], text=texts, padding=True, return_tensors="pt")
    flat = processor(images=[a, b, c], text=texts, padding=True, return_tensors="pt")
    assert torch.equal(nested["pixel_values"], flat["pixel_values"])
    column = processor(images=(image for image in [[a, b], [c]]), text=texts, padding=True, return_tensors="pt")
    assert torch.equal(column["pixel_values"], flat["pixel_values"])


@pytest.mark.parametrize(
    ("variant", "overrides", "message"),
    [
        ("modality", {"num_experts_per_tok": 3}, "larger than the 2 experts image tokens can reach"),
        ("asymoe", {"num_experts_per_tok": 4}, "larger than the 3 experts image tokens can reach"),
        ("vanilla", {"hyperbolic_inter": True}, "hyperbolic_inter=True needs moe_variant='asymoe'"),
        ("modality", {"evidence_experts": True}, "evidence_experts=True needs moe_variant='asymoe'"),
        ("asymoe", {"evidence_layers": [2]}, r"evidence_layers \[2\] are not MoE layers"),
        ("asymoe", {"moe_layers": [1, 7]}, r"moe_layers \[7\] are outside"),
        ("asymoe", {"manifold": "klein"}, "manifold='klein' is not one of"),
        ("switch", {}, "moe_variant='switch' is not one of"),
        ("vanilla", {"num_vision_experts": 1}, "one shared expert pool"),
        ("modality", {"num_inter_experts": 1}, "has only vision and text experts"),
        ("asymoe", {"curvature": float("nan")}, r"curvature must be a number in \[1e-06, 1e\+06\] \(got nan\)"),
        ("asymoe", {"curvature": float("inf")}, r"curvature must be a number in .*\(got inf\)"),
        ("asymoe", {"curvature": 710.0 * 2000}, r"curvature must be a number in .*above it they saturate"),
        ("asymoe", {"curvature": 1e-40}, r"curvature .*set hyperbolic_inter=False"),
        ("asymoe", {"hyperbolic_scale": 0.0}, "hyperbolic_scale must be a finite number > 0"),
        ("asymoe", {"moe_intermediate_size": 0}, r"moe_intermediate_size must be an integer >= 1 \(got 0\)"),
        ("asymoe", {"num_experts_per_tok": 2.5}, r"num_experts_per_tok must be an integer >= 1 \(got 2.5\)"),
        ("asymoe", {"num_inter_experts": -1}, r"num_inter_experts must be an integer >= 0"),
        ("asymoe", {"router_bias_update_rate": float("inf")}, "router_bias_update_rate must be a finite number"),
    ],
)
def test_invalid_configs_raise(variant, overrides, message, tokenizer):
    with pytest.raises(ValueError, match=message):
        tiny_config(tokenizer, variant, **overrides)


@pytest.mark.parametrize("curvature", [1e-6, 800.0, 1e6])
def test_curvature_at_the_ends_of_its_range_trains(curvature, make_model, make_inputs):
    """The extremes the config accepts give a finite loss and finite gradients (before the check, 710 overflowed
    softplus^-1 and 1e-40 gave NaN gradients)."""
    model = wake(make_model("asymoe", curvature=curvature)).train()
    inputs, labels = train_batch(make_inputs)
    model(**inputs, labels=labels).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name
