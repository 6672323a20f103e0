"""Upcycle dense LLaVA checkpoints into AsyMoE (DESIGN §3): `upcycle(SRC, DST)` and `asymoe upcycle SRC DST`.

The vision tower, projector, embeddings, attention, norms and LM head are copied; in every MoE layer each expert is
initialised from the dense FFN of that layer:

- `mode="copy"`: every expert (all groups) is the dense FFN, `gate_up_proj[e] = cat[gate_proj, up_proj]`,
  `down_proj[e] = down_proj`. Routers start random-small, Möbius biases and the evidence readout's `W_o` at zero.
  The top-k weights of a token sum to 1 and all experts it can reach are the same function, so the upcycled model
  computes the dense model's logits (function-preserving, whatever the router says).
- `mode="partition"`: the dense FFN's intermediate neurons are cut into `num_slices` equal slices and each expert
  takes one (`moe_intermediate_size = intermediate_size / num_slices`): fewer activated parameters; needs training.

Optional `noise_std` (Gaussian noise relative to each matrix's std) and `drop_ratio` (Drop-Upcycling: re-initialise
that fraction of each expert's neurons) diversify the experts; both break function preservation.

Streaming: the output shards are created up front at their final size, with headers computed from the target model's
shapes; the source shards are then read one at a time and every output tensor is written at its offset as soon as it
is known. Tensors that are copied unchanged go file to file (`os.copy_file_range`, never through Python memory); a
MoE layer's dense FFN is read (`pread`, no memory map) and held until its three matrices have been seen, then
expanded expert by expert. Peak memory is therefore about one layer's FFN plus one expert above the imports, far below
one source shard, never two models. Everything is written into a temporary directory next to the output and moved
into place with one `os.replace` at the end: a crash leaves no valid-looking checkpoint at the destination.

Supported sources: transformers `LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration` and
`LlavaOnevisionForConditionalGeneration` checkpoints (any key layout transformers has used) with a Llama, Mistral,
Qwen2 or Qwen3 language model and a CLIP or SigLIP vision tower. LLaVA-NeXT / OneVision sources keep their anyres
image features (tiles, unpadding, `image_newline`, OneVision's `vision_aspect_ratio` pooling); OneVision videos are
not supported (image inputs only).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .configuration import AsyMoEConfig, AsyMoETextConfig, ExpertLayout
from .configuration.configuration_asymoe import anyres_layout, write_remote_code
from .modeling import AsyMoEForConditionalGeneration
from .modeling import modeling_asymoe as _modeling_module

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
_WEIGHT_INDEX = "model.safetensors.index.json"
_SINGLE_WEIGHTS = "model.safetensors"
_SOURCE_FILE_PATTERNS = [
    "*.json", "*.jinja", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt",
]
# Test hook (crash safety): SIGKILL this process after that many source shards have been processed.
CRASH_HOOK_ENV = "ASYMOE_UPCYCLE_CRASH_AFTER_SHARDS"

_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_TORCH_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}
# What the processors return that the models take (OneVision's `batch_num_images` included).
_MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images")

# Source keys of the dense FFN pieces, after the key layout is normalised.
_MLP_KEY = re.compile(r"^model\.language_model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
# Buffers some (old) checkpoints saved that the models recompute.
_IGNORED_SOURCE_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")


# --------------------------------------------------------------------------------------------------------------------
# Source resolution and config mapping
# --------------------------------------------------------------------------------------------------------------------


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
    raw = json.loads(config_file.read_text(encoding="utf-8"))
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


# --------------------------------------------------------------------------------------------------------------------
# Safetensors headers and the streaming writer
# --------------------------------------------------------------------------------------------------------------------


def _read_header(path: Path) -> tuple[dict[str, dict], bytes]:
    """The safetensors header of `path` (tensor name -> dtype/shape/data_offsets, plus the absolute `start`) and its
    raw bytes; offsets are checked against the file size."""
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short).")
        (length,) = struct.unpack("<Q", prefix)
        if 8 + length > file_size:
            raise ValueError(f"{path} is not a valid safetensors file (header larger than the file).")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{path} is not a valid safetensors file: {err}") from err
    header.pop("__metadata__", None)
    for key, info in header.items():
        begin, end = info["data_offsets"]
        info["start"] = 8 + length + begin
        if end < begin or 8 + length + end > file_size:
            raise ValueError(f"{path}: tensor {key} lies outside the file (truncated download?).")
    return header, raw


def _read_tensor(fd: int, info: dict) -> torch.Tensor:
    """One source tensor, read with `pread` into fresh memory (no memory map stays resident)."""
    begin, end = info["data_offsets"]
    buffer = bytearray(end - begin)
    view, done = memoryview(buffer), 0
    while done < len(buffer):
        got = os.preadv(fd, [view[done:]], info["start"] + done)
        if got <= 0:
            raise ValueError("unexpected end of a source shard (truncated file?)")
        done += got
    dtype = _TORCH_DTYPES[info["dtype"]]
    if not buffer:
        return torch.empty(info["shape"], dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])


def _source_weight_files(directory: Path) -> tuple[list[Path], Path]:
    """Source shards in order, and the file that identifies them (the index, or the single weights file)."""
    index = directory / _WEIGHT_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
        missing = [name for name in names if not (directory / name).is_file()]
        if missing:
            raise ValueError(f"{directory}: shards listed in {_WEIGHT_INDEX} are missing: {missing[:5]}")
        return [directory / name for name in names], index
    single = directory / _SINGLE_WEIGHTS
    if single.is_file():
        return [single], single
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")) or any(directory.glob("*.pth")):
        raise ValueError(
            f"{directory} holds PyTorch pickle weights only; upcycling streams safetensors. Convert first: "
            "LlavaForConditionalGeneration.from_pretrained(src).save_pretrained(dst)."
        )
    raise ValueError(f"{directory} has no {_SINGLE_WEIGHTS} or {_WEIGHT_INDEX}: no safetensors weights to upcycle.")


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot parse the size {size!r} (examples: '5GB', '500MB', 1000000).")
    number, unit = float(match.group(1)), match.group(2).upper()
    powers = {"B": 0, "KB": 1, "MB": 2, "GB": 3, "TB": 4}
    if unit.endswith("IB"):
        return int(number * 1024 ** powers[unit.replace("I", "")])
    return int(number * 1000 ** powers[unit])


@dataclass
class _TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]
    parts: int = 1  # written as `parts` equal slices along dim 0 (the experts of a fused tensor)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class _ShardWriter:
    """Writes a known set of tensors into safetensors shards whose headers are fixed before any data arrives.

    Each shard is created at its final size; tensors (or parts of them) are written at their offsets as they are
    produced, so nothing but the tensor being written is held in memory.
    """

    def __init__(self, directory: Path, specs: Mapping[str, _TensorSpec], max_shard_bytes: int):
        self.directory = directory
        self.specs = dict(specs)
        shards: list[list[str]] = [[]]
        size = 0
        for name, spec in self.specs.items():
            if shards[-1] and size + spec.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += spec.nbytes
        total = len(shards)
        self.location: dict[str, tuple[str, int]] = {}  # name -> (file name, absolute offset)
        self.written: dict[str, set[int]] = {name: set() for name in self.specs}
        self.files: list[str] = []
        for number, names in enumerate(shards, start=1):
            file_name = f"model-{number:05d}-of-{total:05d}.safetensors"
            self.files.append(file_name)
            # Larger elements first keeps every tensor aligned to its element size.
            names = sorted(names, key=lambda n: -torch.empty((), dtype=self.specs[n].dtype).element_size())
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name in names:
                spec = self.specs[name]
                header[name] = {
                    "dtype": _SAFETENSORS_DTYPES[spec.dtype],
                    "shape": list(spec.shape),
                    "data_offsets": [offset, offset + spec.nbytes],
                }
                offset += spec.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
            raw += b" " * (-len(raw) % 8)
            data_start = 8 + len(raw)
            for name in names:
                self.location[name] = (file_name, data_start + header[name]["data_offsets"][0])
            with open(directory / file_name, "wb") as handle:
                handle.write(struct.pack("<Q", len(raw)))
                handle.write(raw)
                handle.truncate(data_start + offset)
        self._fds: dict[str, int] = {}

    def write(self, name: str, tensor: torch.Tensor, part: int | None = None) -> None:
        spec = self.specs.get(name)
        if spec is None:
            raise KeyError(f"{name} is not a tensor of the upcycled model")
        expected = spec.shape if part is None else spec.shape[1:]
        if tuple(tensor.shape) != tuple(expected) or tensor.dtype != spec.dtype:
            raise ValueError(
                f"{name}{'' if part is None else f'[{part}]'}: got {tuple(tensor.shape)} {tensor.dtype}, expected "
                f"{tuple(expected)} {spec.dtype}"
            )
        file_name, offset = self.location[name]
        index = 0 if part is None else part
        if part is not None:
            if not 0 <= part < spec.parts:
                raise IndexError(f"{name}: part {part} out of range({spec.parts})")
            offset += part * (spec.nbytes // spec.parts)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data).cast("B")
        fd = self._fds.get(file_name)
        if fd is None:
            fd = self._fds[file_name] = os.open(self.directory / file_name, os.O_WRONLY)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
        self.written[name].add(index)

    def copy_bytes(self, name: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Write tensor `name` from `nbytes` raw bytes of another file (same dtype and shape), file to file."""
        spec = self.specs[name]
        if nbytes != spec.nbytes:
            raise ValueError(f"{name}: {nbytes} source bytes, expected {spec.nbytes}")
        file_name, offset = self.location[name]
        fd = self._fds.get(file_name)
        if fd is None:
            fd = self._fds[file_name] = os.open(self.directory / file_name, os.O_WRONLY)
        done = 0
        while done < nbytes:
            try:
                got = os.copy_file_range(src_fd, fd, nbytes - done, src_offset + done, offset + done)
            except (AttributeError, OSError):  # other OS / filesystem: bounded chunks through memory
                got = os.pwrite(fd, os.pread(src_fd, min(nbytes - done, 1 << 24), src_offset + done), offset + done)
            if got <= 0:
                raise ValueError(f"{name}: unexpected end of the source shard (truncated file?)")
            done += got
        self.written[name].add(0)

    def missing(self) -> list[str]:
        return [name for name, spec in self.specs.items() if len(self.written[name]) != spec.parts]

    def close(self) -> dict[str, Any]:
        """fsync and close the shards; return the index (`model.safetensors.index.json` content)."""
        for fd in self._fds.values():
            os.fsync(fd)
            os.close(fd)
        self._fds.clear()
        weight_map = {name: self.location[name][0] for name in sorted(self.specs)}
        total = sum(spec.nbytes for spec in self.specs.values())
        return {"metadata": {"total_size": total}, "weight_map": weight_map}

    def abort(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# --------------------------------------------------------------------------------------------------------------------
# Planning: which source tensor feeds which target tensor
# --------------------------------------------------------------------------------------------------------------------

_PREFIX_RULES = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("model.language_model.", "model.language_model."),
    ("language_model.", "model.language_model."),
    ("model.vision_tower.", "model.vision_tower."),
    ("vision_tower.", "model.vision_tower."),
    ("model.multi_modal_projector.", "model.multi_modal_projector."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("lm_head.", "lm_head."),
    ("model.image_newline", "model.image_newline"),
    ("image_newline", "model.image_newline"),
)


def normalise_key(key: str) -> str | None:
    """A source key in the v5 LLaVA(-NeXT/-OneVision) layout (old `language_model.model.*`, `vision_tower.*`,
    `multi_modal_projector.*`, `image_newline` top-level keys included); `None` if it belongs to no known part."""
    for old, new in _PREFIX_RULES:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def _vision_candidates(key: str) -> list[str]:
    """Names a vision-tower key may have in the target (with or without the `vision_model.` wrapper)."""
    tower = "model.vision_tower."
    if not key.startswith(tower):
        return [key]
    rest = key[len(tower):]
    if rest.startswith("vision_model."):
        return [key, tower + rest[len("vision_model."):]]
    return [key, tower + "vision_model." + rest]


def _target_specs(model: nn.Module, config: AsyMoEConfig) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes the upcycled checkpoint holds (the tied LM head is not stored)."""
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


@dataclass
class _Plan:
    copies: dict[str, str] = field(default_factory=dict)  # source key -> target name
    mlp: dict[str, tuple[int, str]] = field(default_factory=dict)  # source key -> (layer, gate_proj|up_proj|down_proj)
    skipped: list[str] = field(default_factory=list)
    specs: dict[str, _TensorSpec] = field(default_factory=dict)  # every target tensor, in target order


def _plan(config: AsyMoEConfig, headers: dict[str, dict], target_shapes: dict[str, tuple[int, ...]]) -> _Plan:
    text = config.text_config
    moe_layers = set(text.moe_layers)
    plan = _Plan()
    unknown, mismatched = [], []
    dtypes: dict[str, torch.dtype] = {}
    mlp_dtype: dict[int, torch.dtype] = {}
    for key, info in headers.items():
        dtype = _TORCH_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"source tensor {key} has dtype {info['dtype']}, which upcycling does not handle.")
        name = normalise_key(key)
        mlp = _MLP_KEY.match(name) if name is not None else None
        if mlp and int(mlp.group(1)) in moe_layers:
            layer = int(mlp.group(1))
            plan.mlp[key] = (layer, mlp.group(2))
            mlp_dtype.setdefault(layer, dtype)
            if mlp_dtype[layer] != dtype:
                raise ValueError(f"layer {layer}'s FFN weights have mixed dtypes; upcycling needs one dtype per FFN.")
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            plan.skipped.append(key)
            continue
        target = None if name is None else next((c for c in _vision_candidates(name) if c in target_shapes), None)
        if target is None:
            if key.endswith(_IGNORED_SOURCE_SUFFIXES):
                plan.skipped.append(key)
            else:
                unknown.append(key)
            continue
        if tuple(info["shape"]) != target_shapes[target]:
            mismatched.append(f"{key} {tuple(info['shape'])} -> {target} {target_shapes[target]}")
            continue
        if target in dtypes:
            raise ValueError(f"two source tensors map to {target}; is the checkpoint's key layout mixed?")
        plan.copies[key] = target
        dtypes[target] = dtype
    if unknown:
        raise ValueError(
            f"{len(unknown)} source tensors have no place in the upcycled model (e.g. {unknown[:4]}); supported "
            f"sources are {SUPPORTED_SOURCE} checkpoints with SwiGLU language models."
        )
    if mismatched:
        raise ValueError(f"source and upcycled shapes differ: {mismatched[:4]}")
    pieces = {layer: set() for layer in moe_layers}
    for layer, which in plan.mlp.values():
        pieces[layer].add(which)
    incomplete = {layer: sorted({"gate_proj", "up_proj", "down_proj"} - got) for layer, got in pieces.items()
                  if len(got) != 3}
    if incomplete:
        raise ValueError(f"the source lacks FFN weights of MoE layers: {incomplete}")

    for target, shape in target_shapes.items():
        match = re.match(r"^model\.language_model\.layers\.(\d+)\.mlp\.(.+)$", target)
        layer = int(match.group(1)) if match else None
        if target in dtypes:
            plan.specs[target] = _TensorSpec(dtypes[target], shape)
        elif layer in moe_layers:
            rest = match.group(2)
            if rest in ("experts.gate_up_proj", "experts.down_proj"):
                plan.specs[target] = _TensorSpec(mlp_dtype[layer], shape, parts=shape[0])
            elif rest.startswith("router."):
                plan.specs[target] = _TensorSpec(torch.float32, shape)
            else:
                plan.specs[target] = _TensorSpec(mlp_dtype[layer], shape)
        else:
            raise ValueError(f"the source has no tensor for {target} (is the checkpoint complete?)")
    return plan


# --------------------------------------------------------------------------------------------------------------------
# Expert construction
# --------------------------------------------------------------------------------------------------------------------


def _derived_seed(seed: int, *tags: Any) -> int:
    digest = hashlib.sha256(repr((seed, *tags)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _expert_weights(
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


def _fresh_block_tensors(
    meta_model: AsyMoEForConditionalGeneration, layer: int, dtype: torch.dtype, seed: int
) -> dict[str, torch.Tensor]:
    """The new (non-expert-weight) parameters of MoE layer `layer`, initialised by the model's own `_init_weights`
    (routers normal(0, initializer_range) in fp32, hyperbolic scales/curvature), then made neutral: Möbius biases and
    the evidence readout's `W_o` zero, so that the upcycled layer computes the dense FFN."""
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
        torch.manual_seed(_derived_seed(seed, "block", layer))
        for module in block.modules():
            meta_model._init_weights(module)
    with torch.no_grad():
        for name, param in fresh.items():
            if name.startswith("experts.mobius_bias") or name == "evidence.o_proj.weight":
                param.zero_()
    prefix = f"model.language_model.layers.{layer}.mlp."
    return {
        prefix + name: param.detach().to(torch.float32 if name.startswith("router.") else dtype)
        for name, param in fresh.items()
    }


# --------------------------------------------------------------------------------------------------------------------
# Processor conversion
# --------------------------------------------------------------------------------------------------------------------

_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json",
                    "tokenizer.model")


