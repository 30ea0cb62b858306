"""Training throughput of dlrm_mtl next to a plain single-process PyTorch version of the same model.

What is measured
----------------
Samples per second of full training steps (forward, ESMM loss, backward, optimizer step) on
the CPU, for two implementations of the *same* model fed the *same* in-memory batches in the
same order:

* ``dlrm_mtl``: the real framework path, a world of one over gloo:
  ``init_distributed`` -> ``TrainModule(MultiScenarioMultiTaskModel(meta), EntireSpaceLoss)``
  -> ``shard_model`` (DistributedModelParallel: planner-sharded fbgemm tables with fused
  row-wise Adagrad applied in backward, DDP-wrapped dense part with Adam).
* ``plain``: one ``torch.nn.EmbeddingBag(sparse=True)`` per schema table (features sharing a
  table share the module), pooled per feature in schema order into ``[B, F, D]``, the very
  same ``DenseArch`` and ``EntireSpaceLoss``; ``torch.optim.Adagrad`` (sparse gradients) on
  the tables and ``torch.optim.Adam`` on the dense parameters.

Batches are read once from Parquet (no shuffle, no prefetch thread) and kept in memory, so
neither side pays for I/O or decoding; step ``i`` of either side uses batch ``i`` (cycling).
After ``--warmup`` untimed steps per side, the ``--steps`` timed steps of each side are run
in alternating chunks of ``--chunk`` steps (A, B, A, B, ...), so drift and noise from other
processes on the machine hit both sides alike. Every step is timed with
``time.perf_counter`` (CPU steps are synchronous). ``samples/s`` and ``ms/step`` come from
the summed step times; ``median ms`` is the median step, robust to load spikes.

Reading the ratio
-----------------
``ratio = dlrm_mtl samples/s / plain samples/s`` (also shown from median step times). Above
1 the framework is faster than the straightforward PyTorch loop (fbgemm's fused
table-batched embedding kernel updates only the touched rows in place and never builds
sparse gradients); below 1 its overhead (DMP/KJT plumbing, DDP, sharding dist) costs more
than it saves. Both sides share the whole DenseArch (expert layers), which dominates step
time with the default model config, so expect a ratio near 1; the embedding-side difference
shows more with bigger tables / lighter dense layers. If the two ratios disagree a lot, the
machine was noisy (a warning is printed): rerun or raise ``--steps``.

The two sides do not compute bit-identical updates (row-wise vs element-wise Adagrad, and
different initial weights), so their final losses (on the same last batch) are checked for
finiteness and shown for a rough comparison only.

Example::

    .venv/bin/python tools/bench_train.py                       # generates 200k synthetic rows
    .venv/bin/python tools/bench_train.py --data data/synthetic --steps 90 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from dlrm_mtl.config import Config
from dlrm_mtl.data.batch import Batch
from dlrm_mtl.data.stream import ParquetStream
from dlrm_mtl.distributed import init_distributed, plan_summary, shard_model
from dlrm_mtl.losses import EntireSpaceLoss
from dlrm_mtl.models import DenseArch, MultiScenarioMultiTaskModel, TrainModule
from dlrm_mtl.schema import Schema
from dlrm_mtl.synthetic import generate

SEED = 0
NOISE_FACTOR = 1.5  # mean step time above this multiple of the median flags a noisy run
MIN_CPU_SHARE = 0.75  # process CPU time / (wall time x threads) below this: cores were shared
SIDE_A = "dlrm_mtl"
SIDE_B = "plain"

StepFn = Callable[[Batch], torch.Tensor]


# ---------------------------------------------------------------------------- data
def load_batches(schema: Schema, train_dir: str, batch_size: int) -> List[Batch]:
    """Every training batch, read once in file order (no shuffle, no prefetch thread)."""
    stream = ParquetStream(schema, train_dir, batch_size=batch_size, shuffle_buffer_rows=0, prefetch_batches=0)
    return list(stream)


# ---------------------------------------------------------------------------- side B
class PlainModel(nn.Module):
    """``nn.EmbeddingBag`` per table + the framework's ``DenseArch``; no TorchRec modules."""

    def __init__(self, schema: Schema, cfg: Config) -> None:
        super().__init__()
        self.tables = nn.ModuleDict()
        for f in schema.sparse:
            if f.table not in self.tables:
                bag = nn.EmbeddingBag(
                    f.num_embeddings, f.dim, mode="mean" if f.pooling == "mean" else "sum", sparse=True,
                    include_last_offset=True,  # KJT offsets are [B + 1]
                )
                bound = math.sqrt(1.0 / f.num_embeddings)  # TorchRec's default EBC init
                nn.init.uniform_(bag.weight, -bound, bound)
                self.tables[f.table] = bag
        self.feature_tables = [(f.name, f.table) for f in schema.sparse]
        self.dense_arch = DenseArch(schema, cfg.model)
        self.loss = EntireSpaceLoss(schema, cfg.loss)

    def forward(self, batch: Batch) -> torch.Tensor:
        kjt = batch.sparse
        pooled = torch.stack(
            [self.tables[table](kjt[name].values(), kjt[name].offsets()) for name, table in self.feature_tables],
            dim=1,
        )  # [B, F, D]
        logits, _, aux = self.dense_arch(pooled, batch.dense, batch.scenario)
        total, _ = self.loss(logits, batch.labels, batch.label_mask, batch.weight, batch.scenario, aux, batch.bias)
        return total


