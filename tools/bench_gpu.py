"""Training step of dlrm_mtl next to a plain PyTorch peer, and dense arch batched vs loop, on a GPU
(or, with the GPU-only figures left out, on the CPU).

What is measured
----------------
1. **Training step, real path vs plain peer**, per batch size (``--batch-sizes``) and precision
   (``--precision``), both sides fed the *same* in-memory batches in the same order:

   * ``real``: dlrm_mtl as training runs it: ``init_distributed`` (a world of one: NCCL on the
     GPU, gloo on the CPU), ``TrainModule`` + ``shard_model`` (DMP, fbgemm tables with fused
     row-wise Adagrad, fused Adam on dense), and ``make_pipeline(..., train.pipeline)``:
     TorchRec's ``TrainPipelineSparseDist`` where ``train.pipeline`` asks for it (it copies the
     pinned host batch to the device itself, on its own stream, one batch ahead; ``auto``
     leaves it out in this world of one, ``--set train.pipeline=sparse_dist`` measures it);
     without a pipeline ``train_step`` on the batch copied with ``non_blocking=True``. The config's ``train.precision`` (when this
     dlrm_mtl has it) decides bf16; ``dlrm_mtl.train.configure_backends`` (when present) sets
     the TF32 flags before every real chunk. No lr scheduler, no log windows.
   * ``plain``: ``tools/bench_train.py``'s ``PlainModel`` (one ``nn.EmbeddingBag`` per table, the
     same ``DenseArch`` and ``EntireSpaceLoss``), ``torch.optim.Adagrad`` (sparse) + ``Adam``,
     on the device, as a user would write it: PyTorch's default TF32 flags (matmul off, cuDNN
     on), bf16 as ``torch.autocast(dtype=bfloat16)`` around the dense arch (the loss in fp32).

   Batches: ``--batches`` distinct batches of B rows (cycled) are read once from synthetic
   Parquet (generated and cached under ``--work`` unless ``--data`` is given) into host memory;
   on the GPU the plain side's are pinned per tensor (a DataLoader's ``pin_memory``), the real
   side's are as its reader hands them over (``pack_batches``: packed into one page-locked
   buffer each with ``data.pin_memory``, else pageable). After ``--warmup`` untimed steps per side, ``--steps`` timed steps per
   side run in alternating chunks of ``--chunk`` (real, plain, real, plain, ...), each chunk
   between two ``torch.cuda.synchronize()``. ``ms/step`` = summed chunk time / steps;
   ``median`` = median step on the CPU (steps are synchronous there), the median of the
   chunks' ms/step on the GPU (a step alone is not synchronised, so that it may overlap).

2. **Counts per step that do not depend on the clock**, over ``--count-steps`` steps per side
   after timing: operators dispatched (``tools/count_ops.py``'s ``OpCounter``) with the host
   reads of tensor values among them (each one a host synchronisation on a GPU) and reads of
   fbgemm's host-resident counters (not synchronisations). On the GPU also, from
   ``torch.profiler`` (CPU + CUDA): kernel events (a replayed CUDA graph still shows each of
   its kernels), CPU-side launch calls (``cudaLaunchKernel``, ``cuLaunchKernel``,
   ``cudaLaunchKernelExC``, ``cudaGraphLaunch``, ...; a graph replay is one call), host
   synchronisations (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``,
   ``cudaEventSynchronize``, blocking ``cudaMemcpy``; device-to-host copies counted apart),
   **GPU busy** = union of the kernel intervals / wall time of the profiled steps (between two
   synchronisations; the profiler slows the host, so ``busy_vs_timed`` also gives the kernel
   time per step over the timed ms/step), and a second sync figure from
   ``torch.cuda.set_sync_debug_mode("warn")`` (warnings per step, by source line).

3. **Dense arch, batched vs loop**, for every ``configs/arch/*.yaml`` fragment (``--arch``):
   ``tools/bench_arch.py``'s ``DenseArch`` with ``--experts`` experts (batched ``ExpertBank``)
   against its ``to_loop`` copy (the same weights, experts in a Python loop), forward +
   backward at ``--arch-batch`` rows, on the device, both under dlrm_mtl's backend settings,
   chunks alternating and timed between synchronisations.

Reading the ratios
------------------
Step: ``ratio = real samples/s / plain samples/s``: above 1 dlrm_mtl's path is faster than
the straightforward PyTorch loop on the same model and batches. The counts say why: fewer
kernels and launch calls per step, no host synchronisation, a busier GPU. Arch: ``ratio =
loop ms / batched ms`` (= batched samples/s / loop samples/s): above 1 the batched expert bank
wins. A case that fails (bf16 unsupported, a CUDA graph capture failing, out of memory, ...)
is recorded with its error and the others go on; the exit code is then 1.

JSON (``--json OUT``)::

    {"device": {"name", "torch", "torchrec", "fbgemm_gpu", "cuda"},
     "steps": [{"batch", "precision", "real": {...}, "plain": {...}, "ratio"}],
     "arch": [{"fragment", "batched_ms", "loop_ms", "ratio", ...}], "command": "..."}

A side is ``{"samples_per_s", "ms_per_step", "median_ms_per_step", "steps", "final_loss",
"busy", "tf32", "counts": {...}, ...}`` or ``{"error": "..."}``; ``busy`` is null on the CPU.

Example (GPU machine)::

    python3 tools/bench_gpu.py --json docs/results/gpu.json
    python3 tools/bench_gpu.py --batch-sizes 8192 --precision bf16 --skip-arch --set train.cuda_graph=off
    .venv/bin/python tools/bench_gpu.py --quick          # CPU: a minute or two
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "tools")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import bench_arch  # noqa: E402
import bench_train  # noqa: E402
import count_ops  # noqa: E402
from dlrm_mtl.config import Config  # noqa: E402
from dlrm_mtl.data.batch import Batch  # noqa: E402
from dlrm_mtl.data.stream import ParquetStream  # noqa: E402
from dlrm_mtl.distributed import DistEnv, init_distributed, plan_summary, shard_model, shutdown_distributed  # noqa: E402
from dlrm_mtl.models import DenseArch  # noqa: E402
from dlrm_mtl.schema import Schema  # noqa: E402
from dlrm_mtl.synthetic import SyntheticSpec, synthetic_schema  # noqa: E402

PRECISIONS = ("fp32", "bf16")
STEP_MARK = "bench_gpu.step"  # record_function around each profiled step
# CUDA runtime / driver calls that block the host until the device (or a stream) is done
SYNC_CALLS = {
    "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpy2D",
    "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize", "cuMemcpyDtoH", "cuMemcpy",
}
GRAPH_LAUNCHES = {"cudaGraphLaunch", "cuGraphLaunch"}
QUICK = dict(batch_sizes=[2048], precision=["fp32"], steps=6, warmup=2, chunk=3, count_steps=2, batches=4,
             arch=["mmoe", "ple"], arch_steps=4, arch_warmup=1)
FULL = dict(batch_sizes=[2048, 8192, 32768], precision=list(PRECISIONS), steps=60, warmup=10, chunk=10,
            count_steps=5, batches=8, arch=None, arch_steps=30, arch_warmup=5)

StepFn = Callable[[], Optional[torch.Tensor]]


# ---------------------------------------------------------------------------- device
def resolve_device(name: str) -> torch.device:
    """``auto``: cuda when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: --device cuda but torch.cuda.is_available() is False")
    return torch.device(name)


