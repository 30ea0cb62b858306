"""Input pipeline throughput (Parquet -> ready batches) next to the training step's throughput.

What is measured
----------------
* ``loader``: rows per second of iterating ``ParquetStream`` over the training files until
  it is exhausted, i.e. Parquet decoding, validation/conversion, the bounded shuffle and
  building each ready ``Batch`` (KJT + dense + labels + masks). Only real rows count
  (padding rows of the last batch do not). The main configuration is the default one:
  ``DataConfig()``'s ``shuffle_buffer_rows``, ``prefetch_batches`` and ``num_workers``.
  For comparison the same is measured with ``num_workers=1`` (the reader thread alone),
  with ``prefetch_batches=0`` (no reader thread, the default number of row-group worker
  threads) and fully inline (``num_workers=1, prefetch_batches=0``: everything on the
  consuming thread), so the effect of the worker threads and of the prefetch thread shows.
* ``training``: samples per second of full training steps (forward, loss, backward,
  optimizer step) of the default model (``Config()``), built exactly like side A of
  ``tools/bench_train.py`` (``init_distributed`` world of one over gloo, ``shard_model``)
  and fed in-memory batches of the same batch size, so it pays no I/O.

The generated data carries a behaviour sequence by default (``--sequence-len 20``: the
synthetic ``hist_items`` with its aligned ``hist_item_categories`` and ``hist_ages``, read
unpooled into ``Batch.sequence``); the model then mean-pools it (``model.interaction:
concat``).

Everything runs in one process on the same machine. Loader passes (one per configuration)
and chunks of training steps are interleaved in ``--rounds`` rounds, so load from other
processes hits both alike; a loader configuration's rate is the median over its passes, the
training rate is total samples / total step time. One untimed loader pass first warms the
page cache and imports.

Target
------
``ratio = loader rows/s (default config) / training samples/s`` must be >= ``--target``
(5 by default): the input pipeline, running beside the training step, then needs at most
a fifth of the time the step takes, so it cannot be the bottleneck. A PASS/FAIL line says
whether it holds; the exit status is 0 on PASS, 1 on FAIL.

Caveat: both are measured standalone. In a real run the loader's threads share the cores
with the training step's intra-op threads, so a small ratio (< 2) means the loader would
slow training down even though it is "faster".

Example::

    .venv/bin/python tools/bench_loader.py                      # generates 400k synthetic rows
    .venv/bin/python tools/bench_loader.py --data data/synthetic --batch-size 1024
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from dlrm_mtl.config import Config, DataConfig
from dlrm_mtl.data.stream import ParquetStream
from dlrm_mtl.schema import Schema
from dlrm_mtl.synthetic import SyntheticSpec, generate

SEED = 0
T_START = time.perf_counter()  # the reported total includes imports
MIN_CPU_SHARE = 0.75  # training CPU time / (wall x threads) below this: cores were shared
SPREAD = 1.5  # a loader config's fastest pass above this multiple of its slowest: noisy machine
TOOLS = Path(__file__).resolve().parent


def _bench_train():
    """tools/bench_train.py as a module: its side A is the training step measured here."""
    spec = importlib.util.spec_from_file_location("_dlrm_mtl_bench_train", TOOLS / "bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


@dataclass(frozen=True)
class LoaderConfig:
    name: str
    num_workers: int
    prefetch_batches: int
    shuffle_buffer_rows: int


@dataclass
class LoaderResult:
    cfg: LoaderConfig
    rows: List[int] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)
    cpu_seconds: List[float] = field(default_factory=list)
    batches: int = 0

    @property
    def rates(self) -> List[float]:
        return [r / s for r, s in zip(self.rows, self.seconds)]

    @property
    def rows_per_s(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")

    def cpu_cores(self) -> float:
        """Cores this process kept busy on average during the passes (all threads)."""
        return sum(self.cpu_seconds) / sum(self.seconds) if self.seconds else float("nan")


def loader_configs() -> List[LoaderConfig]:
    d = DataConfig()
    return [
        LoaderConfig("default", d.num_workers, d.prefetch_batches, d.shuffle_buffer_rows),
        LoaderConfig("num_workers=1", 1, d.prefetch_batches, d.shuffle_buffer_rows),
        LoaderConfig("prefetch_batches=0", d.num_workers, 0, d.shuffle_buffer_rows),
        LoaderConfig("inline", 1, 0, d.shuffle_buffer_rows),
    ]


def loader_pass(schema: Schema, train: str, batch_size: int, c: LoaderConfig, epoch: int, res: Optional[LoaderResult]) -> None:
    """One full pass over ``train``; appends rows / wall / CPU seconds to ``res`` (None: untimed)."""
    stream = ParquetStream(
        schema, train, batch_size, shuffle_buffer_rows=c.shuffle_buffer_rows, seed=SEED,
        prefetch_batches=c.prefetch_batches, num_workers=c.num_workers,
    )
    stream.set_epoch(epoch)
    rows = batches = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for batch in stream:
        rows += batch.num_real_rows
        batches += 1
    dt = time.perf_counter() - t0
    if batches != len(stream) or rows != stream.total_rows:
        raise RuntimeError(f"{c.name}: got {batches} batches / {rows} rows, expected {len(stream)} / {stream.total_rows}")
    if res is not None:
        res.rows.append(rows)
        res.seconds.append(dt)
        res.cpu_seconds.append(time.process_time() - c0)
        res.batches = batches


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=400_000, help="synthetic rows to generate (train + eval)")
    p.add_argument("--sequence-len", type=int, default=20, metavar="L",
                   help="generated data: a behaviour sequence of up to L events with two aligned side-info columns "
                        "(schema sequence features, read unpooled); 0: none")
    p.add_argument("--data", default=None, help="existing data dir (train/, eval/, schema.yaml); default: generate into a temp dir")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=5, help="rounds of (one pass per loader config, one training chunk)")
    p.add_argument("--steps", type=int, default=60, help="timed training steps in all (split over the rounds)")
    p.add_argument("--warmup", type=int, default=5, help="untimed training steps")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads for training (0: Config() default)")
    p.add_argument("--target", type=float, default=5.0, help="required loader / training ratio")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    start = T_START
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        if args.data:
            data = Path(args.data)
        else:
            data = Path(tmp)
            t0 = time.perf_counter()
            generate(data, rows=args.rows, seed=SEED, spec=replace(SyntheticSpec(), sequence_len=args.sequence_len))
            print(f"generated {args.rows} synthetic rows in {time.perf_counter() - t0:.1f}s -> {data}")
        try:
            return bench(args, data, start)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def bench(args: argparse.Namespace, data: Path, start: float) -> int:
    bt = _bench_train()
    cfg = Config()
    cfg.data.train = str(data / "train")
    cfg.data.eval = str(data / "eval")
    cfg.data.batch_size = args.batch_size
    if args.threads:
        cfg.train.threads_per_rank = args.threads
    schema = Schema.load(cfg.data.schema_path())
    if schema.sequence:  # the sequence encoders' widths differ from the tables': side by side
        cfg.model.interaction = "concat"
    B = args.batch_size

    # training side: tools/bench_train.py side A, in-memory batches (read once, no shuffle)
    batches = bt.load_batches(schema, cfg.data.train, B)
    step, plan = bt.build_dlrm_mtl(schema, cfg)  # init_distributed (world of one) + shard_model
    threads = torch.get_num_threads()
    configs = loader_configs()
    d = configs[0]
    seq = ", ".join(f"{f.name} (max_len {f.max_len})" for f in schema.sequence) or "none"
    print(f"sequence features: {seq}")
    print(f"batch_size={B} train rows={sum(b.num_real_rows for b in batches)} torch threads={threads} "
          f"default loader: num_workers={d.num_workers} prefetch_batches={d.prefetch_batches} "
          f"shuffle_buffer_rows={d.shuffle_buffer_rows}")
    print("plan: " + ", ".join(f"{t}={p['sharding_type']}/{p['compute_kernel']}" for t, p in sorted(plan.items())))

    loader_pass(schema, cfg.data.train, B, d, 0, None)  # warm page cache and code paths
    loss = bt.warmup(step, batches, args.warmup)
    train_res = bt.SideResult("training")
    loader_res: Dict[str, LoaderResult] = {c.name: LoaderResult(c) for c in configs}
    pos = args.warmup
    chunks = bt.chunk_sizes(args.steps, -(-args.steps // max(1, args.rounds)))
    for r in range(max(len(chunks), args.rounds)):
        for c in configs:
            loader_pass(schema, cfg.data.train, B, c, r + 1, loader_res[c.name])
        if r < len(chunks):
            pos = bt.run_chunk(step, batches, pos, chunks[r], train_res)
    loss = train_res.final_loss if train_res.steps else loss

    train_sps = train_res.samples_per_s
    train_median_sps = B / (train_res.median_ms_per_step / 1e3)
    print()
    print(f"{'loader config':<20} {'workers':>7} {'prefetch':>8} {'rows/s':>11} {'min..max rows/s':>21} "
          f"{'ms/batch':>9} {'cpu cores':>9} {'x training':>10}")
    for res in loader_res.values():
        c = res.cfg
        rates = res.rates
        print(f"{c.name:<20} {c.num_workers:>7} {c.prefetch_batches:>8} {res.rows_per_s:>11,.0f} "
              f"{min(rates):>10,.0f}..{max(rates):<10,.0f} {1e3 * B / res.rows_per_s:>9.2f} "
              f"{res.cpu_cores():>9.2f} {res.rows_per_s / train_sps:>9.1f}x")
    inline = loader_res["inline"].rows_per_s
    print(f"default vs inline: {loader_res['default'].rows_per_s / inline:.2f}x; "
          f"num_workers=1 vs inline: {loader_res['num_workers=1'].rows_per_s / inline:.2f}x; "
          f"prefetch_batches=0 vs inline: {loader_res['prefetch_batches=0'].rows_per_s / inline:.2f}x")
    print()
    print(f"{'training step':<20} {'samples/s':>11} {'ms/step':>9} {'median ms':>10} {'cpu share':>10} {'final loss':>11}")
    print(f"{'dlrm_mtl (default)':<20} {train_sps:>11,.0f} {train_res.ms_per_step:>9.1f} "
          f"{train_res.median_ms_per_step:>10.1f} {train_res.cpu_share(threads):>10.0%} {loss:>11.4f}")
    print()
    loader_sps = loader_res["default"].rows_per_s
    ratio = loader_sps / train_sps
    median_ratio = loader_sps / train_median_sps
    print(f"ratio loader (default) / training = {loader_sps:,.0f} / {train_sps:,.0f} = {ratio:.2f}x "
          f"(vs median training step: {median_ratio:.2f}x)")
    warnings: List[str] = []
    if train_res.cpu_share(threads) < MIN_CPU_SHARE:
        warnings.append(f"the training steps got {train_res.cpu_share(threads):.0%} of {threads} cores: other processes "
                        "shared them, so training samples/s is low and the ratio overstated; rerun on a quiet machine")
    noisy = [r.cfg.name for r in loader_res.values() if max(r.rates) > SPREAD * min(r.rates)]
    if noisy:
        warnings.append(f"loader passes of {', '.join(noisy)} vary by > {SPREAD}x: load spikes during the run; "
                        "small differences between loader configs are noise")
    for w in warnings:
        print("WARNING: " + w)
    ok = ratio >= args.target
    print(f"{'PASS' if ok else 'FAIL'}: loader >= {args.target:g}x training throughput with the default worker count "
          f"(num_workers={d.num_workers}): {ratio:.2f}x")
    elapsed = time.perf_counter() - start
    print(f"total {elapsed:.1f}s")
    if args.json:
        out = {
            "data": args.data, "rows": None if args.data else args.rows, "batch_size": B, "torch_threads": threads,
            "loader": {
                n: {"num_workers": r.cfg.num_workers, "prefetch_batches": r.cfg.prefetch_batches,
                    "shuffle_buffer_rows": r.cfg.shuffle_buffer_rows, "rows_per_s": r.rows_per_s,
                    "pass_rows_per_s": r.rates, "cpu_cores": r.cpu_cores()}
                for n, r in loader_res.items()
            },
            "training": {"samples_per_s": train_sps, "median_samples_per_s": train_median_sps,
                         "ms_per_step": train_res.ms_per_step, "steps": train_res.steps,
                         "cpu_share": train_res.cpu_share(threads), "final_loss": loss},
            "ratio": ratio, "median_ratio": median_ratio, "warnings": warnings, "target": args.target, "pass": ok, "seconds": elapsed,
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