def build_plain(schema: Schema, cfg: Config) -> StepFn:
    torch.manual_seed(SEED)
    return plain_step(PlainModel(schema, cfg), cfg)


def plain_step(model: "PlainModel", cfg: Config) -> StepFn:
    """The plain side's training step on ``model``: sparse Adagrad on the tables, Adam on the
    dense arch (whatever ``model.dense_arch`` is when the step runs)."""
    sparse_opt = torch.optim.Adagrad(list(model.tables.parameters()), lr=cfg.train.sparse_lr)
    dense_opt = torch.optim.Adam(
        list(model.dense_arch.parameters()), lr=cfg.train.dense_lr, weight_decay=cfg.train.dense_weight_decay
    )

    def step(batch: Batch) -> torch.Tensor:
        loss = model(batch)
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        loss.backward()
        sparse_opt.step()
        dense_opt.step()
        return loss.detach()

    return step


# ---------------------------------------------------------------------------- side A
def build_dlrm_mtl(schema: Schema, cfg: Config) -> Tuple[StepFn, Dict[str, Dict[str, object]]]:
    env = init_distributed("gloo", 120, cfg.train.threads_per_rank)
    torch.manual_seed(SEED)
    module = TrainModule(
        MultiScenarioMultiTaskModel(schema, cfg.model, device=torch.device("meta")), EntireSpaceLoss(schema, cfg.loss)
    )
    dmp, optimizer, plan = shard_model(module, cfg, env, schema)

    def step(batch: Batch) -> torch.Tensor:
        optimizer.zero_grad()  # before the forward, as in dlrm_mtl.train (fused tables take the lr then)
        loss, _ = dmp(batch)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step, plan_summary(plan)


# ---------------------------------------------------------------------------- timing
@dataclass
class SideResult:
    name: str
    step_seconds: List[float] = field(default_factory=list)
    cpu_seconds: float = 0.0  # process CPU time over the timed steps (all threads)
    samples: int = 0
    final_loss: float = float("nan")

    @property
    def steps(self) -> int:
        return len(self.step_seconds)

    @property
    def seconds(self) -> float:
        return sum(self.step_seconds)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else float("nan")

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.seconds / self.steps if self.steps else float("nan")

    def cpu_share(self, threads: int) -> float:
        """Fraction of ``threads`` cores this process actually got while timing (~1 on a quiet machine)."""
        return self.cpu_seconds / (self.seconds * threads) if self.seconds else float("nan")

    @property
    def median_ms_per_step(self) -> float:
        return 1e3 * statistics.median(self.step_seconds) if self.step_seconds else float("nan")


def run_chunk(step: StepFn, batches: Sequence[Batch], start: int, n: int, result: SideResult) -> int:
    """Runs ``n`` timed steps on batches ``start, start+1, ...`` (cycling); returns the next index.

    Steps are synchronous on CPU, so the clock read after ``step`` returns covers the whole step.
    """
    for i in range(start, start + n):
        batch = batches[i % len(batches)]
        c0, t0 = time.process_time(), time.perf_counter()
        loss = step(batch)
        result.step_seconds.append(time.perf_counter() - t0)
        result.cpu_seconds += time.process_time() - c0
        result.samples += batch.batch_size
        result.final_loss = float(loss)
    return start + n


def chunk_sizes(steps: int, chunk: int) -> List[int]:
    """``steps`` split into chunks of at most ``chunk`` steps."""
    return [min(chunk, steps - s) for s in range(0, steps, max(1, chunk))]


def warmup(step: StepFn, batches: Sequence[Batch], n: int) -> float:
    loss = torch.tensor(float("nan"))
    for i in range(n):
        loss = step(batches[i % len(batches)])
    return float(loss)


# ---------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000, help="synthetic rows to generate (train + eval)")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=60, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per side before timing")
    p.add_argument("--chunk", type=int, default=5, help="steps per side before switching to the other side")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (both sides)")
    p.add_argument("--data", default=None, help="existing synthetic dir (train/, eval/, schema.yaml); default: generate into a temp dir")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        if args.data:
            data = Path(args.data)
        else:
            data = Path(tmp)
            t0 = time.perf_counter()
            generate(data, rows=args.rows, seed=SEED)
            print(f"generated {args.rows} synthetic rows in {time.perf_counter() - t0:.1f}s -> {data}")
        cfg = Config()
        cfg.data.train = str(data / "train")
        cfg.data.eval = str(data / "eval")
        cfg.data.batch_size = args.batch_size
        cfg.data.shuffle_buffer_rows = 0
        cfg.data.prefetch_batches = 0
        cfg.train.threads_per_rank = args.threads
        schema = Schema.load(cfg.data.schema_path())
        t0 = time.perf_counter()
        batches = load_batches(schema, cfg.data.train, args.batch_size)
        print(f"materialised {len(batches)} batches of {args.batch_size} in {time.perf_counter() - t0:.1f}s")
        return bench(args, cfg, schema, batches)