def make_sync(device: torch.device) -> Callable[[], None]:
    """Waits for the device (a no-op on the CPU, where every step is synchronous)."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _dist_version(*names: str) -> Optional[str]:
    from importlib import metadata

    for n in names:
        try:
            return metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return None


def device_info(device: torch.device) -> Dict[str, Optional[str]]:
    """What ran the benchmark: device name and the stack's versions."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name = f"cpu: {name} ({os.cpu_count()} cores)"
    fbgemm = _dist_version("fbgemm-gpu", "fbgemm-gpu-cpu", "fbgemm-gpu-nightly", "fbgemm_gpu")
    return {"name": name, "torch": torch.__version__, "torchrec": _dist_version("torchrec"), "fbgemm_gpu": fbgemm,
            "cuda": torch.version.cuda}


# ---------------------------------------------------------------------------- backends
def configure_real(cfg: Config, device: torch.device) -> None:
    """dlrm_mtl's backend flags (TF32, ...) via ``dlrm_mtl.train.configure_backends`` when
    this dlrm_mtl has it; else PyTorch's defaults (the real side then runs as the plain one)."""
    import dlrm_mtl.train as train

    fn = getattr(train, "configure_backends", None)
    if fn is None:
        restore_defaults()
    else:
        fn(cfg.train, device)


def restore_defaults() -> None:
    """PyTorch's default TF32 flags: matmul off, cuDNN on (the plain peer, as users run it).
    Set only through the legacy API (reading it after the new fp32_precision API was used raises)."""
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True


