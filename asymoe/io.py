"""Atomic file writes (a reader, or a crash, never sees a half-written results file); the benchmarks' JSON
record."""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import torch
import transformers


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a temporary sibling of `path`, then rename it onto `path` (creating the parent)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
    os.replace(handle.name, path)
    return path


def write_bench_record(path: str | os.PathLike, args: argparse.Namespace, device: str, results: dict, **extra) -> Path:
    """Write a benchmark's JSON record atomically: its arguments, the device's name, torch/transformers versions,
    `extra` fields and the results."""
    name = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else platform.processor() or "cpu"
    record = {"args": vars(args), "device": name, **extra,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__}, "results": results}
    return atomic_write_text(path, json.dumps(record, indent=2, default=str))
