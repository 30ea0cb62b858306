"""Streaming Parquet reader: row groups split across ranks, bounded shuffle, padded equal steps.

Design §2. ``pyarrow.dataset`` lists the files and splits them into row-group fragments;
each rank reads only the row groups assigned to it (balanced by row count, deterministic),
one at a time, so memory is bounded by the shuffle buffer, never the data set (about twice
the buffer: its row groups' numpy columns concatenated, then shuffled, see
:class:`dlrm_mtl.data.batch_columns.BatchColumns`; one buffer more while the next epoch is
prepared, :meth:`ParquetStream.prepare`; plus the converted row groups kept for later epochs,
``cache_bytes``). Each row group is converted to numpy once and shuffled as numpy arrays;
with the cache, epochs after the first neither decode nor convert.

Equal steps policy: every rank yields exactly ``num_batches`` batches of exactly
``batch_size`` rows. The last real batch of a rank is filled up with *padding rows*
(``row_id == -1``, ``weight == 0``, ``label_mask`` all False, no sparse ids), and a rank
whose share is smaller yields whole padding batches until every rank is done. No row is
dropped and none is read twice; padding rows carry no loss and are excluded from metrics,
so collectives never hang on uneven shards. A world of one may keep its epoch's last batch
short instead (``pad_last=False``, ``data.last_batch``): with no other rank to keep in step and
no static shape to keep (a CPU step), padding it only computes rows that train nothing.

Validation happens per row group before shuffling, so errors name the file, the column and
the row (0-based index within the file)::

    DataError: data/train/part-00003.parquet: column 'item_id', row 70123: id 100000 outside
    [0, 100000) (set hash: true in the schema to hash raw ids)

Example::

    stream = ParquetStream(schema, "data/synthetic/train", batch_size=2048, rank=0, world_size=2)
    for batch in stream:        # Batch(sparse=KJT, dense=[B, Fd], scenario=[B, L], ...)
        ...
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import numpy.ma  # noqa: F401 - pa.array(ndarray) checks for masked arrays, and numpy imports
# numpy.ma (10-12 ms) on that first check: at import time, not inside the first training step
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs  # noqa: F401  (pa.fs)
from dlrm_mtl.data.batch import Batch
from dlrm_mtl.data.batch_buffers import BatchBuffers
from dlrm_mtl.data.batch_columns import BatchColumns, table_to_batch
from dlrm_mtl.data.errors import DataError
from dlrm_mtl.data.source import Source, open_source
from dlrm_mtl.schema import Schema


@dataclass(frozen=True)
class Segment:
    """A stretch of one epoch trained by one world size before an interruption.

    Its order is fully determined by these fields (and the epoch and the segments before
    it), so ``batches`` is all a checkpoint needs to know which rows it trained.
    """

    world_size: int
    batch_size: int
    shuffle_buffer_rows: int
    seed: int
    batches: int  # steps trained in this segment


@dataclass(frozen=True)
class RowGroup:
    path: str
    file_index: int
    index: int  # row group index within the file
    first_row: int  # index of its first row within the file
    num_rows: int


def list_row_groups(paths: Source | ds.Dataset, filesystem: Optional[pa.fs.FileSystem] = None) -> List[RowGroup]:
    """Every row group of every file under ``paths``, in sorted file order."""
    dset = paths if isinstance(paths, ds.Dataset) else open_source(paths, filesystem)
    out: List[RowGroup] = []
    for fi, frag in enumerate(sorted(dset.get_fragments(), key=lambda f: f.path)):
        first = 0
        try:
            groups = frag.metadata.num_row_groups
            for rg in range(groups):
                n = frag.metadata.row_group(rg).num_rows
                out.append(RowGroup(frag.path, fi, rg, first, n))
                first += n
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{frag.path}: cannot read Parquet metadata: {e}") from None
    return out


def assign_row_groups(groups: Sequence[RowGroup], world_size: int, rows: Optional[Sequence[int]] = None) -> List[List[RowGroup]]:
    """Deterministic balanced split: largest row groups first, each to the least-loaded rank.

    ``rows`` (default: each group's ``num_rows``) are the rows to balance, e.g. the rows a
    resumed epoch has not trained yet.
    """
    rows = [g.num_rows for g in groups] if rows is None else list(rows)
    shards: List[List[RowGroup]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    order = sorted(range(len(groups)), key=lambda i: (-rows[i], i))
    for i in order:
        r = min(range(world_size), key=lambda k: (load[k], k))
        shards[r].append(groups[i])
        load[r] += rows[i]
    for s in shards:
        s.sort(key=lambda g: (g.file_index, g.index))
    return shards


def hash_ids(ids: np.ndarray, num_buckets: int) -> np.ndarray:
    """Stable hash of integer raw ids into [0, num_buckets): splitmix64's finaliser, then modulo.

    Every id is hashed by its 64-bit two's-complement pattern (signed ids are sign-extended,
    unsigned ids zero-extended): a uint64 id >= 2**63 is hashed as itself, without
    wrap-around, and lands in the bucket of the int64 with the same bits (a negative id).
    Identical on every machine and run (pure uint64 arithmetic), and it mixes the bits so
    structured raw ids (sequential, strided, high-bit only) spread evenly over the buckets.
    """
    z = ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(num_buckets)).astype(np.int64)


def hash_strings(values: pa.Array, num_buckets: int) -> np.ndarray:
    """Stable hash of string/binary raw ids: FNV-1a 64 over the UTF-8 bytes, then ``hash_ids``.

    Vectorised over rows (one pass per byte position), identical on every machine and run.
    A string and an integer are never hashed alike: ``"42"`` and ``42`` land in different
    buckets, which is why one hashed column must hold one kind of id in every file
    (:class:`IdKinds`).
    """
    arr = pc.cast(values, pa.large_binary()) if not pa.types.is_large_binary(values.type) else values
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(n, 0xCBF29CE484222325, dtype=np.uint64)
    prime = np.uint64(0x100000001B3)
    for k in range(int(lengths.max()) if n else 0):
        active = lengths > k
        h[active] = (h[active] ^ data[starts[active] + k].astype(np.uint64)) * prime
    return hash_ids(h.view(np.int64), num_buckets)


def is_string_type(t: pa.DataType) -> bool:
    """Whether ``t`` holds raw ids that are hashed as bytes (string, binary, large variants)."""
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def id_kind(t: pa.DataType) -> Optional[str]:
    """``"integer"`` or ``"string"`` for a raw id column type (a list's value type for
    multi-hot columns); None for any other type (the converter rejects those itself)."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    if pa.types.is_integer(t):
        return "integer"
    return "string" if is_string_type(t) else None


