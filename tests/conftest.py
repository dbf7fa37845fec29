"""Shared fixtures: tiny checkpoints in DeepSeek's official layout, written by the tests themselves."""

from __future__ import annotations

import os
import subprocess
import sys

# transformers >= 5.25 kernelizes its own models at from_pretrained with layers fetched from the Hub (and refuses
# to load them without the `kernels` package): the native references load as they are, offline, like ours. Set
# before transformers is imported, whenever a release reads it.
os.environ["USE_HUB_KERNELS"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

from modeling_deepseek_moe.synthetic import random_official_state, tiny_official_config, write_official_checkpoint  # noqa: E402


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


_RSS_MB = """
import ctypes, gc
def rss_mb():
    gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as handle:
        return int(next(line for line in handle if line.startswith("VmRSS")).split()[1]) / 1024
"""


def rss_growth_mb(script: str, warm: range, measured: range) -> float:
    """In a fresh process: ``script`` (defines ``step(n)``), ``step`` over ``warm``, then the RSS growth in
    MB (glibc's free pages returned first) over ``step`` for each of ``measured``."""
    code = (f"{_RSS_MB}\n{script}\nfor n in {warm!r}:\n    step(n)\nbefore = rss_mb()\n"
            f"for n in {measured!r}:\n    step(n)\nprint(rss_mb() - before)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def official_checkpoint(tmp_path):
    """``make(family, edit_state=None, **config_overrides) -> (directory, official config dict, state)``;
    ``edit_state(state)`` may change the random tensors before they are written."""
    counter = iter(range(1000))

    def make(family: str, seed: int = 0, num_shards: int = 2, edit_state=None, **overrides):
        config = tiny_official_config(family, **overrides)
        state = random_official_state(config, seed=seed)
        if edit_state is not None:
            edit_state(state)
        directory = tmp_path / f"official-{family}-{next(counter)}"
        write_official_checkpoint(directory, config, state=state, num_shards=num_shards)
        return directory, config, state

    return make


def spawn_ranks(function, world: int, *args) -> None:
    """Run ``function(rank, world, port, *args)`` in ``world`` fresh processes (gloo on this CPU)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(function, args=(world, port, *args), nprocs=world, join=True, start_method="spawn")
