"""Training loop: one process or one rank of a torchrun/TorchX job.

Writes into ``train.run_dir``: ``config.yaml``, ``plan.json`` (table -> sharding), TensorBoard
events under ``tb/``, checkpoints under ``checkpoints/`` (``step_N`` every ``checkpoint.every_steps``
/ ``every_minutes``, ``final`` at the end; see :mod:`dlrm_mtl.checkpoint`) and ``metrics.json``::

    {"metrics": [{"scenario", "task", "auc", "oracle_auc", "logloss", "calibration", "count", ...}],
     "throughput": {"samples_per_s", "train_seconds", "steps", "world_size"},
     "plan": {...}, "loss": {...}}
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from dlrm_mtl.checkpoint import CheckpointManager, RowAudit, data_fingerprint, fault_point
from dlrm_mtl.collectives import all_reduce_host
from dlrm_mtl.config import Config
from dlrm_mtl.data import Batch, ParquetStream
from dlrm_mtl.distributed import DistEnv, init_distributed, plan_summary, shard_model, shutdown_distributed
from dlrm_mtl.losses import EntireSpaceLoss
from dlrm_mtl.metrics import MetricAccumulator, format_table
from dlrm_mtl.models import MultiScenarioMultiTaskModel, TrainModule
from dlrm_mtl.schema import Schema
from dlrm_mtl.utilisation import ExpertUtilisation, render_heatmap


def _log(env: DistEnv, msg: str) -> None:
    if env.is_main:
        print(f"[dlrm_mtl] {msg}", flush=True)


def evaluate(
    dmp: torch.nn.Module, stream: ParquetStream, schema: Schema, device: torch.device,
    utilisation: Optional[ExpertUtilisation] = None,
) -> List[Dict[str, object]]:
    """Runs the model over ``stream`` and returns exact, rank-merged metric rows (and fills
    ``utilisation`` with the gate weights, when given)."""
    acc = MetricAccumulator(schema)
    dmp.eval()
    with torch.no_grad():
        for batch in stream:
            batch = batch.to(device, non_blocking=True)
            _, (logits, _, gates, _) = dmp(batch)
            acc.update(batch, logits)
            if utilisation is not None:
                utilisation.update(gates, batch.scenario, batch.row_id >= 0)
    dmp.train()
    return acc.compute()


def _log_utilisation(util: ExpertUtilisation, writer: Any, step: int) -> Dict[str, Any]:
    """Heatmap image and histogram per gate in TensorBoard; the matrices for metrics.json."""
    out: Dict[str, Any] = {}
    for name, (matrix, rows) in util.heatmaps().items():
        out[name] = {"rows": rows, "matrix": np.round(np.nan_to_num(matrix, nan=-1.0), 5).tolist()}
        if writer is not None:
            writer.add_image(f"utilisation/{name}", render_heatmap(matrix), step, dataformats="CHW")
            writer.add_histogram(f"utilisation/{name}", np.nan_to_num(matrix).mean(axis=0), step)
            writer.add_text(f"utilisation/{name}", "rows: " + ", ".join(rows) + " (columns: experts)", step)
    return out


def make_pipeline(dmp: torch.nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv, cfg: Config):
    """TorchRec's TrainPipelineSparseDist when ``train.pipeline`` asks for it (``auto``: on GPU)."""
    mode = cfg.train.pipeline
    if mode not in ("auto", "sparse_dist", "none"):
        raise ValueError(f"train.pipeline {mode!r}: expected auto, sparse_dist or none")
    if mode == "none" or (mode == "auto" and env.device.type != "cuda"):
        return None
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    return TrainPipelineSparseDist(dmp, optimizer, env.device, execute_all_batches=True)


def _device_batches(batches: Iterator[Batch], env: DistEnv, cfg: Config) -> Iterator[Batch]:
    """Host batches -> device (pinned first on GPU, so the copy can run asynchronously)."""
    for b in batches:
        if env.device.type == "cuda":
            if cfg.data.pin_memory:
                b = b.pin_memory()
            b = b.to(env.device, non_blocking=True)
        yield b


