"""A clean table's columns as numpy arrays, converted once, cut into padded batches."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_mtl import native
from dlrm_mtl.data.batch import Batch
from dlrm_mtl.schema import Schema, SparseFeature


def _np(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.to_numpy(zero_copy_only=False)


def _array(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return col


def _matrix(t: pa.Table, name: str, n: int, width: int, dtype: type) -> np.ndarray:
    """A fixed-size-list column as ``[n, width]``."""
    if width == 0:
        return np.zeros((n, 0), dtype)
    m = _np(pa.chunked_array(t[name].chunks).combine_chunks().flatten()).reshape(n, width).astype(dtype, copy=False)
    return m if m.flags.writeable else m.copy()  # batches are views of it (Arrow's memory is read-only)


# BatchColumns' per-row arrays (None where the schema or the format has no such column): rows
# along axis 0, so that a shuffle, a slice or a concatenation treats them all alike
ROW_FIELDS = ("dense", "scenario", "labels", "mask", "row_id", "weight", "oracle", "bias", "user", "group",
              "term_labels", "term_rows")


class BatchColumns:
    """The columns of a clean table (``RowGroupConverter`` output: row_id, one column per sparse
    feature, ``dense``, ``scenario:*``, ``label:*``, ``mask:*``, ``weight``, optional
    ``oracle:*``, ``bias``, ``user``) as numpy arrays, converted once; :meth:`batch` cuts rows
    ``[start, start + n)`` into a :class:`Batch` padded to ``batch_size`` with numpy slices only.

    The reader converts each row group once (kept for later epochs in its cache) and builds a
    shuffle buffer from converted groups with :meth:`concat`, :meth:`take` (the shuffle) and
    :meth:`slice` — the row operations of ``pa.Table`` it used to shuffle Arrow tables with,
    on numpy arrays — then cuts all of the buffer's batches from it.

    Sparse features are kept as (lengths, offsets, values) per feature (lengths and offsets
    ``None`` for a single-hot column without nulls: one id per row); the batch's KJT gets its
    per-key lengths and offsets computed on the host, so nothing downstream reads them back.
    Sequence features (schema ``sequence``) become a second KJT, ``Batch.sequence``.

    ``sparse_order`` (default: the schema's) is the order of the sparse KJT's keys, e.g. the
    embedding kernels' order of a world-of-one lookup, which then needs no permute.
    ``term_inputs`` (:class:`dlrm_mtl.losses.TermInputs`): the loss terms' labels and row
    weights are computed for the whole table at once and cut into ``Batch.term_labels`` and
    ``Batch.term_rows`` (0 on padding rows).

    Example::

        cols = BatchColumns(table, schema, with_oracle=False)
        first = cols.batch(0, 1024, 1024)
        last = cols.batch(1024, table.num_rows - 1024, 1024)   # padded to 1024 rows
    """

    def __init__(self, t: pa.Table, schema: Schema, with_oracle: bool, sparse_order: Optional[List[str]] = None,
                 term_inputs: Optional[Callable[[np.ndarray, np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]] = None) -> None:
        n = t.num_rows
        self.schema, self.rows = schema, n
        by_name = {f.name: f for f in schema.sparse}
        self.keys = list(sparse_order) if sparse_order is not None else list(by_name)
        if sorted(self.keys) != sorted(by_name):
            raise ValueError(f"sparse_order {self.keys} is not an order of the schema's sparse features {list(by_name)}")
        self.sparse = IdBlocks(_id_columns(t, [by_name[k] for k in self.keys]))
        self.sequence_keys = [f.name for f in schema.sequence]
        self.sequence = IdBlocks(_id_columns(t, schema.sequence))
        self.dense = _matrix(t, "dense", n, len(schema.dense), np.float32)  # [n, Fd]
        self.scenario = np.stack([_np(t["scenario:" + l.name]) for l in schema.scenarios], axis=1).astype(np.int64)  # [n, L]
        self.labels = np.stack([_np(t["label:" + k.name]) for k in schema.tasks], axis=1).astype(np.float32)  # [n, T]
        self.mask = np.stack([_np(t["mask:" + k.name]) for k in schema.tasks], axis=1).astype(bool)  # [n, T]
        self.row_id = _np(t["row_id"]).astype(np.int64)
        self.weight = _np(t["weight"]).astype(np.float32)
        self.oracle = np.stack([_np(t["oracle:" + k.name]) for k in schema.tasks], axis=1) if with_oracle else None
        self.bias = _matrix(t, "bias", n, len(schema.position_bias.features), np.float32) if schema.position_bias is not None else None
        self.user = _np(t["user"]).astype(np.int64) if schema.user_id else None
        self.group = _np(t["group"]).astype(np.int64) if schema.group_id else None
        self.term_labels, self.term_rows = term_inputs(self.labels, self.mask, self.weight) if term_inputs else (None, None)  # [n, K]
        # rows [offset, offset + rows) of ``base`` when this is a slice of it (views), else None
        self.base: Optional[BatchColumns] = None
        self.offset = 0

    @property
    def num_rows(self) -> int:
        return self.rows

    @property
    def nbytes(self) -> int:
        """Bytes of its arrays (a reader's cache counts them)."""
        return (sum(a.nbytes for a in (getattr(self, f) for f in ROW_FIELDS) if a is not None)
                + self.sparse.nbytes + self.sequence.nbytes)

    def _with_rows(self, rows: int, sparse: "IdBlocks", sequence: "IdBlocks", arrays: Dict[str, Optional[np.ndarray]]) -> "BatchColumns":
        """The same schema, keys and format over other rows."""
        out = object.__new__(BatchColumns)
        out.schema, out.rows, out.keys, out.sequence_keys = self.schema, rows, self.keys, self.sequence_keys
        out.sparse, out.sequence = sparse, sequence
        for f in ROW_FIELDS:
            setattr(out, f, arrays[f])
        out.base, out.offset = None, 0
        return out

    def take(self, idx: np.ndarray) -> "BatchColumns":
        """Rows ``idx`` in that order (new arrays), as ``pa.Table.take``: the reader's shuffle,
        and the rows of a group a resumed epoch still trains."""
        idx = np.asarray(idx, dtype=np.int64)
        present = [f for f in ROW_FIELDS if getattr(self, f) is not None]
        arrays: Dict[str, Optional[np.ndarray]] = dict.fromkeys(ROW_FIELDS)
        columns = [getattr(self, f) for f in present]
        if native.take_applies(*columns):  # one C pass over the rows (numpy's take: a pass per array)
            arrays.update(zip(present, native.take_rows([(a, 0) for a in columns], idx, self.rows)))
        else:
            arrays.update((f, np.take(a, idx, axis=0)) for f, a in zip(present, columns))
        return self._with_rows(len(idx), self.sparse.take(idx), self.sequence.take(idx), arrays)

    def slice(self, offset: int = 0, length: Optional[int] = None) -> "BatchColumns":
        """Rows ``[offset, offset + length)`` (to the end by default; views), as ``pa.Table.slice``."""
        stop = self.rows if length is None else min(self.rows, offset + length)
        arrays = {f: None if (a := getattr(self, f)) is None else a[offset:stop] for f in ROW_FIELDS}
        out = self._with_rows(stop - offset, self.sparse.slice(offset, stop), self.sequence.slice(offset, stop), arrays)
        out.base, out.offset = (self, offset) if self.base is None else (self.base, self.offset + offset)
        return out

    @staticmethod
    def join(parts: Sequence["BatchColumns"], idx: Optional[np.ndarray] = None) -> "BatchColumns":
        """``concat(parts)``, then ``take(idx)`` where ``idx`` is given (a shuffle). Parts that
        are all slices of one ``base`` (a reader's cached row groups, kept as slices of one
        consolidated array per column) are read from it directly: rows in a run of adjacent
        slices are a slice of the base, and a shuffle is one ``take`` from the base — no
        concatenation."""
        base = parts[0].base
        if base is not None and all(p.base is base for p in parts):
            sizes = np.array([p.rows for p in parts], dtype=np.int64)
            offsets = np.array([p.offset for p in parts], dtype=np.int64)
            bounds = np.concatenate([[0], np.cumsum(sizes)])  # each part's first row in the concatenation
            if idx is None:
                if (offsets[1:] == offsets[:-1] + sizes[:-1]).all():
                    return base.slice(int(offsets[0]), int(bounds[-1]))
                idx = np.arange(bounds[-1], dtype=np.int64)
            idx = np.asarray(idx, dtype=np.int64)
            if (offsets[1:] == offsets[:-1] + sizes[:-1]).all():  # one run of the base's rows
                return base.take(idx + offsets[0])
            rows = np.concatenate([np.arange(o, o + n, dtype=np.int64) for o, n in zip(offsets, sizes)])  # base row of each row
            return base.take(rows[idx])
        t = BatchColumns.concat(parts)
        return t if idx is None else t.take(idx)

    @staticmethod
    def concat(parts: Sequence["BatchColumns"]) -> "BatchColumns":
        """The rows of ``parts`` one after the other, as ``pa.concat_tables`` (one part: itself).
        The parts share schema and format (the reader converts them with the same arguments)."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        arrays = {f: None if getattr(first, f) is None else np.concatenate([getattr(p, f) for p in parts]) for f in ROW_FIELDS}
        return first._with_rows(sum(p.rows for p in parts), IdBlocks.concat([p.sparse for p in parts]),
                                IdBlocks.concat([p.sequence for p in parts]), arrays)

    def batch(self, start: int, n: int, batch_size: int) -> Batch:
        """Rows ``[start, start + n)``, ``n <= batch_size``, padded with padding rows."""
        pad = batch_size - n
        if not 0 <= n <= batch_size or start + n > self.rows:
            raise ValueError(f"rows [{start}, {start + n}) of {self.rows} do not fit a batch of {batch_size}")
        stop = start + n

        def padded(x: np.ndarray, fill: float | int | bool) -> torch.Tensor:
            x = x[start:stop]  # rows of a C-contiguous array: contiguous, a view of this buffer's
            if pad:
                x = np.concatenate([x, np.full((pad,) + x.shape[1:], fill, dtype=x.dtype)])
            return torch.from_numpy(x)

        return Batch(
            sparse=self.sparse.kjt(self.keys, start, stop, batch_size),
            dense=padded(self.dense, 0.0),
            scenario=padded(self.scenario, 0),
            labels=padded(self.labels, 0.0),
            label_mask=padded(self.mask, False),
            row_id=padded(self.row_id, -1),
            weight=padded(self.weight, 0.0),
            oracle=None if self.oracle is None else padded(self.oracle, 0.0),
            bias=None if self.bias is None else padded(self.bias, 0.0),
            user=None if self.user is None else padded(self.user, -1),
            group=None if self.group is None else padded(self.group, -1),
            sequence=self.sequence.kjt(self.sequence_keys, start, stop, batch_size) if self.sequence_keys else None,
            term_labels=None if self.term_labels is None else padded(self.term_labels, 0.0),
            term_rows=None if self.term_rows is None else padded(self.term_rows, 0.0),
            real_rows=n,  # the converter rejects negative row ids: every row cut here is real
        )


IdColumn = Tuple[Optional[np.ndarray], Optional[np.ndarray], np.ndarray]  # lengths, offsets, values


def _id_columns(t: pa.Table, features: List[SparseFeature]) -> List[IdColumn]:
    """(lengths, offsets, values) per feature; lengths and offsets ``None`` for a single-hot
    column without nulls (one id per row)."""
    out: List[IdColumn] = []
    for f in features:
        col = _array(t[f.name])
        if f.multi_hot:
            lens = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int32)
            vals = pc.list_flatten(col).to_numpy(zero_copy_only=False)
        elif col.null_count:
            lens = pc.is_valid(col).to_numpy(zero_copy_only=False).astype(np.int32)
            vals = col.to_numpy(zero_copy_only=False)[lens.astype(bool)]
        else:
            lens = None
            vals = col.to_numpy(zero_copy_only=False)
        offs = None if lens is None else np.concatenate([[0], np.cumsum(lens, dtype=np.int64)])
        vals = vals.astype(np.int64, copy=False)
        if lens is not None and not vals.flags.writeable:  # a batch's ids may be a view of it (single-hot ones are stacked: a copy)
            vals = vals.copy()
        out.append((lens, offs, vals))
    return out


def _as_lists(col: IdColumn) -> IdColumn:
    """A column with lengths and offsets (a single-hot one: one id per row)."""
    lens, offs, vals = col
    if lens is not None:
        return col
    return np.ones(len(vals), np.int32), np.arange(len(vals) + 1, dtype=np.int64), vals


def _take_lists(col: IdColumn, idx: np.ndarray) -> IdColumn:
    """Rows ``idx`` of a column with lengths (each row's ids, in their order)."""
    lens, offs, vals = col
    assert lens is not None and offs is not None
    if native.take_applies(lens, offs, vals):  # the values gathered in C
        return native.take_lists(lens, offs, vals, idx)
    lens = lens[idx]
    new_offs = np.zeros(len(idx) + 1, np.int64)
    np.cumsum(lens, out=new_offs[1:])
    # ids position: the row's first id in the old values plus its rank within the row
    pos = np.repeat(offs[idx] - new_offs[:-1], lens) + np.arange(new_offs[-1], dtype=np.int64)
    return lens, new_offs, vals[pos]


def _concat_lists(cols: Sequence[IdColumn]) -> IdColumn:
    lens = np.concatenate([c[0] for c in cols])  # type: ignore[misc]
    offs = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=offs[1:])
    return lens, offs, np.concatenate([c[2] for c in cols])


class IdBlocks:
    """A buffer's id columns (in KJT key order) cut into batches' KJTs: each run of adjacent
    single-hot columns is kept as one ``[m, n]`` matrix, so that a batch takes one slice of it
    (one copy for all of a census-shaped batch's 32 features, not one per feature)."""

    def __init__(self, columns: List[IdColumn]) -> None:
        # (first key, end key, matrix [m, n]) per run of single-hot keys; (k, k + 1, None) per multi-hot key
        runs: List[Tuple[int, int, Optional[np.ndarray]]] = []
        k = 0
        while k < len(columns):
            end = k
            while end < len(columns) and columns[end][0] is None:
                end += 1
            if end > k:
                runs.append((k, end, np.stack([columns[j][2] for j in range(k, end)])))  # [m, n]
                k = end
            else:
                runs.append((k, k + 1, None))
                k += 1
        self._set(list(columns), runs)

    def _set(self, columns: List[IdColumn], runs: List[Tuple[int, int, Optional[np.ndarray]]]) -> None:
        for k, end, matrix in runs:  # a single-hot key's ids: a row of its run's matrix (not a second copy)
            if matrix is not None:
                for j in range(k, end):
                    columns[j] = (None, None, matrix[j - k])
        self.columns, self.runs = columns, runs
        # every key single-hot: a batch's lengths and offsets depend on (rows, batch size) only
        self.single_hot = len(self.runs) == 1 and self.runs[0][2] is not None
        self._layouts: Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor, List[int], List[int]]] = {}

    @classmethod
    def _of(cls, columns: List[IdColumn], runs: List[Tuple[int, int, Optional[np.ndarray]]]) -> "IdBlocks":
        out = object.__new__(cls)
        out._set(columns, runs)
        return out

    @property
    def nbytes(self) -> int:
        return (sum(m.nbytes for _, _, m in self.runs if m is not None)
                + sum(a.nbytes for lens, offs, vals in self.columns if lens is not None for a in (lens, offs, vals)))

    def take(self, idx: np.ndarray) -> "IdBlocks":
        """Rows ``idx`` in that order (:meth:`BatchColumns.take`)."""
        columns, runs = list(self.columns), []
        for k, end, matrix in self.runs:
            if matrix is not None:
                if native.take_applies(matrix):
                    (matrix,) = native.take_rows([(matrix, 1)], idx, matrix.shape[1])  # [m, len(idx)]
                else:
                    matrix = np.take(matrix, idx, axis=1)  # [m, len(idx)]
            else:
                columns[k] = _take_lists(columns[k], idx)
            runs.append((k, end, matrix))
        return IdBlocks._of(columns, runs)

    def slice(self, start: int, stop: int) -> "IdBlocks":
        """Rows ``[start, stop)`` (:meth:`BatchColumns.slice`; views where the layout allows)."""
        columns, runs = list(self.columns), []
        for k, end, matrix in self.runs:
            if matrix is not None:
                matrix = matrix[:, start:stop]
            else:
                lens, offs, vals = columns[k]
                assert lens is not None and offs is not None
                columns[k] = (lens[start:stop], offs[start : stop + 1] - offs[start], vals[offs[start] : offs[stop]])
            runs.append((k, end, matrix))
        return IdBlocks._of(columns, runs)

    @staticmethod
    def concat(parts: Sequence["IdBlocks"]) -> "IdBlocks":
        """Rows of ``parts`` one after the other (:meth:`BatchColumns.concat`). Where a key is
        single-hot in some parts and not in others (nulls in one row group only), its ids are
        concatenated as lists: one id per row where the part had no lengths."""
        first = parts[0]
        layout = [(k, end, m is None) for k, end, m in first.runs]
        if all([(k, end, m is None) for k, end, m in p.runs] == layout for p in parts):
            columns, runs = list(first.columns), []
            for i, (k, end, matrix) in enumerate(first.runs):
                if matrix is not None:
                    matrix = np.concatenate([p.runs[i][2] for p in parts], axis=1)  # [m, Σn]
                else:
                    columns[k] = _concat_lists([p.columns[k] for p in parts])
                runs.append((k, end, matrix))
            return IdBlocks._of(columns, runs)
        columns = []
        for j in range(len(first.columns)):
            cols = [p.columns[j] for p in parts]
            if all(c[0] is None for c in cols):
                columns.append((None, None, np.concatenate([c[2] for c in cols])))
            else:
                columns.append(_concat_lists([_as_lists(c) for c in cols]))
        return IdBlocks(columns)

    def _layout(self, n: int, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor, List[int], List[int]]:
        """Lengths, offsets, length_per_key and offset_per_key of ``n`` single-hot rows in a
        batch of ``batch_size``, computed once per buffer and shared by its batches (read only:
        nothing downstream writes a batch's KJT in place)."""
        got = self._layouts.get((n, batch_size))
        if got is None:
            lengths = np.zeros((len(self.columns), batch_size), dtype=np.int32)  # [F, B]
            lengths[:, :n] = 1
            offsets = np.zeros(lengths.size + 1, dtype=np.int64)  # [F·B + 1]
            np.cumsum(lengths.reshape(-1), dtype=np.int64, out=offsets[1:])
            got = (torch.from_numpy(lengths.reshape(-1)), torch.from_numpy(offsets), lengths.sum(axis=1).tolist(),
                   offsets[:: batch_size].tolist())
            self._layouts[(n, batch_size)] = got
        return got

    def kjt(self, keys: List[str], start: int, stop: int, batch_size: int) -> KeyedJaggedTensor:
        """Rows ``[start, stop)`` as a KJT of stride ``batch_size`` (padding rows empty), its
        per-key lengths and offsets computed here on the host."""
        n = stop - start
        if self.single_hot:
            lengths_t, offsets_t, per_key_l, offset_per_key = self._layout(n, batch_size)
            matrix = self.runs[0][2]
            assert matrix is not None
            return KeyedJaggedTensor(keys=keys, values=torch.from_numpy(matrix[:, start:stop].reshape(-1)),  # [F·n]
                                     lengths=lengths_t, offsets=offsets_t, stride=batch_size,
                                     length_per_key=list(per_key_l), offset_per_key=list(offset_per_key))
        # one pass per run writes the batch's lengths, its values (key after key, each copied
        # once into place) and its offsets (a single-hot key's are a shifted arange, a
        # multi-hot key's its rows' offsets shifted): no cumsum over the F·B bags. Where the C
        # kernels apply (dlrm_mtl/native.py) each run is one C call (GIL released) instead of
        # ~6 numpy operations: the same arrays (tests/test_stream.py runs both).
        use_c = native.available() and self._native_layout()
        B = batch_size
        lengths = np.zeros((len(self.columns), B), dtype=np.int32)  # [F, B]
        # int64 offsets with the batch: the lookup kernels take them as int64 (fbgemm casts offsets
        # to the indices' dtype), so the step neither computes a cumsum nor copies int32 -> int64
        offsets = np.empty(lengths.size + 1, dtype=np.int64)  # [F·B + 1]
        offsets[0] = 0
        sizes = [(end - k) * n if matrix is not None else int(self.columns[k][1][stop] - self.columns[k][1][start])  # type: ignore[index]
                 for k, end, matrix in self.runs]
        values = np.empty(sum(sizes), dtype=np.int64)
        per_key: List[int] = [0] * len(self.columns)
        pos = 0  # where this run's values start
        for (k, end, matrix), size in zip(self.runs, sizes):
            ends = offsets[k * B + 1 : end * B + 1]  # each bag's end, this run's keys
            if matrix is not None:
                m = end - k
                per_key[k:end] = [n] * m
                if use_c:
                    native.kjt_single_run(matrix, start, n, B, pos, values, lengths[k:end], ends)
                else:
                    seg = ends.reshape(m, B)
                    lengths[k:end, :n] = 1
                    values[pos : pos + size].reshape(m, n)[...] = matrix[:, start:stop]
                    firsts = pos + n * np.arange(m, dtype=np.int64)  # [m]: each key's first value
                    seg[:, :n] = firsts[:, None] + np.arange(1, n + 1, dtype=np.int64)
                    seg[:, n:] = (firsts + n)[:, None]  # padding bags: empty
            else:
                lens, offs, vals = self.columns[k]
                assert lens is not None and offs is not None
                per_key[k] = size
                if use_c:
                    native.kjt_multi_key(lens, offs, vals, start, n, B, pos, values, lengths[k], ends)
                else:
                    a = int(offs[start])
                    lengths[k, :n] = lens[start:stop]
                    values[pos : pos + size] = vals[a : a + size]
                    ends[:n] = offs[start + 1 : stop + 1] + (pos - a)
                    ends[n:] = pos + size
            pos += size
        return KeyedJaggedTensor(
            keys=keys,
            values=torch.from_numpy(values),
            lengths=torch.from_numpy(lengths.reshape(-1)),
            offsets=torch.from_numpy(offsets),
            stride=B,
            length_per_key=per_key,
            offset_per_key=offsets[::B].tolist(),  # each key's first bag, and the end
        )

    def _native_layout(self) -> bool:
        """Whether every run's arrays are as the C cut takes them (:meth:`kjt`): int64
        matrices whose rows are contiguous, contiguous int32 lengths and int64 offsets and
        values; checked once."""
        ok = getattr(self, "_native_ok", None)
        if ok is None:
            ok = True
            for k, _, matrix in self.runs:
                if matrix is not None:
                    ok = ok and matrix.dtype == np.int64 and matrix.ndim == 2 and matrix.strides[1] == 8
                else:
                    lens, offs, vals = self.columns[k]
                    ok = ok and lens is not None and offs is not None and lens.dtype == np.int32 \
                        and offs.dtype == np.int64 and vals.dtype == np.int64 \
                        and all(a.flags.c_contiguous for a in (lens, offs, vals))
            self._native_ok = ok
        return ok


def table_to_batch(t: pa.Table, schema: Schema, batch_size: int, with_oracle: bool,
                   sparse_order: Optional[List[str]] = None, term_inputs: Optional[Callable] = None) -> Batch:
    """Converts ≤ batch_size clean rows (from RowGroupConverter) into a Batch padded to batch_size."""
    return BatchColumns(t, schema, with_oracle, sparse_order, term_inputs).batch(0, t.num_rows, batch_size)
