"""What the benchmark scripts in `bench/` share: the timing loops, peak memory of one call on CPUs and GPUs, and their
JSON record."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Hashable
from pathlib import Path

import torch
import transformers
from torch._C._profiler import _EventType

from .io import atomic_write_text


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); CPU work is already done when a call returns."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> float:
    """Median wall time of `fn()` over `repeat` calls after `warmup` untimed ones, each timed from an idle device to
    the end of its work."""
    return interleaved_median_seconds({None: fn}, device, warmup, repeat)[None]


def interleaved_median_seconds(
    fns: dict[Hashable, Callable[[], object]], device: torch.device, warmup: int, repeat: int
) -> dict[Hashable, float]:
    """`median_seconds` of several functions timed in turn: each of `warmup` + `repeat` rounds calls every function
    once, so load that drifts during a run (a shared machine) slows all of them alike and their ratios hold."""
    times = {key: [] for key in fns}
    for round_ in range(warmup + repeat):
        for key, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_ >= warmup:
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(samples) for key, samples in times.items()}


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """The most memory allocated while `fn()` runs, above what was allocated when it started, in MiB.

    CUDA: the caching allocator's peak statistics. CPU: the torch profiler's allocation events, each of which carries
    the running total of bytes allocated since the profiler started (profiling makes this one call slower: do not
    time it).
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if device.type != "cpu":
        raise ValueError(f"peak memory is measured on cpu and cuda devices, not {device.type}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, peak = list(prof.profiler.kineto_results.experimental_event_tree()), 0
    while events:
        event = events.pop()
        events.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            peak = max(peak, event.extra_fields.total_allocated)
    return peak / 2**20


def write_bench_record(path: str | os.PathLike, args: argparse.Namespace, device: str, results: dict, **extra) -> Path:
    """Write a benchmark's JSON record atomically: its arguments, the device's name, torch/transformers versions,
    `extra` fields and the results."""
    name = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else platform.processor() or "cpu"
    record = {"args": vars(args), "device": name, **extra,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__}, "results": results}
    return atomic_write_text(path, json.dumps(record, indent=2, default=str))