def tf32_state() -> Optional[bool]:
    """Whether fp32 matmuls may use TF32 now (None where the flags cannot be read)."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # mixed legacy / new precision APIs
        try:
            return torch.backends.cuda.matmul.fp32_precision == "tf32"
        except (RuntimeError, AttributeError):
            return None


# ---------------------------------------------------------------------------- data
def dataset_dir(args: argparse.Namespace) -> Path:
    """``--data``, or synthetic data with enough rows for ``--batches`` batches of the largest
    batch size (generated once, cached under ``--work``)."""
    if args.data:
        return Path(args.data)
    rows = args.rows or math.ceil(max(args.batch_sizes) * args.batches / (1 - SyntheticSpec().eval_fraction)) + 1024
    t0 = time.perf_counter()
    data = count_ops.ensure_data(Path(args.work), rows)
    print(f"data: {data} ({rows} rows, ready in {time.perf_counter() - t0:.1f}s)", flush=True)
    return data


def load_host_batches(schema: Schema, train_dir: str, batch_size: int, n: int, pin: bool) -> List[Batch]:
    """The first ``n`` training batches in file order (no shuffle, read inline), pinned when ``pin``."""
    stream = ParquetStream(schema, train_dir, batch_size=batch_size, shuffle_buffer_rows=0, prefetch_batches=0,
                           num_workers=0)
    it = iter(stream)
    try:
        batches = list(itertools.islice(it, n))
    finally:
        it.close()
    if not batches:
        raise RuntimeError(f"no batch of {batch_size} rows in {train_dir}")
    return [b.pin_memory() for b in batches] if pin else batches


def case_config(args: argparse.Namespace, data: Path, batch_size: int, precision: Optional[str]) -> Tuple[Config, bool]:
    """``Config.load(--config, [data paths, --set ..., data.batch_size, train.precision])``.

    Returns the config and whether ``train.precision`` was set (only where this dlrm_mtl's
    config has the key; fp32 is then the only precision its real side can run)."""
    overrides = [f"data.train={data / 'train'}", f"data.eval={data / 'eval'}", *args.set, f"data.batch_size={batch_size}"]
    cfg = Config.load(args.config or None, overrides)
    if precision is not None and hasattr(cfg.train, "precision"):
        return Config.load(args.config or None, overrides + [f"train.precision={precision}"]), True
    return cfg, False


# ---------------------------------------------------------------------------- sides
@dataclass
class Side:
    """One implementation under test: ``step()`` runs one step on its next batch and returns
    its loss (on the device, not read) or None."""

    name: str
    step: StepFn = lambda: None
    prepare: Callable[[], None] = lambda: None  # before every chunk: backend flags
    batch_size: int = 0
    host_resident: List[torch.Tensor] = field(default_factory=list)  # fbgemm's host counters
    info: Dict[str, Any] = field(default_factory=dict)
    describe: Callable[[], Dict[str, Any]] = dict  # state read after the run (e.g. CUDA graph in use)
    chunk_seconds: List[float] = field(default_factory=list)
    chunk_steps: List[int] = field(default_factory=list)
    step_seconds: List[float] = field(default_factory=list)  # CPU only: each step alone
    last_loss: Optional[torch.Tensor] = None
    counts: Dict[str, Any] = field(default_factory=dict)
    busy: Optional[float] = None
    tf32: Optional[bool] = None
    error: Optional[str] = None

    def fail(self, stage: str, e: BaseException) -> None:
        self.error = f"{stage}: {type(e).__name__}: {e}"
        print(f"  ERROR {self.name} {self.error}", flush=True)
        if os.environ.get("BENCH_GPU_TRACEBACK"):
            traceback.print_exc()

    @property
    def steps(self) -> int:
        return sum(self.chunk_steps)

    @property
    def ms_per_step(self) -> float:
        return 1e3 * sum(self.chunk_seconds) / self.steps if self.steps else float("nan")

    @property
    def median_ms_per_step(self) -> float:
        if self.step_seconds:
            return 1e3 * statistics.median(self.step_seconds)
        per_chunk = [s / n for s, n in zip(self.chunk_seconds, self.chunk_steps) if n]
        return 1e3 * statistics.median(per_chunk) if per_chunk else float("nan")

    @property
    def samples_per_s(self) -> float:
        return self.batch_size * self.steps / sum(self.chunk_seconds) if self.steps else float("nan")

    def result(self) -> Dict[str, Any]:
        if self.error is not None:
            return {"error": self.error}
        out: Dict[str, Any] = {
            "samples_per_s": self.samples_per_s, "ms_per_step": self.ms_per_step,
            "median_ms_per_step": self.median_ms_per_step, "steps": self.steps,
            "final_loss": None if self.last_loss is None else float(self.last_loss),
            "busy": self.busy, "tf32": self.tf32, **self.info, "counts": self.counts,
        }
        try:
            out.update(self.describe())
        except Exception as e:  # noqa: BLE001 - a description only
            out["describe_error"] = f"{type(e).__name__}: {e}"
        if self.busy is not None and self.counts.get("kernel_ms_per_step") is not None and self.ms_per_step > 0:
            out["busy_vs_timed"] = self.counts["kernel_ms_per_step"] / self.ms_per_step
        return out


def pack_batches(batches: Sequence[Batch], cfg: Config, device: torch.device) -> Sequence[Batch]:
    """The real side's batches as its training loop gets them: with ``data.pin_memory`` on a
    GPU the reader packs each into one page-locked buffer (``dlrm_mtl.data.batch_buffers``:
    one copy per step); otherwise pageable, one copy per tensor. (The plain side's batches are
    pinned per tensor, as a DataLoader with ``pin_memory=True`` hands them over.)"""
    if device.type != "cuda" or not getattr(cfg.data, "pin_memory", False):
        return batches
    try:
        from dlrm_mtl.data.batch_buffers import BatchBuffers
    except ImportError:  # an older dlrm_mtl: its reader pinned per tensor
        return batches
    buffers = BatchBuffers(pin=True)
    return [buffers.pack(b) for b in batches]


def _to_device(batch: Batch, device: torch.device) -> Batch:
    """Host batch -> device, as ``dlrm_mtl.train._device_batches`` does."""
    return batch.to(device, non_blocking=True) if device.type == "cuda" else batch


def build_real(schema: Schema, cfg: Config, env: DistEnv, batches: Sequence[Batch], precision: str,
               has_precision: bool) -> Side:
    """dlrm_mtl's training path on a world of one: the module built as ``setup_run`` builds it,
    ``shard_model``, ``make_pipeline``; a step is ``pipeline.progress`` or ``train_step``."""
    from dlrm_mtl.train import build_module, make_pipeline, train_step

    if precision != "fp32" and not has_precision:
        raise RuntimeError(f"this dlrm_mtl's config has no train.precision: its real path cannot train in {precision}")
    torch.manual_seed(cfg.train.seed)
    dmp, optimizer, plan = shard_model(build_module(cfg, schema, env), cfg, env, schema)
    pipeline = make_pipeline(dmp, optimizer, env, cfg.train.pipeline)
    it = itertools.cycle(batches)  # the pipeline pulls from it one batch ahead, in the same order
    device = env.device

    if pipeline is not None:
        def step() -> torch.Tensor:
            return pipeline.progress(it)[1]["loss/total"]
    else:
        def step() -> torch.Tensor:
            return train_step(dmp, optimizer, _to_device(next(it), device))[1]["loss/total"]

    summary = plan_summary(plan)
    info = {"pipeline": type(pipeline).__name__ if pipeline is not None else None,
            "plan": {t: f"{p['sharding_type']}/{p['compute_kernel']}" for t, p in sorted(summary.items())}}
    for key in ("precision", "allow_tf32", "cuda_graph"):
        if hasattr(cfg.train, key):
            info[key] = getattr(cfg.train, key)
    return Side("real", step, lambda: configure_real(cfg, device), batches[0].batch_size,
                count_ops.host_counters(dmp), info, lambda: dense_step_state(dmp))


def dense_step_state(module: nn.Module) -> Dict[str, Any]:
    """Whether the real side's dense step replays a CUDA graph (``DenseStep.graph``), and why
    not where ``train.cuda_graph: auto`` fell back to eager; {} where this dlrm_mtl has no DenseStep."""
    for m in module.modules():
        if hasattr(m, "graph_error") and hasattr(m, "graph"):
            return {"cuda_graph_used": m.graph is not None, "cuda_graph_error": m.graph_error}
    return {}


class AutocastArch(nn.Module):
    """Runs the wrapped dense arch under ``torch.autocast(bfloat16)``; logits and auxiliary
    losses come back in fp32, so the loss is computed in fp32."""

    def __init__(self, inner: nn.Module, device_type: str) -> None:
        super().__init__()
        self.inner, self.device_type = inner, device_type

    def forward(self, *args: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            logits, gates, aux = self.inner(*args)
        return logits.float(), gates, {k: v.float() for k, v in aux.items()}


def build_plain(schema: Schema, cfg: Config, device: torch.device, batches: Sequence[Batch], precision: str) -> Side:
    """``bench_train.PlainModel`` on ``device`` with its optimizers (sparse Adagrad + Adam)."""
    torch.manual_seed(bench_train.SEED)
    model = bench_train.PlainModel(schema, cfg).to(device)
    train_step = bench_train.plain_step(model, cfg)
    if precision == "bf16":
        model.dense_arch = AutocastArch(model.dense_arch, device.type)  # same parameters, under autocast
    elif precision != "fp32":
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    it = itertools.cycle(batches)

    def step() -> torch.Tensor:  # bench_train's plain step, with the batch copied first
        return train_step(_to_device(next(it), device))

    return Side("plain", step, restore_defaults, batches[0].batch_size, info={"precision": precision})


def try_build(name: str, build: Callable[[], Side]) -> Side:
    try:
        return build()
    except Exception as e:  # noqa: BLE001 - recorded per case
        side = Side(name)
        side.fail("build", e)
        return side


# ---------------------------------------------------------------------------- timing
def warm(side: Side, n: int, sync: Callable[[], None]) -> None:
    """``n`` untimed steps (compilation, caches, allocator, pipeline fill)."""
    if side.error is not None:
        return
    try:
        side.prepare()
        for _ in range(n):
            side.last_loss = side.step()
        sync()
    except Exception as e:  # noqa: BLE001
        side.fail("warmup", e)


def run_chunk(side: Side, n: int, sync: Callable[[], None], per_step: bool) -> None:
    """``n`` steps of ``side`` between two synchronisations; ``per_step`` (CPU) also times each."""
    side.prepare()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        ts = time.perf_counter()
        side.last_loss = side.step()
        if per_step:
            side.step_seconds.append(time.perf_counter() - ts)
    sync()
    side.chunk_seconds.append(time.perf_counter() - t0)
    side.chunk_steps.append(n)
    side.tf32 = tf32_state()


def time_alternating(sides: Sequence[Side], steps: int, chunk: int, sync: Callable[[], None], per_step: bool) -> None:
    """``steps`` timed steps per side in alternating chunks; a side that raises drops out."""
    for n in bench_train.chunk_sizes(steps, chunk):
        for side in sides:
            if side.error is None:
                try:
                    run_chunk(side, n, sync, per_step)
                except Exception as e:  # noqa: BLE001
                    side.fail("timed steps", e)


# ---------------------------------------------------------------------------- counts
def op_counts(side: Side, n: int) -> Dict[str, Any]:
    """Operators per step (median), host reads of tensor values (max: each one a host sync on a
    GPU) and reads of host-resident counters, from ``count_ops.OpCounter`` over ``n`` steps."""
    counter = count_ops.OpCounter(host_resident=side.host_resident)
    with counter, count_ops.counting_host_reads(counter):
        for _ in range(n):
            side.last_loss = side.step()
            counter.cut()
    reads: Counter = Counter()
    for s in counter.steps:
        reads.update(s.sync_by_op)
    return {
        "ops_per_step": int(statistics.median_low(s.ops for s in counter.steps)),
        "value_reads_per_step": int(max(s.syncs for s in counter.steps)),
        "host_counter_reads_per_step": int(statistics.median_low(s.host_reads for s in counter.steps)),
        "value_reads": {k: v / n for k, v in reads.items()},
    }


def _base_name(name: str) -> str:
    return re.sub(r"_v\d+$", "", name)  # CUPTI names some calls by version: cudaLaunchKernelExC_v11060


def is_launch(name: str) -> bool:
    """A CPU-side call that launches device work: kernels, graphs."""
    name = _base_name(name)
    return name.startswith(("cudaLaunch", "cuLaunch")) or name in GRAPH_LAUNCHES


def union_us(intervals: Sequence[Tuple[float, float]]) -> float:
    """Total length of the union of ``[start, end)`` intervals."""
    total, end = 0.0, -math.inf
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarise_trace(events: Sequence[Dict[str, Any]], steps: int, wall_s: float) -> Dict[str, Any]:
    """Per-step figures from a Chrome trace of ``steps`` steps (``torch.profiler``, CPU + CUDA).

    Kernels and device copies: every device event in the trace. Runtime / driver calls: those
    inside a ``STEP_MARK`` window (any thread: the autograd engine launches the backward), so
    the synchronisations around the profiled steps are not counted. ``busy`` = union of the
    kernel intervals / ``wall_s``.
    """
    xs = [e for e in events if e.get("ph") == "X" and "ts" in e]
    cat = lambda e: str(e.get("cat", "")).lower()  # noqa: E731
    windows = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in xs
                     if e.get("name") == STEP_MARK and cat(e) == "user_annotation")

    def in_step(ts: float) -> bool:
        return not windows or any(a <= ts <= b for a, b in windows)

    kernels = [e for e in xs if cat(e) == "kernel"]
    copies = [e for e in xs if cat(e) == "gpu_memcpy"]
    calls = [_base_name(str(e.get("name", ""))) for e in xs
             if cat(e) in ("cuda_runtime", "cuda_driver") and in_step(float(e["ts"]))]
    launches = Counter(c for c in calls if is_launch(c))
    syncs = Counter(c for c in calls if c in SYNC_CALLS)
    busy_us = union_us([(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in kernels])
    names = Counter(str(e.get("name", ""))[:120] for e in kernels)
    per = lambda c: {k: v / steps for k, v in sorted(c.items())}  # noqa: E731
    return {
        "kernels_per_step": len(kernels) / steps,
        "launch_calls_per_step": sum(launches.values()) / steps,
        "launch_calls": per(launches),
        "syncs_per_step": sum(syncs.values()) / steps,
        "syncs": per(syncs),
        "d2h_copies_per_step": sum("DtoH" in str(e.get("name", "")) for e in copies) / steps,
        "h2d_copies_per_step": sum("HtoD" in str(e.get("name", "")) for e in copies) / steps,
        "kernel_ms_per_step": busy_us / 1e3 / steps,
        "profiled_ms_per_step": 1e3 * wall_s / steps,
        "busy": busy_us / (wall_s * 1e6) if wall_s > 0 else None,
        "top_kernels": [[k, v / steps] for k, v in names.most_common(15)],
    }


def profile_counts(side: Side, n: int, sync: Callable[[], None], cuda: bool) -> Dict[str, Any]:
    """``n`` steps under ``torch.profiler`` -> :func:`summarise_trace`."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            with record_function(STEP_MARK):
                side.last_loss = side.step()
        sync()
        wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="bench_gpu_trace_") as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            trace = json.load(fh)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return summarise_trace(events, n, wall)