def convert_processor(source_directory: str | os.PathLike, config: AsyMoEConfig):
    """The source's processor as an `AsyMoEProcessor` (same tokenizer, image processor and chat template; anyres
    tiling for LLaVA-NeXT / OneVision), checked to expand `<image>` and preprocess images exactly like the source;
    `None` if the source has none."""
    from transformers import AutoProcessor

    from .processing import AsyMoEProcessor

    directory = Path(source_directory)
    if not any((directory / name).is_file() for name in _PROCESSOR_FILES):
        warnings.warn(f"{directory} has no processor/tokenizer files: the upcycled checkpoint gets no processor.")
        return None
    model_type = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("model_type")
    try:
        source = AutoProcessor.from_pretrained(directory)
    except Exception as err:  # noqa: BLE001
        if model_type != "llava_onevision":
            raise ValueError(
                f"could not load the source processor from {directory}: {type(err).__name__}: {err}"
            ) from err
        # LlavaOnevisionProcessor also builds a video processor, which needs torchvision: use its image parts.
        source = _onevision_image_processor_parts(directory, config, err)
    tokenizer = getattr(source, "tokenizer", None)
    image_processor = getattr(source, "image_processor", None)
    if tokenizer is None or image_processor is None:
        warnings.warn(f"{directory} has no complete LLaVA processor (tokenizer + image processor): none is written.")
        return None
    image_token = getattr(source, "image_token", None) or tokenizer.convert_ids_to_tokens(config.image_token_id)
    if tokenizer.convert_tokens_to_ids(image_token) != config.image_token_id:
        raise ValueError(
            f"the source tokenizer maps {image_token!r} to id {tokenizer.convert_tokens_to_ids(image_token)}, but the "
            f"config's image_token_id is {config.image_token_id}."
        )
    anyres = {}
    if config.image_grid_pinpoints is not None:
        anyres = {"image_grid_pinpoints": config.image_grid_pinpoints, "patch_size": config.vision_config.patch_size,
                  "vision_aspect_ratio": config.vision_aspect_ratio}
    processor = AsyMoEProcessor(
        image_processor, tokenizer, num_image_tokens=config.num_image_tokens, image_token=image_token,
        chat_template=getattr(source, "chat_template", None), **anyres,
    )
    if isinstance(source, _ProcessorParts):
        warnings.warn(
            f"the source's LlavaOnevisionProcessor cannot be built here ({source.reason}); its image-token expansion "
            "is reproduced from the model config and processor_config.json, not compared with the source's output."
        )
    else:
        _check_same_processing(source, processor, config, image_token)
    return processor