class IdKinds:
    """Remembers the kind of raw id (integer or string) each hashed column holds, per file,
    and raises a DataError naming both files when a column changes kind between files.

    Integer ids are hashed by their bits (:func:`hash_ids`), strings by their bytes
    (:func:`hash_strings`), so ``42`` in one file and ``"42"`` in another would become two
    embedding rows for one raw id. Integer widths (int32, int64, uint64) may differ between
    files, and string may mix with binary: those hash alike.
    """

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = list(dict.fromkeys(columns))
        self._first: Dict[str, Tuple[str, str, pa.DataType]] = {}
        self._lock = threading.Lock()

    def see(self, path: str, column: str, t: pa.DataType) -> None:
        """Records that ``column`` of file ``path`` has type ``t``; raises on a change of kind."""
        kind = id_kind(t)
        if kind is None or column not in self.columns:
            return
        with self._lock:
            first_path, first_kind, first_type = self._first.setdefault(column, (path, kind, t))
        if kind != first_kind:
            raise DataError(
                f"column {column!r}: raw ids are {first_kind}s ({first_type}) in {first_path} but {kind}s ({t}) "
                f"in {path}; integer and string ids hash to different buckets (42 and \"42\" would be two ids), so "
                "the column must hold one kind of id in every file: cast it to one type in the data")

    def see_files(self, fragments: Iterable[ds.Fragment]) -> None:
        """Checks every file with rows (sorted by path) before anything is read: ranks read
        different files, so only a check over all of them finds a change of kind."""
        for frag in sorted(fragments, key=lambda f: f.path):
            try:
                if frag.metadata.num_rows == 0:
                    continue
                physical = frag.physical_schema
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(f"{frag.path}: cannot read Parquet metadata: {e}") from None
            for column in self.columns:
                if column in physical.names:
                    self.see(frag.path, column, physical.field(column).type)


def hashed_id_columns(schema: Schema) -> List[str]:
    """The columns whose raw ids are hashed: sparse features with ``hash: true`` and the
    user column (string user ids are hashed for GAUC)."""
    return [f.column for f in schema.sparse + schema.sequence if f.hash] + ([schema.user_id] if schema.user_id else [])


def first_above_int64(values: np.ndarray) -> Optional[int]:
    """Position of the first value above the int64 range (only uint64 arrays have one), else None."""
    if values.dtype != np.uint64:
        return None
    over = values > np.uint64(np.iinfo(np.int64).max)
    return int(np.argmax(over)) if over.any() else None


def _one_event_lists(col: pa.Array) -> pa.ListArray:
    """A scalar column as lists of one entry per row (none where the value is null)."""
    valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(valid, dtype=np.int32)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), col.drop_null())


def keep_last(col: pa.ListArray, max_len: int) -> pa.ListArray:
    """The last ``max_len`` entries of each list (a behaviour sequence's most recent events)."""
    offs = col.offsets.to_numpy().astype(np.int64)  # [n + 1], into col.values
    lens = np.diff(offs)
    new_lens = np.minimum(lens, max_len)
    start = offs[1:] - new_lens  # [n] first kept entry of each row
    new_offs = np.concatenate([[0], np.cumsum(new_lens)])
    idx = np.arange(new_offs[-1], dtype=np.int64) - np.repeat(new_offs[:-1], new_lens) + np.repeat(start, new_lens)
    return pa.ListArray.from_arrays(pa.array(new_offs.astype(np.int32)), col.values.take(pa.array(idx)))