def sync_warning_counts(side: Side, n: int, sync: Callable[[], None]) -> Dict[str, Any]:
    """Synchronising CUDA calls PyTorch itself flags (``set_sync_debug_mode("warn")``) over ``n`` steps."""
    sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n):
                side.last_loss = side.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync()
    hits = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in hits)
    return {"sync_warnings_per_step": len(hits) / n, "sync_warnings": {k: v / n for k, v in where.most_common(20)}}


def count_side(side: Side, n: int, device: torch.device, sync: Callable[[], None]) -> None:
    """Fills ``side.counts`` (and ``side.busy`` on the GPU). A figure that raises is recorded
    under ``counts["errors"]`` (the case then counts as failed) and the timings are kept."""
    if side.error is not None or n <= 0:
        return
    figures: List[Tuple[str, Callable[[], Dict[str, Any]]]] = []
    if device.type == "cuda":
        figures += [("profiler", lambda: profile_counts(side, n, sync, cuda=True)),
                    ("sync_debug_mode", lambda: sync_warning_counts(side, n, sync))]
    figures.append(("operator_count", lambda: op_counts(side, n)))
    for name, figure in figures:
        try:
            side.prepare()
            got = figure()
            sync()
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {e}"
            side.counts.setdefault("errors", {})[name] = msg
            print(f"  ERROR {side.name} counts ({name}): {msg}", flush=True)
            continue
        if "busy" in got:
            side.busy = got.pop("busy")
        side.counts.update(got)


