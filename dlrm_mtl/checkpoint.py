"""Sharded, atomic training checkpoints and exact resume (docs/checkpoints.md).

A checkpoint is one directory under ``checkpoint.dir`` (default ``RUN_DIR/checkpoints``)::

    step_000000120/                 # or final/, best/
        .metadata, __R_0.distcp     # torch.distributed.checkpoint: "model" (sharded tables, dense
                                    # params, loss state) and "optim" (fused table + dense states)
        trainer/state.json          # step, epoch, data position, LR schedule, plan, config
        trainer/rankR.pt            # per rank: RNG states (torch, CUDA, numpy, python), row counters
        COMPLETE                    # written last: a directory without it is ignored and removed

Loading runs no code from the checkpoint: the rank files are read with
``torch.load(weights_only=True)`` (they hold tensors, lists and numbers only), DCP's
``.metadata`` with an unpickler that allows DCP's own metadata classes only, and DCP's
non-tensor items with ``weights_only=True``; anything else is refused (``UnsafeCheckpointError``).

Writing is atomic: everything goes to ``.tmp-NAME`` (files fsynced), the directory is renamed
to ``NAME`` and only then ``COMPLETE`` is written (via a fsynced temp file and a rename), so a
process killed at any moment leaves either a complete checkpoint or one that is ignored. A
fixed name that exists already (``final``, ``best``: the best evaluation so far, never pruned)
is replaced so that a crash leaves the old or the new one complete (:func:`_replace_dir`).

Example::

    ckpt = CheckpointManager(cfg, env, run_dir, plan=plan_summary(plan))
    ckpt.preflight(dmp, optimizer)                   # writable directory, enough free space
    progress = ckpt.resume(dmp, optimizer, scheduler)  # TrainProgress (fresh if nothing to resume)
    ...
    if ckpt.due(progress.step):
        ckpt.save(dmp, optimizer, scheduler, progress)
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException as DCPException  # a BaseException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from dlrm_mtl.collectives import all_reduce_host, broadcast_host
from dlrm_mtl.config import Config
from dlrm_mtl.data.stream import ParquetStream, Segment
from dlrm_mtl.watchdog import report, stop_point

FORMAT_VERSION = 1
# trainer/rankR.pt: 1 held numpy's and Python's RNG states as numpy/Python objects (read with an
# allow-list for numpy's uint32 array); 2 holds tensors, lists and numbers only
RANK_STATE_FORMAT = 2
COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, found or loaded; the message says what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file asks to import or call something loading does not allow: it was
    refused before anything in it ran."""


def _numpy_array_globals() -> List[Any]:
    """What unpickling numpy's RNG key (a uint32 ndarray) needs, under the names numpy 1.x
    and 2.x pickle it with: the array constructor, ndarray, dtype and the uint32 dtype class."""
    reconstruct = np.zeros(0, np.uint32).__reduce__()[0]
    names = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"}
    return [(reconstruct, n) for n in sorted(names)] + [np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _unsafe_globals(f: Any) -> List[str]:
    """The globals a torch.save file (path or buffer) imports beyond tensors and primitives,
    read without unpickling it (best effort: empty if torch cannot list them)."""
    if hasattr(f, "seek"):
        f.seek(0)
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(f))
    except Exception:
        return []
    finally:
        if hasattr(f, "seek"):
            f.seek(0)


def _refusal(where: str, what: str, names: List[str], way_out: str = "") -> UnsafeCheckpointError:
    """The error for a file that loading without running code does not allow."""
    listed = f" ({', '.join(names)})" if names else ""
    return UnsafeCheckpointError(
        f"{where}: refused to load {what}: it asks to import or call something{listed} that loading without "
        "running code does not allow; nothing from it was run. dlrm_mtl never writes such a file, so it was "
        f"altered or comes from elsewhere: resume from a trusted copy of the checkpoint{way_out}")