class RowGroupConverter:
    """Validates one Arrow row group against the schema and returns clean columns.

    Output table columns: ``row_id`` int64, each sparse feature (int64 ids, lists for
    multi-hot, hashed/truncated), ``dense`` fixed-size list of float32 (transformed),
    ``scenario`` per level int64, ``label:<task>`` float32, ``mask:<task>`` bool,
    ``weight`` float32, ``oracle:<task>`` float32 when present, ``bias`` (fixed-size list of
    float32, schema ``position_bias``), ``user`` int64 (schema ``user_id``) and ``group`` int64
    (schema ``group_id``) when declared.
    """

    def __init__(self, schema: Schema, with_oracle: bool = True, filesystem: Optional[pa.fs.FileSystem] = None,
                 labels_optional: bool = False) -> None:
        self.schema = schema
        self.filesystem = filesystem
        self.format = ds.ParquetFileFormat()
        self.with_oracle = with_oracle and all(t.oracle for t in schema.tasks)
        self.columns = schema.columns(with_oracle=self.with_oracle)
        # scoring new rows (dlrm-mtl predict): the training-only columns may be absent; a
        # missing label is an unknown label (mask false), a missing weight 1, a missing user
        # or position-bias feature unused by the model's forward
        self.optional = set(schema.training_columns()) if labels_optional else set()
        self.counters: Dict[str, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self.id_kinds = IdKinds(hashed_id_columns(schema))  # also checked per row group read

    def _count(self, key: str, n: int) -> None:
        """Counted input policies (null ids, truncated lists, filled/clipped dense values)."""
        if n:
            if not getattr(self._local, "silent", False):
                with self._lock:
                    self.counters[key] = self.counters.get(key, 0) + n
            counts = getattr(self._local, "counts", None)
            if counts is not None:  # read_counted: this call's own counts too
                counts[key] = counts.get(key, 0) + n

    def add_counts(self, counts: Dict[str, int]) -> None:
        """Counts a cached row group's policies again (its rows were read once more)."""
        for k, n in counts.items():
            self._count(k, n)

    def read_counted(self, group: RowGroup, tally: bool = True) -> Tuple[pa.Table, Dict[str, int]]:
        """:meth:`read`, and the policy counts of this row group alone; ``tally=False`` leaves
        them out of :attr:`counters` (a read ahead: they are added when the rows are used)."""
        self._local.counts = {}
        self._local.silent = not tally
        try:
            return self.read(group), self._local.counts
        finally:
            self._local.counts = None
            self._local.silent = False

    def read(self, group: RowGroup) -> pa.Table:
        try:
            frag = self.format.make_fragment(group.path, self.filesystem, row_groups=[group.index])
            present = set(frag.physical_schema.names)
            missing = [c for c in self.columns if c not in present and c not in self.optional]
            if missing:
                raise DataError(f"{group.path}: missing column(s) {missing} required by schema {self.schema.name!r}")
            # decoded on this thread: the reader's own workers parallelise across row groups, and
            # pyarrow's pool would otherwise take the cores the training step's threads run on
            table = frag.to_table(columns=[c for c in self.columns if c in present], use_threads=False)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{group.path}: row group {group.index}: cannot read: {e}") from None
        return self.convert(table, group)

    def convert(self, t: pa.Table, group: RowGroup) -> pa.Table:
        s = self.schema
        n = t.num_rows

        def fail(column: str, local_row: int, msg: str) -> DataError:
            return DataError(f"{group.path}: column {column!r}, row {group.first_row + local_row}: {msg}")

        out: Dict[str, pa.Array] = {}
        if s.row_id:
            rid = t[s.row_id]
            if not pa.types.is_integer(rid.type):
                raise DataError(f"{group.path}: column {s.row_id!r}: expected integer row ids, got {rid.type}")
            if rid.null_count:
                raise fail(s.row_id, int(np.argmax(~pc.is_valid(rid).to_numpy(zero_copy_only=False))), "null row id")
            raw = rid.combine_chunks().to_numpy(zero_copy_only=False)
            over = first_above_int64(raw)
            if over is not None:
                raise fail(s.row_id, over, f"row id {int(raw[over])} above the int64 range")
            neg = raw < 0
            if neg.any():
                raise fail(s.row_id, int(np.argmax(neg)), "negative row id (negative ids mark padding rows)")
            out["row_id"] = pa.array(raw.astype(np.int64, copy=False))
        else:
            out["row_id"] = pa.array(
                (group.file_index << 40) + group.first_row + np.arange(n, dtype=np.int64)
            )
        seq_by_name = {f.name: f for f in s.sequence}
        for f in s.sparse + s.sequence:
            col = t[f.column].combine_chunks()
            if f.sequence and f.max_len == 1 and not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
                col = _one_event_lists(col)  # a scalar id column as a sequence of one (a null: no event)
            if f.multi_hot:
                if not pa.types.is_list(col.type) and not pa.types.is_large_list(col.type):
                    raise DataError(f"{group.path}: column {f.column!r}: expected a list of ids, got {col.type}")
                if col.null_count:  # a null list is an empty bag (counted)
                    self._count(f"null_lists/{f.column}", col.null_count)
                    col = col.fill_null(pa.scalar([], type=col.type))
                if f.aligned_with:  # side info: one entry per event of its sequence
                    main = seq_by_name[f.aligned_with]
                    main_col = t[main.column].combine_chunks()
                    if not (pa.types.is_list(main_col.type) or pa.types.is_large_list(main_col.type)):
                        main_col = _one_event_lists(main_col)
                    want = pc.list_value_length(main_col).fill_null(0).to_numpy(zero_copy_only=False)
                    got = pc.list_value_length(col).to_numpy(zero_copy_only=False)
                    bad = want != got
                    if bad.any():
                        r = int(np.argmax(bad))
                        raise fail(f.column, r, f"{got[r]} entries, but its sequence {main.column!r} has {want[r]} events "
                                   f"on this row (aligned_with: {main.name})")
                truncated = 0
                if f.max_len:
                    over = pc.subtract(pc.list_value_length(col), f.max_len).to_numpy(zero_copy_only=False)
                    truncated = int(over[over > 0].sum())
                    if truncated:
                        col = keep_last(col, f.max_len) if f.sequence and f.keep == "last" else pc.list_slice(col, 0, f.max_len)
                values = pc.list_flatten(col)
            else:
                if pa.types.is_list(col.type):
                    raise DataError(f"{group.path}: column {f.column!r}: declared single-hot but holds lists")
                values, truncated = col, 0
            is_str = is_string_type(values.type)
            if f.hash:
                self.id_kinds.see(group.path, f.column, values.type)
            if is_str and not f.hash:
                raise DataError(f"{group.path}: column {f.column!r}: string ids need `hash: true` in the schema")
            if not is_str and not pa.types.is_integer(values.type):
                raise DataError(f"{group.path}: column {f.column!r}: expected integer or string ids, got {values.type}")
            if f.multi_hot and values.null_count:
                bad_pos = int(np.argmax(~pc.is_valid(values).to_numpy(zero_copy_only=False)))
                offs = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False).cumsum()
                raise fail(f.column, int(np.searchsorted(offs, bad_pos, side="right")), "null id inside a multi-hot list")
            valid = None
            if values.null_count:  # null single-hot id: an empty bag for that row (counted)
                valid = pc.is_valid(values).to_numpy(zero_copy_only=False)
                self._count(f"null_ids/{f.column}", int((~valid).sum()))
                values = pc.fill_null(values, "" if is_str else 0)
            if truncated:
                self._count(f"truncated_ids/{f.column}", truncated)
            if is_str:
                ids = hash_strings(values, f.num_embeddings)
            else:
                # the column's own dtype (uint64 included): range checks and error messages see the
                # real value, and hash_ids hashes its 64 bits without wrap-around
                raw = values.to_numpy(zero_copy_only=False)
                if f.hash:
                    ids = hash_ids(raw, f.num_embeddings)
                else:
                    bad = (raw < 0) | (raw >= f.num_embeddings)
                    if bad.any():
                        pos = int(np.argmax(bad))
                        row = pos
                        if f.multi_hot:
                            offs = col.offsets.to_numpy()[: n + 1] - col.offsets[0].as_py()
                            row = int(np.searchsorted(offs, pos, side="right") - 1)
                        raise fail(
                            f.column, row,
                            f"id {int(raw[pos])} outside [0, {f.num_embeddings}) "
                            "(set hash: true in the schema to hash raw ids)",
                        )
                    ids = raw.astype(np.int64, copy=False)
            if f.multi_hot:
                offsets = pc.subtract(col.offsets, col.offsets[0]) if col.offset else col.offsets
                out[f.name] = pa.ListArray.from_arrays(offsets, pa.array(ids))
            elif valid is not None:
                out[f.name] = pa.array(ids, mask=~valid)
            else:
                out[f.name] = pa.array(ids)
        dense = np.zeros((n, len(s.dense)), dtype=np.float32)
        for j, d in enumerate(s.dense):
            col = t[d.column]
            if not pa.types.is_integer(col.type) and not pa.types.is_floating(col.type):
                raise DataError(f"{group.path}: column {d.column!r}: expected a number, got {col.type}")
            if col.null_count:
                if d.default is None:
                    raise fail(d.column, int(np.argmax(~pc.is_valid(col).to_numpy(zero_copy_only=False))),
                               "null dense value (declare `default:` in the schema to fill nulls)")
                self._count(f"null_dense/{d.column}", col.null_count)
                col = pc.fill_null(pc.cast(col, pa.float64()), float(d.default))
            x = col.to_numpy().astype(np.float32)
            if not np.isfinite(x).all():
                raise fail(d.column, int(np.argmax(~np.isfinite(x))), f"non-finite dense value {x[~np.isfinite(x)][0]}")
            if d.transform == "log1p":
                if (x < 0).any():
                    raise fail(d.column, int(np.argmax(x < 0)), f"log1p of negative value {x[x < 0][0]}")
                x = np.log1p(x)
            if d.clip_min is not None or d.clip_max is not None:
                lo = -np.inf if d.clip_min is None else d.clip_min
                hi = np.inf if d.clip_max is None else d.clip_max
                self._count(f"clipped_dense/{d.column}", int(((x < lo) | (x > hi)).sum()))
                x = np.clip(x, lo, hi)
            if d.standardize:
                x = (x - np.float32(d.mean)) / np.float32(d.std)
            dense[:, j] = x
        out["dense"] = pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1)), max(len(s.dense), 1)) if s.dense else pa.array(np.zeros(n, dtype=np.float32))
        for lvl in s.scenarios:
            col = t[lvl.column]
            if col.null_count:
                raise fail(lvl.column, int(np.argmax(~pc.is_valid(col).to_numpy(zero_copy_only=False))), "null scenario id")
            if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
                raise DataError(f"{group.path}: column {lvl.column!r}: expected integer scenario ids, got {col.type}")
            xf = col.to_numpy()
            if pa.types.is_floating(col.type):
                frac = ~np.isfinite(xf) | (xf != np.round(xf))
                if frac.any():
                    raise fail(lvl.column, int(np.argmax(frac)), f"scenario id {xf[frac][0]} is not an integer")
            bad = (xf < 0) | (xf >= lvl.num_values)  # on the column's own dtype: uint64 ids do not wrap
            if bad.any():
                raise fail(lvl.column, int(np.argmax(bad)), f"scenario id {int(xf[bad][0])} outside [0, {lvl.num_values})")
            out["scenario:" + lvl.name] = pa.array(xf.astype(np.int64))
        labels: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        for task in s.tasks:
            if task.label not in t.column_names:  # an optional label column absent: unknown labels
                labels[task.name] = (np.zeros(n, np.float32), np.zeros(n, bool))
                continue
            col = t[task.label]
            if pa.types.is_boolean(col.type):
                col = pc.cast(col, pa.int8())
            elif not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
                raise DataError(f"{group.path}: column {task.label!r}: expected a numeric or boolean label, got {col.type}")
            valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
            self._count(f"null_labels/{task.label}", int((~valid).sum()))
            y = pc.fill_null(col, 0).to_numpy(zero_copy_only=False).astype(np.float32)
            if task.type == "binary":
                bad = valid & (y != 0) & (y != 1)
                if bad.any():
                    raise fail(task.label, int(np.argmax(bad)), f"label {y[bad][0]} not in {{0, 1}}")
            elif not np.isfinite(y[valid]).all():
                raise fail(task.label, int(np.argmax(valid & ~np.isfinite(y))), "non-finite regression label")
            labels[task.name] = (y, valid)
        for task in s.tasks:
            y, valid = labels[task.name]
            # child ⇒ parent only matters where the chained label is the product (entire space);
            # a branch label outside its parent's space (ESM²'s buy on ¬D rows) is just ignored
            if task.parent is not None and task.type == "binary" and not task.parent_negated and task.loss_space == "entire":
                py, pvalid = labels[task.parent]
                bad = valid & pvalid & (y == 1) & (py == 0)
                if bad.any():
                    raise fail(task.label, int(np.argmax(bad)), f"positive {task.name!r} label on a row whose parent {task.parent!r} is 0")
            out["label:" + task.name] = pa.array(y)
            out["mask:" + task.name] = pa.array(valid)
        if s.weight and s.weight in t.column_names:
            w = t[s.weight].to_numpy(zero_copy_only=False).astype(np.float32)
            if not np.isfinite(w).all() or (w < 0).any():
                raise fail(s.weight, int(np.argmax(~np.isfinite(w) | (w < 0))), "weight must be finite and >= 0")
            out["weight"] = pa.array(w)
        else:
            out["weight"] = pa.array(np.ones(n, dtype=np.float32))
        if self.with_oracle:
            for task in s.tasks:
                out["oracle:" + task.name] = (pc.cast(t[task.oracle], pa.float32()).combine_chunks() if task.oracle in t.column_names
                                              else pa.array(np.full(n, np.nan, np.float32)))
        if s.position_bias is not None:
            feats = s.position_bias.features
            bias = np.zeros((n, len(feats)), dtype=np.float32)
            for j, c in enumerate(feats):
                if c not in t.column_names:  # optional (scoring): the bias tower is training-only
                    continue
                col = t[c]
                if not pa.types.is_integer(col.type) and not pa.types.is_floating(col.type):
                    raise DataError(f"{group.path}: column {c!r}: expected a numeric bias feature, got {col.type}")
                x = pc.fill_null(pc.cast(col, pa.float64()), np.nan).to_numpy(zero_copy_only=False)
                if not np.isfinite(x).all():
                    raise fail(c, int(np.argmax(~np.isfinite(x))), "null or non-finite bias feature")
                bias[:, j] = x
            out["bias"] = pa.FixedSizeListArray.from_arrays(pa.array(bias.reshape(-1)), len(feats))
        if s.user_id and s.user_id not in t.column_names:  # optional (scoring): GAUC only
            out["user"] = pa.array(np.full(n, -1, np.int64))
        elif s.user_id:
            col = t[s.user_id].combine_chunks()
            if col.null_count:
                raise fail(s.user_id, int(np.argmax(~pc.is_valid(col).to_numpy(zero_copy_only=False))), "null user id")
            self.id_kinds.see(group.path, s.user_id, col.type)
            if pa.types.is_integer(col.type):
                # users are only compared (grouped), never ordered: a uint64 id >= 2**63 keeps its
                # 64 bits as the int64 with the same bits, so distinct users stay distinct
                out["user"] = pa.array(col.to_numpy(zero_copy_only=False).astype(np.int64, copy=False))
            elif is_string_type(col.type):
                out["user"] = pa.array(hash_strings(col, 2**62))
            else:
                raise DataError(f"{group.path}: column {s.user_id!r}: expected integer or string user ids, got {col.type}")
        if s.group_id:
            out["group"] = self._group_ids(t, n, group.path, fail)
        return pa.table(out)

    def _group_ids(self, t: pa.Table, n: int, path: str, fail) -> pa.Array:
        """``[n]`` int64 request-group ids (schema ``group_id``); -1 on every row when the
        column is absent and optional (scoring). Nulls and non-integer columns are errors."""
        c = self.schema.group_id
        assert c is not None
        if c not in t.column_names:
            if c in self.optional:
                return pa.array(np.full(n, -1, np.int64))
            raise DataError(f"{path}: column {c!r} (schema group_id) is missing")
        col = t[c].combine_chunks()
        if not pa.types.is_integer(col.type):
            raise DataError(f"{path}: column {c!r}: expected integer group ids (schema group_id), got {col.type}")
        if col.null_count:
            raise fail(c, int(np.argmax(~pc.is_valid(col).to_numpy(zero_copy_only=False))), "null group id")
        # ids are only compared: a uint64 >= 2**63 keeps its bits as an int64
        return pa.array(col.to_numpy(zero_copy_only=False).astype(np.int64, copy=False))