# ---------------------------------------------------------------------------- step cases
class World:
    """The process group, initialised once per process by the first case that needs it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.env: Optional[DistEnv] = None

    def get(self, cfg: Config) -> DistEnv:
        if self.env is None:
            backend = "nccl" if self.device.type == "cuda" else "gloo"  # init_distributed's device follows it
            self.env = init_distributed(backend, cfg.train.timeout_s, cfg.train.threads_per_rank)
        return self.env


def step_case(args: argparse.Namespace, world: World, data: Path, schema: Schema, batches: Sequence[Batch],
              batch_size: int, precision: str) -> Dict[str, Any]:
    """One (batch size, precision): build both sides, warm up, time alternating, count."""
    device = world.device
    sync = make_sync(device)
    entry: Dict[str, Any] = {"batch": batch_size, "precision": precision}
    try:
        cfg, has_precision = case_config(args, data, batch_size, precision)
        env = world.get(cfg)
    except Exception as e:  # noqa: BLE001
        entry["error"] = f"config: {type(e).__name__}: {e}"
        print(f"  ERROR {entry['error']}", flush=True)
        return entry
    real_batches = pack_batches(batches, cfg, device)
    plain_batches = [b.pin_memory() for b in batches] if device.type == "cuda" else batches  # a DataLoader's pin_memory
    sides = [try_build("real", lambda: build_real(schema, cfg, env, real_batches, precision, has_precision)),
             try_build("plain", lambda: build_plain(schema, cfg, device, plain_batches, precision))]
    try:
        for side in sides:
            warm(side, args.warmup, sync)
        time_alternating(sides, args.steps, args.chunk, sync, per_step=device.type == "cpu")
        for side in sides:
            count_side(side, args.count_steps, device, sync)
        for side in sides:
            loss = None if side.error is not None or side.last_loss is None else float(side.last_loss)
            if side.error is None and (loss is None or not math.isfinite(loss)):
                side.fail("result", RuntimeError(f"non-finite final loss {loss}"))
            entry[side.name] = side.result()
        real, plain = entry["real"], entry["plain"]
        entry["ratio"] = (real["samples_per_s"] / plain["samples_per_s"]
                          if "error" not in real and "error" not in plain else None)
    except Exception as e:  # noqa: BLE001 - e.g. a broken CUDA context while reading results
        entry["error"] = f"{type(e).__name__}: {e}"
        print(f"  ERROR {entry['error']}", flush=True)
    finally:
        restore_defaults()
        del sides
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return entry


def bench_steps(args: argparse.Namespace, device: torch.device) -> List[Dict[str, Any]]:
    """Every (batch size, precision) case; failures are recorded per case."""
    world = World(device)
    out: List[Dict[str, Any]] = []
    data = dataset_dir(args)
    for B in args.batch_sizes:
        try:
            cfg, _ = case_config(args, data, B, None)
            schema = Schema.load(cfg.data.schema_path())
            t0 = time.perf_counter()
            batches = load_host_batches(schema, cfg.data.train, B, args.batches, False)
            print(f"batch {B}: {len(batches)} distinct batches in memory ({time.perf_counter() - t0:.1f}s)", flush=True)
        except Exception as e:  # noqa: BLE001
            msg = f"data: {type(e).__name__}: {e}"
            print(f"  ERROR batch {B}: {msg}", flush=True)
            out += [{"batch": B, "precision": p, "error": msg} for p in args.precision]
            continue
        for P in args.precision:
            print(f"case batch={B} precision={P} ...", flush=True)
            t0 = time.perf_counter()
            out.append(step_case(args, world, data, schema, batches, B, P))
            out[-1]["seconds"] = round(time.perf_counter() - t0, 1)  # the whole case: build, warm-up, timing, counts
            print_step_rows([out[-1]])
            print(f"  ({out[-1]['seconds']:.0f}s)", flush=True)
        del batches
    return out


# ---------------------------------------------------------------------------- dense arch
def arch_case(name: str, args: argparse.Namespace, device: torch.device, cfg: Config) -> Dict[str, Any]:
    """``bench_arch``'s batched DenseArch vs its ``to_loop`` copy, forward + backward on ``device``."""
    sync = make_sync(device)
    schema = synthetic_schema()
    torch.manual_seed(0)
    arch_cfg = bench_arch.scaled_config(bench_arch.ARCH_DIR / f"{name}.yaml", args.experts, args.arch_hidden)
    batched = DenseArch(schema, arch_cfg.model)
    loop = bench_arch.to_loop(batched)
    batched.to(device), loop.to(device)
    batch = tuple(t.to(device) for t in bench_arch.inputs(schema, args.arch_batch))  # pooled [B, F, D], dense, scenario
    prepare = lambda: configure_real(cfg, device)  # noqa: E731
    prepare()
    batched.eval(), loop.eval()  # no gate noise / BN batch statistics for the equality check
    with torch.no_grad():
        diff = float((batched(*batch)[0] - loop(*batch)[0]).abs().max())
    batched.train(), loop.train()
    sides = [Side(k, lambda m=m: bench_arch.step(m, batch), prepare, args.arch_batch) for k, m in
             (("batched", batched), ("loop", loop))]
    for s in sides:
        warm(s, args.arch_warmup, sync)
    time_alternating(sides, args.arch_steps, args.chunk, sync, per_step=device.type == "cpu")
    for s in sides:
        if s.error is not None:
            raise RuntimeError(f"{s.name}: {s.error}")
    b, lp = sides
    return {"fragment": name, "batched_ms": b.ms_per_step, "loop_ms": lp.ms_per_step,
            "ratio": lp.ms_per_step / b.ms_per_step, "batched_median_ms": b.median_ms_per_step,
            "loop_median_ms": lp.median_ms_per_step, "batch": args.arch_batch, "experts": args.experts,
            "max_abs_diff": diff}


