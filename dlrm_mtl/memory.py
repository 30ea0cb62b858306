"""How much memory this process may still allocate (export's size check, the reader's cache)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def available_memory_bytes() -> Optional[int]:
    """Memory this process may still allocate: psutil's ``available`` where psutil is
    installed, else ``MemAvailable`` of /proc/meminfo, capped by a cgroup v2 limit
    (``memory.max - memory.current``); None where neither is known."""
    avail: Optional[int] = None
    try:
        import psutil  # type: ignore[import-not-found]

        avail = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
        except OSError:
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    return avail