def _join(parts: List[Any], idx: Optional[np.ndarray]) -> Any:
    """The rows of ``parts`` one after the other, then rows ``idx`` of them where given (a
    shuffle): Arrow tables (the replays' index tables) or converted groups (:meth:`BatchColumns.join`)."""
    if not isinstance(parts[0], pa.Table):
        return BatchColumns.join(parts, idx)
    t = pa.concat_tables(parts)
    return t if idx is None else t.take(pa.array(idx))


@dataclass
class CachedGroup:
    """A row group kept for later epochs: its columns converted as ``fmt`` (sparse key order,
    loss-term inputs) and the policy counts its read added (added again per epoch, as a read
    would)."""

    columns: BatchColumns
    counts: Dict[str, int]
    fmt: Tuple[Optional[Tuple[str, ...]], Optional[Callable]]


@dataclass(frozen=True, eq=False)
class EpochState:
    """Everything an epoch's batches depend on, taken when its iteration (or preparation)
    starts, so that a reader running on another thread never reads the stream's fields
    while ``set_epoch`` changes them."""

    epoch: int
    segment: int
    groups: Tuple[RowGroup, ...]
    keep: Dict[int, np.ndarray]  # group index -> rows still to train (empty: all)
    skip: int
    num_batches: int
    sparse_order: Optional[List[str]]
    term_inputs: Optional[Callable]

    def same_format(self, fmt: Tuple[Optional[Tuple[str, ...]], Optional[Callable]]) -> bool:
        """Whether row groups converted as ``fmt`` (:meth:`format`) are this epoch's columns."""
        return fmt[0] == self.format()[0] and fmt[1] is self.term_inputs

    def format(self) -> Tuple[Optional[Tuple[str, ...]], Optional[Callable]]:
        """What a row group's conversion depends on besides the schema: the sparse keys' order
        and the loss terms' inputs."""
        return (None if self.sparse_order is None else tuple(self.sparse_order)), self.term_inputs

    def fresh(self) -> bool:
        """An epoch from its start: no earlier segment, nothing skipped."""
        return self.segment == 0 and self.skip == 0 and not self.keep

    def same_plan(self, other: "EpochState") -> bool:
        """The same row groups and step count (what a prepared epoch was read for)."""
        return self.groups == other.groups and self.num_batches == other.num_batches


class DeferredCounts:
    """Where a reader sends the policy counts of the row groups it converts: held back while
    the epoch is only prepared (it may never be trained), added to the converter's counters
    once it is adopted, and passed straight through after that."""

    def __init__(self, converter: "RowGroupConverter") -> None:
        self.converter = converter
        self._held: Optional[Dict[str, int]] = {}
        self._lock = threading.Lock()

    def __call__(self, counts: Dict[str, int]) -> None:
        with self._lock:
            if self._held is None:
                self.converter.add_counts(counts)
            else:
                for k, n in counts.items():
                    self._held[k] = self._held.get(k, 0) + n

    def adopt(self) -> None:
        with self._lock:
            held, self._held = self._held, None
            if held:
                self.converter.add_counts(held)


