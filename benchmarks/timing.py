"""Timing helpers shared by the benchmarks: candidates interleaved round by round (this machine is
shared and noisy), reported as median times and medians of per-round ratios to a reference."""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable

import torch


def time_once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(candidates: dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one call of each per round, in a new (seeded) random order each
    round. (A rotation kept each candidate's predecessor fixed: the same kernel timed against itself read
    0.76x after one neighbour than after another, from the caches and prefetchers the previous call left.)"""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    names = list(candidates)
    times = {name: [] for name in names}
    shuffler = random.Random(0)
    for _ in range(rounds):
        order = shuffler.sample(names, len(names))
        for name in order:
            times[name].append(time_once(candidates[name]))
    return times


def summarise(times: dict[str, list[float]], reference: str) -> dict[str, dict[str, float]]:
    """Median milliseconds and the median of per-round ratios to ``reference``."""
    return {
        name: {
            "median_ms": 1000 * statistics.median(values),
            f"ratio_to_{reference}": statistics.median(v / r for v, r in zip(values, times[reference])),
        }
        for name, values in times.items()
    }


def print_table(title: str, summary: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}")
    columns = list(next(iter(summary.values())))
    print(f"{'candidate':<34}" + "".join(f"{c:>22}" for c in columns))
    for name, row in summary.items():
        print(f"{name:<34}" + "".join(f"{row[c]:>22.3f}" for c in columns))


def write_json(path: str, payload: dict) -> None:
    payload = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        **payload,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(payload, handle, indent=2)
    os.replace(temporary, path)
