"""Two variants of dlrm_mtl's training step in one process, alternating step by step.

What is measured
----------------
A change to the step worth 1-5 % is below what two runs of ``tools/bench_peer.py`` can tell
apart on a small shared machine (one case moves by ±5-8 % between runs), and even rounds of
steps alternated in one process drift by ±2 % between rounds. This tool alternates the two
variants *step by step*: per case, one process builds side A exactly as ``bench_peer`` runs
it (``bench_step.a_config``: the arch fragment, the bench's overrides, :func:`setup_run`),
reads 12 full batches (over several epochs where the data set is small, as ``bench_step`` does), warms both variants up, then for ``--rounds`` rounds runs every batch
once under each variant (the order flips every round, and one unmeasured step follows each
switch) and times each training step (``zero_grad``, forward, ``backward``, ``step``). Printed
per case: the median step of each variant and ``gain = old / new − 1``, and the same at each
variant's 10th percentile (``gain_p10``): on a machine whose neighbours slow whole stretches of
steps (the medians' ``--null`` gain swung −7 … +14 % on one, docs/performance.md "Eighteenth
round"), the fastest steps are the ones they left alone.

A variant file defines ``patch(name)``, called with ``"old"`` or ``"new"`` before the steps of
that variant; it switches the code under test in place (a module attribute, a method). With
``--null`` both variants run the same code: its gain is this machine's resolution (measured
here: −0.25 … +0.1 % at 40 rounds). Correctness is not checked here: test it.

``--live EPOCHS``: the same two variants in the real loop instead of replayed batches — the
training stream's epochs of the ``--quick`` run (its reader cutting each batch between the
steps, as ``dlrm-mtl train`` runs them), each epoch under one variant, the order old, new,
new, old, ... after one unmeasured epoch per variant; ``EPOCHS`` measured epochs per variant.
Printed: each variant's median step and median epoch (reading included). Replayed steps run
with warmer caches than the loop's; a change that moves fewer bytes can gain more or less live.

Commands::

    .venv/bin/python tools/ab_step.py variant.py --cases census:shared_bottom,movielens:ple
    .venv/bin/python tools/ab_step.py --null --cases census:mmoe --rounds 40
    .venv/bin/python tools/ab_step.py variant.py --cases movielens:shared_bottom --live 7

Example variant (the single-id gather of ``RecordedLookup`` off / on)::

    from dlrm_mtl.models.recorded_lookup import RecordedLookup
    gather = RecordedLookup._single_hot
    def patch(name):
        RecordedLookup._single_hot = gather if name == "new" else (lambda self, ids, offsets: False)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import bench_peer as bp  # noqa: E402

MARK = "AB_STEP_RESULT "
BATCHES = 12


def load_variant(path: Optional[str]) -> Callable[[str], None]:
    """``patch(name)`` of the variant file, or a no-op (``--null``)."""
    if path is None:
        return lambda name: None
    spec = importlib.util.spec_from_file_location("ab_variant", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    patch = getattr(module, "patch", None)
    if not callable(patch):
        raise SystemExit(f"{path}: defines no patch(name) function")
    return patch


def quantile(xs: List[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (the sorted value at index ``q·(n − 1)``, no interpolation)."""
    ordered = sorted(xs)
    return ordered[int(q * (len(ordered) - 1))]


def child_main(args: argparse.Namespace) -> int:
    """One case in this process: prints one ``MARK`` JSON line."""
    import torch

    from bench_step import a_config, full_batches
    from dlrm_mtl.distributed import init_distributed, shutdown_distributed
    from dlrm_mtl.train import setup_run

    patch = load_variant(args.variant)
    shape, arch = args.child.split(":")
    size = bp.run_sizes(True)[shape]
    env = init_distributed("gloo", 120, bp.THREADS)
    try:
        run = setup_run(a_config(Path(args.data), arch, size, Path(tempfile.mkdtemp(prefix="ab_step_"))), env)
        torch.set_num_threads(bp.THREADS)
        if args.live:
            print(MARK + json.dumps(live_epochs(run, patch, args.live, args.child)), flush=True)
            return 0
        batches = full_batches(run.train_stream, BATCHES, size.batch_size)
        if not batches:
            raise SystemExit(f"{args.child}: no full batch of {size.batch_size} rows to time")

        def step(b: Any) -> None:
            run.optimizer.zero_grad()
            loss, _ = run.dmp(b)
            loss.backward()
            run.optimizer.step()

        for name in ("old", "new"):  # warm-up: each variant's first calls (recordings) off the clock
            patch(name)
            for b in batches:
                step(b)
        times: Dict[str, List[float]] = {"old": [], "new": []}
        for r in range(args.rounds):
            for name in (("old", "new") if r % 2 else ("new", "old")):
                patch(name)
                step(batches[r % len(batches)])  # one unmeasured step after the switch
                for b in batches:
                    t = time.perf_counter()
                    step(b)
                    times[name].append(time.perf_counter() - t)
        old, new = statistics.median(times["old"]), statistics.median(times["new"])
        old10, new10 = quantile(times["old"], 0.1), quantile(times["new"], 0.1)
        print(MARK + json.dumps({"case": args.child, "old_ms": old * 1e3, "new_ms": new * 1e3,
                                 "gain": old / new - 1.0, "old_p10_ms": old10 * 1e3, "new_p10_ms": new10 * 1e3,
                                 "gain_p10": old10 / new10 - 1.0, "steps": len(times["new"]), "batches": len(batches)}),
              flush=True)
    finally:
        shutdown_distributed()
    return 0