@dataclass
class _ProcessorParts:
    """The image-side parts of a source processor that could not be built as a whole."""

    tokenizer: Any
    image_processor: Any
    chat_template: str | None
    image_token: str | None
    reason: str


def _onevision_image_processor_parts(directory: Path, config: AsyMoEConfig, error: Exception) -> _ProcessorParts:
    """Tokenizer, image processor and chat template of a OneVision checkpoint, checked against its model config."""
    from transformers import AutoImageProcessor, AutoTokenizer

    settings = {}
    if (directory / "processor_config.json").is_file():
        settings = json.loads((directory / "processor_config.json").read_text(encoding="utf-8"))
    template = settings.get("chat_template")
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    base = settings.get("num_image_tokens")
    if base is not None:
        base -= int(settings.get("vision_feature_select_strategy", config.vision_feature_select_strategy) == "default")
    if base not in (None, config.num_image_tokens) or settings.get(
            "vision_aspect_ratio", config.vision_aspect_ratio) != config.vision_aspect_ratio:
        raise ValueError(
            f"{directory}/processor_config.json disagrees with config.json: the processor gives {base} base-tile "
            f"image tokens and vision_aspect_ratio={settings.get('vision_aspect_ratio')!r}, the model "
            f"{config.num_image_tokens} and {config.vision_aspect_ratio!r}."
        )
    try:
        image_processor = AutoImageProcessor.from_pretrained(directory)
    except ImportError:  # transformers 5.17 resolves OneVision to its torchvision processor even for a PIL config
        from transformers import LlavaOnevisionImageProcessorPil

        image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(directory)
    return _ProcessorParts(
        tokenizer=tokenizer,
        image_processor=image_processor,
        chat_template=template or getattr(tokenizer, "chat_template", None),
        image_token=settings.get("image_token"),
        reason=f"{type(error).__name__}: {error}",
    )


