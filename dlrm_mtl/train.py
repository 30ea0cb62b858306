"""Training loop: one process or one rank of a torchrun/TorchX job.

Writes into ``train.run_dir``: ``config.yaml``, ``plan.json`` (table -> sharding), TensorBoard
events under ``tb/``, checkpoints under ``checkpoints/`` (``step_N`` every ``checkpoint.every_steps``
/ ``every_minutes``, ``final`` at the end, ``best`` at every evaluation that improves
``train.early_stopping``'s metric; see :mod:`dlrm_mtl.checkpoint`) and ``metrics.json``::

    {"metrics": [{"scenario", "task", "auc", "oracle_auc", "logloss", "calibration", "count", ...}],
     "throughput": {"samples_per_s", "train_seconds", "eval_seconds", "steps", "world_size",
                    "import_s", "startup_s", "first_step_unix", "setup_phases": {...}},
     "plan": {...}, "loss": {...},
     "best": {"metric", "predictions", "value", "step", ...},           # when an evaluation was tracked
     "early_stopped": {"step", "best_step", "best_value", "metric"}}    # when early stopping ended it

The loop is a handful of functions with one job each: :func:`setup_run` builds everything a
run needs (:class:`TrainRun`), :func:`train_step` is one optimizer step, :class:`LogWindow`
keeps the per-window counters on the device and :func:`log_window` reads them (the only
host synchronisation of a step, on logging steps), :func:`run_epoch` iterates one epoch and
:func:`finish_run` writes the results. Evaluation lives in :mod:`dlrm_mtl.evaluate`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from dlrm_mtl import native, start_up_gc
from dlrm_mtl.checkpoint import CheckpointManager, RowAudit, TrainProgress, data_fingerprint, fault_point
from dlrm_mtl.collectives import all_reduce_host, broadcast_host
from dlrm_mtl.config import Config, ConfigError, DataConfig, TrainConfig
from dlrm_mtl.data import Batch, ParquetStream
from dlrm_mtl.data.errors import DataError
from dlrm_mtl.distributed import DistEnv, cache_bytes, init_distributed, plan_summary, reader_threads, shard_model, shutdown_distributed
from dlrm_mtl.evaluate import evaluate
from dlrm_mtl.host_memory import arrow_on_system_allocator, keep_freed_memory
from dlrm_mtl.losses import EntireSpaceLoss
from dlrm_mtl.metrics import format_table
from dlrm_mtl.models import MultiScenarioMultiTaskModel, TrainModule
from dlrm_mtl.modules import folded_affine
from dlrm_mtl.schema import Schema
from dlrm_mtl.utilisation import ExpertUtilisation, render_heatmap
from dlrm_mtl.watchdog import Watchdog, report, stop_point


def _log(env: DistEnv, msg: str) -> None:
    if env.is_main:
        print(f"[dlrm_mtl] {msg}", flush=True)


def process_start_unix() -> Optional[float]:
    """Wall-clock time this process started (Linux ``/proc``; 10 ms resolution), or None."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # since boot
        booted = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)  # /proc/stat's btime is whole seconds
        return booted + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class PhaseClock:
    """Seconds spent in each named set-up phase (``with clock("planner"): ...``)."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}

    def __call__(self, name: str) -> "PhaseClock":
        self._name, self._t0 = name, time.perf_counter()
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        self.seconds[self._name] = self.seconds.get(self._name, 0.0) + time.perf_counter() - self._t0


def log_utilisation(util: ExpertUtilisation, writer: Any, step: int) -> Dict[str, Any]:
    """Per gate in TensorBoard: the heatmap image (``utilisation/<gate>``), the mean weight
    per expert as a histogram (``utilisation_mean/<gate>``) and the heatmap's row labels as
    text (``utilisation_rows/<gate>``); returns the matrices for metrics.json.

    Each kind has its own tag: TensorBoard files a tag under the plugin of its first summary,
    so an image and a histogram sharing one tag leave one of the two pages empty."""
    out: Dict[str, Any] = {}
    for name, (matrix, rows) in util.heatmaps().items():
        out[name] = {"rows": rows, "matrix": np.round(np.nan_to_num(matrix, nan=-1.0), 5).tolist()}
        if writer is not None:
            writer.add_image(f"utilisation/{name}", render_heatmap(matrix), step, dataformats="CHW")
            writer.add_histogram(f"utilisation_mean/{name}", np.nan_to_num(matrix).mean(axis=0), step)
            writer.add_text(f"utilisation_rows/{name}", "rows: " + ", ".join(rows) + " (columns: experts)", step)
    return out


def pipeline_wanted(mode: str, env: DistEnv) -> bool:
    """Whether ``train.pipeline`` (auto | sparse_dist | none) runs TrainPipelineSparseDist.

    ``auto``: on GPU with more than one rank. In a world of one the input all-to-all it
    overlaps moves nothing, while its host work per step (splits exchanged through the device,
    5 host synchronisations, awaitables) stays: on an H200 at batch 8192 the graphed step took
    5.6 ms with the pipeline and 3.4 ms without (docs/performance.md, "GPU")."""
    if mode not in ("auto", "sparse_dist", "none"):
        raise ValueError(f"train.pipeline {mode!r}: expected auto, sparse_dist or none")
    if mode == "auto":
        return env.device.type == "cuda" and env.world_size > 1
    return mode == "sparse_dist"


def make_pipeline(dmp: torch.nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv, mode: str):
    """TorchRec's TrainPipelineSparseDist when ``train.pipeline`` asks for it (:func:`pipeline_wanted`)."""
    if not pipeline_wanted(mode, env):
        return None
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    return TrainPipelineSparseDist(dmp, optimizer, env.device, execute_all_batches=True)


