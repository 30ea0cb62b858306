"""Ends a job whose rank stopped making progress, naming the rank and its step.

A collective only times out where its backend enforces ``timeout_s``; a rank that is stopped
(``kill -STOP``), deadlocked or stuck in I/O can leave its peers blocked in places that do not
(TorchRec's all-to-all inside ``loss.backward()``, for one). :class:`Watchdog` is a daemon
thread per rank that

* every ``interval_s`` publishes a heartbeat to the job's rendezvous store: a counter, where
  this rank last made progress (``step N``, ``eval batch N``, ``checkpoint of step N``), its
  host and pid;
* reads every other rank's heartbeat and, on its own monotonic clock, when it last changed;
* when a rank's heartbeat has not changed for ``timeout_s`` (the rank's process is stopped,
  or gone), or no rank has made progress for ``timeout_s`` (a deadlock: the oldest progress
  is named; not while a rank is inside a checkpoint save, which may take long) — :meth:`start` sets that limit to ``train.timeout_s`` less two intervals, so it
  comes before a collective waiting for the silent rank times out — prints one error line naming the rank, its step and phase, kills that rank's
  process when it runs on this host (a stopped process does not act on the launcher's
  SIGTERM), and ends this process with exit code 3, so that torchrun ends the job or restarts
  it (``--max_restarts``) within ``timeout_s`` + ``interval_s`` + the launcher's own teardown.

The heartbeats travel through the store the process group was built on (under torchrun its
agent hosts it, so a stopped worker does not take the store with it). Long phases that make
no progress by design (a checkpoint save of a very large model) need ``timeout_s`` above
their duration.

Example::

    dog = Watchdog.start(timeout_s=120)      # after init_distributed; None in a world of one
    report(step, "step")                     # from any loop: the running watchdog hears it
    dog.stop()                               # tells the others this rank is done
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch.distributed as dist


_ACTIVE: Optional["Watchdog"] = None


def report(step: int, phase: str) -> None:
    """This rank made progress (a step, an evaluation batch, a checkpoint phase): tells the
    running watchdog, if any (a no-op otherwise)."""
    if _ACTIVE is not None:
        _ACTIVE.progress(step, phase)


def stop_point(where: str, step: int, rank: int) -> None:
    """Test hook: ``DLRM_MTL_TEST_STOP=WHERE:STEP:RANK`` stops this process with SIGSTOP (as
    ``kill -STOP`` would) at ``step`` (``eval``: evaluation batch; ``save``: inside a
    checkpoint save; ``step``: after an optimizer step), all of its threads with it."""
    spec = os.environ.get("DLRM_MTL_TEST_STOP")
    if not spec:
        return
    w, s, r = spec.split(":")
    if w == where and s in ("*", str(step)) and int(r) == rank:
        os.kill(os.getpid(), signal.SIGSTOP)


@dataclass
class Beat:
    """A rank's heartbeat as published: ``count`` grows every interval, ``progress`` every
    time the rank reports a step, evaluation batch or checkpoint phase."""

    count: int
    progress: int
    step: int
    phase: str
    host: str
    pid: int


class Watchdog:
    """See the module docstring. ``store``: the job's key-value store; ``on_silent(message)``
    is what happens when a rank is found silent (default: print, kill, exit 3)."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout_s: float, interval_s: float,
                 on_silent: Optional[Callable[[str, Optional[Beat]], None]] = None) -> None:
        self.store = store
        self.rank, self.world_size = rank, world_size
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self.on_silent = on_silent or self._end_job
        self._count = 0
        self._progress = 0
        self._step = 0
        self._phase = "setup"
        self._host = socket.gethostname()
        self._seen: Dict[int, tuple] = {}  # rank -> (beat, monotonic time it last changed, time progress last changed)
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one user of the store client at a time
        self._published = 0.0
        self._thread = threading.Thread(target=self._run, name=f"dlrm_mtl-watchdog-r{rank}", daemon=True)
        self.fired: Optional[str] = None

    @classmethod
    def start(cls, timeout_s: float, interval_s: float = 0.0) -> Optional["Watchdog"]:
        """A running watchdog over the default process group's store, or None in a world of one
        (nothing to wait for) or where the store is not reachable."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return None
        try:
            base = dist.distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError, ValueError):
            return None
        interval = interval_s or max(0.5, min(5.0, timeout_s / 4))
        # fire before a collective waiting for the silent rank times out (after timeout_s), so
        # the error names that rank instead of the collective that waited for it
        limit = max(interval, timeout_s - 2 * interval)
        dog = cls(dist.PrefixStore("dlrm_mtl/watchdog", base), dist.get_rank(), dist.get_world_size(), limit, interval)
        dog._publish()
        dog._thread.start()
        global _ACTIVE
        _ACTIVE = dog
        return dog

    def progress(self, step: int, phase: str) -> None:
        """Called by the loops: this rank made progress (a step, an evaluation batch, a save).
        A new phase, or the first report an interval after the last heartbeat, is published
        at once from the calling thread (unless the watchdog thread is using the store just
        then), so the heartbeat says where a rank stopped even within its first interval."""
        changed = phase != self._phase
        self._progress += 1
        self._step, self._phase = step, phase
        if (changed or time.monotonic() - self._published > self.interval_s) and self._lock.acquire(blocking=False):
            try:
                self._publish()
            except Exception:  # noqa: BLE001 - the thread reports a store that stopped answering
                pass
            finally:
                self._lock.release()

    def stop(self) -> None:
        """Stops the thread and publishes phase ``done``: the other ranks stop watching this one."""
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 5)
        self._phase = "done"
        try:
            self._publish()
        except Exception:  # noqa: BLE001 - the store may be gone at exit; nobody is left to tell
            pass

    # ------------------------------------------------------------------ the thread

    def _publish(self) -> None:
        self._published = time.monotonic()
        self._count += 1
        beat = Beat(self._count, self._progress, self._step, self._phase, self._host, os.getpid())
        self.store.set(f"rank{self.rank}", json.dumps(beat.__dict__))

    def _read(self, rank: int) -> Optional[Beat]:
        key = f"rank{rank}"
        if not self.store.check([key]):
            return None
        return Beat(**json.loads(self.store.get(key)))

    def check(self, now: float) -> Optional[str]:
        """Reads every rank's heartbeat; the message naming a silent rank, or None."""
        for r in range(self.world_size):
            beat = self._read(r) if r != self.rank else Beat(self._count, self._progress, self._step, self._phase, self._host, os.getpid())
            old = self._seen.get(r)
            if beat is None:
                if old is None:
                    self._seen[r] = (None, now, now)
                continue
            if old is None or old[0] is None:
                self._seen[r] = (beat, now, now)
            else:
                changed = now if beat.count != old[0].count else old[1]
                progressed = now if beat.progress != old[0].progress else old[2]
                self._seen[r] = (beat, changed, progressed)
        watched = {r: v for r, v in self._seen.items() if v[0] is None or v[0].phase != "done"}
        for r, (beat, changed, _) in sorted(watched.items()):
            if r != self.rank and now - changed > self.timeout_s:
                where = "never sent a heartbeat" if beat is None else f"its last heartbeat at {beat.phase} {beat.step}, {beat.host} pid {beat.pid}"
                return f"rank {r} has been silent for {now - changed:.0f}s (limit {self.timeout_s:g}s): {where}"
        saving = any(v[0] is not None and v[0].phase.startswith("checkpoint") for v in watched.values())
        # every rank inside a checkpoint save is writing, not stuck: a large save may take long
        # (a rank stopped inside one still goes silent above)
        if watched and not saving and all(now - p > self.timeout_s for _, _, p in watched.values()):
            r, (beat, _, p) = min(watched.items(), key=lambda kv: kv[1][2])
            at = "" if beat is None else f" at {beat.phase} {beat.step} ({beat.host} pid {beat.pid})"
            return (f"no rank has made progress for {now - p:.0f}s (limit {self.timeout_s:g}s); "
                    f"the longest stalled is rank {r}{at}")
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with self._lock:
                    self._publish()
                    message = self.check(time.monotonic())
            except Exception as e:  # noqa: BLE001 - the store is gone: so is the job's host
                message = f"the job's store stopped answering ({type(e).__name__}: {e})"
            if message is not None and not self._stop.is_set():
                self.fired = message
                silent = None
                for r, (beat, changed, _) in self._seen.items():
                    if r != self.rank and beat is not None and time.monotonic() - changed > self.timeout_s:
                        silent = beat
                self.on_silent(message, silent)
                return

    def _end_job(self, message: str, silent: Optional[Beat]) -> None:
        print(f"[dlrm_mtl] watchdog on rank {self.rank}: {message}; ending this rank so that the launcher "
              f"ends or restarts the job", file=sys.stderr, flush=True)
        if silent is not None and silent.host == self._host:
            try:  # a stopped process ignores SIGTERM until continued: the launcher would wait for it
                os.kill(silent.pid, signal.SIGKILL)
            except OSError:
                pass
        os._exit(3)