def bench(args: argparse.Namespace, cfg: Config, schema: Schema, batches: Sequence[Batch]) -> int:
    try:
        step_a, plan = build_dlrm_mtl(schema, cfg)  # also sets torch threads (init_distributed)
        torch.set_num_threads(args.threads)
        step_b = build_plain(schema, cfg)
        print("plan: " + ", ".join(f"{t}={p['sharding_type']}/{p['compute_kernel']}" for t, p in sorted(plan.items())))
        print(
            f"threads={torch.get_num_threads()} batch_size={args.batch_size} warmup={args.warmup} "
            f"steps={args.steps} per side, alternating every {args.chunk}"
        )
        wa = warmup(step_a, batches, args.warmup)
        wb = warmup(step_b, batches, args.warmup)
        print(f"warmup losses: {SIDE_A}={wa:.4f} {SIDE_B}={wb:.4f}")

        res = {SIDE_A: SideResult(SIDE_A), SIDE_B: SideResult(SIDE_B)}
        # both sides continue from the same batch index, so they see the same batches in the same order
        pos = {SIDE_A: args.warmup, SIDE_B: args.warmup}
        steps = {SIDE_A: step_a, SIDE_B: step_b}
        for n in chunk_sizes(args.steps, args.chunk):
            for side in (SIDE_A, SIDE_B):
                pos[side] = run_chunk(steps[side], batches, pos[side], n, res[side])

        a, b = res[SIDE_A], res[SIDE_B]
        ratio = a.samples_per_s / b.samples_per_s
        median_ratio = b.median_ms_per_step / a.median_ms_per_step  # equal batch sizes
        print()
        print(f"{'side':<10} {'samples/s':>11} {'ms/step':>9} {'median ms':>10} {'cpu share':>10} {'final loss':>11}")
        for r in (a, b):
            print(
                f"{r.name:<10} {r.samples_per_s:>11,.0f} {r.ms_per_step:>9.1f} {r.median_ms_per_step:>10.1f} "
                f"{r.cpu_share(args.threads):>10.0%} {r.final_loss:>11.4f}"
            )
        print(f"ratio {SIDE_A} / {SIDE_B} = {ratio:.2f}x  (from medians: {median_ratio:.2f}x)")

        warnings: List[str] = []
        spiky = [r.name for r in (a, b) if r.ms_per_step > NOISE_FACTOR * r.median_ms_per_step]
        if spiky:
            warnings.append(
                f"mean step > {NOISE_FACTOR}x median for {', '.join(spiky)}: load spikes during the run; "
                "trust the median ratio, or rerun on a quiet machine"
            )
        starved = [r.name for r in (a, b) if r.cpu_share(args.threads) < MIN_CPU_SHARE]
        if starved:
            warnings.append(
                f"{', '.join(starved)} got < {MIN_CPU_SHARE:.0%} of {args.threads} cores: other processes "
                "shared them, so absolute samples/s are low (the ratio is still side by side)"
            )
        for w in warnings:
            print("WARNING: " + w)
        ok = all(math.isfinite(r.final_loss) for r in (a, b))
        if not ok:
            print("ERROR: non-finite final loss")
        if args.json:
            write_json(args, len(batches), plan, ratio, median_ratio, warnings, (a, b))
        return 0 if ok else 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def write_json(
    args: argparse.Namespace,
    num_batches: int,
    plan: Dict[str, Dict[str, object]],
    ratio: float,
    median_ratio: float,
    warnings: List[str],
    results: Sequence[SideResult],
) -> None:
    out = {
        "data": args.data,
        "rows": None if args.data else args.rows,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "chunk": args.chunk,
        "threads": args.threads,
        "num_batches": num_batches,
        "plan": plan,
        "ratio": ratio,
        "median_ratio": median_ratio,
        "warnings": warnings,
        "sides": {
            r.name: {
                "samples_per_s": r.samples_per_s,
                "ms_per_step": r.ms_per_step,
                "median_ms_per_step": r.median_ms_per_step,
                "steps": r.steps,
                "seconds": r.seconds,
                "cpu_share": r.cpu_share(args.threads),
                "final_loss": r.final_loss,
                "step_ms": [round(1e3 * t, 2) for t in r.step_seconds],
            }
            for r in results
        },
    }
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    raise SystemExit(main())
