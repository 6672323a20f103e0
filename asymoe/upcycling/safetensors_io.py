"""Safetensors without loading checkpoints: headers and single tensors read with `pread`, and `ShardWriter`, which
creates output shards at their final size and writes each tensor at its offset as soon as it is known (tensors
copied unchanged go file to file with `os.copy_file_range`)."""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

WEIGHT_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def read_header(path: Path) -> tuple[dict[str, dict], bytes]:
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


def read_tensor(fd: int, info: dict) -> torch.Tensor:
    """One source tensor, read with `pread` into fresh memory (no memory map stays resident)."""
    begin, end = info["data_offsets"]
    buffer = bytearray(end - begin)
    view, done = memoryview(buffer), 0
    while done < len(buffer):
        got = os.preadv(fd, [view[done:]], info["start"] + done)
        if got <= 0:
            raise ValueError("unexpected end of a source shard (truncated file?)")
        done += got
    dtype = TORCH_DTYPES[info["dtype"]]
    if not buffer:
        return torch.empty(info["shape"], dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])


def source_weight_files(directory: Path) -> tuple[list[Path], Path]:
    """Source shards in order, and the file that identifies them (the index, or the single weights file)."""
    index = directory / WEIGHT_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
        missing = [name for name in names if not (directory / name).is_file()]
        if missing:
            raise ValueError(f"{directory}: shards listed in {WEIGHT_INDEX} are missing: {missing[:5]}")
        return [directory / name for name in names], index
    single = directory / SINGLE_WEIGHTS
    if single.is_file():
        return [single], single
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")) or any(directory.glob("*.pth")):
        raise ValueError(
            f"{directory} holds PyTorch pickle weights only; upcycling streams safetensors. Convert first: "
            "LlavaForConditionalGeneration.from_pretrained(src).save_pretrained(dst)."
        )
    raise ValueError(f"{directory} has no {SINGLE_WEIGHTS} or {WEIGHT_INDEX}: no safetensors weights to upcycle.")


def parse_size(size: int | str) -> int:
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
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]
    parts: int = 1  # written as `parts` equal slices along dim 0 (the experts of a fused tensor)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class ShardWriter:
    """Writes a known set of tensors into safetensors shards whose headers are fixed before any data arrives.

    Each shard is created at its final size; tensors (or parts of them) are written at their offsets as they are
    produced, so nothing but the tensor being written is held in memory.
    """

    def __init__(self, directory: Path, specs: Mapping[str, TensorSpec], max_shard_bytes: int):
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
                    "dtype": SAFETENSORS_DTYPES[spec.dtype],
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
