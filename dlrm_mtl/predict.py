"""``dlrm-mtl predict``: per-row probabilities and the fused score of a checkpoint, to Parquet.

Each rank scores the row groups the same deterministic split as training gives it
(:func:`dlrm_mtl.data.stream.assign_row_groups`), through the same validation as training
(:class:`~dlrm_mtl.data.stream.RowGroupConverter`; label, weight, user and position-bias
columns may be absent), one row group at a time (memory bounded by the largest row group), and
streams its rows to ``OUT/part-<rank>.parquet``:

* ``row_id`` (the schema's row-id column) or, without one, ``source_file`` and
  ``source_row`` (the row's index in its file);
* the ``--keep`` columns, copied from the input as they are (user id, request id, ...);
* one column per prediction name (:func:`dlrm_mtl.scoring.prediction_names`: each task's
  probability, chained tasks' entire-space ones, e.g. ``ctr, cvr, ctcvr``), float32;
* ``score``: the fused ranking score (PLE eq. 1, ``predict.fusion``).

Every input row appears exactly once over the parts; padding rows never do. A part is written
as ``part-<rank>.parquet.tmp`` and renamed when complete; ``_SUCCESS`` is written last, by
rank 0, after every rank renamed its part: a directory without ``_SUCCESS`` is not an output.
Ranks with fewer row groups run empty batches so that the sharded tables' collectives stay
matched.

Example::

    torchrun --nproc_per_node 2 -m dlrm_mtl predict --config runs/demo/config.yaml \\
        --checkpoint runs/demo/checkpoints/final --data data/synthetic/eval --out runs/demo/pred --keep user_id
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from dlrm_mtl.checkpoint import is_complete, safe_dcp_load
from dlrm_mtl.config import Config
from dlrm_mtl.data.batch_columns import BatchColumns
from dlrm_mtl.data.errors import DataError
from dlrm_mtl.data.source import open_source
from dlrm_mtl.data.stream import RowGroup, RowGroupConverter, assign_row_groups, list_row_groups
from dlrm_mtl.distributed import init_distributed, shard_model, shutdown_distributed
from dlrm_mtl.losses import EntireSpaceLoss
from dlrm_mtl.models import MultiScenarioMultiTaskModel, TrainModule
from dlrm_mtl.schema import Schema
from dlrm_mtl.scoring import fused_score, fusion_weights, named_predictions, prediction_names
from dlrm_mtl.task_graph import TaskGraph

SUCCESS = "_SUCCESS"


def output_columns(schema: Schema, keep: Sequence[str]) -> List[str]:
    """The columns of every part, in order (see the module docstring)."""
    ids = [schema.row_id] if schema.row_id else ["source_file", "source_row"]
    cols = ids + list(keep) + prediction_names(schema) + ["score"]
    dup = sorted({c for c in cols if cols.count(c) > 1})
    if dup:
        raise ValueError(f"--keep {list(keep)}: column(s) {dup} clash with the output's own columns {ids + prediction_names(schema) + ['score']}")
    return cols


def batches_per_rank(shards: Sequence[Sequence[RowGroup]], batch_size: int) -> List[int]:
    """Forward passes each rank runs: every row group cut into batches of its own."""
    return [sum(math.ceil(g.num_rows / batch_size) for g in shard) for shard in shards]


def _prepare_out(out: Path, env_rank: int) -> None:
    if env_rank == 0:
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out}: exists and is not empty; predict writes a new directory (remove it or pick another --out)")
        out.mkdir(parents=True, exist_ok=True)
    if dist.get_world_size() > 1:
        dist.barrier()
    out.mkdir(parents=True, exist_ok=True)  # a rank on another host without a shared disk


def predict(cfg: Config, checkpoint: str, data: str, out_dir: str, keep: Sequence[str] = ()) -> Dict[str, Any]:
    """Scores ``data`` with ``checkpoint`` into ``out_dir`` (see the module docstring); returns
    ``{"rows", "parts", "seconds", "world_size"}`` (rows: this job's total)."""
    if not is_complete(Path(checkpoint)):
        raise FileNotFoundError(f"{checkpoint}: not a complete checkpoint (no .metadata or no COMPLETE marker)")
    schema = Schema.load(cfg.data.schema_path())
    output_columns(schema, keep)  # a --keep name that clashes: refused before the process group
    weights = fusion_weights(schema, cfg.predict.fusion)
    env = init_distributed(cfg.train.backend, cfg.train.timeout_s, cfg.train.threads_per_rank)
    try:
        t0 = time.perf_counter()
        out = Path(out_dir)
        _prepare_out(out, env.rank)
        module = TrainModule(MultiScenarioMultiTaskModel(schema, cfg.model, device=torch.device("meta")),
                             EntireSpaceLoss(schema, cfg.loss), cuda_graph="eager", precision=cfg.train.precision)
        dmp, _, _ = shard_model(module, cfg, env, schema)
        state = {"model": dmp.state_dict()}
        safe_dcp_load(state, Path(checkpoint))
        dmp.load_state_dict(state["model"])
        dmp.eval()
        dset = open_source(data)
        groups = list_row_groups(dset)
        if not groups:
            raise DataError(f"{data}: no rows to score")
        shards = assign_row_groups(groups, env.world_size)
        batch_size = cfg.data.eval_rows_per_batch()
        per_rank = batches_per_rank(shards, batch_size)
        converter = RowGroupConverter(schema, with_oracle=False, filesystem=dset.filesystem, labels_optional=True)
        arrow_schema = output_schema(schema, converter, groups[0], list(keep))
        rows = _score_shard(dmp, schema, converter, shards[env.rank], groups[0], max(per_rank), batch_size,
                            env.device, TaskGraph(schema), weights, arrow_schema, list(keep), out / f"part-{env.rank:05d}.parquet")
        total = rows
        if env.world_size > 1:
            t = torch.tensor([rows], dtype=torch.int64, device=env.device if env.backend == "nccl" else "cpu")
            dist.all_reduce(t)
            total = int(t.item())
            dist.barrier()  # every part renamed before the marker
        if env.rank == 0:
            (out / SUCCESS).write_text(f"{total} rows in {env.world_size} part(s)\n")
        return {"rows": total, "parts": env.world_size, "seconds": time.perf_counter() - t0, "world_size": env.world_size}
    finally:
        shutdown_distributed()


def output_schema(schema: Schema, converter: RowGroupConverter, template: RowGroup, keep: List[str]) -> pa.Schema:
    """The parts' Arrow schema: ids, the ``--keep`` columns with their input types (read from
    ``template``'s file), float32 predictions and score."""
    fields = ([pa.field(schema.row_id, pa.int64())] if schema.row_id
              else [pa.field("source_file", pa.string()), pa.field("source_row", pa.int64())])
    if keep:
        physical = converter.format.make_fragment(template.path, converter.filesystem).physical_schema
        missing = [c for c in keep if c not in physical.names]
        if missing:
            raise DataError(f"{template.path}: --keep column(s) {missing} not in the file")
        fields += [physical.field(c) for c in keep]
    fields += [pa.field(n, pa.float32()) for n in prediction_names(schema)] + [pa.field("score", pa.float32())]
    return pa.schema(fields)


def _score_shard(dmp: torch.nn.Module, schema: Schema, converter: RowGroupConverter, groups: Sequence[RowGroup],
                 template: RowGroup, num_batches: int, batch_size: int, device: torch.device, graph: TaskGraph,
                 weights: Dict[str, float], arrow_schema: pa.Schema, keep: List[str], part: Path) -> int:
    """Scores this rank's row groups into ``part`` (written as ``.tmp``, renamed when done);
    then runs empty batches (cut from ``template``'s columns) up to ``num_batches``. Returns
    the rows written."""
    tmp = part.with_name(part.name + ".tmp")
    columns = arrow_schema.names
    writer: Any = pq.ParquetWriter(str(tmp), arrow_schema)
    done, written = 0, 0
    empty = None
    try:
        with torch.no_grad():
            for g in groups:
                table = converter.read(g)
                cols = BatchColumns(table, schema, with_oracle=False)
                kept = _keep_columns(converter, g, keep, table.num_rows)
                pieces: Dict[str, List[np.ndarray]] = {c: [] for c in columns if c not in keep}
                for start in range(0, table.num_rows, batch_size):
                    n = min(batch_size, table.num_rows - start)
                    probs = _forward(dmp, cols.batch(start, n, batch_size), device, graph, weights)
                    for name, v in probs.items():
                        pieces[name].append(v[:n])
                    done += 1
                ids = _row_ids(schema, table, g)
                arrays = {**ids, **{c: kept.column(c) for c in keep},
                          **{c: pa.array(np.concatenate(pieces[c]).astype(np.float32)) for c in pieces if c not in ids}}
                try:
                    batch_table = pa.table({c: arrays[c] for c in columns}).cast(arrow_schema)
                except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
                    raise DataError(f"{g.path}: --keep column types differ from {template.path}'s: {e}") from None
                writer.write_table(batch_table)
                written += batch_table.num_rows
            while done < num_batches:  # matched collectives: every rank runs as many forwards
                if empty is None:
                    empty = BatchColumns(converter.read(template).slice(0, 0), schema, with_oracle=False).batch(0, 0, batch_size)
                _forward(dmp, empty, device, graph, weights)
                done += 1
        writer.close()
        writer = None
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, part)
        return written
    finally:
        if writer is not None:
            writer.close()


