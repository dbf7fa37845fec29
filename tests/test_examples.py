"""examples/finetune.py on 2 CPU processes: launched with torchrun several times it exits cleanly every time
(it aborted at exit with SIGABRT about once in five launches), because every rank tears the process group
down before the interpreter finalizes; and it shows Trainer's progress bar."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from conftest import spawn_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
LAUNCHES = 3


def test_finetune_under_torchrun_exits_cleanly_every_time(tmp_path):
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    for launch in range(LAUNCHES):
        done = subprocess.run(
            # --standalone: a free port, not torchrun's default 29500 that another job may hold
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             os.path.join(EXAMPLES, "finetune.py"), "--fsdp", "--steps", "1", "--out", str(tmp_path / f"launch-{launch}")],
            capture_output=True, text=True, env=environment, timeout=300)
        output = done.stdout + done.stderr
        assert done.returncode == 0 and "terminate called" not in output, f"launch {launch}:\n{output[-3000:]}"
        assert "identical on all 2 ranks: True" in done.stdout
        assert "1/1 [" in done.stderr  # Trainer's progress bar


def gloo_threads() -> list[str]:
    """This process's threads that gloo started (its process groups' workers and transport loops)."""
    names = (open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task"))
    return [name for name in names if "gloo" in name]


def _finetune_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    sys.path.insert(0, EXAMPLES)
    import finetune

    end_process_group, left_running = finetune.end_process_group, []

    def end_and_look():
        end_process_group()
        left_running.extend(gloo_threads())

    finetune.end_process_group = end_and_look
    sys.argv = ["finetune.py", "--fsdp", "--steps", "1", "--out", out]
    finetune.main()
    assert not dist.is_initialized() and not left_running, f"rank {rank}: {left_running} still running"


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="threads are listed from Linux's /proc")
def test_finetune_ends_its_process_group_and_threads_on_every_rank(tmp_path):
    """The deterministic half of the above: once finetune.py has ended its process group, no rank runs any
    of gloo's threads (kept alive by DDP's reference, they were joined later by a destructor holding the
    GIL, or not before the interpreter finalized)."""
    spawn_ranks(_finetune_rank, 2, str(tmp_path))


def test_finetune_qlora_lowers_the_loss(tmp_path):
    """``finetune.py --qlora``: LoRA on the tiny model's bitsandbytes nf4 base, end to end (skipped without
    bitsandbytes)."""
    pytest.importorskip("bitsandbytes")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, os.path.join(EXAMPLES, "finetune.py"), "--qlora", "--steps", "20",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = {line.split()[0]: float(line.split()[2]) for line in done.stdout.splitlines() if line.startswith(("first log", "last log"))}
    assert losses["last"] < losses["first"] - 0.5, done.stdout
    assert os.path.isfile(tmp_path / "final" / "adapter_model.safetensors")  # the adapters, not a 4-bit model
