"""Timing helpers shared by bench/run.py and the per-library workers (they run in other venvs too:
only torch, safetensors and the standard library here)."""

from __future__ import annotations

import gc
import json
import resource
import statistics
import sys
import time

import torch


def setup(threads: int = 2) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def median_time(fn, reps: int, warmup: int = 2) -> dict:
    """Median (and min) wall seconds of `fn()` over `reps` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_acts(path: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(path)["acts"]


def emit(result: dict) -> None:
    """Workers print one JSON line on stdout as their last line."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