def _merged_counters(stream: ParquetStream) -> Dict[str, int]:
    """The stream's policy counters (null ids, truncated lists, ...) summed over all ranks."""
    local = stream.counters()
    if dist.get_world_size() == 1:
        return local
    gathered: List[Dict[str, int]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, local)
    out: Dict[str, int] = {}
    for g in gathered:
        for k, v in g.items():
            out[k] = out.get(k, 0) + v
    return out


def lr_factor(cfg: Config, total_steps: int):
    """Multiplier of both learning rates at a step: linear warm-up, then constant or cosine decay."""
    warm, floor = cfg.train.warmup_steps, cfg.train.lr_min_factor
    if cfg.train.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"train.lr_schedule {cfg.train.lr_schedule!r}: expected constant or cosine")

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.train.lr_schedule == "constant":
            return 1.0
        t = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def dense_fingerprint(dmp: torch.nn.Module) -> Dict[str, str]:
    """sha256 of every replicated (DDP) parameter: equal on all ranks when data parallelism is sound."""
    import hashlib

    out = {}
    for name, p in dmp.named_parameters():
        if "embedding_bags" in name or "ebc" in name.split("."):
            continue
        out[name] = hashlib.sha256(p.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return out


def _write_rank_report(run_dir: Path, env: DistEnv, dmp: torch.nn.Module, trained_rows: int, padded_rows: int) -> None:
    """Per-rank facts for audits and tests: rows trained, padding rows, dense fingerprints."""
    d = run_dir / "ranks"
    d.mkdir(parents=True, exist_ok=True)
    report = {"rank": env.rank, "rows_trained": trained_rows, "padding_rows": padded_rows, "dense_sha256": dense_fingerprint(dmp)}
    (d / f"rank{env.rank}.json").write_text(json.dumps(report, indent=2))


def train(cfg: Config) -> Dict[str, Any]:
    env = init_distributed(cfg.train.backend, cfg.train.timeout_s, cfg.train.threads_per_rank)
    try:
        result = _train(cfg, env)
        fault_point("end", result["step"], env.rank)
        # every rank leaves together: a rank that died after the last collective turns into an
        # error here (within train.timeout_s) instead of letting the others exit 0 while the
        # launcher waits for the dead one
        if dist.get_world_size() > 1:
            dist.barrier()
        return result
    finally:
        shutdown_distributed()


def _train(cfg: Config, env: DistEnv) -> Dict[str, Any]:
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    schema = Schema.load(cfg.data.schema_path())
    run_dir = Path(cfg.train.run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
    _log(env, f"world_size={env.world_size} backend={env.backend} device={env.device} threads={torch.get_num_threads()}")

    model = MultiScenarioMultiTaskModel(schema, cfg.model, device=torch.device("meta"))
    loss_fn = EntireSpaceLoss(schema, cfg.loss)
    if cfg.loss.scenario_weighting == "inverse_share" and not cfg.loss.scenario_shares:
        from dlrm_mtl.data.scenario_share import scenario_shares

        share = scenario_shares(schema, cfg.data.train)  # every rank reads the same columns: same λ
        loss_fn.set_scenario_share(share)
        _log(env, "scenario weights λ (inverse share): " + ", ".join(f"{n}={v:.3f}" for n, v in zip(loss_fn.leaf_names, loss_fn.scenario_lambda.tolist())))
    module = TrainModule(model, loss_fn)
    dmp, optimizer, plan = shard_model(module, cfg, env)
    summary = plan_summary(plan)
    if env.is_main:
        (run_dir / "plan.json").write_text(json.dumps(summary, indent=2))
        for table, p in summary.items():
            _log(env, f"plan: {table:<12} {p['sharding_type']:<15} {p['compute_kernel']:<8} ranks {p['ranks']}")

    B = cfg.data.batch_size
    train_stream = ParquetStream(
        schema, cfg.data.train, B, env.rank, env.world_size,
        shuffle_buffer_rows=cfg.data.shuffle_buffer_rows, seed=cfg.train.seed, prefetch_batches=cfg.data.prefetch_batches,
        num_workers=cfg.data.num_workers,
    )
    eval_stream = ParquetStream(
        schema, cfg.data.eval, B, env.rank, env.world_size, prefetch_batches=cfg.data.prefetch_batches,
        num_workers=cfg.data.num_workers,
    )
    _log(env, f"train rows {train_stream.total_rows} ({train_stream.rows_per_rank} per rank), "
              f"{len(train_stream)} steps/epoch of {B} rows/rank; eval rows {eval_stream.total_rows}")

    writer = None
    if env.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"))
        writer.add_text("config", "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```")

    steps_per_epoch = len(train_stream) if cfg.train.max_steps <= 0 else min(len(train_stream), cfg.train.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch * cfg.train.epochs))
    ckpt = CheckpointManager(cfg, env, run_dir, summary, data_fingerprint(train_stream))
    ckpt.preflight(dmp, optimizer)
    progress = ckpt.resume(dmp, optimizer, scheduler, audit=cfg.checkpoint.audit_rows)
    audit = RowAudit(run_dir, env.rank) if cfg.checkpoint.audit_rows else None
    step = progress.step
    trained_rows, padded_rows = progress.rows_trained, progress.padding_rows
    train_seconds = progress.train_seconds
    metrics: List[Dict[str, object]] = []
    utilisation: Dict[str, Any] = {}
    last_terms: Dict[str, float] = {}
    counters: Dict[str, int] = {}
    pipeline = make_pipeline(dmp, optimizer, env, cfg)
    for epoch in range(progress.epoch, cfg.train.epochs):
        steps_per_epoch = progress.enter_epoch(train_stream, epoch, cfg)  # steps left (all, unless resumed)
        bar = None
        if env.is_main and cfg.train.progress and sys.stdout.isatty():
            from tqdm import tqdm

            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", file=sys.stdout, mininterval=2.0, dynamic_ncols=False, ncols=100)
        t0 = time.perf_counter()
        window_t = time.perf_counter()
        window_real, window_steps = torch.zeros((), dtype=torch.int64, device=env.device), 0
        epoch_iter = iter(train_stream)
        batches = _device_batches(itertools.islice(epoch_iter, steps_per_epoch), env, cfg)
        if audit is not None:
            batches = audit.tap(batches)
        for i in range(steps_per_epoch):
            if pipeline is not None:
                # TrainPipelineSparseDist: input dist of batch i+1 overlaps compute of batch i
                logits, terms, gates, real = pipeline.progress(batches)  # returns the output only
            else:
                batch = next(batches)
                # zero_grad *before* the forward: it also hands the current learning rate to the
                # fused fbgemm tables, which capture it at forward time (TrainPipelineSparseDist
                # uses the same order; after the forward the lr would lag one step behind)
                optimizer.zero_grad()
                loss, (logits, terms, gates, real) = dmp(batch)
                loss.backward()
                optimizer.step()
            scheduler.step()  # fused table optimizers read their lr from param_groups on step()
            step = progress.advance()
            window_steps += 1
            # real-row count stays a device tensor until the next log: an int() here would
            # synchronise the GPU every step and defeat the pipeline's overlap
            window_real = window_real + real.detach()
            if audit is not None:
                audit.record(step, epoch)
            fault_point("step", step, env.rank)
            if ckpt.due(step):
                progress.rows_trained = trained_rows + int(window_real)
                progress.padding_rows = padded_rows + B * window_steps - int(window_real)
                progress.train_seconds = train_seconds + time.perf_counter() - t0
                ckpt.save(dmp, optimizer, scheduler, progress, audit=audit)
            if bar is not None:
                bar.update(1)
            if step % cfg.train.log_every == 0 or i == steps_per_epoch - 1:
                window_rows = int(window_real)
                trained_rows += window_rows
                padded_rows += B * window_steps - window_rows
                window_real, window_steps = torch.zeros((), dtype=torch.int64, device=env.device), 0
                names = sorted(terms)
                vals = all_reduce_host(torch.tensor([float(terms[k]) for k in names] + [float(window_rows)], dtype=torch.float64))
                now = time.perf_counter()
                sps = float(vals[-1]) / max(now - window_t, 1e-9)
                window_t = now
                last_terms = {k: float(v) / env.world_size for k, v in zip(names, vals[:-1])}
                if writer is not None:
                    for k, v in last_terms.items():
                        writer.add_scalar(k, v, step)
                    writer.add_scalar("throughput/samples_per_s", sps, step)
                    writer.add_scalar("lr/factor", scheduler.get_last_lr()[0] / cfg.train.sparse_lr, step)
                    for name, g in gates.items():
                        writer.add_histogram(f"gates/{name}", g.float().mean(0).flatten(), step)
                if bar is not None:
                    bar.set_postfix_str(f"loss {last_terms.get('loss/total', math.nan):.4f} {sps:,.0f} samples/s")
                elif cfg.train.progress and (i + 1) % (cfg.train.log_every * 4) == 0:
                    _log(env, f"epoch {epoch} step {i + 1}/{steps_per_epoch} loss {last_terms.get('loss/total', math.nan):.4f} "
                              f"{sps:,.0f} samples/s")
        train_seconds += time.perf_counter() - t0
        # stop the reader threads now (max_steps leaves the stream unfinished): an abandoned
        # generator would only be closed by the garbage collector, and a reader thread still
        # inside pyarrow at interpreter exit can abort the process
        epoch_iter.close()
        progress.finish_epoch()
        if bar is not None:
            bar.close()
        counters = _merged_counters(train_stream)
        if counters:
            _log(env, "input policies applied so far (summed over ranks): " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))
            if writer is not None:
                for k, v in counters.items():
                    writer.add_scalar(f"data/{k}", v, step)
        if cfg.train.eval_every_epoch or epoch == cfg.train.epochs - 1:
            if pipeline is not None:
                pipeline.detach()  # the plain forward for evaluation; attach() again after
            util = ExpertUtilisation(schema)
            metrics = evaluate(dmp, eval_stream, schema, env.device, util)
            utilisation = _log_utilisation(util, writer, step)
            if pipeline is not None and epoch < cfg.train.epochs - 1:
                pipeline.attach(dmp)
            if writer is not None:
                for r in metrics:
                    for key in ("auc", "oracle_auc", "gauc", "logloss", "ne", "calibration", "mse", "mae", "oracle_mse"):
                        v = r.get(key)
                        if isinstance(v, float) and not math.isnan(v):
                            writer.add_scalar(f"eval_{key}/{r['task']}/{r['scenario']}", v, step)
            _log(env, f"epoch {epoch} eval:\n" + format_table(metrics))

    total_rows = int(all_reduce_host(torch.tensor([trained_rows], dtype=torch.int64))[0])
    throughput = {
        "samples_per_s": total_rows / max(train_seconds, 1e-9),
        "train_seconds": train_seconds,
        "rows_trained": total_rows,
        "steps": step,
        "world_size": env.world_size,
        "batch_size_per_rank": B,
    }
    if not metrics and cfg.train.epochs > 0:  # resumed from a checkpoint of a finished run
        metrics = evaluate(dmp, eval_stream, schema, env.device)
    _write_rank_report(run_dir, env, dmp, trained_rows, padded_rows)
    if cfg.checkpoint.at_end:
        progress.rows_trained, progress.padding_rows, progress.train_seconds = trained_rows, padded_rows, train_seconds
        ckpt.save(dmp, optimizer, scheduler, progress, name="final", audit=audit)
    if audit is not None:
        audit.close()
    result = {
        "metrics": metrics, "throughput": throughput, "plan": summary, "loss": last_terms, "step": step,
        "data_counters": counters,  # cumulative over the epochs, summed over ranks
        "expert_utilisation": utilisation,  # gate -> {"rows": labels, "matrix": [R][E]} (last eval)
    }
    if env.is_main:
        (run_dir / "metrics.json").write_text(json.dumps(result, indent=2))
        if writer is not None:
            writer.add_scalar("throughput/epoch_samples_per_s", throughput["samples_per_s"], step)
            writer.close()
        _log(env, f"trained {total_rows} rows in {train_seconds:.1f}s: {throughput['samples_per_s']:,.0f} samples/s "
                  f"on {env.world_size} rank(s)")
        _log(env, f"wrote {run_dir}/metrics.json; TensorBoard: tensorboard --logdir {run_dir}/tb")
    return result
