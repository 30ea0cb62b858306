"""Training throughput at world size 1 and 2 on the same data and global batch.

    .venv/bin/python tools/bench_scale.py [--rows 200000] [--global-batch 4096] [--steps 30]

For each world size W the script launches ``torchrun --nproc_per_node W`` on itself
(``--worker``): every rank loads its own shard of the same data set into memory (so reading
is not measured), builds the real training path (DMP, planner, fused tables, dense DDP) with
a per-rank batch of ``global_batch / W``, runs warm-up steps, then times ``--steps`` steps and
profiles a few more with ``torch.profiler`` to split rank 0's step time into

* embedding: fbgemm/TBE lookup and update kernels,
* communication: gloo/NCCL collectives (input and output all-to-all, DDP all-reduce, ...),
* dense and other: everything else (dense forward/backward, optimizer, framework overhead).

The split counts the main thread's own CPU time per operator (profiler "self" time): with
gloo, collectives run in gloo's threads, so "communication" is the time the step spends
issuing and waiting for them, not the time on the wire.

It prints samples/s per world size, the scaling ratio (W=2 over W=1; the ideal on 2 CPU
cores is below 2 because both ranks share the same 2 cores: each rank gets 1 thread), and
the split. All numbers come from one invocation, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMM_KEYS = ("all_to_all", "alltoall", "allreduce", "all_reduce", "allgather", "all_gather", "reduce_scatter", "broadcast", "gloo", "nccl", "c10d::")
EMB_KEYS = ("fbgemm", "embedding", "tbe", "split_embedding")


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from dlrm_mtl.cli import quiet_third_party_logs

    quiet_third_party_logs()
    from dlrm_mtl.config import Config
    from dlrm_mtl.data import ParquetStream
    from dlrm_mtl.distributed import init_distributed, shard_model
    from dlrm_mtl.losses import EntireSpaceLoss
    from dlrm_mtl.models import MultiScenarioMultiTaskModel, TrainModule
    from dlrm_mtl.schema import Schema

    env = init_distributed("gloo", 120, 0)
    per_rank = args.global_batch // env.world_size
    cfg = Config.load(None, [f"data.train={args.data}/train", f"data.eval={args.data}/eval", f"data.batch_size={per_rank}"])
    schema = Schema.load(cfg.data.schema_path())
    stream = ParquetStream(schema, cfg.data.train, per_rank, env.rank, env.world_size, prefetch_batches=0)
    need = args.warmup + args.steps + args.profile_steps
    batches = []
    while len(batches) < need:
        for b in stream:
            batches.append(b)
            if len(batches) == need:
                break
    torch.manual_seed(0)
    module = TrainModule(MultiScenarioMultiTaskModel(schema, cfg.model, device=torch.device("meta")), EntireSpaceLoss(schema, cfg.loss))
    dmp, opt, _ = shard_model(module, cfg, env, schema)

    def step(b) -> None:
        opt.zero_grad()
        loss, _ = dmp(b)
        loss.backward()
        opt.step()

    for b in batches[: args.warmup]:
        step(b)
    dist.barrier()
    t0 = time.perf_counter()
    for b in batches[args.warmup : args.warmup + args.steps]:
        step(b)
    dist.barrier()
    seconds = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[args.warmup + args.steps :]:
            step(b)
    split = {"embedding": 0.0, "communication": 0.0}
    total = 0.0
    for e in prof.key_averages():
        name = e.key.lower()
        own = e.self_cpu_time_total / 1e6  # seconds, exclusive of children
        total += own
        if any(k in name for k in COMM_KEYS):
            split["communication"] += own
        elif any(k in name for k in EMB_KEYS):
            split["embedding"] += own
    split["dense_and_other"] = max(0.0, total - split["embedding"] - split["communication"])
    if env.rank == 0:
        out = {
            "world_size": env.world_size,
            "threads_per_rank": torch.get_num_threads(),
            "per_rank_batch": per_rank,
            "samples_per_s": args.steps * args.global_batch / seconds,
            "ms_per_step": 1000 * seconds / args.steps,
            "profile_split": {k: v / total if total else 0.0 for k, v in split.items()},
        }
        Path(args.out).write_text(json.dumps(out))
    dist.destroy_process_group()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--global-batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--data", default=None)
    p.add_argument("--world-sizes", default="1,2")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="write all results to this file")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from dlrm_mtl.synthetic import generate

    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "data"
        if not args.data:
            generate(data, rows=args.rows, seed=0)
        results: List[Dict[str, object]] = []
        for ws in [int(w) for w in args.world_sizes.split(",")]:
            out = Path(tmp) / f"ws{ws}.json"
            cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(ws),
                   __file__, "--worker", "--data", str(data), "--out", str(out), "--global-batch", str(args.global_batch),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--profile-steps", str(args.profile_steps)]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                return 1
            results.append(json.loads(out.read_text()))
    print(f"global batch {args.global_batch}, {args.steps} timed steps per world size, in-memory batches")
    print(f"{'world':>5} {'threads/rank':>12} {'batch/rank':>10} {'samples/s':>11} {'ms/step':>8}   "
          f"{'embedding':>9} {'comm':>6} {'dense+other':>11}")
    for r in results:
        s = r["profile_split"]  # type: ignore[index]
        print(f"{r['world_size']:>5} {r['threads_per_rank']:>12} {r['per_rank_batch']:>10} {r['samples_per_s']:>11,.0f} "
              f"{r['ms_per_step']:>8.1f}   {s['embedding']:>9.1%} {s['communication']:>6.1%} {s['dense_and_other']:>11.1%}")
    if len(results) >= 2:
        ratio = results[1]["samples_per_s"] / results[0]["samples_per_s"]  # type: ignore[operator]
        print(f"scaling ratio (world {results[1]['world_size']} / world {results[0]['world_size']}): {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