def bench_archs(args: argparse.Namespace, device: torch.device) -> List[Dict[str, Any]]:
    names = args.arch or sorted(p.stem for p in bench_arch.ARCH_DIR.glob("*.yaml"))
    out: List[Dict[str, Any]] = []
    try:
        cfg = Config.load(args.config or None, args.set)
    except Exception as e:  # noqa: BLE001
        return [{"fragment": n, "error": f"config: {type(e).__name__}: {e}"} for n in names]
    print(f"\ndense arch, batched vs loop: batch {args.arch_batch}, {args.experts} experts, {device}")
    print(f"{'fragment':<16}{'batched ms':>11}{'loop ms':>10}{'ratio':>8}{'max|diff|':>11}")
    for name in names:
        try:
            r = arch_case(name, args, device, cfg)
            print(f"{name:<16}{r['batched_ms']:>11.2f}{r['loop_ms']:>10.2f}{r['ratio']:>7.2f}x{r['max_abs_diff']:>11.1e}", flush=True)
        except Exception as e:  # noqa: BLE001
            r = {"fragment": name, "error": f"{type(e).__name__}: {e}"}
            print(f"{name:<16}ERROR {r['error']}", flush=True)
        finally:
            restore_defaults()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        out.append(r)
    return out


# ---------------------------------------------------------------------------- output
def _fmt(v: Any, spec: str) -> str:
    """``format(v, spec)``, or a right-aligned ``-`` of the spec's width for None."""
    width = re.match(r"\D*(\d*)", spec).group(1)
    return format("-", f">{width}") if v is None else format(v, spec)