def live_epochs(run: Any, patch: Callable[[str], None], epochs: int, case: str) -> Dict[str, Any]:
    """``--live``: epochs of the real training stream, each under one variant (old, new, new,
    old, ... after one unmeasured epoch of each), every ``train_step`` and every epoch timed."""
    from dlrm_mtl.train import train_step

    run.train_stream.wait_read_ahead()
    run.eval_stream.wait_read_ahead()
    order = ["old", "new"] + [("new", "old")[(i // 2 + i) % 2] for i in range(2 * epochs)]
    steps: Dict[str, List[float]] = {"old": [], "new": []}
    wall: Dict[str, List[float]] = {"old": [], "new": []}
    for epoch, name in enumerate(order):
        patch(name)
        run.train_stream.set_epoch(epoch)
        it = iter(run.train_stream)
        mine: List[float] = []
        t_epoch = time.perf_counter()
        while True:
            b = next(it, None)
            if b is None:
                break
            t = time.perf_counter()
            train_step(run.dmp, run.optimizer, b)
            mine.append(time.perf_counter() - t)
        if epoch >= 2:  # each variant's first epoch (its recordings, first touches) off the clock
            steps[name].extend(mine[1:])  # the epoch's first step follows the switch
            wall[name].append(time.perf_counter() - t_epoch)
    old, new = statistics.median(steps["old"]), statistics.median(steps["new"])
    eo, en = statistics.median(wall["old"]), statistics.median(wall["new"])
    return {"case": case, "live": True, "old_ms": old * 1e3, "new_ms": new * 1e3, "gain": old / new - 1.0,
            "steps": len(steps["new"]), "epochs": len(wall["new"]), "old_epoch_ms": eo * 1e3, "new_epoch_ms": en * 1e3,
            "epoch_gain": eo / en - 1.0}


def run_case(case: str, data: Path, variant: Optional[str], rounds: int, live: int = 0) -> Dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case, "--data", str(data), "--rounds", str(rounds),
           "--live", str(live)]
    if variant is not None:
        cmd.append(str(Path(variant).resolve()))
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"{case}: no result (exit {out.returncode})\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variant", nargs="?", help="a Python file defining patch(name), name 'old' or 'new'")
    p.add_argument("--null", action="store_true", help="both variants the same code (the machine's resolution)")
    p.add_argument("--cases", default=None, help="e.g. census:mmoe,movielens:ple (default: all 6)")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--live", type=int, default=0, metavar="EPOCHS",
                   help="time the real loop instead: EPOCHS epochs per variant, alternating (see above)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--train-rows", type=int, default=None, help="override the train rows of every shape (eval: a quarter)")
    p.add_argument("--data-root", default=str(ROOT / "data" / "bench_peer"), help="cache of the generated data sets")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        return child_main(args)
    if (args.variant is None) == (not args.null):
        p.error("give a variant file, or --null")
    sizes = bp.run_sizes(True, args.train_rows)
    results = []
    for shape, arch in bp.parse_cases(args.cases):
        data = bp.ensure_data(Path(args.data_root), shape, sizes[shape])
        r = run_case(f"{shape}:{arch}", data, args.variant, args.rounds, args.live)
        results.append(r)
        line = (f"{r['case']:<24} old {r['old_ms']:7.3f} ms  new {r['new_ms']:7.3f} ms  gain {r['gain'] * 100:+6.2f} %"
                f"  ({r['steps']} steps each)")
        if "gain_p10" in r:
            line += f"  p10: old {r['old_p10_ms']:.3f}  new {r['new_p10_ms']:.3f}  gain {r['gain_p10'] * 100:+6.2f} %"

        if r.get("live"):
            line += (f"  live: epochs old {r['old_epoch_ms']:.1f} ms  new {r['new_epoch_ms']:.1f} ms"
                     f"  gain {r['epoch_gain'] * 100:+6.2f} %  ({r['epochs']} each)")
        print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"variant": args.variant, "rounds": args.rounds, "live": args.live,
                                               "cases": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