_END = object()


class PreparedEpoch:
    """An epoch's batch generator whose first batch — reading and converting its first
    shuffle buffer, most of an epoch's reading when the buffer holds the epoch — is produced
    on a background thread while the previous epoch (or the set-up) still runs."""

    def __init__(self, key: Tuple[int, int], state: EpochState, gen: Iterator[Batch], counts: DeferredCounts,
                 background: Callable[[], None]) -> None:
        self.key = key
        self.state = state
        self.gen = gen
        self.counts = counts
        pool = ThreadPoolExecutor(1, thread_name_prefix="dlrm_mtl-prepare", initializer=background)
        self.first: "Future[object]" = pool.submit(next, gen, _END)
        pool.shutdown(wait=False)  # its thread ends with that one call

    def adopt(self) -> Iterator[Batch]:
        """The epoch's batches: the prepared first one (or what preparing it raised: raised
        here, where reading it would have raised), then the rest of the generator."""
        first = self.first.result()
        self.counts.adopt()
        if first is _END:
            return iter(())
        return itertools.chain([first], self.gen)  # type: ignore[list-item]

    def discard(self) -> None:
        """Waits for the background call (a generator cannot be closed while it runs) and
        closes the generator; its held counts are dropped with it."""
        try:
            self.first.result()
        except BaseException:  # noqa: BLE001 - an epoch that is not trained raises nothing
            pass
        self.gen.close()


