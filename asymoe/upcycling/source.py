"""Upcycling sources: where a checkpoint is (local or Hub), what it is (LLaVA / LLaVA-NeXT / OneVision with a
supported decoder and vision tower), and the AsyMoE config it becomes (`asymoe_config_from_llava`)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..configuration import AsyMoEConfig, AsyMoETextConfig, ExpertLayout

# model_type -> architecture of the sources upcycling reads.
SOURCE_ARCHITECTURES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}
SUPPORTED_SOURCE = "/".join(SOURCE_ARCHITECTURES.values())
SUPPORTED_TEXT_MODELS = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_VISION_MODELS = ("clip_vision_model", "siglip_vision_model")
NOT_SUPPORTED_YET = {"llava_next_video": "LlavaNextVideoForConditionalGeneration"}
MODES = ("copy", "partition")
# Fields of the dense architecture: they come from the source and cannot be overridden.
_ARCHITECTURE_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_parameters", "attention_bias", "qkv_bias",
    "use_qk_norm", "sliding_window", "tie_word_embeddings", "moe_intermediate_size", "moe_variant",
}
_EXPERT_FIELDS = ("num_vision_experts", "num_text_experts", "num_inter_experts", "num_evidence_experts")
_SOURCE_FILE_PATTERNS = [
    "*.json", "*.jinja", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt",
]


def resolve_source(source: str | os.PathLike, revision: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Local directory of `source` (a directory or a Hub model id) and its provenance (id, revision, kind).

    Hub ids go through `huggingface_hub.snapshot_download`, from the local cache only when `HF_HUB_OFFLINE=1`.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        match = re.search(r"/snapshots/([0-9a-f]{40})/?$", str(path.resolve()))
        return path, {"source": str(path.resolve()), "kind": "local", "revision": match.group(1) if match else None}
    if path.exists():
        raise ValueError(f"source {str(source)!r} is a file; pass the checkpoint's directory (or a Hub model id).")
    try:
        from huggingface_hub import constants, snapshot_download

        directory = snapshot_download(
            str(source), revision=revision, allow_patterns=_SOURCE_FILE_PATTERNS,
            local_files_only=bool(constants.HF_HUB_OFFLINE),
        )
    except Exception as err:  # noqa: BLE001 - every failure means the same thing to the user
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE=1: only the local Hugging Face cache was searched)" if offline else ""
        raise ValueError(
            f"source {str(source)!r} is neither a local directory nor a Hub model id that could be found{hint}: "
            f"{type(err).__name__}: {err}"
        ) from err
    directory = Path(directory)
    commit = directory.name if re.fullmatch(r"[0-9a-f]{40}", directory.name) else revision
    return directory, {"source": str(source), "kind": "hub", "revision": commit}


def load_source_config(directory: str | os.PathLike):
    """The source's `LlavaConfig` / `LlavaNextConfig` / `LlavaOnevisionConfig`, after checking that it is a source
    this module can upcycle."""
    from transformers import AutoConfig

    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"{directory} has no config.json: upcycling needs a saved {SUPPORTED_SOURCE} checkpoint "
            "(config.json + safetensors weights)."
        )
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON ({err}): the checkpoint is damaged; save or download it "
                         "again.") from err
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    if model_type in NOT_SUPPORTED_YET:
        raise ValueError(
            f"{NOT_SUPPORTED_YET[model_type]} sources (model_type {model_type!r}) are not supported: AsyMoE takes "
            f"images, not videos. Supported: {SUPPORTED_SOURCE} with a {'/'.join(SUPPORTED_TEXT_MODELS)} language "
            "model."
        )
    if model_type not in SOURCE_ARCHITECTURES:
        raise ValueError(
            f"cannot upcycle model_type {model_type!r} (architectures {architectures}): supported sources are "
            f"{SUPPORTED_SOURCE} with a {'/'.join(SUPPORTED_TEXT_MODELS)} language model and a "
            f"{'/'.join(SUPPORTED_VISION_MODELS)} vision tower."
        )
    config = AutoConfig.from_pretrained(directory)
    text, vision = config.text_config, config.vision_config
    if text.model_type not in SUPPORTED_TEXT_MODELS:
        raise ValueError(
            f"the source's language model is {text.model_type!r}; upcycling supports "
            f"{'/'.join(SUPPORTED_TEXT_MODELS)} language models (SwiGLU FFNs)."
        )
    if vision.model_type not in SUPPORTED_VISION_MODELS:
        raise ValueError(
            f"the source's vision tower is {vision.model_type!r}; upcycling supports "
            f"{'/'.join(SUPPORTED_VISION_MODELS)} vision towers (fixed image size)."
        )
    if getattr(text, "hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(
            f"the source's FFN uses hidden_act={text.hidden_act!r}; AsyMoE experts are SwiGLU FFNs, so upcycling "
            "supports only hidden_act='silu' (Llama/Mistral/Qwen2/Qwen3 SwiGLU MLPs)."
        )
    if getattr(text, "mlp_bias", False):
        raise ValueError(
            "the source's FFN has biases (mlp_bias=True); AsyMoE experts are bias-free SwiGLU FFNs, so upcycling "
            "supports only mlp_bias=False."
        )
    rope = getattr(text, "rope_parameters", None) or {}
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial rotary embeddings (partial_rotary_factor != 1) are not supported by AsyMoE.")
    return config


def _sliding_window(text) -> int | None:
    """AsyMoE's one global sliding window from a Mistral/Qwen config (Qwen may mix sliding and full layers)."""
    if text.model_type == "mistral":
        return text.sliding_window
    layer_types = getattr(text, "layer_types", None) or []
    window = getattr(text, "sliding_window", None)
    kinds = set(layer_types)
    if "sliding_attention" not in kinds:
        return None
    if kinds == {"sliding_attention"} and window:
        return window
    raise ValueError(
        f"the source mixes sliding-window and full-attention layers (layer_types={layer_types}); AsyMoE supports "
        "one attention kind for all layers (a global sliding_window or none)."
    )