def print_step_rows(entries: Sequence[Dict[str, Any]], header: bool = True) -> None:
    """The step table: one row per side, then the ratio."""
    if header:
        print(f"{'batch':>6} {'prec':<5}{'side':<6}{'ms/step':>9}{'median':>9}{'samples/s':>12}{'ops':>7}{'reads':>6}"
              f"{'kernels':>8}{'launch':>8}{'syncs':>6}{'syncw':>6}{'busy':>6}")
    for e in entries:
        if "error" in e:
            print(f"{e['batch']:>6} {e['precision']:<5}ERROR {e['error']}")
            continue
        for name in ("real", "plain"):
            s = e[name]
            lead = f"{e['batch']:>6} {e['precision']:<5}{name:<6}"
            if "error" in s:
                print(lead + "ERROR " + s["error"])
                continue
            c = s["counts"]
            print(lead + f"{s['ms_per_step']:>9.2f}{s['median_ms_per_step']:>9.2f}{s['samples_per_s']:>12,.0f}"
                  f"{_fmt(c.get('ops_per_step'), '>7')}{_fmt(c.get('value_reads_per_step'), '>6')}"
                  f"{_fmt(c.get('kernels_per_step'), '>8.0f')}{_fmt(c.get('launch_calls_per_step'), '>8.0f')}"
                  f"{_fmt(c.get('syncs_per_step'), '>6.1f')}{_fmt(c.get('sync_warnings_per_step'), '>6.1f')}"
                  f"{_fmt(s['busy'], '>6.0%')}")
        if e.get("ratio") is not None:
            print(f"{'':>6} {'':<5}ratio real/plain = {e['ratio']:.2f}x")


