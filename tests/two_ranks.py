"""Launching a script as two local ranks over gloo (the tests that train sharded)."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

ROOT = Path(__file__).resolve().parents[1]


def _ephemeral_range() -> range:
    """The ports the kernel hands out to outgoing connections (gloo's own among them)."""
    try:
        lo, hi = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return range(lo, hi + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def free_port_block(n: int) -> int:
    """A local port with ``n`` ports above it (one process group per run of a worker), all
    free now and all below the ephemeral range, where the kernel does not hand them to an
    outgoing connection (gloo's own, or another process's) between the runs: a block drawn
    inside that range, only its first port checked, once failed a later run's store with
    EADDRINUSE."""
    eph = _ephemeral_range()
    top = min(eph.start, 65000) - n - 1
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, top) if top > 10000 else rng.randrange(1024, 65000 - n)
        if port + n in eph or port in eph:
            continue
        try:
            for p in range(port, port + n + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port block")


def run_two_ranks(script: Path, args: Sequence[str], timeout: float = 900) -> List[str]:
    """Runs ``python script args...`` as ranks 0 and 1 (torchrun's environment variables,
    ``MASTER_PORT`` left to the script) and returns both outputs; a failed rank fails the
    calling test with the tail of its output."""
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs
