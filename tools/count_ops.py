"""Operators and host synchronisations per training step: a launch-overhead measure that
needs neither a quiet clock nor a GPU.

What is counted
---------------
The real training loop (:func:`dlrm_mtl.train.run_epoch`, a world of one over gloo: DMP,
fused tables, loss, optimizer, lr schedule, log windows) runs on small synthetic data under a
``TorchDispatchMode`` that counts every operator dispatched on the training thread, per loop
iteration (``on_step_end`` marks the boundaries). On a GPU each of these is a kernel launch
(or a CPU-side op between launches), so fewer operators is what makes a GPU step cheap.

A *host synchronisation* is an operation whose result the host must wait for: reading a
tensor's value (``aten::_local_scalar_dense``: ``.item()``, ``int(t)``, ``float(t)``,
``bool(t)``), an operator whose output shape depends on the data (``nonzero``,
``masked_select``, ``unique``, boolean-mask indexing, ``repeat_interleave`` without
``output_size``, ...), and ``Tensor.tolist()`` / ``Tensor.numpy()`` (not dispatched; counted by
wrapping them while counting). On CPU every one of these is cheap; on a GPU each one stalls the
host until the device catches up.

The reader threads that decode Parquet into batches run outside the dispatch mode (they are
not on the step's critical path and launch nothing on a GPU); ops of the batch's copy to the
device are counted (none on CPU).

Cases: the default config (``configs/demo.yaml``: scenario CGC per level + CGC task layer)
and each ``configs/arch/*.yaml`` fragment on top of it. Per case: operators of a median
non-logging step, of a logging step, host syncs of both, the training thread's minor page
faults per non-logging step (fresh pages the kernel had to zero: ``train.keep_host_memory``
keeps them at 0), and the most frequent operators.

Example::

    .venv/bin/python tools/count_ops.py                       # every case, table
    .venv/bin/python tools/count_ops.py --cases default,mmoe --top 15
    .venv/bin/python tools/count_ops.py --json ops.json
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import statistics
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Counter, Dict, Iterator, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
aten = torch.ops.aten

# operators that make the host wait for the device: a value read, or an output whose shape
# depends on the data
SYNC_OPS = {
    aten._local_scalar_dense, aten.nonzero, aten.nonzero_static, aten.masked_select, aten.unique_dim,
    aten._unique, aten._unique2, aten.unique_consecutive, aten.unique_dim_consecutive, aten.equal,
    aten.is_nonzero, aten.argwhere, aten.bincount, aten.histc,
}


@dataclass
class StepCount:
    ops: int = 0
    syncs: int = 0
    host_reads: int = 0  # reads of host-resident tensors (not synchronisations)
    page_faults: int = 0  # minor page faults of the training thread (fresh pages the kernel zeroed)
    by_op: Counter[str] = field(default_factory=collections.Counter)
    sync_by_op: Counter[str] = field(default_factory=collections.Counter)


class OpCounter(TorchDispatchMode):
    """Counts the operators dispatched while active (on this thread and the autograd engine's
    work for it) into ``self.current``; :meth:`cut` closes one step's count.

    Example::

        with OpCounter() as c:
            (torch.randn(3) * 2).sum().item()
        c.current.ops, c.current.syncs   # 4 ops (randn, mul, sum, _local_scalar_dense), 1 sync
    """

    def __init__(self, host_resident: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()
        self.current = StepCount()
        self.steps: List[StepCount] = []
        # tensors that live on the host by design (fbgemm's per-table iteration counter
        # ``iter_cpu``): reading them never waits for a device
        self.host_ptrs = {t.data_ptr() for t in host_resident}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.current.ops += 1
        self.current.by_op[str(func.overloadpacket.__name__)] += 1
        if self._is_sync(func, args, kwargs or {}):
            if func.overloadpacket is aten._local_scalar_dense and args[0].data_ptr() in self.host_ptrs:
                self.current.host_reads += 1
            else:
                self.note_sync(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _is_sync(func, args, kwargs) -> bool:
        packet = func.overloadpacket
        if packet in SYNC_OPS:
            return True
        if packet is aten.repeat_interleave:  # a tensor of repeats without output_size: sum read on the host
            return func._overloadname != "self_int" and kwargs.get("output_size") is None
        if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or [])
        return False

    def note_sync(self, what: str) -> None:
        self.current.syncs += 1
        self.current.sync_by_op[what] += 1

    def cut(self) -> StepCount:
        done, self.current = self.current, StepCount()
        self.steps.append(done)
        return done


@contextmanager
def counting_host_reads(counter: OpCounter) -> Iterator[None]:
    """``Tensor.tolist`` and ``Tensor.numpy`` are not dispatched: wrap them to count them."""
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(self: torch.Tensor, *a: Any, **k: Any) -> Any:
            counter.note_sync(name)
            return fn(self, *a, **k)

        return counted

    try:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def host_counters(module: torch.nn.Module) -> List[torch.Tensor]:
    """fbgemm's ``iter_cpu`` counters under ``module``. TorchRec's sharded modules keep their
    lookups in plain lists (invisible to ``named_modules``), so this walks those too."""
    out, stack, seen = [], [module], set()
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        t = getattr(m, "iter_cpu", None)
        if isinstance(t, torch.Tensor):
            out.append(t)
        stack.extend(c for c in m._modules.values() if c is not None)
        for v in vars(m).values():
            if isinstance(v, list):
                stack.extend(c for c in v if isinstance(c, torch.nn.Module))
    return out


@dataclass
class CaseResult:
    case: str
    ops_per_step: float  # median over non-logging steps
    syncs_per_step: float  # max over non-logging steps
    ops_logging_step: float
    syncs_logging_step: float
    page_faults_per_step: float  # median over non-logging steps, training thread
    steps_counted: int
    top_ops: List[List[Any]]
    sync_ops: Dict[str, int]


def fragments() -> Dict[str, List[str]]:
    """case name -> config files (the default config, then the arch fragment)."""
    out = {"default": [str(ROOT / "configs/demo.yaml")]}
    for f in sorted((ROOT / "configs/arch").glob("*.yaml")):
        out[f.stem] = [str(ROOT / "configs/demo.yaml"), str(f)]
    return out


def ensure_data(root: Path, rows: int) -> Path:
    from dlrm_mtl.synthetic import generate

    data = root / f"synthetic-{rows}"
    if not (data / "schema.yaml").exists():
        generate(data, rows=rows, seed=0)
    return data


def _thread_faults() -> int:
    """Minor page faults of the calling thread so far (Linux; 0 elsewhere)."""
    who = getattr(resource, "RUSAGE_THREAD", None)
    return resource.getrusage(who).ru_minflt if who is not None else 0


def count_case(name: str, configs: Sequence[str], data: Path, run_dir: Path, steps: int, log_every: int,
               overrides: Sequence[str] = ()) -> CaseResult:
    """Runs ``steps`` iterations of the real loop on a world of one and counts each one."""
    from dlrm_mtl.config import Config
    from dlrm_mtl.distributed import init_distributed, shutdown_distributed
    from dlrm_mtl.train import Totals, setup_run, run_epoch

    cfg = Config.load(list(configs), [
        f"data.train={data}/train", f"data.eval={data}/eval", f"train.run_dir={run_dir}", "train.epochs=1",
        f"train.max_steps={steps}", f"train.log_every={log_every}", "train.progress=false", "checkpoint.at_end=false", "checkpoint.keep_best=false",
        "train.threads_per_rank=1", *overrides,
    ])
    env = init_distributed("gloo", 120, cfg.train.threads_per_rank)
    logged_at: Dict[int, bool] = {}
    try:
        run = setup_run(cfg, env)
        counter = OpCounter(host_resident=host_counters(run.dmp))
        faults = [_thread_faults()]

        def on_step_end(step: int, logged: bool) -> None:
            counter.cut().page_faults = _thread_faults() - faults[0]
            faults[0] = _thread_faults()
            logged_at[len(counter.steps) - 1] = logged

        with counter, counting_host_reads(counter):
            run_epoch(run, 0, Totals(), on_step_end=on_step_end)
        if run.writer is not None:
            run.writer.close()
    finally:
        shutdown_distributed()
    warm = 2  # the first iterations start the reader and build lazy state
    plain = [s for i, s in enumerate(counter.steps) if i >= warm and not logged_at[i]]
    logged = [s for i, s in enumerate(counter.steps) if i >= warm and logged_at[i]]
    if not plain or not logged:
        raise RuntimeError(f"{name}: need both plain and logging steps after warm-up (steps={steps}, log_every={log_every})")
    median = sorted(plain, key=lambda s: s.ops)[len(plain) // 2]
    syncs = collections.Counter()
    for s in plain:
        syncs.update(s.sync_by_op)
    return CaseResult(
        case=name,
        ops_per_step=statistics.median(s.ops for s in plain),
        syncs_per_step=max(s.syncs for s in plain),
        ops_logging_step=statistics.median(s.ops for s in logged),
        syncs_logging_step=statistics.median(s.syncs for s in logged),
        page_faults_per_step=statistics.median(s.page_faults for s in plain),
        steps_counted=len(plain) + len(logged),
        top_ops=[[k, v] for k, v in median.by_op.most_common(25)],
        sync_ops=dict(syncs),
    )


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="", help="comma-separated: default and/or configs/arch fragment names (default: all)")
    p.add_argument("--rows", type=int, default=40_000, help="synthetic rows generated (cached under --work)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--top", type=int, default=0, help="print the N most frequent operators of a plain step per case")
    p.add_argument("--set", action="append", default=[], help="extra config override (key=value), every case")
    p.add_argument("--work", default=str(ROOT / "data" / "count_ops"))
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    from dlrm_mtl.cli import quiet_third_party_logs

    quiet_third_party_logs()
    cases = fragments()
    chosen = [c for c in args.cases.split(",") if c] or list(cases)
    unknown = sorted(set(chosen) - set(cases))
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {sorted(cases)}")
    work = Path(args.work)
    data = ensure_data(work, args.rows)
    results: List[CaseResult] = []
    print(f"{'case':<15} {'ops/step':>9} {'syncs/step':>10} {'ops (log step)':>15} {'syncs (log step)':>17} {'page faults/step':>17}")
    for name in chosen:
        with tempfile.TemporaryDirectory() as run_dir:
            r = count_case(name, cases[name], data, Path(run_dir), args.steps, args.log_every, args.set)
        results.append(r)
        print(f"{r.case:<15} {r.ops_per_step:>9.0f} {r.syncs_per_step:>10.0f} {r.ops_logging_step:>15.0f} {r.syncs_logging_step:>17.0f} {r.page_faults_per_step:>17.0f}"
              + (f"   syncs: {r.sync_ops}" if r.sync_ops else ""), flush=True)
        if args.top:
            for op, n in r.top_ops[: args.top]:
                print(f"    {n:>5}  {op}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cases": [r.__dict__ for r in results]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
