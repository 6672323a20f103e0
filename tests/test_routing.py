"""Routing statistics agree with what the routers actually chose, and respect modality reachability."""

import pytest
import torch

from asymoe import AsyMoEForConditionalGeneration
from asymoe.routing import RoutingStatistics, plot_routing
from asymoe.tiny import build_tokenizer, tiny_config


@pytest.fixture(scope="module")
def routed():
    tokenizer = build_tokenizer("red green blue".split())
    config = tiny_config(tokenizer)
    torch.manual_seed(0)
    model = AsyMoEForConditionalGeneration(config).eval()
    chosen = []
    hooks = [b.router.register_forward_hook(lambda m, a, out: chosen.append(out[2])) for b in model.moe_blocks()]
    stats = RoutingStatistics(config)
    handles = stats.track(model)
    image = config.image_token_id
    input_ids = torch.tensor([[0, 0, 2] + [image] * 16 + [5, 6], [2] + [image] * 16 + [5, 6, 7, 8]])
    attention_mask = (input_ids != 0).long()
    model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=torch.randn(2, 3, 32, 32))
    for hook in [*handles, *hooks]:
        hook.remove()
    return config, stats, chosen, input_ids, attention_mask


def test_counts_equal_the_routers_choices(routed):
    config, stats, chosen, input_ids, attention_mask = routed
    valid = attention_mask.reshape(-1).bool()
    image = (input_ids == config.image_token_id).reshape(-1)
    for index, top_index in enumerate(chosen):
        for modality, rows in enumerate((valid & image, valid & ~image)):
            counted = stats.slots[index][modality]
            expected = torch.bincount(top_index[rows].reshape(-1), minlength=counted.numel())
            assert counted.tolist() == expected.tolist()
            assert int(stats.tokens[index, modality]) == int(rows.sum())


def test_summary_respects_reachability(routed):
    config, stats, *_ = routed
    for entry in stats.summary():
        assert sum(entry["image"]["group_load"].values()) == pytest.approx(1.0)
        assert sum(entry["text"]["group_load"].values()) == pytest.approx(1.0)
        assert entry["image"]["group_load"]["text"] == 0.0
        assert entry["image"]["group_load"].get("evidence", 0.0) == 0.0
        assert entry["text"]["group_load"]["vision"] == 0.0
        assert 0.0 < entry["text"]["entropy"] <= 1.0
        for modality, reach in (("image", 3), ("text", 4)):
            reachable = [entry[modality]["expert_load"][e] for e in config.text_config.expert_layout(
                entry["layer"]).reachable(modality)]
            assert entry[modality]["imbalance"] == pytest.approx(max(reachable) * len(reachable))
            assert 1.0 <= entry[modality]["imbalance"] <= len(reachable)
    assert set(stats.log_scalars()) >= {"routing/L1/image/inter", "routing/L3/text/evidence", "routing/L3/text/entropy",
                                        "routing/L3/text/imbalance"}


def test_entropy_is_over_the_reachable_experts_only():
    """Equal logits on a modality's reachable experts give normalised entropy 1 and one dominant logit 0, whatever
    the logits of the experts the modality cannot reach (here far larger)."""
    config = tiny_config(build_tokenizer([]))
    stats = RoutingStatistics(config)
    layout = config.text_config.expert_layout(stats.layers[0])
    logits = torch.full((4, layout.num_experts), 50.0)
    image_mask = torch.tensor([True, True, False, False])
    for row, modality in enumerate(("image", "image", "text", "text")):
        logits[row, list(layout.reachable(modality))] = 0.0
    logits[1, layout.reachable("image")[0]] = 60.0  # token 1: one expert all but certain
    logits[3, layout.reachable("text")[0]] = 60.0
    stats.record(0, logits, torch.zeros(4, 1, dtype=torch.long), image_mask)
    entry = stats.summary()[0]
    assert entry["image"]["entropy"] == pytest.approx(0.5, abs=1e-6)  # mean of 1 and ~0
    assert entry["text"]["entropy"] == pytest.approx(0.5, abs=1e-6)


def test_checkpointing_recompute_is_counted_once(make_model, make_inputs):
    """A training step with activation checkpointing re-runs every layer's forward inside the backward; the routing
    statistics count each token once, as without checkpointing."""
    from asymoe.compat import enable_activation_checkpointing

    counts = []
    for checkpointing in (False, True):
        model = make_model().train()
        if checkpointing:
            enable_activation_checkpointing(model)
        stats = RoutingStatistics(model.config)
        handles = stats.track(model)
        inputs = make_inputs(["<image> what color ?", "what shape is the <image> ?"])
        model(**inputs, labels=inputs["input_ids"], use_cache=False).loss.backward()
        for handle in handles:
            handle.remove()
        counts.append((stats.tokens.clone(), [slots.clone() for slots in stats.slots]))
    assert torch.equal(counts[0][0], counts[1][0]) and counts[0][0].sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(counts[0][1], counts[1][1]))


def test_plot_and_errors(routed, tmp_path):
    config, stats, *_ = routed
    path = plot_routing(stats.summary(), tmp_path / "routing.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    other = AsyMoEForConditionalGeneration(tiny_config(build_tokenizer([]), moe_layers=[1]))
    with pytest.raises(ValueError, match="MoE layers"):
        stats.track(other)
    with pytest.raises(ValueError, match="dense"):
        plot_routing([], tmp_path / "dense.png")
