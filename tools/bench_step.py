"""dlrm_mtl's training step next to the peer's, in one process, interleaved.

What is measured
----------------
``tools/bench_peer.py`` times whole runs, each side in its own process. On a small shared
machine two processes of the same code differ by 25-45 % in speed (a process-wide state: the
cores' neighbours, caches, clocks), which at ``--quick`` size is more than most changes to the
step. This tool removes that noise from the step itself: per case, one process builds

* **A**: dlrm_mtl's training module exactly as ``dlrm-mtl train`` builds it for side A of
  ``bench_peer`` (the same config: the arch fragment, the bench's overrides and tuned rate,
  :func:`dlrm_mtl.train.setup_run`: DMP, the local lookup, fused table optimizers, Adam), fed
  20 batches read by its own ``ParquetStream``;
* **peer**: ``bench_peer``'s straightforward model (``build_peer_model``, Adam on every
  parameter, ``peer_loss``), fed 20 batches of the same size gathered from the split in memory;

warms both up (10 steps each), then alternates rounds of ``--steps`` steps of A and of the
peer (the order flips every round), ``--rounds`` times, on ``torch.set_num_threads(2)``.
A's step is :func:`dlrm_mtl.train.train_step`'s four calls (``zero_grad``, forward,
``backward``, ``step``) plus the scheduler's step, each timed; the peer's is its loop body
(gather already done, as its batches are in memory: feature lookup and forward, ``zero_grad``
and ``backward``, ``step``). Printed per case: the median step (ms) of each side, the phases,
``ratio = peer ms / A ms`` (above 1: dlrm_mtl's step is faster) and the range of per-round
ratios. What it leaves out on purpose: reading and batch building, the loop around the step,
start-up, evaluation (``bench_peer`` measures those, with the process noise).

Commands::

    .venv/bin/python tools/bench_step.py                       # all 6 cases, ≈ 2 min
    .venv/bin/python tools/bench_step.py --cases movielens:ple --rounds 20 --json /tmp/step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import bench_peer as bp  # noqa: E402

MARK = "BENCH_STEP_RESULT "
BATCHES = 20
WARMUP = 10


def a_config(data: Path, arch: str, size: bp.RunSize, run_dir: Path) -> Any:
    """Side A's config, from the very command ``bench_peer`` runs (its ``--config`` files and
    ``--set`` overrides), with checkpoints and TensorBoard kept in ``run_dir``."""
    from dlrm_mtl.config import Config

    cmd = bp.side_a_command(data, arch, size, run_dir, bp.concat_supported())
    configs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--config"]
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    return Config.load(configs, sets)


def full_batches(stream: Any, n: int, batch_size: int) -> List[Any]:
    """``n`` full batches of ``stream`` (a run's training stream), read over as many epochs as
    a small data set needs (each epoch's reader stops once its batches are taken)."""
    import itertools

    batches: List[Any] = []
    for epoch in range(n):
        stream.set_epoch(epoch)
        it = iter(stream)
        batches += [b for b in itertools.islice(it, n - len(batches)) if b.batch_size == batch_size]
        it.close()
        if len(batches) == n:
            break
    return batches


def _timed(phases: Dict[str, List[float]], name: str, fn: Callable[[], Any]) -> Any:
    t = time.perf_counter()
    out = fn()
    phases.setdefault(name, []).append(time.perf_counter() - t)
    return out


def child_main(args: argparse.Namespace) -> int:
    """One case in this process: prints one ``MARK`` JSON line."""
    import numpy as np
    import torch

    from dlrm_mtl.distributed import init_distributed, shutdown_distributed
    from dlrm_mtl.train import setup_run

    shape, arch = args.child.split(":")
    size = bp.run_sizes(args.quick)[shape]
    data = Path(args.data)
    with tempfile.TemporaryDirectory(prefix="bench_step-") as tmp:
        cfg = a_config(data, arch, size, Path(tmp))
        env = init_distributed("gloo", 120, bp.THREADS)
        try:
            run = setup_run(cfg, env)
            a_batches = full_batches(run.train_stream, BATCHES, size.batch_size)
            torch.manual_seed(bp.SEED)
            schema = run.schema
            model = bp.build_peer_model(schema, arch)
            opt = torch.optim.Adam(model.parameters(), lr=size.peer_lr)
            split = bp.load_split(schema, data / "train")
            rng = np.random.default_rng(bp.SEED)
            p_batches = [bp.peer_batches(split, rng.permutation(split.rows)[: size.batch_size]) for _ in range(BATCHES)]
            torch.set_num_threads(bp.THREADS)
            phases: Dict[str, Dict[str, List[float]]] = {"A": {}, "peer": {}}
            losses: Dict[str, List[float]] = {"A": [], "peer": []}

            def step_a(i: int, ph: Dict[str, List[float]]) -> None:
                batch = a_batches[i % len(a_batches)]
                _timed(ph, "zero_grad", run.optimizer.zero_grad)
                loss, _ = _timed(ph, "forward", lambda: run.dmp(batch))
                _timed(ph, "backward", loss.backward)
                _timed(ph, "step", lambda: (run.optimizer.step(), run.scheduler.step()))
                losses["A"].append(float(loss.detach()))

            def step_peer(i: int, ph: Dict[str, List[float]]) -> None:
                ids, bags, dense, scen, y = p_batches[i % len(p_batches)]
                total = _timed(ph, "forward", lambda: bp.peer_loss(schema, model(model.features(ids, bags, dense, scen)), y))
                _timed(ph, "zero_grad", opt.zero_grad)
                _timed(ph, "backward", total.backward)
                _timed(ph, "step", opt.step)
                losses["peer"].append(float(total.detach()))

            sides = {"A": step_a, "peer": step_peer}
            for i in range(WARMUP):
                for fn in sides.values():
                    fn(i, {})
            steps: Dict[str, List[float]] = {"A": [], "peer": []}
            round_ratio: List[float] = []
            k = 0
            for r in range(args.rounds):
                order = ["A", "peer"] if r % 2 == 0 else ["peer", "A"]
                med: Dict[str, float] = {}
                for name in order:
                    ts = []
                    for _ in range(args.steps):
                        t = time.perf_counter()
                        sides[name](k, phases[name])
                        ts.append(time.perf_counter() - t)
                        k += 1
                    steps[name] += ts
                    med[name] = statistics.median(ts)
                round_ratio.append(med["peer"] / med["A"])
        finally:
            shutdown_distributed()
    ms = {name: statistics.median(v) * 1e3 for name, v in steps.items()}
    result = {
        "shape": shape, "arch": arch, "batch_size": size.batch_size, "threads": bp.THREADS,
        "rounds": args.rounds, "steps_per_round": args.steps,
        "a_ms": ms["A"], "peer_ms": ms["peer"], "ratio": ms["peer"] / ms["A"],
        "round_ratios": round_ratio, "steps_timed": {n: len(v) for n, v in steps.items()},
        "phases_ms": {n: {p: statistics.median(v) * 1e3 for p, v in ph.items()} for n, ph in phases.items()},
        "loss": {n: [v[0], v[-1]] for n, v in losses.items()},
    }
    print(MARK + json.dumps(result), flush=True)
    return 0


def run_case(case: str, data: Path, args: argparse.Namespace) -> Dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case, "--data", str(data),
           "--rounds", str(args.rounds), "--steps", str(args.steps)] + (["--quick"] if args.quick else [])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith(MARK)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"bench_step {case} failed with exit code {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[len(MARK):])


def format_case(r: Dict[str, Any]) -> str:
    pa, pp = r["phases_ms"]["A"], r["phases_ms"]["peer"]
    phase = lambda p: "  ".join(f"{k} {p[k]:.2f}" for k in ("forward", "backward", "step", "zero_grad") if k in p)  # noqa: E731
    return (f"{r['shape'] + ':' + r['arch']:24s} A {r['a_ms']:6.2f} ms  peer {r['peer_ms']:6.2f} ms  "
            f"ratio {r['ratio']:.2f} [{min(r['round_ratios']):.2f}-{max(r['round_ratios']):.2f}]\n"
            f"{'':24s}   A:    {phase(pa)}\n{'':24s}   peer: {phase(pp)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=None, help="e.g. census:mmoe,movielens:ple (default: all 6)")
    p.add_argument("--quick", action="store_true", help="bench_peer's --quick sizes (its data and tuned rates)")
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds per side (default 10)")
    p.add_argument("--steps", type=int, default=10, help="steps per side and round (default 10)")
    p.add_argument("--train-rows", type=int, default=None, help="override the train rows of every shape (eval: a quarter)")
    p.add_argument("--data-root", default=str(ROOT / "data" / "bench_peer"), help="cache of the generated data sets")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be >= 1")
    if args.child:
        return child_main(args)
    t0 = time.perf_counter()
    sizes = bp.run_sizes(args.quick, args.train_rows)
    results = []
    for shape, arch in bp.parse_cases(args.cases):
        data = bp.ensure_data(Path(args.data_root), shape, sizes[shape])
        results.append(run_case(f"{shape}:{arch}", data, args))
        print(format_case(results[-1]), flush=True)
    print(f"\n{len(results)} case(s), {args.rounds} rounds x {args.steps} steps per side, in {time.perf_counter() - t0:.0f}s "
          f"(ratio = peer ms / A ms: above 1, dlrm_mtl's step is faster)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": args.rounds, "steps": args.steps, "quick": args.quick, "cases": results}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