def _device_batches(batches: Iterator[Batch], device: torch.device, copy: bool = True) -> Iterator[Batch]:
    """Host batches -> device. With ``data.pin_memory`` the reader thread has packed each batch
    into one page-locked buffer, and this is one asynchronous copy (``BatchBuffers``).
    ``copy=False`` leaves them on the host: TrainPipelineSparseDist copies each batch on its
    own stream, overlapped with the previous step's compute."""
    for b in batches:
        if device.type == "cuda" and copy:
            b = b.to(device, non_blocking=True)
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


def lr_factor(cfg: TrainConfig, total_steps: int):
    """Multiplier of both learning rates at a step: linear warm-up, then constant or cosine decay."""
    warm, floor = cfg.warmup_steps, cfg.lr_min_factor
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"train.lr_schedule {cfg.lr_schedule!r}: expected constant or cosine")

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.lr_schedule == "constant":
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


# --------------------------------------------------------------------------- set-up


@dataclass
class TrainRun:
    """Everything one training run holds between its set-up and its results."""

    cfg: Config
    env: DistEnv
    schema: Schema
    run_dir: Path
    dmp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    plan: Dict[str, Dict[str, object]]
    train_stream: ParquetStream
    eval_stream: ParquetStream
    writer: Any
    ckpt: CheckpointManager
    progress: TrainProgress
    audit: Optional[RowAudit]
    pipeline: Any
    phases: PhaseClock


def pad_last_batch(data: DataConfig, env: DistEnv, pin: bool) -> bool:
    """``data.last_batch`` resolved: whether the training epoch's last batch is padded to
    ``batch_size`` (ConfigError for ``short`` where every rank must take equal steps or the
    pinned buffers hold full batches)."""
    if data.last_batch == "short" and (env.world_size > 1 or pin):
        raise ConfigError("data.last_batch: short needs a world of one without data.pin_memory "
                          f"(world size {env.world_size}, pinned buffers: {pin})", "data.last_batch")
    if data.last_batch == "auto":
        return not (env.world_size == 1 and env.device.type == "cpu")
    return data.last_batch == "padded"


def open_streams(schema: Schema, data: DataConfig, env: DistEnv, seed: int) -> Tuple[ParquetStream, ParquetStream]:
    """The training stream (shuffled; its last batch per :func:`pad_last_batch`) and the
    evaluation stream of this rank (batches of ``data.eval_batch_size`` rows)."""
    prefetch, workers = reader_threads(data, env)
    pin = data.pin_memory and env.device.type == "cuda"
    cache = cache_bytes(data, env)
    train_stream = ParquetStream(
        schema, data.train, data.batch_size, env.rank, env.world_size,
        shuffle_buffer_rows=data.shuffle_buffer_rows, seed=seed, prefetch_batches=prefetch,
        num_workers=workers, background_priority=data.background_priority, pin_memory=pin, cache_bytes=cache,
        pad_last=pad_last_batch(data, env, pin),
    )
    eval_stream = ParquetStream(
        schema, data.eval, data.eval_rows_per_batch(), env.rank, env.world_size, prefetch_batches=prefetch,
        num_workers=workers, background_priority=data.background_priority, pin_memory=pin, cache_bytes=cache,
    )
    return train_stream, eval_stream


def check_row_ids(cfg: Config, schema: Schema, env: DistEnv) -> None:
    """Row ids declared in the schema must be unique in the train and in the eval data
    (``data.check_row_ids``): a duplicate ends every rank with the error naming both files and
    rows (printed by the rank whose share of the ids held it)."""
    if not (schema.row_id and cfg.data.check_row_ids):
        return
    from dlrm_mtl.data.row_ids import DuplicateRowIdError, check_unique_row_ids

    error: Optional[DuplicateRowIdError] = None
    try:
        for source in (cfg.data.train, cfg.data.eval):
            if source:
                check_unique_row_ids(source, schema.row_id, env.rank, env.world_size)
    except DuplicateRowIdError as e:
        error = e
    flags = torch.zeros(env.world_size, dtype=torch.int64)
    flags[env.rank] = error is not None
    found = [r for r, f in enumerate(all_reduce_host(flags).tolist()) if f]
    if error is not None:
        raise error
    if found:
        raise DataError(f"duplicate row ids in the data: rank(s) {found} name the files and rows")


def build_module(cfg: Config, schema: Schema, env: DistEnv) -> TrainModule:
    """Model (on the meta device: DMP materialises only this rank's shards) + loss."""
    model = MultiScenarioMultiTaskModel(schema, cfg.model, device=torch.device("meta"))
    loss_fn = EntireSpaceLoss(schema, cfg.loss)
    if cfg.loss.scenario_weighting == "inverse_share" and not cfg.loss.scenario_shares:
        from dlrm_mtl.data.scenario_share import scenario_shares

        share = scenario_shares(schema, cfg.data.train)  # every rank reads the same columns: same λ
        loss_fn.set_scenario_share(share)
        _log(env, "scenario weights λ (inverse share): " + ", ".join(f"{n}={v:.3f}" for n, v in zip(loss_fn.leaf_names, loss_fn.scenario_lambda.tolist())))
    return TrainModule(model, loss_fn, cuda_graph=cfg.train.cuda_graph, precision=cfg.train.precision)


