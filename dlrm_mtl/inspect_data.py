"""Validate a data set against its schema and summarise it, one row group at a time.

``inspect_data`` reads every row group through the training reader's own
``RowGroupConverter`` (so every validation error the trainer would hit is raised here, with
the file, column and row), plus the raw columns of that one row group for null counts. Memory
is bounded by one row group plus the distinct-id sets (capped, see ``max_distinct``); the data
set is never loaded whole.

``dense_stats`` computes the mean and population std of every dense feature after default
fill, transform and clipping (exactly the reader's output before standardisation) and returns
a copy of the schema with ``standardize: true`` and those statistics.

Example::

    from dlrm_mtl.inspect_data import inspect_data, format_report, dense_stats
    schema = Schema.load("data/synthetic/schema.yaml")
    report = inspect_data(schema, "data/synthetic/train", world_size=8, batch_size=2048)
    print(format_report(report))
    dense_stats(schema, "data/synthetic/train").save("data/synthetic/schema.std.yaml")
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs  # noqa: F401  (pa.fs)

from dlrm_mtl.data.errors import DataError
from dlrm_mtl.data.source import Source, open_source
from dlrm_mtl.data.stream import RowGroup, RowGroupConverter, assign_row_groups, list_row_groups
from dlrm_mtl.metrics import scenario_names
from dlrm_mtl.schema import Schema, leaf_ids
from dlrm_mtl.task_graph import TaskGraph

#: Distinct ids are counted exactly up to this many per sparse feature; beyond it the feature
#: is reported as ``>= MAX_DISTINCT`` and its id set is dropped (8 bytes per id held).
MAX_DISTINCT = 1_000_000


class _DistinctIds:
    """Exact distinct count of int64 ids, capped at ``cap`` (bounded memory: <= ~2 x cap ids).

    Per-row-group uniques are buffered and merged into the sorted set when the buffer is as
    large as the set, so the total work is O(n log n) rather than one full merge per group.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.known = np.zeros(0, dtype=np.int64)
        self.pending: List[np.ndarray] = []
        self.pending_size = 0
        self.overflow = False

    def add(self, ids: np.ndarray) -> None:
        if self.overflow or ids.size == 0:
            return
        u = np.unique(ids)
        self.pending.append(u)
        self.pending_size += u.size
        if self.pending_size >= max(self.known.size, 65536) or self.pending_size > self.cap:
            self._merge()

    def _merge(self) -> None:
        if self.pending:
            self.known = np.unique(np.concatenate([self.known] + self.pending))
            self.pending, self.pending_size = [], 0
        if self.known.size > self.cap:
            self.overflow = True
            self.known = np.zeros(0, dtype=np.int64)

    def result(self) -> Dict[str, Any]:
        self._merge()
        if self.overflow:
            return {"distinct": self.cap, "exact": False}
        return {"distinct": int(self.known.size), "exact": True}


class _Moments:
    """Streaming count / mean / population variance per column, merged exactly in float64.

    Each chunk contributes its own mean and sum of squared deviations (Chan et al.'s pairwise
    update), which avoids the cancellation of a naive sum-of-squares on large offsets.
    """

    def __init__(self, nd: int) -> None:
        self.n = 0
        self.mean = np.zeros(nd, dtype=np.float64)
        self.m2 = np.zeros(nd, dtype=np.float64)
        self.min = np.full(nd, np.inf)
        self.max = np.full(nd, -np.inf)

    def update(self, x: np.ndarray) -> None:
        k = x.shape[0]
        if k == 0:
            return
        x = x.astype(np.float64, copy=False)
        gm = x.mean(axis=0)
        gm2 = ((x - gm) ** 2).sum(axis=0)
        delta = gm - self.mean
        tot = self.n + k
        self.mean = self.mean + delta * (k / tot)
        self.m2 = self.m2 + gm2 + delta * delta * (self.n * k / tot)
        self.n = tot
        self.min = np.minimum(self.min, x.min(axis=0))
        self.max = np.maximum(self.max, x.max(axis=0))

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.n) if self.n else np.full_like(self.m2, np.nan)


def _dense_matrix(t: pa.Table, nd: int) -> np.ndarray:
    """The converter's ``dense`` column as an [n, nd] float32 array."""
    return t["dense"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, nd)


def _leaf_ids(t: pa.Table, schema: Schema) -> np.ndarray:
    """``[n]`` leaf ids of the converter's (validated) ``scenario:*`` columns."""
    ids = np.stack([t["scenario:" + lvl.name].to_numpy() for lvl in schema.scenarios], axis=1)  # [n, L]
    return leaf_ids(ids, schema)


