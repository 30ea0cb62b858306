"""``dlrm-mtl export-checkpoint``: a sharded checkpoint as one unsharded ``torch.save`` file.

The DCP shards of every table are assembled into full tensors in this one process (no
process group, no TorchRec), so the output loads into an unsharded model anywhere::

    dlrm-mtl export-checkpoint --checkpoint runs/demo/checkpoints/final --out model.pt

    sd = torch.load("model.pt")
    sd["model"]      # {"model.ebc.embedding_bags.t_user.weight": [500000, 16], "model.dense...": ...}
    sd["trainer"]    # step, epoch, plan, config of the checkpoint (trainer/state.json)
    module = TrainModule(MultiScenarioMultiTaskModel(schema, cfg.model), EntireSpaceLoss(schema, cfg.loss))
    module.load_state_dict(sd["model"])

Memory: the whole state (every table) is held once in host memory.

``dlrm-mtl export``: the serving model (:mod:`dlrm_mtl.serving`) as a ``torch.export``
program that runs with torch alone, and its input/output contract (docs/serving.md)::

    dlrm-mtl export --checkpoint runs/demo/checkpoints/final --out runs/demo/serving
    # runs/demo/serving/model.pt2, runs/demo/serving/signature.json

    model = torch.export.load("runs/demo/serving/model.pt2").module()
    out = model({"user_id.values": ..., "user_id.offsets": ..., ..., "dense": ..., "scenario": ...})
    out["score"]     # [B]
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from dlrm_mtl.checkpoint import CheckpointError, SafeFileSystemReader, is_complete
from dlrm_mtl.memory import available_memory_bytes


def load_unsharded(checkpoint: str | Path, with_optimizer: bool = False) -> Dict[str, Any]:
    """``{"model": {name: full tensor}, ["optim": ...,] "trainer": {...}}`` of a checkpoint."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    path = Path(checkpoint)
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (no COMPLETE marker or no .metadata)")
    keys = {"model", "optim"} if with_optimizer else {"model"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: loading into this process" is the intent
        # the .metadata file through the allow-listed reader (it is a pickle)
        sd = _load_state_dict_from_keys(keys, checkpoint_id=str(path), storage_reader=SafeFileSystemReader(str(path)))
    state_file = path / "trainer" / "state.json"
    sd["trainer"] = json.loads(state_file.read_text()) if state_file.exists() else {}
    return sd


def export_checkpoint(checkpoint: str | Path, out: str | Path, with_optimizer: bool = False) -> Dict[str, Any]:
    """Writes :func:`load_unsharded` to ``out``; returns counts for the command's message."""
    sd = load_unsharded(checkpoint, with_optimizer)
    tensors = [t for t in _tensors(sd)]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, out)
    return {"tensors": len(tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors),
            "step": sd["trainer"].get("step")}


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


# ---------------------------------------------------------------------------- dlrm-mtl export

SIGNATURE_FORMAT = "dlrm_mtl serving signature 1"
TABLE_PREFIX = "model.ebc.embedding_bags."  # TrainModule state dict: model.ebc.embedding_bags.<table>.weight
DENSE_PREFIX = "model.dense_arch."
SEQUENCE_PREFIX = "model.sequence_arch."  # the sequence encoders
# a sequence table: model.sequence_tables.dim<D>.embeddings.<table>.weight (one collection per dim)
SEQUENCE_TABLE = re.compile(r"^model\.sequence_tables\.dim\d+\.embeddings\.([^.]+)\.weight$")
EXPORT_OVERHEAD_BYTES = 256 * 2**20  # tracing, the archive's bookkeeping


class ExportError(CheckpointError):
    """A checkpoint that cannot be exported as a serving model here (its tables do not fit in
    this process's memory, or they do not match the schema)."""