def _probe_image(size: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size + 7, size + 19, 3)) * 255).astype("uint8"))


def _check_same_processing(source, processor, config: AsyMoEConfig, image_token: str) -> None:
    image = _probe_image(config.vision_config.image_size)
    text = f"{image_token}\nWhat is in the image?"
    expected = source(images=image, text=text, return_tensors="pt")
    got = processor(images=image, text=text, return_tensors="pt")
    size = config.vision_config.image_size
    if tuple(got["pixel_values"].shape[-2:]) != (size, size):
        raise ValueError(
            f"the source image processor gives {tuple(got['pixel_values'].shape[-2:])} images, but the vision tower "
            f"takes {size}x{size}: AsyMoE needs fixed-size images (tiles)."
        )
    same_pixels = expected["pixel_values"].shape == got["pixel_values"].shape and torch.allclose(
        expected["pixel_values"].float(), got["pixel_values"].float())
    same_pixels = same_pixels and all(
        torch.equal(torch.as_tensor(expected[key]), torch.as_tensor(got[key]))
        for key in ("image_sizes", "batch_num_images") if key in expected
    )
    if getattr(source, "patch_size", None) is None and config.image_grid_pinpoints is None:
        # Old checkpoints without processor_config.json: the source processor cannot expand `<image>` (it has no
        # patch_size), so only the image preprocessing can be compared; the expansion comes from the model config.
        warnings.warn("the source processor has no patch_size; <image> expansion follows the model config.")
        same_ids = True
    else:
        same_ids = torch.equal(expected["input_ids"], got["input_ids"])
    if not (same_ids and same_pixels):
        raise ValueError(
            "the converted processor does not reproduce the source's inputs: the source expands the probe image to "
            f"{int((expected['input_ids'] == config.image_token_id).sum())} image tokens, AsyMoE to "
            f"{int((got['input_ids'] == config.image_token_id).sum())}; pixel values "
            f"{'agree' if same_pixels else 'differ'} (patch_size / num_additional_image_tokens / "
            "vision_feature_select_strategy / image_grid_pinpoints of the source processor disagree with its model "
            "config)."
        )