def _raw_table(group: RowGroup, columns: List[str], filesystem: Optional[pa.fs.FileSystem]) -> pa.Table:
    frag = ds.ParquetFileFormat().make_fragment(group.path, filesystem, row_groups=[group.index])
    present = [c for c in columns if c in frag.physical_schema.names]
    try:
        return frag.to_table(columns=present)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{group.path}: row group {group.index}: cannot read: {e}") from None


def _steps(rows_per_rank: List[int], batch_size: int) -> int:
    # same rule as ParquetStream.num_batches: every rank runs this many (padded) steps
    return max(1, max((-(-r // batch_size) for r in rows_per_rank), default=0))


def inspect_data(
    schema: Schema,
    paths: Source,
    world_size: int = 1,
    filesystem: Optional[pa.fs.FileSystem] = None,
    batch_size: int = 2048,
    max_distinct: int = MAX_DISTINCT,
) -> Dict[str, Any]:
    """Validate ``paths`` against ``schema`` and gather statistics, one row group at a time.

    Raises ``DataError`` (naming the file, column and row) on the first bad row group, exactly
    as the training reader would. Returns a JSON-serialisable dict:

    * ``files``: per file ``{path, row_groups, rows}``; ``num_files``, ``num_row_groups``,
      ``empty_row_groups``, ``total_rows``;
    * ``scenarios``: per leaf scenario name (plus ``all``) ``{rows, tasks: {task: {labeled,
      positives, rate}}}``; a child task also has ``parent_labeled``, ``parent_positives`` and
      ``rate_given_parent`` (rows whose ancestors are all labeled positive);
    * ``null_rates``: per raw column of ``schema.columns()`` ``{rows, nulls, rate}`` (a null
      multi-hot list counts as null; ``rows`` counts the rows of files holding the column);
    * ``cardinality``: per sparse feature ``{distinct, exact, num_embeddings}``: distinct ids
      after hashing / bounds check (null single-hot ids excluded), exact up to ``max_distinct``,
      else ``distinct == max_distinct`` and ``exact == False`` (meaning ``>= max_distinct``);
    * ``dense``: per dense feature ``{count, min, max, mean, std, standardized}`` of the values
      the reader feeds the model (after default fill, transform, clipping, and
      standardisation when the schema asks for it);
    * ``counters``: the reader's policy counters (null ids, truncated lists, filled / clipped
      dense values, null labels);
    * ``world_size``, ``batch_size``, ``ranks`` (per rank ``{rank, row_groups, rows}`` from
      ``assign_row_groups``) and ``steps_per_epoch`` (max over ranks of ceil(rows / batch),
      at least 1, as ParquetStream).
    """
    if world_size <= 0:
        raise ValueError("world_size must be > 0")
    if batch_size <= 0:
        raise ValueError("batch_size must be > 0")
    dset = open_source(paths, filesystem)
    fs = dset.filesystem
    groups = list_row_groups(dset)
    converter = RowGroupConverter(schema, with_oracle=True, filesystem=fs)
    names = scenario_names(schema)
    n_leaf = len(names)
    n_tasks = len(schema.tasks)
    raw_columns = schema.columns()
    # the conditions of each task's conditional space, root first: (task index, positive)
    ancestors = TaskGraph(schema).context

    files: Dict[str, Dict[str, Any]] = {f: {"path": f, "row_groups": 0, "rows": 0} for f in sorted(dset.files)}
    leaf_rows = np.zeros(n_leaf, dtype=np.int64)
    labeled = np.zeros((n_tasks, n_leaf), dtype=np.int64)
    positives = np.zeros((n_tasks, n_leaf), dtype=np.int64)
    p_labeled = np.zeros((n_tasks, n_leaf), dtype=np.int64)
    p_positives = np.zeros((n_tasks, n_leaf), dtype=np.int64)
    col_rows = {c: 0 for c in raw_columns}
    col_nulls = {c: 0 for c in raw_columns}
    distinct = {f.name: _DistinctIds(max_distinct) for f in schema.sparse + schema.sequence}
    nd = len(schema.dense)
    moments = _Moments(nd)
    empty = 0

    for g in groups:
        info = files.setdefault(g.path, {"path": g.path, "row_groups": 0, "rows": 0})
        info["row_groups"] += 1
        info["rows"] += g.num_rows
        if g.num_rows == 0:  # skipped by the reader too
            empty += 1
            continue
        t = converter.read(g)  # every validation of the training reader
        raw = _raw_table(g, raw_columns, fs)
        for c in raw.column_names:
            col_rows[c] += raw.num_rows
            col_nulls[c] += raw[c].null_count
        del raw

        leaf = _leaf_ids(t, schema)
        leaf_rows += np.bincount(leaf, minlength=n_leaf)
        y = np.stack([t["label:" + k.name].to_numpy() for k in schema.tasks], axis=1) > 0.5
        m = np.stack([t["mask:" + k.name].to_numpy(zero_copy_only=False) for k in schema.tasks], axis=1)
        for i in range(n_tasks):
            labeled[i] += np.bincount(leaf[m[:, i]], minlength=n_leaf)
            positives[i] += np.bincount(leaf[m[:, i] & y[:, i]], minlength=n_leaf)
            if ancestors[i]:
                inp = m[:, i].copy()
                for a, positive in ancestors[i]:
                    inp &= m[:, a] & (y[:, a] if positive else ~y[:, a])
                p_labeled[i] += np.bincount(leaf[inp], minlength=n_leaf)
                p_positives[i] += np.bincount(leaf[inp & y[:, i]], minlength=n_leaf)

        for f in schema.sparse + schema.sequence:
            col = t[f.name].combine_chunks()
            if f.multi_hot:
                ids = col.flatten().to_numpy(zero_copy_only=False)
            else:
                ids = col.drop_null().to_numpy(zero_copy_only=False)
            distinct[f.name].add(ids.astype(np.int64, copy=False))

        if nd:
            moments.update(_dense_matrix(t, nd))

    rate = lambda a, b: (a / b) if b else None  # noqa: E731
    scenarios: Dict[str, Any] = {}
    for li, name in [(None, "all")] + list(enumerate(names)):
        sel = slice(None) if li is None else slice(li, li + 1)
        entry: Dict[str, Any] = {"rows": int(leaf_rows[sel].sum()), "tasks": {}}
        for i, task in enumerate(schema.tasks):
            lab, pos = int(labeled[i, sel].sum()), int(positives[i, sel].sum())
            te: Dict[str, Any] = {"labeled": lab, "positives": pos, "rate": rate(pos, lab)}
            if ancestors[i]:
                plab, ppos = int(p_labeled[i, sel].sum()), int(p_positives[i, sel].sum())
                te.update(parent_labeled=plab, parent_positives=ppos, rate_given_parent=rate(ppos, plab))
            entry["tasks"][task.name] = te
        scenarios[name] = entry

    dense: Dict[str, Any] = {}
    for j, d in enumerate(schema.dense):
        if moments.n:
            dense[d.name] = {"count": moments.n, "min": float(moments.min[j]), "max": float(moments.max[j]),
                             "mean": float(moments.mean[j]), "std": float(moments.std[j]),
                             "standardized": bool(d.standardize)}
        else:
            dense[d.name] = {"count": 0, "min": None, "max": None, "mean": None, "std": None,
                             "standardized": bool(d.standardize)}

    shards = assign_row_groups(groups, world_size)
    rows_per_rank = [sum(g.num_rows for g in s) for s in shards]
    total = sum(g.num_rows for g in groups)
    return {
        "schema": schema.name,
        "paths": [str(p) for p in paths] if isinstance(paths, (list, tuple)) else str(paths),
        "files": list(files.values()),
        "num_files": len(files),
        "num_row_groups": len(groups),
        "empty_row_groups": empty,
        "total_rows": total,
        "scenario_names": names,
        "scenarios": scenarios,
        "null_rates": {
            c: {"rows": col_rows[c], "nulls": col_nulls[c], "rate": rate(col_nulls[c], col_rows[c])}
            for c in raw_columns
        },
        "cardinality": {
            f.name: dict(distinct[f.name].result(), num_embeddings=f.num_embeddings, hashed=bool(f.hash))
            for f in schema.sparse + schema.sequence
        },
        "max_distinct": max_distinct,
        "dense": dense,
        "counters": dict(sorted(converter.counters.items())),
        "world_size": world_size,
        "batch_size": batch_size,
        "ranks": [{"rank": r, "row_groups": len(s), "rows": rows_per_rank[r]} for r, s in enumerate(shards)],
        "steps_per_epoch": _steps(rows_per_rank, batch_size),
    }


def _fmt_rate(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _fmt_num(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.6g}"


def format_report(report: Dict[str, Any], max_files: int = 20) -> str:
    """The ``inspect_data`` report as readable text (at most ``max_files`` files listed)."""
    r = report
    out: List[str] = []
    out.append(f"data set (schema {r['schema']!r}): {r['paths']}")
    out.append("")
    out.append("== files & row groups")
    out.append(f"files: {r['num_files']}  row groups: {r['num_row_groups']} ({r['empty_row_groups']} empty)  "
               f"rows: {r['total_rows']}")
    for f in r["files"][:max_files]:
        out.append(f"  {f['path']}  row_groups={f['row_groups']}  rows={f['rows']}")
    if len(r["files"]) > max_files:
        out.append(f"  ... and {len(r['files']) - max_files} more file(s)")

    out.append("")
    out.append("== scenarios: rows and label rates (rate = positives / labeled rows; "
               "|parent = among rows whose parent tasks are positive)")
    task_cols: List[str] = []
    sc = r["scenarios"]
    first = next(iter(sc.values()))
    for tname, te in first["tasks"].items():
        task_cols.append(tname)
        if "rate_given_parent" in te:
            task_cols.append(tname + "|parent")
    width = max([len(n) for n in sc] + [8])
    head = f"{'scenario':<{width}} {'rows':>10} {'share':>7} " + " ".join(f"{c:>14}" for c in task_cols)
    out.append(head)
    out.append("-" * len(head))
    total = max(sc["all"]["rows"], 1)
    for name in ["all"] + list(r["scenario_names"]):
        e = sc[name]
        cells = []
        for tname, te in e["tasks"].items():
            cells.append(f"{_fmt_rate(te['rate']):>8} {te['positives']:>5}" if te["rate"] is not None else f"{'n/a':>14}")
            if "rate_given_parent" in te:
                cells.append(f"{_fmt_rate(te['rate_given_parent']):>8} {te['parent_positives']:>5}"
                             if te["rate_given_parent"] is not None else f"{'n/a':>14}")
        cells = [c if len(c) == 14 else f"{c:>14}" for c in cells]
        out.append(f"{name:<{width}} {e['rows']:>10} {e['rows'] / total:>7.2%} " + " ".join(cells))
    out.append("(each task cell: rate, positives)")

    out.append("")
    out.append("== null rates per column")
    cw = max([len(c) for c in r["null_rates"]] + [6])
    for c, v in r["null_rates"].items():
        if v["rows"] == 0 and r["total_rows"]:
            out.append(f"  {c:<{cw}}  missing from every file")
        else:
            out.append(f"  {c:<{cw}}  {_fmt_rate(v['rate']):>8}  ({v['nulls']} of {v['rows']})")

    out.append("")
    out.append(f"== id cardinality (distinct ids after hashing / bounds; exact up to {r['max_distinct']})")
    fw = max([len(n) for n in r["cardinality"]] + [7])
    for name, v in r["cardinality"].items():
        n = f"{v['distinct']}" if v["exact"] else f">= {v['distinct']}"
        cover = v["distinct"] / v["num_embeddings"]
        out.append(f"  {name:<{fw}}  {n:>12} of {v['num_embeddings']:<10} ({cover:.2%} of the table"
                   f"{', hashed' if v['hashed'] else ''})")

    out.append("")
    out.append("== dense features (reader output: after default fill, transform, clipping, standardisation)")
    if not r["dense"]:
        out.append("  (none)")
    for name, v in r["dense"].items():
        out.append(f"  {name:<{fw}}  min={_fmt_num(v['min'])}  max={_fmt_num(v['max'])}  mean={_fmt_num(v['mean'])}"
                   f"  std={_fmt_num(v['std'])}{'  (standardized)' if v['standardized'] else ''}")

    out.append("")
    out.append("== reader policy counters")
    if not r["counters"]:
        out.append("  (none)")
    for k, v in r["counters"].items():
        out.append(f"  {k}: {v}")

    out.append("")
    out.append(f"== split over {r['world_size']} rank(s), batch size {r['batch_size']}: "
               f"{r['steps_per_epoch']} steps per epoch")
    for e in r["ranks"]:
        out.append(f"  rank {e['rank']}: {e['row_groups']} row groups, {e['rows']} rows")
    return "\n".join(out)


def dense_stats(schema: Schema, paths: Source, filesystem: Optional[pa.fs.FileSystem] = None) -> Schema:
    """A copy of ``schema`` with ``mean``/``std`` of every dense feature and ``standardize: true``.

    Statistics are of the reader's output with standardisation off (after default fill,
    transform and clipping), over every row of ``paths``, streamed one row group at a time
    (count, mean and sum of squared deviations in float64, merged per group). ``std`` is the
    population std; a constant feature gets ``std = 1.0``.
    """
    out = Schema.from_dict(copy.deepcopy(schema.to_dict()))
    if not out.dense:
        return out
    plain = Schema.from_dict(copy.deepcopy(schema.to_dict()))
    for d in plain.dense:
        d.standardize = False
    dset = open_source(paths, filesystem)
    converter = RowGroupConverter(plain, with_oracle=False, filesystem=dset.filesystem)
    nd = len(plain.dense)
    moments = _Moments(nd)
    for g in list_row_groups(dset):
        if g.num_rows:  # the reader skips empty row groups too
            moments.update(_dense_matrix(converter.read(g), nd))
    if moments.n == 0:
        raise DataError(f"{paths}: no rows to compute dense statistics from")
    std = moments.std
    for j, d in enumerate(out.dense):
        d.mean = float(moments.mean[j])
        d.std = float(std[j]) if std[j] > 0 else 1.0
        d.standardize = True
    out.validate()
    return out
