"""init_distributed / shutdown_distributed outside torchrun."""

from __future__ import annotations


def test_standalone_process_group_leaves_no_rendezvous_variables(monkeypatch):
    """A world of one set up by init_distributed removes the variables it set, so a later run
    or a child process does not inherit a stale MASTER_PORT/RANK (EADDRINUSE)."""
    import os

    from dlrm_mtl.distributed import init_distributed, shutdown_distributed

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # set by the user: must survive
    env = init_distributed("gloo", 30)
    assert env.world_size == 1 and os.environ["RANK"] == "0"
    shutdown_distributed()
    assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"
    env = init_distributed("gloo", 30)  # and a second standalone run works
    shutdown_distributed()


def test_default_threads_share_the_cores_this_process_may_use():
    """``train.threads_per_rank=0``: the cores of the process's CPU affinity (a container's
    cpuset, ``taskset``), not the machine's count — a rank pinned to one core runs one
    intra-op thread, not a team that time-slices every parallel region."""
    import os
    import subprocess
    import sys

    import pytest

    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        pytest.skip("needs CPU affinity and two cores")
    code = ("import os, torch\nfrom dlrm_mtl.distributed import init_distributed, shutdown_distributed, usable_cores\n"
            "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
            "env = init_distributed('gloo', 30, 0)\nprint('THREADS', usable_cores(), torch.get_num_threads())\n"
            "shutdown_distributed()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "THREADS 1 1" in out.stdout, out.stdout