def failures(result: Dict[str, Any]) -> List[str]:
    """Every recorded error, as ``where: error``."""
    out = []
    for e in result["steps"]:
        where = f"batch {e['batch']} {e['precision']}"
        if "error" in e:
            out.append(f"{where}: {e['error']}")
        for name in ("real", "plain"):
            side = e.get(name)
            if isinstance(side, dict) and "error" in side:
                out.append(f"{where} {name}: {side['error']}")
            for figure, msg in (side or {}).get("counts", {}).get("errors", {}).items():
                out.append(f"{where} {name} counts ({figure}): {msg}")
    out += [f"arch {a['fragment']}: {a['error']}" for a in result["arch"] if "error" in a]
    return out


# ---------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: batch 2048, fp32, few steps, two arch fragments (options given explicitly win)")
    p.add_argument("--config", action="append", default=[], help="YAML config file(s), composed in order (default: none)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, every case")
    p.add_argument("--data", default=None, help="existing data dir (train/, eval/, schema.yaml); default: synthetic under --work")
    p.add_argument("--work", default=str(ROOT / "data" / "bench_gpu"), help="cache of generated synthetic data")
    p.add_argument("--rows", type=int, default=0, help="synthetic rows to generate (0: enough for --batches of the largest batch)")
    p.add_argument("--batches", type=int, default=None, help="distinct batches kept in memory and cycled (8; quick 4)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="step batch sizes (2048 8192 32768; quick 2048)")
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, default=None, help="(fp32 bf16; quick fp32)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per side (60; quick 6)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per side first (10; quick 2)")
    p.add_argument("--chunk", type=int, default=None, help="steps per side before switching sides (10; quick 3)")
    p.add_argument("--count-steps", type=int, default=None, help="steps per side counted / profiled (5; quick 2; 0: none)")
    p.add_argument("--arch", nargs="+", default=None, help="configs/arch fragment names (all; quick mmoe ple)")
    p.add_argument("--arch-batch", type=int, default=4096)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--arch-hidden", type=int, default=64, help="hidden layer of every expert (0: one-layer experts)")
    p.add_argument("--arch-steps", type=int, default=None, help="timed dense-arch steps per version (30; quick 4)")
    p.add_argument("--arch-warmup", type=int, default=None, help="(5; quick 1)")
    p.add_argument("--skip-steps", action="store_true", help="no training-step cases")
    p.add_argument("--skip-arch", action="store_true", help="no dense-arch cases")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from dlrm_mtl.cli import quiet_third_party_logs

    quiet_third_party_logs()
    device = resolve_device(args.device)
    result: Dict[str, Any] = {"device": device_info(device), "steps": [], "arch": [],
                              "command": shlex.join(["python3", "tools/bench_gpu.py", *argv])}
    print(f"device: {result['device']}", flush=True)
    try:
        if not args.skip_steps:
            result["steps"] = bench_steps(args, device)
        if not args.skip_arch:
            result["arch"] = bench_archs(args, device)
    finally:
        shutdown_distributed()
        restore_defaults()
    if result["steps"]:
        print("\ntraining step, real path vs plain peer (ops/reads: per step, OpCounter; kernels..busy: GPU profiler)")
        print_step_rows(result["steps"])
    failed = failures(result)
    for f in failed:
        print(f"FAILED {f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
