"""Where a real ``dlrm-mtl train`` run's training time goes, by wall clock and by thread.

``dlrm-mtl train`` runs unchanged, with the loop of :func:`dlrm_mtl.train.run_epoch`
instrumented from outside:

* ``step``: the host's wall time inside each :func:`dlrm_mtl.train.train_step` (on a GPU, with
  no host synchronisation per step, this is the host's dispatch work; the device runs behind);
* ``read``: each ``next()`` on the reader's batch iterator (time the loop waited for input);
* ``gap``: everything else between them within an epoch — the batch's copy to the device, the
  lr schedule, log windows, checkpoints, the per-step bookkeeping (not what lies between one
  epoch's last event and the next epoch's first: partly outside the training clock);
* CPU seconds per thread over the training epochs (``/proc/self/task``, Linux), sampled every
  ``SAMPLE_EVERY`` steps and at each epoch's end, so reader threads that end with their epoch
  are counted; a GPU's backward runs on PyTorch's autograd device thread (``pt_autograd``);
* per epoch: its wall seconds, and on CUDA how long a ``synchronize`` at its end waited (how
  far the device ran behind the host: ~0 means the loop is bound by the host).

Prints one line ``TRACE_LOOP {json}`` at the end (``--json OUT`` writes it too)::

    .venv/bin/python tools/trace_loop.py [--json OUT] train --config configs/demo.yaml --set ...

docs/performance.md ("GPU", rounds eleven to thirteen) has an H100 run of it.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

SAMPLE_EVERY = 25  # steps between per-thread CPU samples


def thread_cpu_seconds() -> Dict[int, Tuple[str, float]]:
    """``{native thread id: (name, user + system CPU seconds)}`` of this process's live threads;
    the name is the Python thread's where there is one, else the OS thread's (``comm``)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: Dict[int, Tuple[str, float]] = {}
    task = Path("/proc/self/task")
    if not task.is_dir():
        return out
    for d in task.iterdir():
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            comm = (d / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        tid = int(d.name)
        out[tid] = (names.get(tid, comm), (int(fields[11]) + int(fields[12])) / tick)
    return out


class LoopTrace:
    """Wraps ``train_step``, ``_timed`` and ``run_epoch`` of a ``dlrm_mtl.train`` module."""

    def __init__(self, T: Any) -> None:
        self.events: List[Tuple[str, float, float]] = []
        self.epoch_s: List[float] = []
        self.lag_ms: List[float] = []
        self._base: Dict[int, Tuple[str, float]] = {}  # CPU at the epoch's start, per thread
        self._last: Dict[int, Tuple[str, float]] = {}  # the latest sample, per thread
        self.cpu: Dict[str, float] = {}
        self._epoch_first: set = set()  # index in events of each epoch's first event
        step, timed, epoch = T.train_step, T._timed, T.run_epoch
        trace = self

        def train_step(dmp, optimizer, batch):
            t = time.perf_counter()
            out = step(dmp, optimizer, batch)
            trace.events.append(("step", t, time.perf_counter()))
            if len(trace.events) % (2 * SAMPLE_EVERY) == 0:
                trace._sample()
            return out

        def _timed(batches, totals):
            inner = timed(batches, totals)
            while True:
                t = time.perf_counter()
                try:
                    b = next(inner)
                except StopIteration:
                    return
                trace.events.append(("read", t, time.perf_counter()))
                yield b

        def run_epoch(*args, **kwargs):
            trace._base = thread_cpu_seconds()
            trace._last = dict(trace._base)
            trace._epoch_first.add(len(trace.events))
            t0 = time.perf_counter()
            try:
                return epoch(*args, **kwargs)
            finally:
                trace.lag_ms.append(round(_synchronize() * 1e3, 3))
                trace.epoch_s.append(round(time.perf_counter() - t0, 4))
                trace._sample()
                for tid, (name, cpu) in trace._last.items():
                    key = name.rstrip("0123456789_-") or name
                    before = trace._base.get(tid, (name, 0.0))[1]
                    trace.cpu[key] = round(trace.cpu.get(key, 0.0) + cpu - before, 3)

        T.train_step, T._timed, T.run_epoch = train_step, _timed, run_epoch

    def _sample(self) -> None:
        self._last.update(thread_cpu_seconds())

    def result(self) -> Dict[str, Any]:
        steps = [e - s for k, s, e in self.events if k == "step"]
        reads = [e - s for k, s, e in self.events if k == "read"]
        # between two events of one epoch (what lies between epochs — the epoch's end, an
        # evaluation, a save — is outside the training clock)
        gaps = [self.events[i + 1][1] - self.events[i][2] for i in range(len(self.events) - 1)
                if i + 1 not in self._epoch_first]
        if not steps:
            return {"steps": 0}
        ordered = sorted(steps)
        return {
            "steps": len(steps),
            "step_median_ms": statistics.median(steps) * 1e3,
            "step_p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1e3,
            "first_step_ms": steps[0] * 1e3,
            "step_sum_s": sum(steps),
            "read_median_ms": statistics.median(reads) * 1e3 if reads else 0.0,
            "read_sum_s": sum(reads),
            "gap_sum_s": sum(gaps),
            "epoch_s": self.epoch_s,
            "lag_ms": self.lag_ms,
            "cpu_s_by_thread": {k: v for k, v in sorted(self.cpu.items(), key=lambda kv: -kv[1]) if v > 0},
        }


def _synchronize() -> float:
    """Seconds a CUDA synchronize waited (0 where no GPU is in use)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0.0
    t = time.perf_counter()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    out: Optional[str] = None
    if argv[:1] == ["--json"]:
        out, argv = argv[1], argv[2:]
    import dlrm_mtl.train as T
    from dlrm_mtl.cli import main as cli_main

    trace = LoopTrace(T)
    try:
        cli_main(argv)
    finally:
        res = trace.result()
        print("TRACE_LOOP " + json.dumps(res), flush=True)
        if out:
            Path(out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