def configure_backends(cfg: TrainConfig, device: torch.device) -> None:
    """Process-wide math settings of a run: TF32 matmuls and convolutions on CUDA when
    ``train.allow_tf32`` (PyTorch's own default keeps fp32 GEMMs at full precision, which on
    an H100 runs them at a fraction of the tensor cores' rate), on the CPU fp32 matmuls from
    bf16-rounded inputs when ``train.allow_bf16_matmul``, subnormal floats flushed to zero
    when ``train.flush_denormal``; the host allocator keeps freed memory when
    ``train.keep_host_memory`` (:mod:`dlrm_mtl.host_memory`); the fused C kernels are on when
    ``train.native_kernels`` (:mod:`dlrm_mtl.native`), and with them the first layer's backward
    by table row when ``train.fold_first_layer`` (:mod:`dlrm_mtl.modules.folded_affine`)."""
    native.set_enabled(cfg.native_kernels)
    folded_affine.set_enabled(cfg.fold_first_layer)
    if cfg.keep_host_memory:
        # on the CPU one arena, and pyarrow's buffers on the same malloc, where it was measured
        # (docs/performance.md); a GPU host's reader threads allocate batch after batch at
        # once, and there a shared lock is unmeasured
        keep_freed_memory(arenas=1 if device.type == "cpu" else 0)
        if device.type == "cpu":
            arrow_on_system_allocator()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    elif device.type == "cpu":
        # "none" is PyTorch's default (MKL's fp32 GEMMs); "ieee" would route them through oneDNN instead
        torch.backends.mkldnn.matmul.fp32_precision = "bf16" if cfg.allow_bf16_matmul else "none"
        # the calling thread's FTZ/DAZ; the intra-op pool's threads inherit it where they are
        # created after this (the set-up's first parallel operator comes later: the model's init)
        torch.set_flush_denormal(cfg.flush_denormal)


def _open_writer(run_dir: Path, cfg: Config, env: DistEnv) -> Any:
    """TensorBoard writer on rank 0 (None elsewhere), with the config as text."""
    if not env.is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tb"))
    writer.add_text("config", "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```")
    return writer


def setup_run(cfg: Config, env: DistEnv) -> TrainRun:
    """Builds the model, plan, DMP, optimizers, streams, writer and checkpoint state of a run
    (resuming from a checkpoint when ``checkpoint.resume`` says so); times each phase."""
    clock = PhaseClock()
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    with clock("schema"):
        schema = Schema.load(cfg.data.schema_path())
    run_dir = Path(cfg.train.run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
    _log(env, f"world_size={env.world_size} backend={env.backend} device={env.device} threads={torch.get_num_threads()}")
    configure_backends(cfg.train, env.device)
    with clock("row_ids"):
        check_row_ids(cfg, schema, env)
    with clock("streams"):
        train_stream, eval_stream = open_streams(schema, cfg.data, env, cfg.train.seed)
        # the first row groups are decoded while the model is built and sharded
        train_stream.read_ahead()
        eval_stream.read_ahead(cfg.data.shuffle_buffer_rows)
    with clock("model"):
        module = build_module(cfg, schema, env)
    with clock("plan_and_shard"):
        dmp, optimizer, plan = shard_model(module, cfg, env, schema)
    summary = plan_summary(plan)
    if env.is_main:
        (run_dir / "plan.json").write_text(json.dumps(summary, indent=2))
        for table, p in summary.items():
            _log(env, f"plan: {table:<12} {p['sharding_type']:<15} {p['compute_kernel']:<8} ranks {p['ranks']}")
    _log(env, f"train rows {train_stream.total_rows} ({train_stream.rows_per_rank} per rank), "
              f"{len(train_stream)} steps/epoch of {cfg.data.batch_size} rows/rank; eval rows {eval_stream.total_rows}")
    steps_per_epoch = len(train_stream) if cfg.train.max_steps <= 0 else min(len(train_stream), cfg.train.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.train, steps_per_epoch * cfg.train.epochs))
    with clock("checkpoint"):
        ckpt = CheckpointManager(cfg, env, run_dir, summary, data_fingerprint(train_stream))
        ckpt.preflight(dmp, optimizer)
        progress = ckpt.resume(dmp, optimizer, scheduler, audit=cfg.checkpoint.audit_rows)
    audit = RowAudit(run_dir, env.rank) if cfg.checkpoint.audit_rows else None
    pipeline = make_pipeline(dmp, optimizer, env, cfg.train.pipeline)
    model = dmp.module.model
    if pipeline is not None:
        model.local_lookup = None  # the pipeline fx-traces the sharded module's input dist
    if model.local_lookup is not None:
        for stream in (train_stream, eval_stream):  # batches in the kernels' feature order: no permute per step
            stream.set_sparse_order(model.local_lookup.kernel_keys)
        lookup = model.local_lookup
        recorded = [c for c, m in zip(lookup.calls, lookup.modules) if c is not m]
        one_table = sum(getattr(c, "one_table", False) for c in recorded)
        _log(env, "lookup: the tables' fbgemm kernels called directly (a world of one: no input/output dist; "
                  f"{len(recorded)} of {len(lookup.calls)} with recorded arguments"
                  + (f", {one_table} as one table where their layout allows" if one_table else "") + ")")
    terms = dmp.module.loss.term_matrices
    if terms is not None:  # the loss terms' labels and row weights come with each batch, computed per row group
        train_stream.set_loss_terms(terms.host_inputs())
    for stream in (train_stream, eval_stream):  # their formats are final: the groups read ahead are converted
        stream.convert_ahead()
    if not progress.segments and progress.epoch < cfg.train.epochs:
        train_stream.prepare(progress.epoch)  # its first buffer is read while the writer opens
    with clock("tensorboard"):
        writer = _open_writer(run_dir, cfg, env)
    return TrainRun(cfg, env, schema, run_dir, dmp, optimizer, scheduler, summary, train_stream, eval_stream, writer,
                    ckpt, progress, audit, pipeline, clock)


# --------------------------------------------------------------------------- the step