# --------------------------------------------------------------------------------------------------------------------
# Parameter counts and the model card
# --------------------------------------------------------------------------------------------------------------------


def _meta_model(config: AsyMoEConfig) -> AsyMoEForConditionalGeneration:
    with torch.device("meta"):
        return AsyMoEForConditionalGeneration(config)


def parameter_counts(config: AsyMoEConfig) -> dict[str, int]:
    """Parameter counts from the config (no weights are built): total, vision tower, projector (with the anyres
    `image_newline`), language model
    (total and activated per token: embeddings, attention, norms, routers, evidence readouts, LM head, dense FFNs and
    the token's top-k experts), and the language model of the dense source (every FFN dense, no MoE extras)."""
    model = _meta_model(config)
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


def _model_card(config: AsyMoEConfig, manifest: dict[str, Any], counts: dict[str, int]) -> str:
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


# --------------------------------------------------------------------------------------------------------------------
# upcycle()
# --------------------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def upcycle(
    source: str | os.PathLike | nn.Module,
    output_dir: str | os.PathLike | None = None,
    *,
    moe_variant: str = "asymoe",
    mode: str = "copy",
    experts: Iterable[int] | None = None,
    num_slices: int | None = None,
    seed: int = 0,
    noise_std: float = 0.0,
    drop_ratio: float = 0.0,
    revision: str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool | Callable[[int, int, str], None] = False,
    **text_overrides,
):
    """Upcycle a dense LLaVA, LLaVA-NeXT or LLaVA-OneVision checkpoint into AsyMoE.

    Args:
        source: local checkpoint directory, Hub model id, or a `LlavaForConditionalGeneration` /
            `LlavaNextForConditionalGeneration` / `LlavaOnevisionForConditionalGeneration` instance.
        output_dir: where to write the AsyMoE checkpoint (weights, config with an `upcycling` manifest, remote code,
            processor, README.md). `None`: return the upcycled model instead.
        moe_variant: `"dense"`, `"vanilla"`, `"modality"` or `"asymoe"`.
        mode: `"copy"` (every expert = the dense FFN; same logits as the source) or `"partition"` (experts take
            `1/num_slices` of the dense neurons each; fewer activated parameters, needs training).
        experts: (vision, text, inter, evidence) experts per MoE layer; default the variant's.
        num_slices: partition mode only: slices of the dense FFN (default the most experts a token can reach).
        seed: seeds routers, noise and drop-upcycling (per layer and expert, independent of the shard layout).
        noise_std: Gaussian noise added to each expert, relative to the std of the dense matrix it comes from.
        drop_ratio: Drop-Upcycling: fraction of each expert's neurons re-initialised from the dense statistics.
        revision: Hub revision of `source`.
        max_shard_size: largest output shard (e.g. `"5GB"`).
        overwrite: replace an existing non-empty `output_dir`.
        progress: `True` for a tqdm bar over the source shards, or a callable `(done, total, shard_name)`.
        **text_overrides: MoE fields of the text config (`moe_layers`, `num_experts_per_tok`, `evidence_layers`,
            `manifold`, `router_aux_loss_coef`, ...).

    Returns:
        The output directory (`Path`), or the upcycled `AsyMoEForConditionalGeneration` if `output_dir` is `None`.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}.")
    if noise_std < 0 or not 0.0 <= drop_ratio <= 1.0:
        raise ValueError("noise_std must be >= 0 and drop_ratio in [0, 1].")
    options = dict(
        moe_variant=moe_variant, mode=mode, experts=experts, num_slices=num_slices, seed=seed, noise_std=noise_std,
        drop_ratio=drop_ratio, revision=revision, max_shard_size=max_shard_size, progress=progress, **text_overrides,
    )
    if output_dir is None:
        with tempfile.TemporaryDirectory(prefix="asymoe-upcycle-", ignore_cleanup_errors=True) as tmp:
            with warnings.catch_warnings():  # the returned model has no processor either way
                warnings.filterwarnings("ignore", message=".*processor")
                path = upcycle(source, Path(tmp) / "upcycled", **options)
            model = AsyMoEForConditionalGeneration.from_pretrained(path)
            # Materialise every tensor before the files go away (safetensors loads may be memory-mapped).
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.data = tensor.data.clone()
            return model
    if isinstance(source, nn.Module):
        return _upcycle_module(source, Path(output_dir), overwrite=overwrite, **options)

    output = Path(output_dir).expanduser().absolute()
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} exists and is not a directory.")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{output} exists and is not empty; pass overwrite=True (CLI: --overwrite) to replace it."
        )
    src_dir, provenance = resolve_source(source, revision)
    return _upcycle_directory(src_dir, provenance, output, overwrite=overwrite, **{
        k: v for k, v in options.items() if k != "revision"})


def _upcycle_module(model: nn.Module, output: Path, *, overwrite: bool, **options) -> Path:
    """Upcycle an in-memory LLaVA(-NeXT/-OneVision) model (saved to a temporary directory first)."""
    if type(model).__name__ not in SOURCE_ARCHITECTURES.values():
        raise ValueError(
            f"cannot upcycle a {type(model).__name__}: supported sources are {SUPPORTED_SOURCE} models or "
            "checkpoints."
        )
    options.pop("revision", None)
    with tempfile.TemporaryDirectory(prefix="asymoe-dense-", ignore_cleanup_errors=True) as tmp:
        model.save_pretrained(tmp)
        provenance = {"source": f"in-memory {type(model).__name__}", "kind": "in-memory", "revision": None}
        output = output.expanduser().absolute()
        if output.exists() and any(output.iterdir()) and not overwrite:
            raise FileExistsError(f"{output} exists and is not empty; pass overwrite=True to replace it.")
        return _upcycle_directory(Path(tmp), provenance, output, overwrite=overwrite, **options)


def _upcycle_directory(
    src_dir: Path, provenance: dict[str, Any], output: Path, *, moe_variant: str, mode: str, experts, num_slices,
    seed: int, noise_std: float, drop_ratio: float, max_shard_size, overwrite: bool, progress, **text_overrides,
) -> Path:
    source_config = load_source_config(src_dir)
    config = asymoe_config_from_llava(
        source_config, moe_variant, mode=mode, experts=experts, num_slices=num_slices, **text_overrides
    )
    text = config.text_config
    shard_files, identity_file = _source_weight_files(src_dir)
    headers: dict[str, dict] = {}
    shard_headers: dict[Path, dict] = {}
    shard_of: dict[str, Path] = {}
    header_digest = hashlib.sha256()
    for shard in shard_files:
        header, raw = _read_header(shard)
        header_digest.update(raw)
        shard_headers[shard] = header
        for key, info in header.items():
            if key in headers:
                raise ValueError(f"tensor {key} appears in two source shards ({shard_of[key].name}, {shard.name}).")
            headers[key] = info
            shard_of[key] = shard
    meta_model = _meta_model(config)
    plan = _plan(config, headers, _target_specs(meta_model, config))

    slices_total = text.intermediate_size // text.moe_intermediate_size if mode == "partition" else 1
    layer_slices = {
        layer: partition_slices(text.expert_layout(layer), slices_total) if mode == "partition"
        else [0] * text.expert_layout(layer).num_experts
        for layer in text.moe_layers
    }
    function_preserving = mode == "copy" and noise_std == 0.0 and drop_ratio == 0.0
    manifest = {
        "source": provenance["source"],
        "source_kind": provenance["kind"],
        "revision": provenance["revision"],
        "config_sha256": _sha256(src_dir / "config.json"),
        ("index_sha256" if identity_file.name == _WEIGHT_INDEX else "weights_header_sha256"): (
            _sha256(identity_file) if identity_file.name == _WEIGHT_INDEX else header_digest.hexdigest()),
        "source_architecture": SOURCE_ARCHITECTURES[source_config.model_type],
        "source_text_model_type": source_config.text_config.model_type,
        "moe_variant": text.moe_variant,
        "mode": mode,
        "seed": seed,
        "noise_std": noise_std,
        "drop_ratio": drop_ratio,
        "num_slices": slices_total if mode == "partition" else None,
        "partition_down_scale": text.num_experts_per_tok if mode == "partition" else None,
        "function_preserving": function_preserving,
        "layers": {
            str(layer): {
                "vision": text.expert_layout(layer).num_vision,
                "text": text.expert_layout(layer).num_text,
                "inter": text.expert_layout(layer).num_inter,
                "evidence": text.expert_layout(layer).num_evidence,
                **({"slices": layer_slices[layer]} if mode == "partition" else {}),
            }
            for layer in text.moe_layers
        },
        "asymoe_version": _version(),
    }

    output.parent.mkdir(parents=True, exist_ok=True)
    stale = sorted(output.parent.glob(f".{output.name}.upcycling-*"))
    if stale:
        warnings.warn(
            f"{len(stale)} temporary directories of interrupted (or concurrent) upcycling runs lie next to the "
            f"output, e.g. {stale[0]}; remove them once no run is writing there."
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.upcycling-", dir=output.parent))
    writer = None
    try:
        writer = _ShardWriter(tmp, plan.specs, _parse_size(max_shard_size))
        _stream(
            shard_files, shard_headers, plan, writer, meta_model, config, layer_slices,
            seed=seed, noise_std=noise_std, drop_ratio=drop_ratio, progress=progress,
        )
        missing = writer.missing()
        if missing:
            raise RuntimeError(f"internal error: tensors not written: {missing[:5]}")
        index = writer.close()
        writer = None
        (tmp / _WEIGHT_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")

        config.upcycling = manifest
        config.save_pretrained(tmp)  # config.json + configuration_asymoe.py
        write_remote_code(tmp, _modeling_module.__file__)  # modeling_asymoe.py, hyperbolic_asymoe.py
        if (src_dir / "generation_config.json").is_file():
            shutil.copyfile(src_dir / "generation_config.json", tmp / "generation_config.json")
        if provenance["kind"] == "in-memory":  # model.save_pretrained writes no processor files
            warnings.warn(f"the source is an in-memory model, which carries no processor: {output} gets none. Save the "
                          "source model and its processor to one directory and upcycle that directory to get one.")
            processor = None
        else:
            processor = convert_processor(src_dir, config)
        if processor is not None:
            processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(config, manifest, parameter_counts(config)), encoding="utf-8")
        _fsync_directory(tmp)
        _move_into_place(tmp, output)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _stream(
    shard_files: list[Path], headers: dict[Path, dict], plan: _Plan, writer: _ShardWriter, meta_model,
    config: AsyMoEConfig, layer_slices: dict[int, list[int]], *, seed: int, noise_std: float, drop_ratio: float,
    progress,
) -> None:
    """Read the source shard by shard: copy tensors file to file, expand each MoE layer's FFN once its three matrices
    have been read (they may sit in different shards)."""
    text = config.text_config
    width = text.moe_intermediate_size
    partition = width != text.intermediate_size
    down_scale = float(text.num_experts_per_tok) if partition else 1.0
    pending: dict[int, dict[str, torch.Tensor]] = {}
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(shard_files), desc="upcycling", unit="shard")
    crash_after = int(os.environ.get(CRASH_HOOK_ENV, "0") or 0)
    try:
        for done, shard in enumerate(shard_files, start=1):
            header = headers[shard]
            fd = os.open(shard, os.O_RDONLY)
            try:
                for key in sorted(header, key=lambda k: header[k]["start"]):  # sequential reads
                    info = header[key]
                    if key in plan.copies:
                        begin, end = info["data_offsets"]
                        writer.copy_bytes(plan.copies[key], fd, info["start"], end - begin)
                    elif key in plan.mlp:
                        layer, which = plan.mlp[key]
                        pending.setdefault(layer, {})[which] = _read_tensor(fd, info)
                        if len(pending[layer]) == 3:
                            _emit_layer(
                                layer, pending.pop(layer), writer, meta_model, layer_slices[layer], width,
                                seed=seed, noise_std=noise_std, drop_ratio=drop_ratio, down_scale=down_scale,
                            )
            finally:
                os.close(fd)
            if bar is not None:
                bar.update(1)
            elif callable(progress):
                progress(done, len(shard_files), shard.name)
            if crash_after and done >= crash_after:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        if bar is not None:
            bar.close()
    if pending:
        raise RuntimeError(f"internal error: FFN pieces of layers {sorted(pending)} were never completed")


def _emit_layer(
    layer: int, pieces: dict[str, torch.Tensor], writer: _ShardWriter, meta_model, slices: list[int], width: int,
    *, seed: int, noise_std: float, drop_ratio: float, down_scale: float,
) -> None:
    gate, up, down = pieces["gate_proj"], pieces["up_proj"], pieces["down_proj"]
    prefix = f"model.language_model.layers.{layer}.mlp."
    deterministic = noise_std == 0.0 and drop_ratio == 0.0
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # identical experts are built once
    for expert, slice_index in enumerate(slices):
        if deterministic and slice_index in cache:
            gate_up, down_e = cache[slice_index]
        else:
            generator = torch.Generator().manual_seed(_derived_seed(seed, "expert", layer, expert))
            neurons = slice(slice_index * width, (slice_index + 1) * width)
            gate_up, down_e = _expert_weights(
                gate, up, down, neurons, noise_std=noise_std, drop_ratio=drop_ratio, down_scale=down_scale,
                generator=generator,
            )
            if deterministic:
                cache[slice_index] = (gate_up, down_e)
        writer.write(prefix + "experts.gate_up_proj", gate_up, part=expert)
        writer.write(prefix + "experts.down_proj", down_e, part=expert)
    for name, tensor in _fresh_block_tensors(meta_model, layer, gate.dtype, seed).items():
        writer.write(name, tensor)


def _fsync_directory(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors"):  # shards were synced by the writer
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, output: Path) -> None:
    """Atomically publish `tmp` as `output` (an existing output is swapped out first, then removed)."""
    if output.exists():
        if not any(output.iterdir()):
            output.rmdir()
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.replaced-", dir=output.parent))
            old.rmdir()
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
            return
    os.replace(tmp, output)


def _version() -> str:
    from . import __version__

    return __version__


# --------------------------------------------------------------------------------------------------------------------
# Deviation report
# --------------------------------------------------------------------------------------------------------------------


def probe_inputs(config: AsyMoEConfig, processor=None, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed probe (one image + a short question) for `deviation_report`: through `processor` if given, else
    synthetic token ids with the image placeholders already expanded."""
    if processor is not None:
        image = _probe_image(config.vision_config.image_size, seed)
        text = f"{processor.image_token}\nWhat is shown in this image? Describe it."
        batch = processor(images=image, text=text, return_tensors="pt")
        return {k: batch[k] for k in _MODEL_INPUTS if k in batch}
    generator = torch.Generator().manual_seed(seed)
    text = config.text_config
    vision = config.vision_config
    words = torch.randint(0, text.vocab_size, (12,), generator=generator)
    words[words == config.image_token_id] = (config.image_token_id + 1) % text.vocab_size
    num_features, tiles, extra = config.num_image_tokens, (), {}
    if config.image_grid_pinpoints is not None:  # an image of the first pinpoint's size
        size = config.image_grid_pinpoints[0]
        layout = anyres_layout(size, config.image_grid_pinpoints, vision.image_size,
                               vision.image_size // vision.patch_size, config.max_anyres_tiles)
        num_features += layout.num_grid_features
        tiles, extra = (layout.num_tiles,), {"image_sizes": torch.tensor([size])}
    image = torch.full((num_features,), config.image_token_id)
    input_ids = torch.cat([words[:2], image, words[2:]]).unsqueeze(0)
    pixels = torch.randn(1, *tiles, vision.num_channels, vision.image_size, vision.image_size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels, **extra}


@torch.no_grad()
def model_states(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Image features, per-layer hidden states and logits of `model` on `inputs` (fp64, on CPU)."""
    model.eval()
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in inputs.items()}
    out = model(**batch, output_hidden_states=True)
    states: dict[str, torch.Tensor] = {}
    # Projected image features: LLaVA keeps them in `image_outputs.pooler_output` from transformers 5.24 (one tensor
    # per image; `image_hidden_states` is deprecated there), in `image_hidden_states` before, as AsyMoE does.
    image_features = out.image_outputs.pooler_output if "image_outputs" in out else out.get("image_hidden_states")
    if image_features is not None:
        features = image_features if isinstance(image_features, (list, tuple)) else [image_features]
        states["image features"] = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    hidden = out.hidden_states or ()
    for i, h in enumerate(hidden):
        if i == 0:
            name = "embeddings"
        elif i == len(hidden) - 1:
            name = f"layer {i - 1} (final norm)"
        else:
            name = f"layer {i - 1}"
        states[name] = h
    states["logits"] = out.logits
    return {k: v.detach().to("cpu", torch.float64) for k, v in states.items()}


def compare_states(source: Mapping[str, torch.Tensor], upcycled: Mapping[str, torch.Tensor]) -> list[dict]:
    rows = []
    for name, reference in source.items():
        if name not in upcycled:
            continue
        other = upcycled[name]
        if other.shape != reference.shape:
            raise ValueError(f"{name}: source {tuple(reference.shape)} vs upcycled {tuple(other.shape)}")
        rows.append({
            "name": name,
            "max_abs": float((other - reference).abs().max()),
            "ref_max_abs": float(reference.abs().max()),
        })
    return rows


def deviation_report(
    source_model: nn.Module, upcycled_model: nn.Module, inputs: Mapping[str, torch.Tensor]
) -> list[dict]:
    """Per-layer max |source - upcycled| of hidden states (and image features, logits) on `inputs`.

    Returns rows `{"name", "max_abs", "ref_max_abs"}` in layer order; `format_deviation_report` prints them.
    """
    return compare_states(model_states(source_model, inputs), model_states(upcycled_model, inputs))


def format_deviation_report(rows: list[dict]) -> str:
    width = max(len(row["name"]) for row in rows)
    lines = [f"{'tensor':<{width}}  max|source - upcycled|  max|source|"]
    for row in rows:
        lines.append(f"{row['name']:<{width}}  {row['max_abs']:>21.3e}  {row['ref_max_abs']:>11.3e}")
    return "\n".join(lines)


def report_from_checkpoints(
    source: str | os.PathLike, upcycled: str | os.PathLike, *, revision: str | None = None, seed: int = 0
) -> list[dict]:
    """`deviation_report` between a dense source checkpoint and its upcycled checkpoint, loading one model at a time
    (fp32, CPU) so that peak memory is one model, on the upcycled processor's probe (synthetic if it has none)."""
    import gc

    import transformers

    from .processing import AsyMoEProcessor

    src_dir, _ = resolve_source(source, revision)
    source_class = getattr(transformers, SOURCE_ARCHITECTURES[load_source_config(src_dir).model_type])
    config = AsyMoEConfig.from_pretrained(upcycled)
    processor = None
    if (Path(upcycled) / "processor_config.json").is_file():
        processor = AsyMoEProcessor.from_pretrained(upcycled)
    inputs = probe_inputs(config, processor, seed)
    model = source_class.from_pretrained(src_dir, dtype=torch.float32)
    reference = model_states(model, inputs)
    del model
    gc.collect()
    model = AsyMoEForConditionalGeneration.from_pretrained(upcycled, dtype=torch.float32)
    states = model_states(model, inputs)
    del model
    gc.collect()
    return compare_states(reference, states)


__all__ = [
    "CRASH_HOOK_ENV",
    "asymoe_config_from_llava",
    "compare_states",
    "convert_processor",
    "deviation_report",
    "format_deviation_report",
    "load_source_config",
    "model_states",
    "model_parameter_counts",
    "parameter_counts",
    "partition_slices",
    "probe_inputs",
    "report_from_checkpoints",
    "resolve_source",
    "upcycle",
]
