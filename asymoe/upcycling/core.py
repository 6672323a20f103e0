"""`upcycle()`: resolve the source, plan, stream shard by shard into a temporary sibling of the destination, then
publish it with one `os.replace` (a crash leaves no valid-looking checkpoint at the destination)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..configuration import AsyMoEConfig
from ..configuration.configuration_asymoe import write_remote_code
from ..io import atomic_directory, file_sha256
from ..modeling import AsyMoEForConditionalGeneration
from ..modeling import modeling_asymoe as _modeling_module
from .card import build_meta_model, model_card, parameter_counts
from .experts import derived_seed, expert_weights, fresh_block_tensors
from .plan import Plan, plan_tensors, target_specs
from .processor import convert_processor
from .safetensors_io import WEIGHT_INDEX, ShardWriter, parse_size, read_header, read_tensor, source_weight_files
from .source import (
    MODES,
    SOURCE_ARCHITECTURES,
    SUPPORTED_SOURCE,
    asymoe_config_from_llava,
    load_source_config,
    partition_slices,
    resolve_source,
)

# Test hook (crash safety): SIGKILL this process after that many source shards have been processed.
CRASH_HOOK_ENV = "ASYMOE_UPCYCLE_CRASH_AFTER_SHARDS"


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
    source_path, output_path = src_dir.resolve(), output.resolve()
    if output_path == source_path or source_path in output_path.parents or output_path in source_path.parents:
        raise ValueError(
            f"the output {output} is the source checkpoint {src_dir}, lies inside it or holds it: upcycling would "
            "replace the source. Choose an output directory outside the source."
        )
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
    shard_files, identity_file = source_weight_files(src_dir)
    headers: dict[str, dict] = {}
    shard_headers: dict[Path, dict] = {}
    shard_of: dict[str, Path] = {}
    header_digest = hashlib.sha256()
    for shard in shard_files:
        header, raw = read_header(shard)
        header_digest.update(raw)
        shard_headers[shard] = header
        for key, info in header.items():
            if key in headers:
                raise ValueError(f"tensor {key} appears in two source shards ({shard_of[key].name}, {shard.name}).")
            headers[key] = info
            shard_of[key] = shard
    meta_model = build_meta_model(config)
    plan = plan_tensors(config, headers, target_specs(meta_model, config))

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
        "config_sha256": file_sha256(src_dir / "config.json"),
        ("index_sha256" if identity_file.name == WEIGHT_INDEX else "weights_header_sha256"): (
            file_sha256(identity_file) if identity_file.name == WEIGHT_INDEX else header_digest.hexdigest()),
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

    with atomic_directory(output, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, plan.specs, parse_size(max_shard_size))
        try:
            _stream(
                shard_files, shard_headers, plan, writer, meta_model, config, layer_slices,
                seed=seed, noise_std=noise_std, drop_ratio=drop_ratio, progress=progress,
            )
        except BaseException:
            writer.abort()
            raise
        missing = writer.missing()
        if missing:
            raise RuntimeError(f"internal error: tensors not written: {missing[:5]}")
        index = writer.close()
        (tmp / WEIGHT_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")

        config.upcycling = manifest
        config.save_pretrained(tmp)  # config.json + configuration_asymoe.py
        write_remote_code(tmp, _modeling_module.__file__)  # modeling_asymoe.py, hyperbolic_asymoe.py
        if (src_dir / "generation_config.json").is_file():
            shutil.copyfile(src_dir / "generation_config.json", tmp / "generation_config.json")
        if provenance["kind"] == "in-memory":  # model.save_pretrained writes no processor files
            warnings.warn(f"the source is an in-memory model, which carries no processor: {output} gets none. Save "
                          "the source model and its processor to one directory and upcycle that directory to get one.")
            processor = None
        else:
            processor = convert_processor(src_dir, config)
        if processor is not None:
            processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(config, manifest, parameter_counts(config)), encoding="utf-8")
        _fsync_directory(tmp)
    return output


def _stream(
    shard_files: list[Path], headers: dict[Path, dict], plan: Plan, writer: ShardWriter, meta_model,
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
                        pending.setdefault(layer, {})[which] = read_tensor(fd, info)
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
    layer: int, pieces: dict[str, torch.Tensor], writer: ShardWriter, meta_model, slices: list[int], width: int,
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
            generator = torch.Generator().manual_seed(derived_seed(seed, "expert", layer, expert))
            neurons = slice(slice_index * width, (slice_index + 1) * width)
            gate_up, down_e = expert_weights(
                gate, up, down, neurons, noise_std=noise_std, drop_ratio=drop_ratio, down_scale=down_scale,
                generator=generator,
            )
            if deterministic:
                cache[slice_index] = (gate_up, down_e)
        writer.write(prefix + "experts.gate_up_proj", gate_up, part=expert)
        writer.write(prefix + "experts.down_proj", down_e, part=expert)
    for name, tensor in fresh_block_tensors(meta_model, layer, gate.dtype, seed).items():
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


def _version() -> str:
    from .. import __version__

    return __version__