class ParquetStream:
    """Iterable of equal-size, equal-count Batches for one rank (see module docstring).

    Args:
        schema: the data set schema.
        paths: file, directory, glob, URI (s3://, gs://, hdfs://, any fsspec scheme) or a list
            of them; see :mod:`dlrm_mtl.data.source`.
        batch_size: rows per batch on this rank.
        rank, world_size: this rank's position; row groups are split by ``assign_row_groups``.
        shuffle_buffer_rows: rows held for shuffling (0 = read order, no shuffle).
        seed: shuffle seed; the order depends on (seed, epoch, rank).
        prefetch_batches: batches converted ahead by a background thread (0 = inline).
        filesystem: an explicit pyarrow filesystem for ``paths`` (default: from the URI).
        num_workers: threads reading and converting row groups ahead (1 = the reader thread only).
        pin_memory: the reader thread packs each batch into one page-locked buffer of a reused
            ring (``BatchBuffers``): its copy to the device is then one asynchronous transfer
            instead of one per tensor, and nothing is pinned per batch. Only with a reader
            thread (``prefetch_batches`` > 0).
        cache_bytes: converted (validated, as numpy columns) row groups kept in memory for the
            next epochs, up to this many bytes; later epochs then skip decoding, validation and
            conversion. The shuffle and the batches are the same with or without it; policy
            counters count cached rows again, as a read would.
        background_priority: ``idle`` runs the reader threads under Linux's SCHED_IDLE policy
            (they get a core only when the training step's threads leave it), ``normal`` keeps
            the default. On a machine whose cores the step's intra-op threads fill, a reader at
            normal priority preempts one of them mid-operator and the others wait for it at the
            operator's barrier.
        pad_last: the epoch's last batch is filled up to ``batch_size`` with padding rows (the
            equal-steps policy). False yields it with its real rows only: a world of one
            (nothing to keep in step with) without ``pin_memory`` (its buffers have the batch's
            fixed size); every other batch, the order and the rows are the same.
    """

    def __init__(
        self,
        schema: Schema,
        paths: Source,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer_rows: int = 0,
        seed: int = 0,
        prefetch_batches: int = 4,
        with_oracle: bool = True,
        filesystem: Optional[pa.fs.FileSystem] = None,
        num_workers: int = 2,
        background_priority: str = "idle",
        pin_memory: bool = False,
        cache_bytes: int = 0,
        pad_last: bool = True,
    ) -> None:
        if not pad_last and (world_size != 1 or pin_memory):
            raise ValueError("pad_last=False needs a world of one without pin_memory (every rank must take "
                             "equal steps, and the pinned buffers hold full batches)")
        if background_priority not in ("idle", "normal"):
            raise ValueError(f"background_priority {background_priority!r}: expected idle or normal")
        if batch_size <= 0:
            raise ValueError("batch_size must be > 0")
        self.schema = schema
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer_rows = shuffle_buffer_rows
        self.seed = seed
        self.prefetch_batches = prefetch_batches
        self.num_workers = num_workers
        self.background_priority = background_priority
        self.pin_memory = pin_memory
        self.pad_last = pad_last
        # the reader thread's page-locked buffers (tests may set unpinned ones to run the packing on CPU)
        self.buffers: Optional[BatchBuffers] = BatchBuffers(pin=True) if pin_memory else None
        self.sparse_order: Optional[List[str]] = None  # the sparse KJT's key order; None: the schema's
        self.term_inputs: Optional[Callable] = None  # the loss terms' labels and row weights per row group (set_loss_terms)
        # converted row groups kept for later epochs, up to this many bytes (0: none)
        self.cache_bytes = cache_bytes
        self._cache: Dict[Tuple[int, int], CachedGroup] = {}
        self._cache_used = 0
        self._cache_lock = threading.Lock()
        # row groups read ahead of their turn (read_ahead): key -> the read's Future
        self._ahead: Dict[Tuple[int, int], "Future[Tuple[pa.Table, Dict[str, int]]]"] = {}
        # and their conversions (convert_ahead): key -> Future of (table, counts, columns, format)
        self._converting: Dict[Tuple[int, int], "Future[Tuple]"] = {}
        self._ahead_futures: List[Future] = []  # every read read_ahead started (wait_read_ahead)
        self.epoch = 0
        dset = open_source(paths, filesystem)
        self.converter = RowGroupConverter(schema, with_oracle, dset.filesystem)
        self.with_oracle = self.converter.with_oracle
        groups = list_row_groups(dset)
        if not groups:
            raise DataError(f"{paths}: no Parquet row groups found")
        self.converter.id_kinds.see_files(dset.get_fragments())
        self.all_groups = groups
        self._group_index = {(g.file_index, g.index): i for i, g in enumerate(groups)}
        self._any_group = next(g for g in groups if g.num_rows > 0) if any(g.num_rows for g in groups) else groups[0]
        self.total_rows = sum(g.num_rows for g in groups)
        self._segment = 0  # index of the current segment of the epoch (see set_epoch)
        self._keep: Dict[int, np.ndarray] = {}  # group index -> rows still to train this epoch
        self._skip = 0
        self._format = 0  # bumped by set_sparse_order / set_loss_terms: a prepared epoch's batches must match
        self._prepared: Optional[PreparedEpoch] = None
        self._assign()

    def set_sparse_order(self, names: Sequence[str]) -> None:
        """Builds every later batch's sparse KJT with its keys in this order (a permutation of
        the schema's sparse features; the values are the same): the order a world-of-one
        lookup's kernels read them in (``LocalPooledLookup.kernel_keys``), so that it permutes
        nothing."""
        names = list(names)
        if sorted(names) != sorted(f.name for f in self.schema.sparse):
            raise ValueError(f"sparse order {names} is not an order of the schema's sparse features "
                             f"{[f.name for f in self.schema.sparse]}")
        self.sparse_order = None if names == [f.name for f in self.schema.sparse] else names
        self._format += 1

    def set_loss_terms(self, term_inputs: Optional[Callable]) -> None:
        """Batches of later iterations carry ``term_labels`` and ``term_rows``, computed by ``term_inputs``
        (``EntireSpaceLoss.term_matrices.host_inputs()``) once per row group in numpy,
        so that the loss does not derive them from the labels every step (None: they don't)."""
        self.term_inputs = term_inputs
        self._format += 1

    def _plan(self, keep: Dict[int, np.ndarray], segment: int) -> Tuple[List[RowGroup], List[int], int]:
        """This rank's row groups, every rank's rows and the step count of a segment whose rows
        left are ``keep`` (empty: all)."""
        shards = self._shards(self.world_size, keep, fresh=segment == 0)
        rows_per_rank = [sum(self._remaining(g, keep) for g in sh) for sh in shards]
        least = 1 if segment == 0 else 0  # a resumed epoch may have no rows left
        return shards[self.rank], rows_per_rank, max(least, max(-(-r // self.batch_size) for r in rows_per_rank))

    def _assign(self) -> None:
        """This rank's row groups and the epoch's step count for the current segment."""
        self.groups, self.rows_per_rank, self.num_batches = self._plan(self._keep, self._segment)
        self.num_rows = self.rows_per_rank[self.rank]

    def _remaining(self, g: RowGroup, keep: Dict[int, np.ndarray]) -> int:
        k = keep.get(self._group_index[(g.file_index, g.index)])
        return g.num_rows if k is None else int(k.sum())

    def _shards(self, world_size: int, keep: Dict[int, np.ndarray], fresh: bool) -> List[List[RowGroup]]:
        """Row groups per rank: all of them in an epoch's first segment, else those with rows left."""
        if fresh:
            return assign_row_groups(self.all_groups, world_size)
        left = [(g, self._remaining(g, keep)) for g in self.all_groups]
        left = [(g, n) for g, n in left if n > 0]
        return assign_row_groups([g for g, _ in left], world_size, [n for _, n in left])

    def counters(self) -> Dict[str, int]:
        """Counted input policies so far on this rank (see RowGroupConverter)."""
        return dict(self.converter.counters)

    def __len__(self) -> int:
        """Batches of the current segment of the epoch (skipped ones included), equal on all ranks."""
        return self.num_batches

    def set_epoch(self, epoch: int, history: Sequence[Segment] = (), skip_batches: int = 0) -> None:
        """Positions the stream in ``epoch``: exact resume, also across world sizes.

        ``history``: the earlier *segments* of this epoch, each a stretch trained by one world
        size (and batch size, shuffle buffer, seed) before an interruption. Their rows are
        excluded (recomputed from row-group metadata alone: the order of a segment depends
        only on row counts, seed, epoch and rank), and the rows left are split afresh over
        this world size, so every row of the epoch is trained exactly once.
        ``skip_batches``: batches of the current segment this world already trained (a resume
        with the same world size): the stream continues at the exact next batch, shuffle
        included, by reading and dropping the skipped ones.
        """
        self.epoch = epoch
        self._segment = len(history)
        self._keep = self._rows_left(history)
        self._skip = skip_batches
        self._assign()
        if skip_batches > self.num_batches:
            raise ValueError(f"skip_batches {skip_batches} > {self.num_batches} batches in epoch {epoch}")

    def _rng(self, rank: int, segment: int, seed: int, epoch: Optional[int] = None) -> np.random.Generator:
        epoch = self.epoch if epoch is None else epoch
        return np.random.default_rng([seed, epoch, rank] + ([segment] if segment else []))

    def _rows_left(self, history: Sequence[Segment]) -> Dict[int, np.ndarray]:
        """Group index -> mask of the rows no segment of ``history`` trained (metadata only)."""
        keep = {i: np.ones(g.num_rows, dtype=bool) for i, g in enumerate(self.all_groups)}
        for si, seg in enumerate(history):
            before = {i: k.copy() for i, k in keep.items()} if si else {}
            shards = self._shards(seg.world_size, before, fresh=si == 0)
            for r, groups in enumerate(shards):
                tables = self._ordered(
                    groups, self._rng(r, si, seg.seed), seg.batch_size, seg.shuffle_buffer_rows,
                    lambda gs, before=before: (self._index_table(g, before) for g in gs), before,
                )
                for t in itertools.islice(tables, seg.batches):
                    gi, ri = t["g"].to_numpy(), t["r"].to_numpy()
                    for i in np.unique(gi):
                        keep[int(i)][ri[gi == i]] = False
        return {i: k for i, k in keep.items() if not k.all()}

    def _index_table(self, g: RowGroup, keep: Dict[int, np.ndarray]) -> pa.Table:
        """Stand-in for a row group in replays: (group index, row) per row still to train."""
        gi = self._group_index[(g.file_index, g.index)]
        t = pa.table({"g": np.full(g.num_rows, gi, dtype=np.int64), "r": np.arange(g.num_rows, dtype=np.int64)})
        return t.filter(pa.array(keep[gi])) if gi in keep else t

    # ---------------------------------------------------------------- producer
    def _ordered(
        self, groups: List[RowGroup], rng: np.random.Generator, B: int, shuffle_rows: int,
        read: Callable[[Iterator[RowGroup]], Iterator[pa.Table]], keep: Dict[int, np.ndarray],
    ) -> Iterator[pa.Table]:
        """Tables of exactly ``B`` rows (the last may be shorter) in the epoch's order
        (:meth:`_spans`, each cut out of its buffer)."""
        for t, start, n in self._spans(groups, rng, B, shuffle_rows, read, keep):
            yield t.slice(start, n)

    @staticmethod
    def _group_order(groups: List[RowGroup], rng: np.random.Generator, shuffle_rows: int) -> List[RowGroup]:
        """The epoch's row-group order: shuffled when rows are (one draw of ``rng``)."""
        groups = list(groups)
        return [groups[i] for i in rng.permutation(len(groups))] if shuffle_rows > 0 else groups

    def _spans(
        self, groups: List[RowGroup], rng: np.random.Generator, B: int, shuffle_rows: int,
        read: Callable[[Iterator[RowGroup]], Iterator[Any]], keep: Dict[int, np.ndarray],
    ) -> Iterator[Tuple[Any, int, int]]:
        """``(buffer, start, rows)`` per batch of exactly ``B`` rows (the last may be shorter),
        in the epoch's order; consecutive batches share their drained buffer.

        The one place that decides the order: shuffled row groups, then a bounded shuffle
        buffer. Random draws depend only on row counts, so the same code replays a stream
        from metadata (``read`` yielding index tables) to find which rows it trained. What
        ``read`` yields — converted groups (:class:`BatchColumns`) or Arrow tables — needs
        ``num_rows``, ``slice(offset)`` and :func:`_join`.
        """
        groups = self._group_order(groups, rng, shuffle_rows)
        buffer: List[pa.Table] = []
        held = 0

        def drain(final: bool) -> Iterator[Tuple[pa.Table, int, int]]:
            nonlocal buffer, held
            if not buffer:
                return
            t = _join(buffer, rng.permutation(sum(b.num_rows for b in buffer)) if shuffle_rows > 0 else None)
            n = t.num_rows if final else t.num_rows - t.num_rows % B
            for start in range(0, n, B):
                yield t, start, min(B, n - start)
            rest = t.slice(n)
            buffer, held = ([rest], rest.num_rows) if rest.num_rows else ([], 0)

        threshold = max(shuffle_rows, B)
        for t in read(g for g in groups if self._remaining(g, keep) > 0):
            buffer.append(t)
            held += t.num_rows
            if held >= threshold:
                yield from drain(final=False)
        yield from drain(final=True)

    def _state(self) -> EpochState:
        """The current epoch's state (after ``set_epoch``)."""
        return EpochState(self.epoch, self._segment, tuple(self.groups), self._keep, self._skip, self.num_batches,
                          self.sparse_order, self.term_inputs)

    def _tables(self, state: EpochState, counts: Callable[[Dict[str, int]], None]) -> Iterator[Tuple[BatchColumns, int, int]]:
        """Spans of clean rows, exactly batch_size each (the last one may be shorter), as
        (converted buffer, start, rows)."""
        rng = self._rng(self.rank, state.segment, self.seed, state.epoch)
        read = lambda groups: self._read(groups, state, counts)  # noqa: E731
        return self._spans(list(state.groups), rng, self.batch_size, self.shuffle_buffer_rows, read, state.keep)

    def _background_thread(self) -> None:
        """Lowers the calling reader thread to ``background_priority`` (Linux; elsewhere a no-op)."""
        if self.background_priority == "idle" and hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
            try:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
            except OSError:
                pass

    def read_ahead(self, rows: Optional[int] = None) -> None:
        """Starts converting, on a thread of its own, the row groups this rank reads first in
        the current epoch: ``rows`` rows' worth (default one shuffle buffer; at least a batch),
        in the epoch's order.
        Called while a run is still being set up (model, plan, sharding), so that the first
        epoch's decoding overlaps it instead of delaying the first step. The rows, their order
        and the policy counters are the same as without it: a group read ahead is used where
        the stream would have read it (an error it raised is raised there too), and its
        policy counts are added then."""
        rng = self._rng(self.rank, self._segment, self.seed)  # a copy: the epoch's own draws are untouched
        groups = self._group_order(self.groups, rng, self.shuffle_buffer_rows)
        threshold, rows = max(self.shuffle_buffer_rows if rows is None else rows, self.batch_size), 0
        first: List[RowGroup] = []
        for g in groups:
            if rows >= threshold:
                break
            n = self._remaining(g, self._keep)
            if n > 0:
                first.append(g)
                rows += n
        if not first:
            return
        pool = ThreadPoolExecutor(1, thread_name_prefix=f"dlrm_mtl-ahead-r{self.rank}")
        for g in first:
            key = (g.file_index, g.index)
            if key not in self._ahead and key not in self._cache:
                self._ahead[key] = pool.submit(self.converter.read_counted, g, False)
                self._ahead_futures.append(self._ahead[key])
        pool.shutdown(wait=False)  # its thread ends when these reads are done

    def convert_ahead(self) -> None:
        """Converts the row groups :meth:`read_ahead` started (once each is decoded) to numpy
        columns in the current format, on a thread of its own: call it once the format is
        final (after :meth:`set_sparse_order` / :meth:`set_loss_terms`). The stream then takes
        them converted (and cached, where ``cache_bytes`` has room); read in another format
        by then, a group is converted again. Like the decoding, this is the reader's loading:
        :meth:`wait_read_ahead` waits for it too."""
        reads = {k: f for k, f in self._ahead.items() if k not in self._converting}
        if not reads:
            return
        pool = ThreadPoolExecutor(1, thread_name_prefix=f"dlrm_mtl-convert-r{self.rank}", initializer=self._background_thread)
        job = pool.submit(self._convert_reads, reads, self._state())
        pool.shutdown(wait=False)  # its thread ends with the job
        self._converting.update((k, job) for k in reads)
        self._ahead_futures.append(job)

    def _convert_reads(self, reads: Dict[Tuple[int, int], "Future[Tuple[pa.Table, Dict[str, int]]]"],
                       state: EpochState) -> Dict[Tuple[int, int], Any]:
        """:meth:`convert_ahead`'s job: each group's (table, counts, columns, format) — the
        columns slices of one conversion of their concatenation (one copy: the groups a shuffle
        buffer joins are then slices of one base, :meth:`BatchColumns.join`) — or the error its
        read raised, raised where the stream reads that group."""
        out: Dict[Tuple[int, int], Any] = {}
        for key, read in reads.items():
            try:
                out[key] = read.result()
            except BaseException as e:  # noqa: BLE001
                out[key] = e
        read_ok = {k: v for k, v in out.items() if not isinstance(v, BaseException)}
        if read_ok:
            whole = self._columns(pa.concat_tables([t for t, _ in read_ok.values()]), state)
            start = 0
            for key, (t, counts) in read_ok.items():
                cols = whole.slice(start, t.num_rows)
                start += t.num_rows
                self._remember(key, cols, counts, state)
                out[key] = (t, counts, cols, state.format())
        return out

    def wait_read_ahead(self) -> float:
        """Blocks until the row groups :meth:`read_ahead` started are decoded and validated
        (and converted, after :meth:`convert_ahead`); returns the seconds waited. Their tables
        or columns (or the error a read raised) stay where the stream takes them when it reads
        those groups: nothing is consumed here. A group the
        stream reached before the read-ahead thread did is read by the stream itself (its
        future cancelled), not waited for."""
        t = time.perf_counter()
        futures, self._ahead_futures = self._ahead_futures, []
        for future in futures:
            if not future.cancelled():
                future.exception()  # waits; an error is raised where the stream reads the group
        return time.perf_counter() - t

    def _read_group(self, g: RowGroup, state: EpochState, add_counts: Callable[[Dict[str, int]], None]) -> BatchColumns:
        """Row group ``g``'s rows this epoch still trains, converted to numpy columns in the
        epoch's format: from the cache, from its read ahead, or read now (and then cached)."""
        key = (g.file_index, g.index)
        converting = self._converting.pop(key, None) if self._converting else None
        ahead = self._ahead.pop(key, None) if self._ahead else None
        hit = self._cache.get(key)
        if converting is not None:  # converted ahead, or being converted now: wait for it
            got = converting.result()[key]
            if isinstance(got, BaseException):
                raise got  # what the read raised, here, as a read would
            t, counts, cols, fmt = got
            add_counts(counts)
            if not state.same_format(fmt):
                cols = self._convert(key, t, counts, state)
        elif ahead is not None and not ahead.cancel():  # read ahead, or being read now: wait for it
            t, counts = ahead.result()  # raises what the read raised, here, as a read would
            add_counts(counts)
            cols = self._convert(key, t, counts, state)
        elif hit is not None and state.same_format(hit.fmt):  # converted in an earlier epoch: its policies count again, as a read would
            cols = hit.columns
            add_counts(hit.counts)
        else:  # not read yet, or cached in another format (set_sparse_order / set_loss_terms since)
            t, counts = self.converter.read_counted(g, tally=False)
            add_counts(counts)
            cols = self._convert(key, t, counts, state)
        keep = state.keep.get(self._group_index[key])
        return cols if keep is None else cols.take(np.flatnonzero(keep))

    def _consolidate(self, columns: Dict[Tuple[int, int], BatchColumns]) -> Dict[Tuple[int, int], BatchColumns]:
        """``columns`` (row groups converted in one format) as slices of one concatenation of
        them (one copy, once; the cache keeps the slices in their place, at the same bytes):
        a shuffle buffer of these groups is then one ``take`` from it and an unshuffled one a
        slice (:meth:`BatchColumns.join`), not a concatenation per buffer. Called when an epoch
        starts whose every group is cached (the groups converted ahead are converted as one)."""
        parts = list(columns.values())
        if not parts or (parts[0].base is not None and all(c.base is parts[0].base for c in parts)):
            return columns  # already (or nothing)
        whole = BatchColumns.concat(parts)
        views, start = {}, 0
        for k, c in columns.items():
            views[k] = whole.slice(start, c.rows)
            start += c.rows
        with self._cache_lock:
            for k, v in views.items():
                e = self._cache.get(k)
                if e is not None and e.columns is columns[k]:
                    e.columns = v
        return views

    def _columns(self, t: pa.Table, state: EpochState) -> BatchColumns:
        """``t``'s numpy columns in ``state``'s format."""
        return BatchColumns(t, self.schema, self.with_oracle, state.sparse_order, state.term_inputs)

    def _convert(self, key: Tuple[int, int], t: pa.Table, counts: Dict[str, int], state: EpochState) -> BatchColumns:
        """``t``'s numpy columns in ``state``'s format, kept (:meth:`_remember`)."""
        cols = self._columns(t, state)
        self._remember(key, cols, counts, state)
        return cols

    def _remember(self, key: Tuple[int, int], cols: BatchColumns, counts: Dict[str, int], state: EpochState) -> None:
        """Keeps a group's columns for the next epochs while the cache has room
        (``cache_bytes``): epochs after the first then skip decoding, validation and
        conversion."""
        size = cols.nbytes
        with self._cache_lock:
            # two readers (an epoch and the next one, prepared) may convert the same group at once
            old = self._cache.get(key)
            room = self._cache_used - (old.columns.nbytes if old is not None else 0) + size <= self.cache_bytes
            if (old is None or not state.same_format(old.fmt)) and room:
                self._cache[key] = CachedGroup(cols, counts, state.format())
                self._cache_used += size - (old.columns.nbytes if old is not None else 0)

    def _read(self, groups: Iterator[RowGroup], state: EpochState,
              counts: Callable[[Dict[str, int]], None]) -> Iterator[BatchColumns]:
        """Converted row groups in ``groups`` order, read by ``num_workers`` threads ahead.

        pyarrow's Parquet decoding releases the GIL, so threads read row groups in parallel;
        results are yielded in submission order, which keeps the stream deterministic.
        """
        if self.num_workers <= 1:
            for g in groups:
                yield self._read_group(g, state, counts)
            return
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix=f"dlrm_mtl-rg-r{self.rank}",
                                initializer=self._background_thread) as pool:
            pending: "deque[Future[BatchColumns]]" = deque()
            for g in groups:
                pending.append(pool.submit(self._read_group, g, state, counts))
                if len(pending) > self.num_workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def _batches(self, state: EpochState, counts: Callable[[Dict[str, int]], None]) -> Iterator[Batch]:
        # an epoch whose every group is cached, and which reads them as one buffer (or unshuffled):
        # its groups as slices of one concatenation make each buffer a take (or a slice) of it.
        # A shuffled epoch of several buffers would not use it (each buffer's rest is a slice
        # of the shuffled buffer before it): no concatenation of the whole cache for nothing
        one_buffer = sum(g.num_rows for g in state.groups) <= max(self.shuffle_buffer_rows, self.batch_size)
        if self.shuffle_buffer_rows == 0 or one_buffer:
            keys = [(g.file_index, g.index) for g in state.groups]
            with self._cache_lock:
                entries = [self._cache.get(k) for k in keys]
            if entries and all(e is not None and state.same_format(e.fmt) for e in entries):
                self._consolidate({k: e.columns for k, e in zip(keys, entries) if e is not None})
        produced = 0
        for columns, start, n in self._tables(state, counts):
            if produced >= state.skip:  # skipped batches (a resume) are read and shuffled, not cut
                yield columns.batch(start, n, self.batch_size if self.pad_last else n)
            produced += 1
        empty = None
        while produced < state.num_batches:
            if produced >= state.skip:
                if empty is None:
                    empty = table_to_batch(self._empty_table(), self.schema, self.batch_size, self.with_oracle, state.sparse_order,
                                           state.term_inputs)
                yield empty
            produced += 1
        if produced != state.num_batches:
            raise RuntimeError(f"rank {self.rank}: produced {produced} batches, expected {state.num_batches}")

    def _empty_table(self) -> pa.Table:
        """A table with the clean columns and no rows (padding batches); the group read for
        its columns counts no policies: none of its rows is trained here."""
        return self.converter.read_counted(self._any_group, tally=False)[0].slice(0, 0)

    # ------------------------------------------------------------- epochs ahead
    def prepare(self, epoch: int) -> None:
        """Starts reading ``epoch`` from its start on a background thread (at
        ``background_priority``) up to its first batch: the first shuffle buffer's row groups
        read, shuffled and converted while the current epoch, or the run's set-up, goes on.

        The next iteration adopts it when it is that epoch from its start with the same batch
        format (``set_epoch(epoch)`` without history or skipped batches, no
        ``set_sparse_order`` / ``set_loss_terms`` since): the batches, their order and the
        policy counters are exactly those of reading it then (the counts of what was read
        ahead are added when it is adopted). Anything else discards it. Without this the
        epoch's first ``next`` waits for that buffer (13-40 ms per epoch of MovieLens
        ``--quick`` in ``tools/bench_peer.py``, docs/performance.md). Memory: while it waits,
        that buffer (its Arrow table and numpy columns) is held next to the current epoch's,
        one more shuffle buffer's worth."""
        key = (epoch, self._format)
        if self._prepared is not None:
            if self._prepared.key == key:
                return
            self.discard_prepared()
        groups, _, num_batches = self._plan({}, 0)
        state = EpochState(epoch, 0, tuple(groups), {}, 0, num_batches, self.sparse_order, self.term_inputs)
        counts = DeferredCounts(self.converter)
        self._prepared = PreparedEpoch(key, state, self._batches(state, counts), counts, self._background_thread)

    def discard_prepared(self) -> None:
        """Drops an epoch prepared and not (yet) iterated (the run ends or stops early)."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            prepared.discard()

    def _epoch_batches(self) -> Iterator[Batch]:
        """The current epoch's batches: the prepared ones when they are this epoch's."""
        state = self._state()
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            if state.fresh() and prepared.key == (state.epoch, self._format) and prepared.state.same_plan(state):
                return prepared.adopt()
            prepared.discard()
        return self._batches(state, self.converter.add_counts)

    def __iter__(self) -> Iterator[Batch]:
        if self.prefetch_batches <= 0:
            yield from self._epoch_batches()
            return
        batches = self._epoch_batches()
        q: "queue.Queue[object]" = queue.Queue(maxsize=self.prefetch_batches)
        stop = threading.Event()
        done = object()

        def offer(item: object) -> bool:
            """Puts ``item`` once there is room; False when the consumer has stopped. Every put
            checks ``stop``: a consumer that stops early (an evaluation of its first batches)
            with the queue full must not leave this thread blocked on its last put — it joins
            it."""
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                self._background_thread()
                for b in batches:
                    if self.buffers is not None:  # one buffer per batch, off the training thread
                        b = self.buffers.pack(b)
                    if not offer(b):
                        return
                offer(done)
            except BaseException as e:  # surfaced in the consumer thread
                offer(e)

        th = threading.Thread(target=work, name=f"dlrm_mtl-reader-r{self.rank}", daemon=True)
        th.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            stop.set()  # the reader returns at its next put (timeout 0.1 s); wait for it, so no
            th.join(timeout=60)  # reader thread outlives an iterator that was closed early
