"""The host allocator's policy for freed memory: keep it in the process.

A training step on the CPU allocates and frees the same large temporaries every step
(activations and their gradients: ``[B, h]`` float tensors of 0.25-16 MiB). glibc's ``malloc``
serves blocks above its mmap threshold (128 KiB at start, raised adaptively up to 32 MiB) with
fresh ``mmap`` calls and hands free memory at the top of the heap back to the kernel above its
trim threshold, so the next step's tensors land on pages the kernel must fault in and zero
again: ~1,250-1,700 minor page faults per step on the MovieLens-shaped benchmark
(``tools/count_ops.py`` counts them; docs/performance.md). Raising both thresholds once makes
the step reuse the pages it freed: 0 faults per step after the first.

The cost is that memory freed during training is kept by the process (its peak resident size
is not returned to the kernel until exit), which is what a training process wants anyway.
Other C libraries (musl) and other systems are left alone.

``arenas=1`` also makes threads allocate from one arena (those that start allocating after it,
see below). glibc gives each thread that
allocates its own arena (up to 8 per core), and memory freed into one arena serves only the
threads of that arena: the first epoch's shuffle buffer, built on the reader's preparing
thread, is freed into that thread's arena, and the training thread's next buffer lands on
fresh pages again (on the census-shaped ``tools/bench_peer.py`` run: 420 faults and 20-25 ms
at the second epoch's start on a VM whose first touch of a page is slow, against 5 ms for the
third). With one arena the threads reuse each other's freed memory; the price is a lock shared
by threads that allocate at once, which the CPU training loop (one thread computing, the
reader's few large allocations per row group or buffer) did not show in its timings — on two
cores; a many-core CPU rank whose intra-op threads allocate large blocks at once was not
measured (glibc's per-thread cache still serves small blocks without the lock).
glibc applies the arena limit to threads that allocate for the first time after it is set:
in a training process the process group's threads (gloo) and the intra-op pool's worker
already have arenas of their own by then (three arenas in a world-of-one CPU run), so it
covers the threads that start later — the reader's — which share the existing arenas. One
arena for every thread from the process start (``GLIBC_TUNABLES=glibc.malloc.arena_max=1``)
cut the minor page faults of a MovieLens step from ~38 to ~5 but measured no faster end to
end (census: reading +30 %, steps −2 %; docs/performance.md, "Seventeenth round").

:func:`arrow_on_system_allocator` puts pyarrow's buffers (the decoded row groups) on the same
``malloc``: pyarrow's own allocator (mimalloc or jemalloc) keeps the pages of the tables the
reader frees after converting them to numpy, so the first epoch's shuffle buffer, built right
after, lands on fresh pages; on the system allocator, with one arena, it reuses them (census
``--quick``: the first epoch's shuffle 9-33 ms → 6-21 ms, docs/performance.md).

Example::

    from dlrm_mtl.host_memory import keep_freed_memory
    keep_freed_memory()   # True on glibc
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# glibc's ceiling for the mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30


def _glibc() -> "ctypes.CDLL | None":
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it (and mallopt's parameters above)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD, arenas: int = 0) -> bool:
    """Serve blocks below ``mmap_threshold`` bytes from the heap and keep up to
    ``trim_threshold`` bytes of free heap in the process (glibc ``mallopt``); with ``arenas``
    > 0, at most that many malloc arenas for the threads that allocate from now on (1: every
    thread's freed memory reusable by every other; 0 leaves glibc's default). Returns whether
    the settings took effect (False: not glibc, or glibc refused a value)."""
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
    if arenas > 0:
        ok = bool(libc.mallopt(_M_ARENA_MAX, int(arenas))) and ok
    return ok


def arrow_on_system_allocator() -> bool:
    """pyarrow's default memory pool set to the system allocator (``malloc``) instead of its
    bundled one, for the allocations made from now on. Returns whether the pool is the
    system's afterwards."""
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())
    return pa.default_memory_pool().backend_name == "system"
