"""Row ids declared unique are checked to be unique, in bounded memory, across all files."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from dlrm_mtl.data.errors import DataError
from dlrm_mtl.data.source import Source, open_source
from dlrm_mtl.data.stream import RowGroup, hash_ids, list_row_groups

# (id, file index, row within the file) of one partition's ids, as three int64 arrays
_Part = Tuple[np.ndarray, np.ndarray, np.ndarray]


class DuplicateRowIdError(DataError):
    """The same row id in two rows (a file copied twice, two exports overlapping)."""


def check_unique_row_ids(
    source: Source,
    column: str,
    rank: int = 0,
    world_size: int = 1,
    memory_rows: int = 4_000_000,
    filesystem: Optional[pa.fs.FileSystem] = None,
) -> int:
    """Raises :class:`DuplicateRowIdError` naming both files and rows of a duplicated id in
    ``column`` over every row group of ``source``; returns the number of ids this rank checked.

    The ids are hash-partitioned into ``P`` partitions of about ``memory_rows`` ids each;
    rank ``r`` checks the partitions ``p ≡ r (mod world_size)``, so the ranks share the work
    and every pair of equal ids meets in one partition on one rank. A rank holds at most
    ``memory_rows`` ids (24 bytes each with their file and row) before it spills its
    partitions to a temporary directory; each partition is then sorted on its own. Every rank
    reads the whole id column (one int64 column: a small part of a row).
    """
    dset = open_source(source, filesystem)
    groups = list_row_groups(dset)
    filesystem = dset.filesystem
    total = sum(g.num_rows for g in groups)
    parts = max(1, math.ceil(total / max(1, memory_rows)))
    parts = math.ceil(parts / world_size) * world_size  # whole rounds: every rank owns as many
    mine = [p for p in range(parts) if p % world_size == rank]
    paths = {g.file_index: g.path for g in groups}
    fmt = ds.ParquetFileFormat()
    with tempfile.TemporaryDirectory(prefix="dlrm_mtl-row-ids-") as spill:
        buffers: Dict[int, List[_Part]] = {p: [] for p in mine}
        held, chunks, checked = 0, 0, 0
        for g in groups:
            ids = _read_ids(fmt, g, column, filesystem)
            rows = np.arange(g.first_row, g.first_row + len(ids), dtype=np.int64)
            keep = ids >= 0  # negative ids are refused where the rows are read
            ids, rows = ids[keep], rows[keep]
            if parts == 1:
                buffers[0].append((ids, np.full(len(ids), g.file_index, np.int64), rows))
                held += len(ids)
            else:
                owner = hash_ids(ids, parts)
                by_owner = np.argsort(owner, kind="stable")
                bounds = np.searchsorted(owner[by_owner], np.arange(parts + 1))
                for p in mine:
                    sel = by_owner[bounds[p]:bounds[p + 1]]
                    if len(sel):
                        buffers[p].append((ids[sel], np.full(len(sel), g.file_index, np.int64), rows[sel]))
                        held += len(sel)
            if held > memory_rows:
                chunks = _spill(buffers, Path(spill), chunks)
                held = 0
        for p in mine:
            checked += _check_partition(_load(buffers[p], Path(spill), p, chunks), paths, column)
    return checked


def _read_ids(fmt: ds.ParquetFileFormat, g: RowGroup, column: str, filesystem: Optional[pa.fs.FileSystem]) -> np.ndarray:
    frag = fmt.make_fragment(g.path, filesystem, row_groups=[g.index])
    if column not in frag.physical_schema.names:
        raise DataError(f"{g.path}: missing row id column {column!r}")
    col = frag.to_table(columns=[column], use_threads=False)[column]
    if not pa.types.is_integer(col.type):
        raise DataError(f"{g.path}: column {column!r}: expected integer row ids, got {col.type}")
    col = pc.fill_null(col, -1) if col.null_count else col
    return col.to_numpy().astype(np.int64, copy=False)


def _spill(buffers: Dict[int, List[_Part]], spill: Path, chunks: int) -> int:
    """Writes every buffered partition to ``spill/p{p}_c{chunks}.npz`` and empties the buffers."""
    for p, parts in buffers.items():
        if parts:
            np.savez(spill / f"p{p}_c{chunks}.npz", *[np.concatenate([x[k] for x in parts]) for k in range(3)])
            parts.clear()
    return chunks + 1


def _load(buffered: List[_Part], spill: Path, p: int, chunks: int) -> List[_Part]:
    parts = list(buffered)
    for c in range(chunks):
        f = spill / f"p{p}_c{c}.npz"
        if f.exists():
            with np.load(f) as z:
                parts.append((z["arr_0"], z["arr_1"], z["arr_2"]))
    return parts


def _check_partition(parts: List[_Part], paths: Dict[int, str], column: str) -> int:
    """The number of ids in ``parts``; raises on the earliest duplicated id among them."""
    if not parts:
        return 0
    ids = np.concatenate([x[0] for x in parts])
    s = np.sort(ids)
    if not (s[1:] == s[:-1]).any():  # the usual case: one sort, no lexsort
        return len(ids)
    files, rows = (np.concatenate([x[k] for x in parts]) for k in (1, 2))
    order = np.lexsort((rows, files, ids))  # by id, then file, then row: the earliest pair first
    ids_sorted = ids[order]
    dup = np.flatnonzero(ids_sorted[1:] == ids_sorted[:-1])
    if len(dup):
        a, b = order[dup[0]], order[dup[0] + 1]
        n = len(dup)
        raise DuplicateRowIdError(
            f"column {column!r}: row id {int(ids[a])} appears twice: {paths[files[a]]} row {int(rows[a])} and "
            f"{paths[files[b]]} row {int(rows[b])} ({n} duplicate id(s) in this part of the data; a file copied "
            f"twice into the data directory?). Row ids declared in the schema must be unique; set "
            f"data.check_row_ids=false to skip this check"
        )
    return len(ids)