def _forward(dmp: torch.nn.Module, batch: Any, device: torch.device, graph: TaskGraph, weights: Dict[str, float]) -> Dict[str, np.ndarray]:
    batch = batch.to(device, non_blocking=True)
    _, (logits, _, _, _) = dmp(batch)
    probs = named_predictions(graph, logits.float())
    probs["score"] = fused_score(probs, weights)
    return {k: v.cpu().numpy() for k, v in probs.items()}


def _row_ids(schema: Schema, table: pa.Table, g: RowGroup) -> Dict[str, pa.Array]:
    if schema.row_id:
        return {schema.row_id: table["row_id"].combine_chunks()}
    n = table.num_rows
    return {"source_file": pa.array([g.path] * n), "source_row": pa.array(np.arange(g.first_row, g.first_row + n, dtype=np.int64))}


def _keep_columns(converter: RowGroupConverter, g: RowGroup, keep: List[str], rows: int) -> pa.Table:
    if not keep:
        return pa.table({})
    frag = converter.format.make_fragment(g.path, converter.filesystem, row_groups=[g.index])
    missing = [c for c in keep if c not in frag.physical_schema.names]
    if missing:
        raise DataError(f"{g.path}: --keep column(s) {missing} not in the file")
    t = frag.to_table(columns=keep, use_threads=False)
    if t.num_rows != rows:
        raise DataError(f"{g.path}: row group {g.index}: {t.num_rows} rows for --keep, {rows} scored")
    return t