def asymoe_config_from_llava(
    source_config,
    moe_variant: str = "asymoe",
    *,
    mode: str = "copy",
    experts: Iterable[int] | None = None,
    num_slices: int | None = None,
    **text_overrides,
) -> AsyMoEConfig:
    """Map a LLaVA / LLaVA-NeXT / OneVision config (Llama/Mistral/Qwen2/Qwen3 backbone) to an `AsyMoEConfig` with
    the same architecture (anyres settings included).

    `experts` = (vision, text, inter, evidence) experts per MoE layer; `text_overrides` set MoE fields of the text
    config (`moe_layers`, `num_experts_per_tok`, `evidence_layers`, `manifold`, ...). In `"partition"` mode the
    expert width is `intermediate_size / num_slices` (default: the most experts a token can reach in a layer).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}.")
    bad = sorted(set(text_overrides) & _ARCHITECTURE_FIELDS)
    if bad:
        raise ValueError(
            f"{bad} come from the dense source and cannot be overridden when upcycling (moe_variant and the expert "
            "width have their own arguments)."
        )
    text = source_config.text_config
    model_type = text.model_type
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    tied = bool(getattr(source_config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))
    text_kwargs: dict[str, Any] = {
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads or text.num_attention_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": text.max_position_embeddings,
        "initializer_range": getattr(text, "initializer_range", 0.02),
        "rms_norm_eps": text.rms_norm_eps,
        "use_cache": getattr(text, "use_cache", True),
        "pad_token_id": getattr(text, "pad_token_id", None),
        "bos_token_id": getattr(text, "bos_token_id", None),
        "eos_token_id": getattr(text, "eos_token_id", None),
        "tie_word_embeddings": tied,
        "rope_parameters": dict(text.rope_parameters) if getattr(text, "rope_parameters", None) else None,
        "attention_bias": bool(getattr(text, "attention_bias", False)) if model_type != "qwen2" else False,
        "qkv_bias": model_type == "qwen2",
        "use_qk_norm": model_type == "qwen3",
        "sliding_window": _sliding_window(text) if model_type in ("mistral", "qwen2", "qwen3") else None,
        "attention_dropout": float(getattr(text, "attention_dropout", 0.0) or 0.0),
        "moe_variant": moe_variant,
    }
    if experts is not None:
        counts = [int(c) for c in experts]
        if len(counts) != 4:
            raise ValueError(f"experts must be 4 counts (vision, text, inter, evidence), got {counts}.")
        text_kwargs.update(dict(zip(_EXPERT_FIELDS, counts)))
    text_kwargs.update(text_overrides)
    text_config = AsyMoETextConfig(**text_kwargs)  # validates the MoE settings
    if mode == "partition":
        if not text_config.moe_layers:
            raise ValueError("mode='partition' needs MoE layers; moe_variant='dense' has none (use mode='copy').")
        slices = num_slices or _default_num_slices(text_config)
        if slices < 1 or text.intermediate_size % slices:
            raise ValueError(
                f"num_slices={slices} must divide the dense intermediate_size {text.intermediate_size} (each expert "
                "takes one equal slice of the dense FFN's neurons)."
            )
        text_kwargs["moe_intermediate_size"] = text.intermediate_size // slices
        text_config = AsyMoETextConfig(**text_kwargs)
    elif num_slices is not None:
        raise ValueError("num_slices only applies to mode='partition'.")

    vision = source_config.vision_config.to_dict()
    config = AsyMoEConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_id=source_config.image_token_id,
        projector_hidden_act=source_config.projector_hidden_act,
        vision_feature_select_strategy=source_config.vision_feature_select_strategy,
        vision_feature_layer=source_config.vision_feature_layer,
        multimodal_projector_bias=getattr(source_config, "multimodal_projector_bias", True),
        image_grid_pinpoints=getattr(source_config, "image_grid_pinpoints", None),
        vision_aspect_ratio=getattr(source_config, "vision_aspect_ratio", None),
        tie_word_embeddings=tied,
    )
    config.architectures = ["AsyMoEForConditionalGeneration"]
    if getattr(source_config, "dtype", None) is not None:
        config.dtype = source_config.dtype
    return config


def _default_num_slices(text_config: AsyMoETextConfig) -> int:
    """The most experts one token can reach in any MoE layer (so each modality's experts cover distinct slices)."""
    layouts = [text_config.expert_layout(i) for i in text_config.moe_layers]
    return max(len(lay.reachable(modality)) for lay in layouts for modality in ("image", "text"))


def partition_slices(layout: ExpertLayout, num_slices: int) -> list[int]:
    """Slice of the dense neurons each expert of `layout` takes (storage order: vision, text, inter, evidence).

    Inter experts (reached by both modalities) take the first slices; text then evidence experts the following ones;
    vision experts the last ones, counting down (all mod `num_slices`). So the experts one token can reach hold
    distinct slices whenever there are at most `num_slices` of them, and where the text side leaves slices free
    (e.g. AsyMoE layers without evidence experts) the vision experts take them: the layer keeps every dense neuron.
    """
    start = layout.num_inter
    inter = [j % num_slices for j in range(layout.num_inter)]
    text = [(start + j) % num_slices for j in range(layout.num_text)]
    evidence = [(start + layout.num_text + j) % num_slices for j in range(layout.num_evidence)]
    vision = [(num_slices - 1 - j) % num_slices for j in range(layout.num_vision)]
    return vision + text + inter + evidence