def save_rank_state(path: Path, rows_trained: int, padding_rows: int) -> None:
    """Writes this process's RNG states (torch, CUDA, numpy, Python) and row counters to
    ``path`` as tensors, lists and numbers only (format 2), so loading needs no unpickling
    of arbitrary objects."""
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state = {
        "format": RANK_STATE_FORMAT,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {"kind": str(kind), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": {"version": int(version), "state": [int(x) for x in internal], "gauss_next": gauss_next},
        "rows_trained": int(rows_trained),
        "padding_rows": int(padding_rows),
    }
    torch.save(state, path)


def load_rank_state(path: Path) -> Dict[str, Any]:
    """Reads a ``trainer/rankR.pt`` without running code from it; returns it in format 2.

    ``torch.load(weights_only=True)`` plus, for files of format 1, numpy's uint32 array
    (:func:`_numpy_array_globals`). A file that needs anything else raises
    UnsafeCheckpointError; one whose content is not a rank state raises CheckpointError.
    """
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            raw = torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise _refusal(str(path), "the trainer state", _unsafe_globals(path),
                       f" (or delete {path.parent}/rank*.pt: the resume then starts fresh RNG streams and row "
                       "counters, and is no longer bit-exact)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the trainer state: {e}") from e
    try:
        return _as_format_2(raw)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a trainer state written by dlrm_mtl ({type(e).__name__}: {e})") from None


def _as_format_2(raw: Any) -> Dict[str, Any]:
    """A loaded rank state (format 1 or 2) in format 2, its types checked."""
    if not isinstance(raw, dict):
        raise TypeError(f"expected a dict, got {type(raw).__name__}")
    numpy_state, python_state = raw["numpy"], raw["python"]
    if isinstance(numpy_state, tuple):  # format 1: np.random.get_state()
        kind, key, pos, has_gauss, gauss = numpy_state
        if not isinstance(key, np.ndarray) or key.dtype != np.uint32:
            raise TypeError("numpy RNG key is not a uint32 array")
        numpy_state = {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "cached_gaussian": gauss}
    if isinstance(python_state, tuple):  # format 1: random.getstate()
        version, internal, gauss_next = python_state
        python_state = {"version": version, "state": list(internal), "gauss_next": gauss_next}
    cuda = raw.get("cuda")
    if not isinstance(raw["torch"], torch.Tensor) or not (cuda is None or all(isinstance(t, torch.Tensor) for t in cuda)):
        raise TypeError("torch/CUDA RNG states are not tensors")
    if not isinstance(numpy_state["key"], torch.Tensor):
        raise TypeError("numpy RNG key is not a tensor")
    return {
        "format": RANK_STATE_FORMAT,
        "torch": raw["torch"],
        "cuda": cuda,
        "numpy": {"kind": str(numpy_state["kind"]), "key": numpy_state["key"], "pos": int(numpy_state["pos"]),
                  "has_gauss": int(numpy_state["has_gauss"]), "cached_gaussian": float(numpy_state["cached_gaussian"])},
        "python": {"version": int(python_state["version"]), "state": [int(x) for x in python_state["state"]],
                   "gauss_next": None if python_state["gauss_next"] is None else float(python_state["gauss_next"])},
        "rows_trained": int(raw["rows_trained"]),
        "padding_rows": int(raw["padding_rows"]),
    }


def restore_rng(state: Dict[str, Any]) -> None:
    """Sets torch's, CUDA's (when available), numpy's and Python's global RNGs from a
    :func:`load_rank_state` result."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# everything DCP's FileSystemWriter pickles into ``.metadata`` (besides builtins and torch dtypes)
_DCP_METADATA_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
})


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``: only the classes in ``_DCP_METADATA_GLOBALS`` and torch
    dtypes may be imported, so the file cannot name a function to call."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader whose ``.metadata`` is read by :class:`_MetadataUnpickler`.

    ``refused`` keeps the last refusal: DCP reports a failed metadata read as text only.
    """

    refused: Optional[UnsafeCheckpointError] = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's metadata, as FileSystemReader returns it, without running code from it."""
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as fh:
            try:
                metadata = _MetadataUnpickler(fh).load()
            except pickle.UnpicklingError as e:
                self.refused = _refusal(str(path), "the DCP metadata", [str(e)])
                raise self.refused from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not DCP metadata (a {type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's DefaultLoadPlanner whose non-tensor items must load with ``weights_only=True``.

    ``refused`` keeps the last refusal (see :class:`SafeFileSystemReader`).
    """

    refused: Optional[UnsafeCheckpointError] = None

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        """Checks that the item loads with ``weights_only=True`` (refused otherwise), then
        stores it as DefaultLoadPlanner does. The stored bytes are the checked in-memory
        bytes, which import nothing beyond what ``weights_only`` allows."""
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            self.refused = _refusal(f"DCP item {read_item.dest_index.fqn!r}", "it", _unsafe_globals(value))
            raise self.refused from None
        value.seek(0)
        super().load_bytes(read_item, value)


def safe_dcp_load(state: Dict[str, Any], path: Path) -> None:
    """``dcp.load(state, checkpoint_id=path)`` that runs no code from the checkpoint
    (:class:`SafeFileSystemReader`, :class:`SafeLoadPlanner`). A refused file raises
    UnsafeCheckpointError itself, not DCP's wrapper around every rank's failure."""
    reader, planner = SafeFileSystemReader(str(path)), SafeLoadPlanner()
    try:
        dcp.load(state, checkpoint_id=str(path), storage_reader=reader, planner=planner)
    except (Exception, DCPException) as e:
        refused = reader.refused or planner.refused or _refused_in(e)  # this rank's, else another rank's
        if refused is not None:
            raise refused from None
        raise


def _refused_in(e: BaseException) -> Optional[UnsafeCheckpointError]:
    """The UnsafeCheckpointError behind a DCP failure (DCP wraps each rank's exception), if any."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop()
        x = x[0] if isinstance(x, tuple) else x  # DCP's failures: (exception, stack summary)
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, UnsafeCheckpointError):
            return x
        failures = getattr(x, "failures", None)
        todo.extend(failures.values() if isinstance(failures, dict) else ())
        todo.extend(c for c in (x.__cause__, x.__context__) if c is not None)
    return None


@dataclass
class TrainProgress:
    """Where training stands: what a checkpoint restores besides tensors.

    ``segments`` are the stretches of the current epoch trained so far, one per world size
    (see :class:`dlrm_mtl.data.stream.Segment`); an epoch that starts has none.
    ``rows_trained``/``padding_rows`` are this rank's counters, ``train_seconds`` the run's.
    """

    step: int = 0
    epoch: int = 0
    segments: List[Segment] = field(default_factory=list)
    train_seconds: float = 0.0
    rows_trained: int = 0
    padding_rows: int = 0
    # the tracked metric of train.early_stopping so far (best value and step, evaluations
    # without improvement, where it stopped): ``state.json["tracker"]``, see dlrm_mtl/train.py
    tracker: Dict[str, Any] = field(default_factory=dict)

    def enter_epoch(self, stream: ParquetStream, epoch: int, cfg: Config) -> int:
        """Positions ``stream`` at this epoch's next batch; returns the steps left in the epoch.

        Same world size, batch size, shuffle buffer and seed as the last segment: continue it
        (skip the batches it trained). Anything else: a new segment over the rows left.
        """
        if epoch != self.epoch:
            self.epoch, self.segments = epoch, []
        here = Segment(stream.world_size, stream.batch_size, stream.shuffle_buffer_rows, stream.seed, 0)
        last = self.segments[-1] if self.segments else None
        if last is not None and dataclasses.replace(last, batches=0) == here:
            stream.set_epoch(epoch, history=self.segments[:-1], skip_batches=last.batches)
        else:
            stream.set_epoch(epoch, history=self.segments)
            self.segments.append(here)
        done_in_epoch = sum(s.batches for s in self.segments)
        left = len(stream) - self.segments[-1].batches
        if cfg.train.max_steps > 0:
            left = min(left, max(0, cfg.train.max_steps - done_in_epoch))
        return left

    def advance(self) -> int:
        """One optimizer step trained; returns the new global step."""
        self.step += 1
        self.segments[-1] = dataclasses.replace(self.segments[-1], batches=self.segments[-1].batches + 1)
        return self.step

    def finish_epoch(self) -> None:
        self.epoch, self.segments = self.epoch + 1, []


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    """Writes ``path`` via a fsynced temp file and an atomic rename."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _exchange_dirs(a: Path, b: Path) -> bool:
    """Swaps the paths ``a`` and ``b`` in one atomic step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``: ext4, xfs, btrfs, tmpfs); False where the C library or the file
    system does not offer it. Other errors raise OSError."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_dir(new: Path, target: Path, trash: Path) -> None:
    """Puts the complete checkpoint ``new`` in place of the complete ``target`` (a fixed name:
    ``final``, ``best``) so that a crash at any moment leaves one of the two complete.

    Where the file system can exchange two directories atomically, ``target`` is the old or
    the new checkpoint at every moment (the old one ends at ``new`` and is removed). Elsewhere
    ``target`` is renamed to ``trash`` and ``new`` to ``target``: a crash between the two
    renames leaves no ``target`` but the old checkpoint complete in ``trash``, and the next
    start of the run puts it back (``CheckpointManager._remove_incomplete``)."""
    if _exchange_dirs(new, target):
        _fsync_dir(target.parent)
        shutil.rmtree(new, ignore_errors=True)
        return
    if trash.exists():  # left by a removal that failed earlier in this run; target is complete
        shutil.rmtree(trash)
    os.replace(target, trash)
    os.replace(new, target)
    _fsync_dir(target.parent)
    shutil.rmtree(trash, ignore_errors=True)


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file() and (Path(path) / ".metadata").is_file()


def list_checkpoints(root: Path) -> List[Tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first (``final`` last on ties)."""
    out = []
    if not Path(root).is_dir():
        return out
    for p in Path(root).iterdir():
        if p.is_dir() and (p.name == "final" or _STEP_DIR.match(p.name)) and is_complete(p):
            try:
                step = int(json.loads((p / COMPLETE).read_text())["step"])
            except (ValueError, KeyError, OSError):
                continue
            out.append((step, p))
    return sorted(out, key=lambda sp: (sp[0], sp[1].name == "final", sp[1].name))


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def _local_bytes(obj: Any, count_replicated: bool) -> int:
    """Bytes this rank writes for ``obj`` (nested state dicts of tensors / sharded tensors)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(obj, dict):
        return sum(_local_bytes(v, count_replicated) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_local_bytes(v, count_replicated) for v in obj)
    if isinstance(obj, ShardedTensor):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in obj.local_shards())
    if hasattr(obj, "to_local") and isinstance(obj, torch.Tensor):  # DTensor
        t = obj.to_local()
        return t.numel() * t.element_size()
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size() if count_replicated else 0
    return 0


def fault_point(where: str, step: int, rank: int) -> None:
    """Test hook: ``DLRM_MTL_TEST_KILL=WHERE:STEP:RANK:MARKER`` SIGKILLs this process once
    (STEP ``*``: any step).

    WHERE is ``step`` (right after an optimizer step), ``save`` (after the shards of a
    checkpoint are written, before it is complete) or ``end`` (after the last collective of
    training, before the exit barrier). MARKER is created first, so the
    restarted process runs on.
    """
    spec = os.environ.get("DLRM_MTL_TEST_KILL")
    if not spec:
        return
    w, s, r, marker = spec.split(":", 3)
    if w == where and s in ("*", str(step)) and int(r) == rank and not os.path.exists(marker):
        _write_durable(Path(marker), f"{where} {step} {rank}\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)


def _agree(error: Optional[str], what: str) -> None:
    """Raises the same CheckpointError on every rank if any rank reported an error."""
    errors: List[Optional[str]] = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    bad = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
    if bad:
        raise CheckpointError(f"{what}: " + "; ".join(bad))


def _short(e: BaseException) -> str:
    """One line per failed rank instead of DCP's tracebacks."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for r, x in sorted(failures.items()):
            x = x[0] if isinstance(x, tuple) else x  # (exception, stack summary)
            text = str(x).strip()
            parts.append(f"rank {r}: {type(x).__name__}: {text.splitlines()[-1] if text else ''}")
        return "; ".join(parts)
    return f"{type(e).__name__}: {e}"


def _column_wise(t: Optional[str]) -> bool:
    return bool(t) and "column_wise" in str(t)


class RowAudit:
    """Per-rank log of the row ids trained at every step (``checkpoint.audit_rows``).

    ``RUN_DIR/audit/rankR.rows``, one line per step: ``STEP EPOCH ID ID ...`` (real rows
    only). :meth:`tap` records the row ids of batches as the loop (or TorchRec's pipeline,
    which reads ahead) pulls them; :meth:`record` writes the oldest one for the step just
    trained. A resume truncates every rank's file back to the checkpoint's step, so the files
    always say which rows the model state has seen.
    """

    def __init__(self, run_dir: Path, rank: int) -> None:
        self.dir = Path(run_dir) / "audit"
        self.path = self.dir / f"rank{rank}.rows"
        self._pending: List[np.ndarray] = []
        self._fh = None

    @staticmethod
    def truncate(run_dir: Path, step: int) -> None:
        """Keeps the lines of steps <= ``step`` in every rank's file (rank 0 calls it)."""
        d = Path(run_dir) / "audit"
        d.mkdir(parents=True, exist_ok=True)
        for f in d.glob("rank*.rows"):
            lines = f.read_bytes().split(b"\n")
            kept = [ln for ln in lines[:-1] if int(ln.split(b" ", 1)[0]) <= step]  # [:-1]: unfinished line
            _write_durable(f, b"".join(ln + b"\n" for ln in kept))

    def tap(self, batches: Iterator[Any]) -> Iterator[Any]:
        for b in batches:
            ids = b.row_id.detach().cpu().numpy()
            self._pending.append(ids[ids >= 0])
            yield b

    def record(self, step: int, epoch: int) -> None:
        if self._fh is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "ab")
        ids = self._pending.pop(0)
        self._fh.write(f"{step} {epoch} ".encode() + " ".join(map(str, ids.tolist())).encode() + b"\n")

    def sync(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def data_fingerprint(stream: ParquetStream) -> str:
    """sha256 of the row-group list (paths, indices, row counts): a resumed epoch's position
    means something only over the same data."""
    h = hashlib.sha256()
    for g in stream.all_groups:
        h.update(f"{g.path}|{g.index}|{g.num_rows}\n".encode())
    return h.hexdigest()


class CheckpointManager:
    """Saves, finds, prunes and loads the checkpoints of one run (see module docstring).

    Every method is collective (all ranks call it in the same order). The checkpoint
    directory must be shared by all ranks (DCP's own assumption).
    """

    def __init__(self, cfg: Config, env: Any, run_dir: Path, plan: Dict[str, Dict[str, Any]], fingerprint: str = "") -> None:
        self.cfg, self.env = cfg, env
        self.run_dir = Path(run_dir)
        self.root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.plan = plan
        self.fingerprint = fingerprint
        self._last_save = time.monotonic()
        c = cfg.checkpoint
        if c.every_steps < 0 or c.every_minutes < 0:
            raise CheckpointError("checkpoint.every_steps and checkpoint.every_minutes must be >= 0")

    # ------------------------------------------------------------ checks, cleanup
    def preflight(self, dmp: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Before training: the directory is writable and has room for a checkpoint.

        The space needed is this run's state (tables, dense, optimizer states incl. Adam's
        two moments) summed over ranks, plus 10 %; ``checkpoint.min_free_gb`` overrides it.
        Also removes incomplete checkpoints (``.tmp-*`` and directories without COMPLETE).
        """
        need = _local_bytes(dmp.state_dict(), self.env.is_main) + _local_bytes(optimizer.state_dict(), self.env.is_main)
        dense = sum(p.numel() * p.element_size() for n, p in dmp.named_parameters() if "embedding_bags" not in n and ".embeddings." not in n)
        need += 2 * dense if self.env.is_main else 0  # Adam's moments, created at the first step
        total = torch.tensor([need], dtype=torch.int64)
        total = all_reduce_host(total)
        need = int(int(total[0]) * 1.1) + (1 << 20)
        if self.cfg.checkpoint.min_free_gb > 0:
            need = int(self.cfg.checkpoint.min_free_gb * 1024**3)
        self.estimated_bytes = need
        error = None
        if self.env.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                probe = self.root / f".probe-{os.getpid()}"
                _write_durable(probe, b"x" * 4096)
                probe.unlink()
                self._remove_incomplete()
                free = shutil.disk_usage(self.root).free
                if free < need:
                    error = (f"only {free / 2**20:.1f} MiB free on the file system of {self.root}, a checkpoint needs "
                             f"≈ {need / 2**20:.1f} MiB (free space, set checkpoint.dir elsewhere, or "
                             "checkpoint.min_free_gb if the estimate is wrong)")
            except OSError as e:
                error = f"checkpoint.dir {self.root} is not writable: {e}"
        _agree(error, "cannot checkpoint this run")
        self._barrier()

    def _remove_incomplete(self) -> None:
        # a complete checkpoint set aside while a new one of the same name (``final``, ``best``)
        # was being put in place where directories cannot be exchanged atomically (see
        # :func:`_replace_dir`): restore it unless the new one is complete
        for trash in self.root.glob(".trash-*"):
            target = self.root / trash.name[len(".trash-"):]
            if is_complete(trash) and not is_complete(target):
                shutil.rmtree(target, ignore_errors=True)
                os.replace(trash, target)
        for p in self.root.iterdir():
            if p.name.startswith(".tmp-") or p.name.startswith(".trash-") or (
                    p.is_dir() and (p.name in ("final", "best") or _STEP_DIR.match(p.name)) and not is_complete(p)):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def _barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    # ------------------------------------------------------------------ saving
    def due(self, step: int) -> bool:
        """Whether to save after ``step`` (every N steps, or M minutes decided by rank 0)."""
        c = self.cfg.checkpoint
        if c.every_steps > 0 and step % c.every_steps == 0:
            return True
        if c.every_minutes > 0 and step % max(1, self.cfg.train.log_every) == 0:
            flag = torch.tensor([int(time.monotonic() - self._last_save >= c.every_minutes * 60)], dtype=torch.int64)
            return bool(broadcast_host(flag, src=0)[0])  # rank 0's clock decides for all
        return False

    def save(self, dmp: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, progress: TrainProgress,
             name: Optional[str] = None, audit: Optional[RowAudit] = None) -> Path:
        """Writes a complete checkpoint atomically and prunes old ones; returns its path.

        Raises CheckpointError on every rank if any rank fails (disk full, permissions);
        the previous checkpoint stays the latest complete one.
        """
        name = name or f"step_{progress.step:09d}"
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        report(progress.step, "checkpoint of step")  # the watchdog: a save makes no step progress
        error = None
        if self.env.is_main:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                (tmp / "trainer").mkdir(parents=True)
            except OSError as e:
                error = f"cannot create {tmp}: {e}"
        _agree(error, f"checkpoint {name} not written")
        try:
            dcp.save({"model": dmp.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=str(tmp))
        except (Exception, DCPException) as e:  # DCP gathers every rank's failure and raises on all ranks
            self._discard(tmp)
            raise CheckpointError(f"checkpoint {name} not written: {_short(e)}{self._space_text()} "
                                  f"({self._latest_text()})") from e
        fault_point("save", progress.step, self.env.rank)
        report(progress.step, "checkpoint of step")
        stop_point("save", progress.step, self.env.rank)
        error = None
        try:
            save_rank_state(tmp / "trainer" / f"rank{self.env.rank}.pt", progress.rows_trained, progress.padding_rows)
            with open(tmp / "trainer" / f"rank{self.env.rank}.pt", "rb+") as fh:
                os.fsync(fh.fileno())
            if audit is not None:
                audit.sync()
            if self.env.is_main:
                _write_durable(tmp / "trainer" / "state.json", json.dumps(self._state(scheduler, progress), indent=1).encode())
        except OSError as e:
            error = str(e)
        self._fail_if(error, tmp, name)
        error = None
        if self.env.is_main:
            try:
                _fsync_dir(tmp)
                marker = {"step": progress.step, "epoch": progress.epoch, "world_size": self.env.world_size,
                          "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "format": FORMAT_VERSION}
                if final.exists():  # a fixed name (final, best): swap the complete new one in
                    _write_durable(tmp / COMPLETE, json.dumps(marker).encode())
                    _replace_dir(tmp, final, self.root / f".trash-{name}")
                else:
                    os.replace(tmp, final)
                    _fsync_dir(self.root)
                    _write_durable(final / COMPLETE, json.dumps(marker).encode())
                self._prune()
            except OSError as e:
                error = str(e)
        self._fail_if(error, tmp, name)
        self._last_save = time.monotonic()
        return final

    def _fail_if(self, error: Optional[str], tmp: Path, name: str) -> None:
        try:
            _agree(error, f"checkpoint {name} not written")
        except CheckpointError as e:
            self._discard(tmp)
            raise CheckpointError(f"{e}{self._space_text()} ({self._latest_text()})") from None

    def _space_text(self) -> str:
        """The free space, to tell a full disk from other write errors (torch.save reports
        ENOSPC as "unexpected pos")."""
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            return ""
        need = getattr(self, "estimated_bytes", 0)
        return (f"; {free / 2**20:.1f} MiB free on the file system of {self.root}"
                + (f", a checkpoint needs ≈ {need / 2**20:.1f} MiB (disk full?)" if need else ""))

    def _discard(self, tmp: Path) -> None:
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)

    def _latest_text(self) -> str:
        latest = latest_checkpoint(self.root)
        return f"the latest complete checkpoint is still {latest}" if latest else "no complete checkpoint exists yet"

    def _prune(self) -> None:
        keep = self.cfg.checkpoint.keep_last
        steps = [p for _, p in list_checkpoints(self.root) if p.name != "final"]
        if keep > 0:
            for p in steps[:-keep]:
                shutil.rmtree(p, ignore_errors=True)

    def _state(self, scheduler: Any, progress: TrainProgress) -> Dict[str, Any]:
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        return {
            "format": FORMAT_VERSION,
            "step": progress.step,
            "epoch": progress.epoch,
            "segments": [dataclasses.asdict(s) for s in progress.segments],
            "train_seconds": progress.train_seconds,
            "world_size": self.env.world_size,
            "scheduler": sched,
            "plan": self.plan,
            "data_fingerprint": self.fingerprint,
            "config": self.cfg.to_dict(),
            "tracker": dict(progress.tracker),
        }

    # ---------------------------------------------------------------- resuming
    def resume_path(self) -> Optional[Path]:
        """The checkpoint to resume from per ``checkpoint.resume`` (rank 0 decides, all agree)."""
        mode = self.cfg.checkpoint.resume
        choice: List[Optional[str]] = [None]
        error = None
        if self.env.is_main:
            restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
            if mode in ("auto",) or (mode == "" and restarted):
                latest = latest_checkpoint(self.root)
                choice[0] = str(latest) if latest else None
            elif mode == "best":
                best = self.root / "best"
                if not is_complete(best):
                    error = f"checkpoint.resume=best: {best} is not a complete checkpoint (checkpoint.keep_best writes it)"
                choice[0] = str(best)
            elif mode not in ("", "none"):
                if not is_complete(Path(mode)):
                    error = f"checkpoint.resume={mode}: not a complete checkpoint (no COMPLETE marker or no .metadata)"
                choice[0] = mode
        _agree(error, "cannot resume")
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(choice, src=0)
        return Path(choice[0]) if choice[0] else None

    def resume(self, dmp: torch.nn.Module, optimizer: Any, scheduler: Any, audit: bool = False) -> TrainProgress:
        """Loads the checkpoint ``checkpoint.resume`` selects (or none) and returns the progress.

        Tables and optimizer states are resharded by DCP when the world size or plan changed;
        a plan change to or from column-wise sharding of a row-wise Adagrad table cannot be
        (its per-row state is kept per column shard) and raises unless ``checkpoint.model_only``.
        """
        path = self.resume_path()
        if path is None:
            if audit and self.env.is_main:
                shutil.rmtree(self.run_dir / "audit", ignore_errors=True)
            self._barrier()
            return TrainProgress()
        state = json.loads((path / "trainer" / "state.json").read_text())
        model_only = self.cfg.checkpoint.model_only
        if not model_only:
            self._check_reshardable(path, state)
        to_load: Dict[str, Any] = {"model": dmp.state_dict()}
        if not model_only:
            _init_dense_state(optimizer)
            to_load["optim"] = optimizer.state_dict()
        try:
            safe_dcp_load(to_load, path)
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(f"cannot load checkpoint {path}: {e}") from None
        except (Exception, DCPException) as e:
            hint = "" if model_only else " (set checkpoint.model_only=true to load the weights only and reset the optimizer state)"
            raise CheckpointError(f"cannot load checkpoint {path}: {e}{hint}") from e
        dmp.load_state_dict(to_load["model"])
        if not model_only:
            optimizer.load_state_dict(to_load["optim"])
        sched = dict(scheduler.state_dict())
        sched.update(state["scheduler"])
        scheduler.load_state_dict(sched)
        for g, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            g["lr"] = lr
        segments = [Segment(**s) for s in state["segments"]]
        if segments and self.fingerprint and state.get("data_fingerprint") and state["data_fingerprint"] != self.fingerprint:
            raise CheckpointError(
                f"{path}: it stopped in the middle of epoch {state['epoch']}, but data.train lists other row groups "
                "than when it was written; the position within the epoch would be meaningless (restore the data, "
                "or resume from a checkpoint written at an epoch boundary)")
        progress = TrainProgress(step=int(state["step"]), epoch=int(state["epoch"]), segments=segments,
                                 train_seconds=float(state["train_seconds"]), tracker=dict(state.get("tracker") or {}))
        same_world = int(state["world_size"]) == self.env.world_size
        self._restore_rank_state(path, same_world, progress)
        if audit and self.env.is_main:
            RowAudit.truncate(self.run_dir, progress.step)
        self._barrier()
        if self.env.is_main:
            print(f"[dlrm_mtl] resumed from {path}: step {progress.step}, epoch {progress.epoch}, "
                  f"{sum(s.batches for s in segments)} steps into the epoch"
                  + (f", world size {state['world_size']} -> {self.env.world_size}" if not same_world else "")
                  + (" (weights only; optimizer state reset)" if model_only else ""), flush=True)
        return progress

    def _restore_rank_state(self, path: Path, same_world: bool, progress: TrainProgress) -> None:
        """RNG states and row counters from ``trainer/rank*.pt`` (read by :func:`load_rank_state`).

        Same world size: this rank's file restores its RNGs and counters exactly. Another world
        size (or no file for this rank): fresh per-rank RNG streams, and rank 0 sums the old
        counters. A file any rank cannot read or refuses raises the same CheckpointError on
        every rank (no rank is left waiting at the next collective).
        """
        rank_file = path / "trainer" / f"rank{self.env.rank}.pt"
        error = None
        try:
            if same_world and rank_file.exists():
                rs = load_rank_state(rank_file)
                restore_rng(rs)
                progress.rows_trained, progress.padding_rows = rs["rows_trained"], rs["padding_rows"]
            else:
                seed = self.cfg.train.seed * 1_000_003 + progress.step * 101 + self.env.rank
                torch.manual_seed(seed)
                np.random.seed(seed % 2**32)
                random.seed(seed)
                if self.env.is_main:
                    for f in sorted((path / "trainer").glob("rank*.pt")):
                        rs = load_rank_state(f)
                        progress.rows_trained += rs["rows_trained"]
                        progress.padding_rows += rs["padding_rows"]
        except CheckpointError as e:
            error = str(e)
        except (ValueError, TypeError) as e:  # a well-typed state the RNGs reject (e.g. a key of the wrong length)
            error = f"{rank_file}: cannot restore the RNG states: {e}"
        _agree(error, f"cannot resume from {path}")

    def _check_reshardable(self, path: Path, state: Dict[str, Any]) -> None:
        old_plan: Dict[str, Dict[str, Any]] = state.get("plan", {})
        bad = []
        for table, new in self.plan.items():
            old = old_plan.get(table)
            if old is None:
                continue
            kind = self.cfg.sharding.tables[table].optimizer if table in self.cfg.sharding.tables else "rowwise_adagrad"
            changed = (old["sharding_type"], old["ranks"]) != (new["sharding_type"], new["ranks"])
            if kind == "rowwise_adagrad" and changed and (_column_wise(old["sharding_type"]) or _column_wise(new["sharding_type"])):
                bad.append(f"{table}: {old['sharding_type']} on ranks {old['ranks']} -> {new['sharding_type']} on ranks {new['ranks']}")
        if bad:
            raise CheckpointError(
                f"cannot resume from {path}: TorchRec cannot reshard row-wise Adagrad state to or from column-wise "
                f"sharding (it keeps one state per row and column shard): {'; '.join(bad)}. Either keep the old "
                "plan (sharding.tables.<t>.types) or set checkpoint.model_only=true to load the weights and start "
                "the optimizer state afresh")


def _init_dense_state(optimizer: Any) -> None:
    """Materialises lazily created optimizer state (Adam's moments and step) so DCP can load
    into it in place; fused table optimizers create theirs eagerly. Parameters are unchanged
    in effect: the checkpoint overwrites them right after."""
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

    optims = [o for _, o in optimizer.optimizers] if isinstance(optimizer, CombinedOptimizer) else [optimizer]
    for opt in optims:
        if isinstance(opt, KeyedOptimizer) and not opt.state:
            with torch.no_grad():
                saved = {k: p.detach().clone() for k, p in opt.params.items()}
            opt.init_state()
            with torch.no_grad():
                for k, p in opt.params.items():
                    p.copy_(saved[k])
                    p.grad = None
