"""Launching a script as two local ranks over gloo (the tests that train sharded)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

ROOT = Path(__file__).resolve().parents[1]


def free_port_block(n: int) -> int:
    """A free local port with ``n`` ports above it (one process group per run of a worker)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + n < 65000:
            return port
    raise RuntimeError("no free port")


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
