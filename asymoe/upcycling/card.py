"""Parameter counts (total and activated per token) of AsyMoE and dense LLaVA models, and the model card of an
upcycled checkpoint."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from ..configuration import AsyMoEConfig
from ..modeling import AsyMoEForConditionalGeneration


def build_meta_model(config: AsyMoEConfig) -> AsyMoEForConditionalGeneration:
    with torch.device("meta"):
        return AsyMoEForConditionalGeneration(config)


def parameter_counts(config: AsyMoEConfig) -> dict[str, int]:
    """Parameter counts from the config (no weights are built): total, vision tower, projector (with the anyres
    `image_newline`), language model
    (total and activated per token: embeddings, attention, norms, routers, evidence readouts, LM head, dense FFNs and
    the token's top-k experts), and the language model of the dense source (every FFN dense, no MoE extras)."""
    model = build_meta_model(config)
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    if model.model.image_newline is not None:  # anyres: counted with the projector (image side, not the decoder)
        projector += model.model.image_newline.numel()
    language = total - vision - projector
    text = config.text_config
    inactive, moe_extra = 0, 0
    for block in model.moe_blocks():
        per_expert = (block.experts.gate_up_proj.numel() + block.experts.down_proj.numel()) // block.layout.num_experts
        inactive += (block.layout.num_experts - text.num_experts_per_tok) * per_expert
        moe_extra += sum(p.numel() for p in block.parameters()) - 3 * text.hidden_size * text.intermediate_size
    return {
        "total": total,
        "vision_tower": vision,
        "projector": projector,
        "language_model": language,
        "language_model_activated": language - inactive,
        "dense_language_model": language - moe_extra,
    }


def model_parameter_counts(model: nn.Module) -> dict[str, int]:
    """`parameter_counts` of an AsyMoE model; for a dense transformers LLaVA-family model its total and
    language-model parameters (LM head included), all activated."""
    if isinstance(model.config, AsyMoEConfig):
        return parameter_counts(model.config)
    language = sum(p.numel() for n, p in model.named_parameters() if "language_model" in n or "lm_head" in n)
    return {"total": model.num_parameters(), "language_model": language, "language_model_activated": language}


def model_card(config: AsyMoEConfig, manifest: dict[str, Any], counts: dict[str, int]) -> str:
    text = config.text_config
    base = manifest["source"] if manifest.get("source_kind") == "hub" else None
    front = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text",
             "tags: [asymoe, mixture-of-experts, llava, upcycled]"]
    if base:
        front.append(f"base_model: {base}")
    front.append("---")
    rows = ["| MoE layer | vision | text | inter | evidence | experts |", "|---|---|---|---|---|---|"]
    for layer in text.moe_layers:
        lay = text.expert_layout(layer)
        rows.append(f"| {layer} | {lay.num_vision} | {lay.num_text} | {lay.num_inter} | {lay.num_evidence} | "
                    f"{lay.num_experts} |")
    dense_layers = [i for i in range(text.num_hidden_layers) if i not in text.moe_layers]
    dense_lm = counts["dense_language_model"]
    ratio = counts["language_model_activated"] / dense_lm
    lines = [
        *front,
        "",
        f"# AsyMoE ({text.moe_variant}) upcycled from `{manifest['source']}`",
        "",
        f"Upcycled with `asymoe upcycle` in **{manifest['mode']}** mode (seed {manifest['seed']}) from a dense "
        f"LLaVA checkpoint with a {manifest['source_text_model_type']} language model. "
        + ("It computes the same logits as the source until it is trained (function-preserving)."
           if manifest["function_preserving"] else
           "Experts hold slices / perturbed copies of the dense FFN: train before use."),
        "",
        "## Experts",
        "",
        f"Variant `{text.moe_variant}`, top-{text.num_experts_per_tok} routing, expert width "
        f"{text.moe_intermediate_size} (dense FFN {text.intermediate_size}), hyperbolic inter experts: "
        f"{text.hyperbolic_inter}, evidence layers: {text.evidence_layers or 'none'}.",
        f"Dense FFN layers: {dense_layers or 'none'}.",
        "",
        *(rows if text.moe_layers else ["No MoE layers (dense variant)."]),
        "",
        "## Parameters",
        "",
        "| | parameters |",
        "|---|---|",
        f"| total | {counts['total']:,} |",
        f"| vision tower + projector | {counts['vision_tower'] + counts['projector']:,} |",
        f"| language model, total | {counts['language_model']:,} |",
        f"| language model, activated per token | {counts['language_model_activated']:,} |",
        f"| dense source language model | {dense_lm:,} |",
        "",
        f"Activated / dense (language model): {ratio:.3f}.",
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "model = AutoModelForImageTextToText.from_pretrained(PATH, trust_remote_code=True)",
        "processor = AutoProcessor.from_pretrained(PATH, trust_remote_code=True)",
        "```",
        "",
        "## Upcycling manifest",
        "",
        "```json",
        json.dumps(manifest, indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)
