"""Independent test runs as processes side by side (the suite's learning tests train several
models one after another on a machine with cores to spare)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence


def run_side_by_side(cmds: Sequence[List[str]], logs: Sequence[Path], cwd: Path, timeout: float,
                     env: Optional[Dict[str, str]] = None) -> None:
    """Starts every command at once, each writing to its log file (not a pipe: a process that
    filled one while the caller waited on another would stall), and asserts each exits 0,
    showing the tail of its log otherwise."""
    procs = []
    for cmd, log in zip(cmds, logs):
        with log.open("w") as f:  # the process writes to its own copy of the file
            procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT))
    for proc, log in zip(procs, logs):
        proc.wait(timeout=timeout)
        assert proc.returncode == 0, log.read_text()[-6000:]