def train_step(dmp: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> Tuple[Any, ...]:
    """One optimizer step on ``batch``; returns the module's output
    ``(logits, loss terms, gates, real rows)``, still on the device (real rows: the reader's
    host count where the batch carries one, ``Batch.real_rows``).

    ``zero_grad`` comes *before* the forward: it also hands the current learning rate to the
    fused fbgemm tables, which capture it at forward time (TrainPipelineSparseDist uses the
    same order; after the forward the lr would lag one step behind).
    """
    optimizer.zero_grad()
    loss, output = dmp(batch)
    loss.backward()
    optimizer.step()
    return output


class LogWindow:
    """Rows and steps since the last log line. Real rows are added on the host where the
    batches counted them (``Batch.real_rows``), else as a device tensor read only when the
    window is: an ``int()`` every step would synchronise the GPU and defeat the pipeline's
    overlap."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.real: Optional[torch.Tensor] = None
        self.host_real = 0  # real rows the batches counted on the host (Batch.real_rows)
        self.steps = 0
        self.batch_rows = 0  # rows of the window's batches, padding included (known on the host)
        self.t0 = time.perf_counter()

    def add(self, real_rows: "torch.Tensor | int", batch_rows: int) -> None:
        """One step's real rows: the reader's host count (an int: no operator) or a device tensor."""
        if isinstance(real_rows, int):
            self.host_real += real_rows
        else:
            r = real_rows.detach()
            self.real = r if self.real is None else self.real + r
        self.steps += 1
        self.batch_rows += batch_rows

    def real_rows(self) -> int:
        """Real rows in the window (synchronises with the device where a step counted there)."""
        return self.host_real + (0 if self.real is None else int(self.real))


@dataclass
class Totals:
    """This rank's running counters over the run."""

    trained_rows: int = 0
    padded_rows: int = 0
    train_seconds: float = 0.0
    last_terms: Dict[str, float] = field(default_factory=dict)
    input_wait_seconds: float = 0.0  # the training thread waiting for the reader's next batch
    first_step_seconds: float = 0.0  # the run's first step (initialisation, graph recording)


def _timed(batches: Iterator[Batch], totals: Totals) -> Iterator[Batch]:
    """``batches``, adding the seconds each ``next`` takes to ``totals.input_wait_seconds``
    (in metrics.json: a loop bound by its input shows it there)."""
    it = iter(batches)
    while True:
        t = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            return
        finally:
            totals.input_wait_seconds += time.perf_counter() - t
        yield b


def write_scalars(writer: Any, scalars: Dict[str, Any], step: int) -> None:
    """``add_scalar(tag, value, step)`` for each of ``scalars``, as one TensorBoard event: one
    summary holding every value (TensorBoard reads it as it reads separate events), not an
    event and a hand-off to the writer's thread per value (an evaluation's 60 scalars: 3.3 ms
    of ``add_scalar`` calls, docs/performance.md)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard.summary import scalar

    if scalars:
        values = [v for tag, x in scalars.items() for v in scalar(tag, x).value]
        writer.file_writer.add_summary(Summary(value=values), step)


def log_window(run: TrainRun, window: LogWindow, totals: Totals, terms: Dict[str, torch.Tensor],
               gates: Dict[str, torch.Tensor], step: int, epoch: int, i: int, steps_in_epoch: int) -> None:
    """Closes a log window: counts its rows into ``totals``, averages the loss terms over
    ranks and writes them, samples/s, the lr factor and gate histograms to TensorBoard, and
    prints a progress line (step, rows, samples/s, loss, ETA)."""
    rows = window.real_rows()
    totals.trained_rows += rows
    totals.padded_rows += window.batch_rows - rows
    names = sorted(terms)
    vals = all_reduce_host(torch.tensor([float(terms[k]) for k in names] + [float(rows)], dtype=torch.float64))
    now = time.perf_counter()
    sps = float(vals[-1]) / max(now - window.t0, 1e-9)
    totals.last_terms = {k: float(v) / run.env.world_size for k, v in zip(names, vals[:-1])}
    writer = run.writer
    if writer is not None:
        write_scalars(writer, {**totals.last_terms, "throughput/samples_per_s": sps,
                               "lr/factor": run.scheduler.get_last_lr()[0] / run.cfg.train.sparse_lr}, step)
        for name, g in gates.items():
            writer.add_histogram(f"gates/{name}", g.float().mean(0).flatten(), step)
    if run.cfg.train.progress:
        left = steps_in_epoch - (i + 1)
        eta = left * (now - window.t0) / max(window.steps, 1)
        _log(run.env, f"epoch {epoch} step {i + 1}/{steps_in_epoch} (global {step}) rows {totals.trained_rows:,} "
                      f"loss {totals.last_terms.get('loss/total', math.nan):.4f} {sps:,.0f} samples/s, epoch ETA {eta:.0f}s")
    window.reset()


def _save_step_checkpoint(run: TrainRun, window: LogWindow, totals: Totals, t0: float) -> None:
    rows = window.real_rows()
    run.progress.rows_trained = totals.trained_rows + rows
    run.progress.padding_rows = totals.padded_rows + window.batch_rows - rows
    run.progress.train_seconds = totals.train_seconds + time.perf_counter() - t0
    run.ckpt.save(run.dmp, run.optimizer, run.scheduler, run.progress, audit=run.audit)


def eval_due(cfg: Config, step: int) -> bool:
    """Whether ``train.eval_every_steps`` asks for an evaluation after global ``step``."""
    return cfg.train.eval_every_steps > 0 and step % cfg.train.eval_every_steps == 0


def run_epoch(run: TrainRun, epoch: int, totals: Totals, on_first_step: Optional[Callable[[float], None]] = None,
              on_step_end: Optional[Callable[[int, bool], None]] = None, evals: Optional[Evaluations] = None) -> bool:
    """Trains one epoch (or what is left of it after a resume): steps, windows, checkpoints,
    and with ``evals`` the evaluations of ``train.eval_every_steps`` inside it (one due at the
    epoch's last step is left to the caller's evaluation after the epoch). Returns True when
    early stopping ended training within the epoch; the epoch then stays unfinished, its
    data position that of the last step trained.

    ``on_first_step(seconds waited)`` runs before the first step, once the row groups both
    streams read ahead during the set-up are decoded; that wait is outside ``train_seconds`` (the caller
    passes it for the run's first epoch only: that loading ends the start-up).
    ``on_step_end(step, logged)`` runs after every iteration (``tools/count_ops.py`` counts
    operators per iteration with it)."""
    cfg, env, progress = run.cfg, run.env, run.progress
    stopped = False
    steps = progress.enter_epoch(run.train_stream, epoch, cfg)  # steps left (all, unless resumed)
    if on_first_step is not None and steps > 0:
        # start-up ends when the row groups read ahead during the set-up (the first shuffle
        # buffer's and the evaluation's first) are decoded and validated: the reader's
        # loading, which a plain in-memory loop does before its own loop starts. Shuffling
        # them into batches, like every later read, is training time.
        on_first_step(run.train_stream.wait_read_ahead() + run.eval_stream.wait_read_ahead())
    t0 = time.perf_counter()
    window = LogWindow(env.device)
    epoch_iter = iter(run.train_stream)
    batches = _timed(itertools.islice(epoch_iter, steps), totals)
    batches = _device_batches(batches, env.device, copy=run.pipeline is None)
    if run.audit is not None:
        batches = run.audit.tap(batches)
    try:
        for i in range(steps):
            first = progress.step == 0 and totals.first_step_seconds == 0.0
            t_step = time.perf_counter()
            if run.pipeline is not None:
                # TrainPipelineSparseDist: input dist of batch i+1 overlaps compute of batch i
                logits, terms, gates, real = run.pipeline.progress(batches)  # returns the output only
            else:
                logits, terms, gates, real = train_step(run.dmp, run.optimizer, next(batches))
            run.scheduler.step()  # fused table optimizers read their lr from param_groups on step()
            step = progress.advance()
            report(step, "step")
            window.add(real, logits.shape[0])
            if first:  # the run's first step: cuBLAS/fbgemm initialisation, the CUDA graph recorded
                totals.first_step_seconds = time.perf_counter() - t_step
            if i == 0 and epoch + 1 < cfg.train.epochs and run.train_stream.prefetch_batches > 0:
                # the next epoch's first buffer, read during this one where the reader has a core
                # of its own (data.prefetch_batches; on a CPU whose cores the step's threads take,
                # reading it now measured no faster than at the epoch's start)
                run.train_stream.prepare(epoch + 1)
            if run.audit is not None:
                run.audit.record(step, epoch)
            fault_point("step", step, env.rank)
            stop_point("step", step, env.rank)
            evaluated = evals is not None and i < steps - 1 and eval_due(cfg, step)
            if evaluated:  # before a checkpoint of this step, so that it records this evaluation
                assert evals is not None
                log_window(run, window, totals, terms, gates, step, epoch, i, steps)  # every row in totals
                t_eval = time.perf_counter()
                stopped = evaluate_during_training(run, evals, totals, f"epoch {epoch} step {i + 1}/{steps}",
                                                   totals.train_seconds + t_eval - t0)
                t0 += time.perf_counter() - t_eval  # training time leaves the evaluation out
                window.reset()
            if run.ckpt.due(step):
                _save_step_checkpoint(run, window, totals, t0)
            logged = not evaluated and (step % cfg.train.log_every == 0 or i == steps - 1)
            if logged:
                log_window(run, window, totals, terms, gates, step, epoch, i, steps)
            if on_step_end is not None:
                on_step_end(step, logged or evaluated)
            if stopped:
                break
    finally:
        # stop the reader threads now (max_steps leaves the stream unfinished): an abandoned
        # generator would only be closed by the garbage collector, and a reader thread still
        # inside pyarrow at interpreter exit can abort the process
        epoch_iter.close()
    totals.train_seconds += time.perf_counter() - t0
    if not stopped:
        progress.finish_epoch()
        # DWA's λ for the next epoch from this epoch's task losses (summed over the ranks)
        run.dmp.module.loss.end_epoch(all_reduce_host)  # DMP's .module: the TrainModule, unwrapped
    return stopped


def _log_counters(run: TrainRun, step: int) -> Dict[str, int]:
    counters = _merged_counters(run.train_stream)
    if counters:
        _log(run.env, "input policies applied so far (summed over ranks): " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))
        if run.writer is not None:
            write_scalars(run.writer, {f"data/{k}": v for k, v in counters.items()}, step)
    return counters


def eval_batches(cfg: Config, world_size: int) -> int:
    """Batches per rank of an evaluation during training: ``ceil(train.eval_rows / (eval batch x
    world size))`` (:meth:`~dlrm_mtl.config.DataConfig.eval_rows_per_batch`), the same on every
    rank (0: the whole eval set). The ranks' streams are
    padded to one length, so no rank waits for another in the metrics' collectives; the rows
    evaluated are the first of each rank's share, ``eval_rows`` or a little more (fewer where
    the eval set or a rank's share runs out)."""
    if cfg.train.eval_rows <= 0:
        return 0
    return -(-cfg.train.eval_rows // (cfg.data.eval_rows_per_batch() * world_size))


def _evaluate_epoch(run: TrainRun, label: str, step: int, reattach: bool) -> Tuple[List[Dict[str, object]], Dict[str, Any]]:
    """One evaluation during training (after an epoch, or every ``train.eval_every_steps``
    within one): exact metrics, expert utilisation, TensorBoard scalars at ``step``.

    The training stream is not touched (the eval stream is a stream of its own), and batches
    TorchRec's pipeline already holds stay in it: ``detach()`` keeps them and ``attach()``
    continues with them (``reattach``; not after the last epoch)."""
    if run.pipeline is not None:
        run.pipeline.detach()  # the plain forward for evaluation; attach() again after
    util = ExpertUtilisation(run.schema)
    metrics = evaluate(run.dmp, run.eval_stream, run.schema, run.env.device, util,
                       max_batches=eval_batches(run.cfg, run.env.world_size))
    utilisation = log_utilisation(util, run.writer, step)
    if run.pipeline is not None and reattach:
        run.pipeline.attach(run.dmp)
    if run.writer is not None:
        write_scalars(run.writer, {f"eval_{key}/{r['task']}/{r['scenario']}": v for r in metrics
                                   for key in ("auc", "oracle_auc", "gauc", "logloss", "ne", "calibration", "mse", "mae", "oracle_mse")
                                   if isinstance(v := r.get(key), float) and not math.isnan(v)}, step)
    _log(run.env, f"{label} eval (step {step}):\n" + format_table(metrics))
    return metrics, utilisation


# --------------------------------------------------------------------------- best model, early stopping


def scripted_metric(value: float, index: int) -> float:
    """Test hook (tests/test_best_checkpoint.py): ``DLRM_MTL_TEST_METRIC_SCRIPT="0.61,0.65,0.6"``
    replaces the tracked metric of the run's evaluation ``index`` (0-based, counted over
    resumes) by the listed value; evaluations beyond the list keep their real value."""
    script = os.environ.get("DLRM_MTL_TEST_METRIC_SCRIPT", "")
    values = [float(v) for v in script.split(",") if v.strip()]
    return values[index] if index < len(values) else value


def tracked_value(metrics: List[Dict[str, object]], predictions: List[str], metric: str) -> float:
    """The mean of ``metric`` over the ``all`` rows of ``predictions`` (NaN where one lacks it)."""
    rows = {r["task"]: r for r in metrics if r["scenario"] == "all"}
    values = [rows.get(p, {}).get(metric) for p in predictions]
    if not values or any(not isinstance(v, (int, float)) for v in values):
        return math.nan
    return float(sum(values)) / len(values)  # type: ignore[arg-type]


@dataclass
class Tracker:
    """``train.early_stopping``'s metric over the run's evaluations: the best value and its
    step, evaluations since the last improvement. Its :meth:`state` rides in every checkpoint
    (``TrainProgress.tracker``), so a resumed run judges its evaluations as the original would."""

    predictions: List[str]
    metric: str
    mode: str
    patience: int
    min_delta: float
    best_value: float = math.nan
    best_step: int = -1
    bad_evals: int = 0
    evaluations: int = 0
    stopped_step: int = -1

    @classmethod
    def from_config(cls, cfg: Config, schema: Schema, state: Dict[str, Any]) -> "Tracker":
        """The tracker of ``cfg``, continuing ``state`` (a checkpoint's) when that tracked the same metric."""
        from dlrm_mtl.config import tracked_predictions

        es = cfg.train.early_stopping
        try:
            predictions = tracked_predictions(schema, es.metric, es.task)
        except ValueError:  # config.check allows it only when neither early stopping nor keep_best reads it
            predictions = []
        t = cls(predictions, es.metric, es.mode, es.patience, es.min_delta)
        if state and [state.get("predictions"), state.get("metric"), state.get("mode")] == [predictions, es.metric, es.mode]:
            t.best_value, t.best_step = float(state["best_value"]), int(state["best_step"])
            t.bad_evals, t.evaluations = int(state["bad_evals"]), int(state["evaluations"])
            t.stopped_step = int(state.get("stopped_step", -1)) if t.should_stop() else -1  # a larger patience goes on
        return t

    @property
    def name(self) -> str:
        """``auc of ctcvr`` (or ``auc of all (ctr, cvr, ctcvr)``)."""
        return f"{self.metric} of {self.predictions[0] if len(self.predictions) == 1 else 'all (' + ', '.join(self.predictions) + ')'}"

    def observe(self, value: float, step: int) -> bool:
        """Counts one evaluation; True when ``value`` improves on the best by more than
        ``min_delta`` (the first evaluation improves unless NaN; NaN never does)."""
        self.evaluations += 1
        if math.isnan(self.best_value):
            better = not math.isnan(value)
        elif self.mode == "max":
            better = value > self.best_value + self.min_delta
        else:
            better = value < self.best_value - self.min_delta
        if better:
            self.best_value, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return better

    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def state(self) -> Dict[str, Any]:
        return {"metric": self.metric, "predictions": list(self.predictions), "mode": self.mode,
                "best_value": self.best_value, "best_step": self.best_step, "bad_evals": self.bad_evals,
                "evaluations": self.evaluations, "stopped_step": self.stopped_step}


@dataclass
class Evaluations:
    """The evaluations of a run so far: the latest metric rows and utilisation, the seconds
    they took, and the tracked metric."""

    tracker: Tracker
    metrics: List[Dict[str, object]] = field(default_factory=list)
    utilisation: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def _judge(run: TrainRun, evals: Evaluations, step: int) -> Tuple[bool, bool]:
    """Reads the tracked metric of the latest evaluation; returns (improved, stop). Rank 0's
    value decides for every rank (the metric rows are merged over the ranks and equal on all
    of them already; the broadcast makes every rank take the same decision by construction)."""
    tracker = evals.tracker
    if not tracker.predictions:
        return False, False
    value = scripted_metric(tracked_value(evals.metrics, tracker.predictions, tracker.metric), tracker.evaluations)
    value = float(broadcast_host(torch.tensor([value], dtype=torch.float64))[0])
    improved = tracker.observe(value, step)
    if run.writer is not None and not math.isnan(value):
        run.writer.add_scalar(f"early_stopping/{tracker.metric}", value, step)
    _log(run.env, f"step {step}: {tracker.name} {value:.6f}"
                  + (" (best so far)" if improved else f", best {tracker.best_value:.6f} at step {tracker.best_step}, "
                     f"{tracker.bad_evals} evaluation(s) without improvement"))
    stop = tracker.should_stop()
    if stop:
        tracker.stopped_step = step
        _log(run.env, f"early stopping at step {step}: {tracker.name} {value:.6f} has not improved by more than "
                      f"{tracker.min_delta:g} for {tracker.bad_evals} evaluation(s); best {tracker.best_value:.6f} "
                      f"at step {tracker.best_step}")
    return improved, stop


def evaluate_during_training(run: TrainRun, evals: Evaluations, totals: Totals, label: str, train_seconds: float,
                             reattach: bool = True) -> bool:
    """Evaluates now (:func:`_evaluate_epoch`), judges the tracked metric (:func:`_judge`),
    saves ``checkpoints/best`` when it improved (``checkpoint.keep_best``); returns whether
    training stops early. ``totals`` must hold every trained row (the log window closed) and
    ``train_seconds`` the training time so far: both go into the best checkpoint."""
    t = time.perf_counter()
    progress, step = run.progress, run.progress.step
    evals.metrics, evals.utilisation = _evaluate_epoch(run, label, step, reattach)
    improved, stop = _judge(run, evals, step)
    progress.tracker = evals.tracker.state()  # every later checkpoint (best, step_N, final) carries it
    if improved and run.cfg.checkpoint.keep_best:
        progress.rows_trained, progress.padding_rows, progress.train_seconds = totals.trained_rows, totals.padded_rows, train_seconds
        path = run.ckpt.save(run.dmp, run.optimizer, run.scheduler, progress, name="best", audit=run.audit)
        _log(run.env, f"saved {path} ({evals.tracker.name} {evals.tracker.best_value:.6f} at step {step})")
    evals.seconds += time.perf_counter() - t
    return stop


def _write_hparams(run: TrainRun, metrics: List[Dict[str, object]], tracker: Tracker, step: int) -> None:
    """The run's config (flattened to ``section.key`` scalars and strings) and its final
    metrics — the ``all`` AUC of every binary prediction, the tracked metric's best value —
    on TensorBoard's HPARAMS page, written into the run's own event file (``SummaryWriter.
    add_hparams`` would open a sub-run for them)."""
    from torch.utils.tensorboard.summary import hparams

    writer = run.writer
    if writer is None:
        return
    values: Dict[str, float] = {}
    for r in metrics:
        if r["scenario"] == "all" and isinstance(r.get("auc"), float) and not math.isnan(r["auc"]):  # type: ignore[arg-type]
            values[f"hparams/auc/{r['task']}"] = float(r["auc"])  # type: ignore[arg-type]
    if tracker.predictions and not math.isnan(tracker.best_value):
        values[f"hparams/best_{tracker.metric}"] = tracker.best_value
    for summary in hparams(flat_config(run.cfg.to_dict()), values):
        writer.file_writer.add_summary(summary)
    write_scalars(writer, values, step)  # the plugin reads a metric's value from the scalar of its tag


def flat_config(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"train": {"epochs": 2}}`` -> ``{"train.epochs": 2}``: mappings are flattened
    (``loss.task_weights.ctr``), lists (``model.task_layers``), empty mappings and None
    become their JSON text."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_config(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v, sort_keys=True)
    return out


def finish_run(run: TrainRun, totals: Totals, metrics: List[Dict[str, object]], utilisation: Dict[str, Any],
               counters: Dict[str, int], timeline: Dict[str, Any], tracker: Optional[Tracker] = None) -> Dict[str, Any]:
    """Final checkpoint, per-rank report, ``metrics.json`` (with the tracked metric's best
    evaluation and, after early stopping, where it stopped), the config and final metrics on
    TensorBoard's HPARAMS page, and the closing log lines."""
    env, progress, step = run.env, run.progress, run.progress.step
    total_rows = int(all_reduce_host(torch.tensor([totals.trained_rows], dtype=torch.int64))[0])
    throughput = {
        "samples_per_s": total_rows / max(totals.train_seconds, 1e-9),
        "train_seconds": totals.train_seconds,
        "rows_trained": total_rows,
        "steps": step,
        "world_size": env.world_size,
        "batch_size_per_rank": run.cfg.data.batch_size,
        "input_wait_seconds": totals.input_wait_seconds,  # this rank's (rank 0's in metrics.json)
        "first_step_seconds": totals.first_step_seconds,  # included in train_seconds
        **timeline,
    }
    _write_rank_report(run.run_dir, env, run.dmp, totals.trained_rows, totals.padded_rows)
    if run.cfg.checkpoint.at_end:
        progress.rows_trained, progress.padding_rows, progress.train_seconds = totals.trained_rows, totals.padded_rows, totals.train_seconds
        run.ckpt.save(run.dmp, run.optimizer, run.scheduler, progress, name="final", audit=run.audit)
    if run.audit is not None:
        run.audit.close()
    result = {
        "metrics": metrics, "throughput": throughput, "plan": run.plan, "loss": totals.last_terms, "step": step,
        "data_counters": counters,  # cumulative over the epochs, summed over ranks
        "expert_utilisation": utilisation,  # gate -> {"rows": labels, "matrix": [R][E]} (last eval)
    }
    if tracker is not None and tracker.predictions and tracker.best_step >= 0:
        result["best"] = {"metric": tracker.metric, "predictions": tracker.predictions, "value": tracker.best_value,
                          "step": tracker.best_step, "evaluations": tracker.evaluations,
                          "checkpoint": "best" if run.cfg.checkpoint.keep_best else None}
    if tracker is not None and tracker.stopped_step >= 0:
        result["early_stopped"] = {"step": tracker.stopped_step, "best_step": tracker.best_step,
                                   "best_value": tracker.best_value, "metric": tracker.name}
    if env.is_main:
        (run.run_dir / "metrics.json").write_text(json.dumps(result, indent=2))
        if run.writer is not None and tracker is not None:
            _write_hparams(run, metrics, tracker, step)
        if run.writer is not None:
            run.writer.add_scalar("throughput/epoch_samples_per_s", throughput["samples_per_s"], step)
            run.writer.close()
        _log(env, f"trained {total_rows} rows in {totals.train_seconds:.1f}s: {throughput['samples_per_s']:,.0f} samples/s "
                  f"on {env.world_size} rank(s)")
        _log(env, f"wrote {run.run_dir}/metrics.json; TensorBoard: tensorboard --logdir {run.run_dir}/tb")
    return result


def finished_result(run: TrainRun) -> Optional[Dict[str, Any]]:
    """A resumed run with every epoch done and its metrics.json written: that metrics.json,
    kept as it is (a second evaluation would overwrite it, recording this job's world size),
    unless ``checkpoint.reevaluate_finished``. Rank 0 decides (the run directory may be on
    its disk only); the others get its ``step``."""
    stopped = Tracker.from_config(run.cfg, run.schema, run.progress.tracker).should_stop()  # early stopping ended it
    if (run.progress.epoch < run.cfg.train.epochs and not stopped) or run.progress.step == 0 or run.cfg.checkpoint.reevaluate_finished:
        return None
    path = run.run_dir / "metrics.json"
    keep = torch.tensor([int(run.env.is_main and path.exists())])
    if int(broadcast_host(keep)[0]) == 0:
        return None
    _log(run.env, f"this run finished at step {run.progress.step}: nothing to train; {path} is kept as it is "
                  f"(checkpoint.reevaluate_finished=true evaluates the final weights again and overwrites it)")
    if run.writer is not None:
        run.writer.close()
    return json.loads(path.read_text()) if run.env.is_main else {"step": run.progress.step}


def run_training(run: TrainRun, import_s: float = 0.0) -> Dict[str, Any]:
    """The epochs of a set-up run, evaluation where configured, then :func:`finish_run`."""
    cfg = run.cfg
    done = finished_result(run)
    if done is not None:
        return done
    totals = Totals(run.progress.rows_trained, run.progress.padding_rows, run.progress.train_seconds)
    timeline: Dict[str, Any] = {"import_s": import_s, "eval_seconds": 0.0,
                                "setup_phases": {k: round(v, 4) for k, v in run.phases.seconds.items()}}
    started = process_start_unix()

    def first_step(read_ahead_s: float) -> None:  # called once: run_epoch gets it until the first step
        timeline["setup_phases"]["read_ahead"] = round(read_ahead_s, 4)  # waiting for the first buffer's row groups
        now = time.time()
        timeline["first_step_unix"] = now
        timeline["startup_s"] = None if started is None else now - started
        start_up_gc.resume()  # the start-up's objects frozen, the collector back on (after the CLI's pause)

    evals = Evaluations(Tracker.from_config(cfg, run.schema, run.progress.tracker))
    counters: Dict[str, int] = {}
    if cfg.train.progress:
        steps = len(run.train_stream) if cfg.train.max_steps <= 0 else min(len(run.train_stream), cfg.train.max_steps)
        _log(run.env, f"training: epochs {run.progress.epoch}..{cfg.train.epochs - 1} x {steps} steps of {cfg.data.batch_size} rows/rank; "
                      f"a progress line every {cfg.train.log_every} steps and at each epoch's end")
    stopped = evals.tracker.should_stop()  # resumed from a checkpoint written after early stopping
    try:
        for epoch in range(run.progress.epoch, cfg.train.epochs):
            if stopped:
                break
            stopped = run_epoch(run, epoch, totals, first_step if "first_step_unix" not in timeline else None, evals=evals)
            counters = _log_counters(run, run.progress.step)
            last = epoch == cfg.train.epochs - 1
            if not stopped and (cfg.train.eval_every_epoch or last or eval_due(cfg, run.progress.step)):
                stopped = evaluate_during_training(run, evals, totals, f"epoch {epoch}", totals.train_seconds, reattach=not last)
    finally:
        run.train_stream.discard_prepared()  # an epoch prepared and never trained (early stopping, an error)
    if not evals.metrics and cfg.train.epochs > 0:  # resumed from a checkpoint of a finished run
        t = time.perf_counter()
        evals.metrics = evaluate(run.dmp, run.eval_stream, run.schema, run.env.device,
                                 max_batches=eval_batches(cfg, run.env.world_size))
        evals.seconds += time.perf_counter() - t
    timeline["eval_seconds"] = evals.seconds
    return finish_run(run, totals, evals.metrics, evals.utilisation, counters, timeline, evals.tracker)


def train(cfg: Config, import_s: float = 0.0) -> Dict[str, Any]:
    """Trains as configured; ``import_s`` (the caller's seconds spent importing torch, torchrec
    and fbgemm) is reported next to the start-up time in ``metrics.json``."""
    from dlrm_mtl.config import check

    check(cfg, Schema.load(cfg.data.schema_path()))  # config mistakes end here, before the process group
    env = init_distributed(cfg.train.backend, cfg.train.timeout_s, cfg.train.threads_per_rank)
    dog: Optional[Watchdog] = None
    try:
        run = setup_run(cfg, env)
        # a rank that stops making progress ends the job within train.timeout_s, naming itself
        dog = Watchdog.start(cfg.train.timeout_s)
        result = run_training(run, import_s)
        fault_point("end", result["step"], env.rank)
        # every rank leaves together: a rank that died after the last collective turns into an
        # error here (within train.timeout_s) instead of letting the others exit 0 while the
        # launcher waits for the dead one
        if dist.get_world_size() > 1:
            dist.barrier()
        return result
    finally:
        start_up_gc.resume()  # a run that ended before its first step
        if dog is not None:
            dog.stop()
        shutdown_distributed()