@dataclass(frozen=True)
class TableSize:
    """One embedding table as the checkpoint's metadata describes it (nothing loaded)."""

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    bytes: int

    def describe(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return f"{self.name!r} ({' x '.join(f'{n:,}' for n in self.shape)} {dtype}, {_gib(self.bytes)})"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def checkpoint_sizes(checkpoint: str | Path) -> Tuple[List[TableSize], int, int]:
    """``(tables, model_bytes, largest_bytes)`` from a checkpoint's ``.metadata`` alone: its
    embedding tables (largest first), the bytes of all its ``model`` tensors and of the
    largest of them."""
    from dlrm_mtl.checkpoint import SafeFileSystemReader

    md = SafeFileSystemReader(str(checkpoint)).read_metadata()
    tables: List[TableSize] = []
    total = largest = 0
    prefix = "model." + TABLE_PREFIX
    for key, meta in md.state_dict_metadata.items():
        if not key.startswith("model.") or not hasattr(meta, "chunks"):  # tensors only (not bytes items)
            continue
        n = torch.empty((), dtype=meta.properties.dtype).element_size() * _numel(meta.size)
        total += n
        largest = max(largest, n)
        seq = SEQUENCE_TABLE.match(key[len("model."):])
        if key.startswith(prefix) and key.endswith(".weight"):
            tables.append(TableSize(key[len(prefix):-len(".weight")], tuple(meta.size), meta.properties.dtype, n))
        elif seq:
            tables.append(TableSize(seq.group(1), tuple(meta.size), meta.properties.dtype, n))
    return sorted(tables, key=lambda t: -t.bytes), total, largest


def _numel(size: Any) -> int:
    n = 1
    for s in size:
        n *= int(s)
    return n


def export_memory_needed(model_bytes: int, largest_bytes: int) -> int:
    """Peak host memory :func:`export_model` adds to the process: every ``model`` tensor once
    (the serving model uses the loaded tables in place), plus two transient copies of the
    largest table, both while DCP reads it (the bytes read and the tensor they load into) and
    while ``torch.export.save`` writes it (measured: a 0.97 GiB table and 1.0 GiB in all peaked
    at 2.9 GiB above the imports), plus :data:`EXPORT_OVERHEAD_BYTES`."""
    return model_bytes + 2 * largest_bytes + EXPORT_OVERHEAD_BYTES


def check_export_memory(checkpoint: str | Path, available: Optional[int] = None) -> Dict[str, int]:
    """Refuses (ExportError naming the tables and sizes) an export whose tables cannot be
    gathered into this one process, before anything is loaded. ``available``: default
    :func:`available_memory_bytes` (no check where that is unknown). Returns the estimate."""
    tables, model_bytes, largest = checkpoint_sizes(checkpoint)
    need = export_memory_needed(model_bytes, largest)
    available = available_memory_bytes() if available is None else available
    sizes = {"model_bytes": model_bytes, "needed_bytes": need, "available_bytes": -1 if available is None else available}
    if available is None or need <= available:
        return sizes
    where = f"{checkpoint}: the serving model holds every embedding table in one process"
    if tables and tables[0].bytes > available:
        raise ExportError(
            f"{where}: table {tables[0].describe()} alone is larger than the {_gib(available)} of memory available "
            f"(about {_gib(need)} needed in all: the model's {_gib(model_bytes)} plus two transient copies of this "
            "table while reading and writing it); export on a machine with more memory, or train with fewer num_embeddings (hash: true)")
    listed = ", ".join(t.describe() for t in tables[:3]) + (f" and {len(tables) - 3} more" if len(tables) > 3 else "")
    raise ExportError(
        f"{where}: about {_gib(need)} needed (the model's {_gib(model_bytes)}, of which tables {listed}, plus "
        f"two transient copies of the largest table while reading and writing it), only {_gib(available)} available; export on a machine "
        "with more memory or free some")


def run_config_path(checkpoint: str | Path, config: Optional[str | Path] = None) -> Path:
    """``config`` if given, else the run's ``config.yaml`` of ``RUN/checkpoints/<name>``."""
    if config is not None:
        return Path(config)
    path = Path(checkpoint).resolve().parent.parent / "config.yaml"
    if not path.is_file():
        from dlrm_mtl.config import ConfigError

        raise ConfigError(f"{checkpoint}: no run config at {path} (a checkpoint of `dlrm-mtl train` is "
                          "RUN_DIR/checkpoints/<name>, next to RUN_DIR/config.yaml); pass --config RUN_DIR/config.yaml")
    return path


def export_model(checkpoint: str | Path, out_dir: str | Path, config: Optional[str | Path] = None) -> Dict[str, Any]:
    """Writes ``out_dir/model.pt2`` (``torch.export.save`` of the serving model of
    ``checkpoint``, see :mod:`dlrm_mtl.serving`) and ``out_dir/signature.json``; returns
    the signature. ``config``: the run's config (default: see :func:`run_config_path`).

    Refuses before loading anything where the run config or schema is missing or invalid
    (ConfigError, SchemaError), the checkpoint is incomplete, its tables differ from the
    schema's or cannot be gathered into this process (ExportError)."""
    from dlrm_mtl.config import Config, check_values
    from dlrm_mtl.schema import Schema
    from dlrm_mtl.scoring import fusion_weights
    from dlrm_mtl.serving import ServingModel, export_serving_model, output_names

    path = Path(checkpoint)
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (no COMPLETE marker or no .metadata)")
    cfg_path = run_config_path(path, config)
    cfg = Config.load(str(cfg_path))
    schema_path = cfg.data.schema_path()
    schema = Schema.load(schema_path)
    check_values(cfg, schema)
    fusion = fusion_weights(schema, cfg.predict.fusion)
    output_names(schema)  # a task named like the score output is refused here, before loading
    tables, _, _ = checkpoint_sizes(path)
    _check_tables(path, tables, schema, schema_path)
    estimate = check_export_memory(path)

    state = load_unsharded(path)
    weights = state["model"]
    table_weights = {t: weights.pop(f"{TABLE_PREFIX}{t}.weight") for t in {f.table for f in schema.sparse}}
    sequence_weights = {m.group(1): weights.pop(k) for k in list(weights) if (m := SEQUENCE_TABLE.match(k))}
    model = ServingModel(schema, cfg.model, fusion, tables=table_weights, sequence_tables=sequence_weights)
    dense_state = {k[len(DENSE_PREFIX):]: v for k, v in weights.items() if k.startswith(DENSE_PREFIX)}
    try:
        model.dense_arch.load_state_dict(dense_state)
        if model.sequence_arch is not None:
            model.sequence_arch.load_state_dict({k[len(SEQUENCE_PREFIX):]: v for k, v in weights.items()
                                                 if k.startswith(SEQUENCE_PREFIX)})
    except RuntimeError as e:
        raise ExportError(f"{path}: the model config of {cfg_path} does not build this checkpoint's dense arch "
                          f"(was it trained with another config?): {' '.join(str(e).split())}") from None
    del weights, dense_state
    model.eval().requires_grad_(False)
    program = export_serving_model(model, schema)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sig = signature(schema, fusion, checkpoint=path, config=cfg_path, schema_path=schema_path,
                    step=state["trainer"].get("step"))
    sig["memory_estimate_bytes"] = estimate["needed_bytes"]
    tmp = out / ".model.tmp.pt2"  # torch.export.save wants the .pt2 suffix
    try:
        torch.export.save(program, str(tmp))
        os.replace(tmp, out / "model.pt2")
    finally:
        tmp.unlink(missing_ok=True)
    (out / "signature.json").write_text(json.dumps(sig, indent=2) + "\n")
    return sig


def _check_tables(path: Path, tables: List[TableSize], schema: Any, schema_path: str) -> None:
    """The checkpoint's tables against the schema's (names and shapes), from the metadata."""
    have = {t.name: t for t in tables}
    for f in schema.sparse + schema.sequence:
        t = have.get(f.table)
        if t is None:
            raise ExportError(f"{path}: no embedding table {f.table!r} (feature {f.name!r} of {schema_path}); "
                              f"the checkpoint has {sorted(have)}")
        if t.shape != (f.num_embeddings, f.dim):
            raise ExportError(f"{path}: table {f.table!r} is {list(t.shape)} in the checkpoint, [{f.num_embeddings}, {f.dim}] "
                              f"in {schema_path} (is that the schema the run trained with?)")


def signature(schema: Any, fusion: Dict[str, float], checkpoint: Path, config: Path, schema_path: str,
              step: Optional[int]) -> Dict[str, Any]:
    """The contract of ``model.pt2``: inputs and outputs in order, with dtype and shape, and
    what the caller must prepare (signature.json; docs/serving.md)."""
    from dlrm_mtl.serving import DENSE, SCENARIO, SCORE, offsets_name, output_names, values_name

    inputs: List[Dict[str, Any]] = []
    for f in schema.sparse:
        if f.hash:
            ids = (f"hash: true: raw ids hashed into [0, {f.num_embeddings}) exactly as the reader does "
                   "(dlrm_mtl/data/stream.py: hash_ids for integer ids - splitmix64 finaliser of the id's 64 bits, "
                   "modulo num_embeddings; hash_strings for string ids - FNV-1a 64 over the UTF-8 bytes, then hash_ids)")
        else:
            ids = f"hash: false: the raw ids themselves, which must lie in [0, {f.num_embeddings})"
        if f.multi_hot and f.max_len:
            ids += f"; lists longer than max_len {f.max_len} keep their first {f.max_len} ids"
        inputs.append({"name": values_name(f.name), "dtype": "int64", "shape": [f"ids_{f.name}"], "feature": f.name,
                       "column": f.column, "table": f.table, "num_embeddings": f.num_embeddings, "dim": f.dim,
                       "pooling": f.pooling, "multi_hot": f.multi_hot, "hash": f.hash, "ids": ids})
        inputs.append({"name": offsets_name(f.name), "dtype": "int64", "shape": ["batch + 1"], "feature": f.name,
                       "bags": f"row b's ids are {values_name(f.name)}[offsets[b]:offsets[b + 1]]; offsets[0] = 0, "
                               "offsets[batch] = the number of ids; a missing id or list (null) is an empty bag "
                               "(two equal offsets)" + ("" if f.multi_hot else "; single-hot: arange(batch + 1) when no id is missing")})
    for f in schema.sequence:
        ids = (f"hash: true: raw ids hashed into [0, {f.num_embeddings}) exactly as the reader does (as above)" if f.hash
               else f"hash: false: the raw ids themselves, which must lie in [0, {f.num_embeddings})")
        inputs.append({"name": values_name(f.name), "dtype": "int64", "shape": [f"ids_{f.name}"], "feature": f.name,
                       "column": f.column, "table": f.table, "num_embeddings": f.num_embeddings, "dim": f.dim,
                       "sequence": True, "max_len": f.max_len, "keep": f.keep, "aligned_with": f.aligned_with or None,
                       "hash": f.hash, "ids": ids + f"; a behaviour sequence, oldest event first: the model keeps each "
                                                   f"row's {'last' if f.keep == 'last' else 'first'} {f.max_len} events itself"})
        inputs.append({"name": offsets_name(f.name), "dtype": "int64", "shape": ["batch + 1"], "feature": f.name,
                       "events": f"row b's events are {values_name(f.name)}[offsets[b]:offsets[b + 1]]; offsets[0] = 0"
                                 + (f"; the same offsets as {offsets_name(f.aligned_with)} (side info of that sequence)"
                                    if f.aligned_with else "")})
    inputs.append({"name": DENSE, "dtype": "float32", "shape": ["batch", len(schema.dense)],
                   "columns": [{"name": d.name, "column": d.column, "transform": d.transform, "default": d.default,
                                "clip_min": d.clip_min, "clip_max": d.clip_max, "standardize": d.standardize,
                                "mean": d.mean, "std": d.std} for d in schema.dense],
                   "values": "raw values (as in the data's columns); the model applies the schema's transforms: NaN -> "
                             "default, log1p, clip, standardize (the reader's order); NaN without a default is refused"})
    inputs.append({"name": SCENARIO, "dtype": "int64", "shape": ["batch", len(schema.scenarios)],
                   "columns": [{"name": s.name, "column": s.column, "num_values": s.num_values, "value_names": s.value_names}
                               for s in schema.scenarios],
                   "values": "one id per scenario level, in [0, num_values)"})
    regression = {t.name for t in schema.tasks if t.type == "regression"}
    outputs = [{"name": n, "dtype": "float32", "shape": ["batch"],
                "kind": "score" if n == SCORE else ("regression" if n in regression else "probability")}
               for n in output_names(schema)]
    return {
        "format": SIGNATURE_FORMAT,
        "model": "model.pt2",
        "call": "torch.export.load('model.pt2').module()(inputs) with inputs = {name: tensor} of every input below "
                "(any order); returns {name: tensor} in the order of outputs",
        "inputs": inputs,
        "outputs": outputs,
        "tasks": [{"name": t.name, "type": t.type, "parent": t.parent, "entire_name": schema.entire_name(t),
                   "sum_of": list(t.sum_of)} for t in schema.tasks],
        "scenarios": [{"name": s.name, "num_values": s.num_values, "value_names": s.value_names} for s in schema.scenarios],
        "fusion": dict(fusion),
        "score": "exp(sum of w * log(max(p, 1e-12))) over fusion = product of p ** w (PLE eq. 1)",
        "torch_version": torch.__version__,
        "schema": {"name": schema.name, "path": str(schema_path)},
        "checkpoint": str(checkpoint),
        "config": str(config),
        "step": step,
    }
