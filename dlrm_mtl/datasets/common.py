"""Shared machinery of the public data set converters: streaming text input, format errors,
seeded splits, vocabularies and a row-group Parquet writer that counts what it writes.

A converter reads raw files line by line (``open_text`` also reads ``.gz``), turns each line
into a dict of column values, and hands it to a :class:`ParquetSink`, which buffers at most
one row group per output directory (Python rows or Arrow tables) and writes it with ``pyarrow.parquet.ParquetWriter``.
Nothing holds a whole raw file in memory.

Example::

    sink = ParquetSink(out / "train", arrow_schema, scenario_columns=["country"],
                       label_columns=["click", "conversion"])
    for line_no, line in numbered_lines(path):
        sink.add({...})
    sink.close()
    print(sink.stats.format("train"))
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dlrm_mtl.data.errors import DataError
from dlrm_mtl.schema import Schema

DEFAULT_ROW_GROUP_ROWS = 65_536
DEFAULT_FILE_ROWS = 1_048_576


class FormatError(DataError):
    """A raw file that is not in the documented format: names the file, the 1-based line
    number and what is wrong with that line."""

    def __init__(self, path: str | Path, line_no: int, reason: str, line: Optional[str] = None) -> None:
        shown = "" if line is None else f": {line[:160]!r}" + ("..." if len(line) > 160 else "")
        super().__init__(f"{path}: line {line_no}: {reason}{shown}")
        self.path, self.line_no, self.reason = str(path), line_no, reason


@dataclass
class ConvertOptions:
    """Knobs every converter accepts (``dlrm-mtl convert --row-group-rows ...``)."""

    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS
    file_rows: int = DEFAULT_FILE_ROWS  # a new part file after this many rows
    seed: int = 0  # seeded splits (hash of a stable key) where no official split exists
    limit: int = 0  # stop after this many data lines per raw file (0 = all); for smoke runs
    quiet: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)  # converter-specific (--opt key=value)


def open_text(path: str | Path, encoding: str = "utf-8") -> io.TextIOBase:
    """A text stream over ``path`` (gzip when it ends with ``.gz``); decoding errors raise."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: raw file not found")
    if p.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding=encoding, newline="")
    return open(p, encoding=encoding, newline="")


def numbered_lines(path: str | Path, encoding: str = "utf-8", limit: int = 0) -> Iterator[Tuple[int, str]]:
    """(1-based line number, line without its newline), streamed. Blank lines are skipped
    (a trailing newline at the end of a file is common); a line that cannot be decoded in
    ``encoding`` is a :class:`FormatError`."""
    fh = open_text(path, encoding)
    line_no = 0
    n = 0
    try:
        while True:
            try:
                raw = fh.readline()
            except UnicodeDecodeError as e:
                raise FormatError(path, line_no + 1, f"not valid {encoding} text ({e.reason})") from None
            if not raw:
                return
            line_no += 1
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            yield line_no, line
            n += 1
            if limit and n >= limit:
                return
    finally:
        fh.close()


def stable_unit(key: str, seed: int) -> float:
    """A uniform number in [0, 1) from ``key`` and ``seed``: BLAKE2b, so the same on every
    machine, Python version and run (``hash()`` is salted per process)."""
    h = hashlib.blake2b(f"{seed}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


class Vocabulary:
    """Raw value -> dense id in order of first appearance (deterministic for a fixed input
    order). ``reserve`` leading ids for padding/unknown."""

    def __init__(self, reserve: Sequence[str] = ()) -> None:
        self.ids: Dict[str, int] = {}
        for r in reserve:
            self.ids[r] = len(self.ids)

    def __call__(self, value: str) -> int:
        i = self.ids.get(value)
        if i is None:
            i = self.ids[value] = len(self.ids)
        return i

    def __len__(self) -> int:
        return len(self.ids)

    def values(self) -> List[str]:
        return list(self.ids)


class RunningMoments:
    """Mean and standard deviation of a stream of numbers (Welford), for ``standardize``."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    def add_batch(self, x: "np.ndarray") -> None:
        """Many values at once (Chan et al.'s pairwise update; equal to ``add`` one by one up
        to rounding)."""
        n = int(x.size)
        if not n:
            return
        x = x.astype(np.float64, copy=False)
        mean = float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        tot = self.n + n
        d = mean - self.mean
        self.mean += d * n / tot
        self.m2 += m2 + d * d * self.n * n / tot
        self.n = tot

    def result(self) -> Tuple[float, float]:
        """(mean, std); std 1.0 where it would be 0 (a constant column)."""
        std = math.sqrt(self.m2 / self.n) if self.n else 0.0
        return (self.mean, std if std > 0 else 1.0)


@dataclass
class SplitStats:
    """Rows and label sums per scenario (a tuple of scenario ids) of one output split."""

    scenario_columns: List[str]
    label_columns: List[str]
    rows: Dict[Tuple[int, ...], int] = field(default_factory=dict)
    positives: Dict[Tuple[int, ...], List[int]] = field(default_factory=dict)
    nulls: Dict[Tuple[int, ...], List[int]] = field(default_factory=dict)

    def add(self, row: Dict[str, Any]) -> None:
        key = tuple(int(row[c]) for c in self.scenario_columns)
        self.rows[key] = self.rows.get(key, 0) + 1
        pos = self.positives.setdefault(key, [0] * len(self.label_columns))
        nul = self.nulls.setdefault(key, [0] * len(self.label_columns))
        for j, c in enumerate(self.label_columns):
            v = row[c]
            if v is None:
                nul[j] += 1
            elif v:
                pos[j] += 1

    def add_table(self, table: pa.Table) -> None:
        """Counts of a whole Arrow table (same result as ``add`` row by row)."""
        if not table.num_rows:
            return
        keys = np.stack([table[c].to_numpy().astype(np.int64) for c in self.scenario_columns], axis=1)
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        for j_key, key_arr in enumerate(uniq):
            key = tuple(int(k) for k in key_arr)
            sel = inverse == j_key
            self.rows[key] = self.rows.get(key, 0) + int(sel.sum())
            pos = self.positives.setdefault(key, [0] * len(self.label_columns))
            nul = self.nulls.setdefault(key, [0] * len(self.label_columns))
            for j, c in enumerate(self.label_columns):
                col = table[c]
                valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False))
                vals = col.fill_null(0).to_numpy().astype(np.float64)
                nul[j] += int((sel & ~valid).sum())
                pos[j] += int(((vals != 0) & sel & valid).sum())

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def to_dict(self, names: Optional[Dict[Tuple[int, ...], str]] = None) -> Dict[str, Any]:
        out = {}
        for key in sorted(self.rows):
            n = self.rows[key]
            name = (names or {}).get(key) or "/".join(map(str, key))
            labelled = [n - z for z in self.nulls[key]]
            out[name] = {"rows": n, **{
                f"{c}_rate": (p / m if m else None) for c, p, m in zip(self.label_columns, self.positives[key], labelled)
            }}
        return out

    def format(self, split: str, names: Optional[Dict[Tuple[int, ...], str]] = None) -> str:
        lines = [f"  {split}: {self.total:,} rows"]
        for name, d in self.to_dict(names).items():
            rates = "  ".join(f"{k[:-5]} {v:.4f}" if v is not None else f"{k[:-5]} -" for k, v in d.items() if k != "rows")
            lines.append(f"    {name:<24} {d['rows']:>12,}  {rates}")
        return "\n".join(lines)


class ParquetSink:
    """Writes dict rows to ``directory/part-NNNNN.parquet`` in row groups of
    ``row_group_rows``, starting a new file every ``file_rows`` rows; counts rows and labels
    per scenario. Holds at most one row group in memory."""

    def __init__(
        self,
        directory: str | Path,
        schema: pa.Schema,
        scenario_columns: Sequence[str],
        label_columns: Sequence[str],
        row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
        file_rows: int = DEFAULT_FILE_ROWS,
    ) -> None:
        if row_group_rows <= 0 or file_rows < row_group_rows:
            raise ValueError("row_group_rows must be > 0 and file_rows >= row_group_rows")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for old in self.directory.glob("part-*.parquet"):
            old.unlink()  # re-running a conversion replaces its output
        self.schema = schema
        self.row_group_rows = row_group_rows
        self.file_rows = file_rows
        self.stats = SplitStats(list(scenario_columns), list(label_columns))
        self._cols: Dict[str, list] = {f.name: [] for f in schema}
        self._chunks: List[pa.Table] = []  # pending rows not yet written (< one row group)
        self._pending_rows = 0
        self._writer: Optional[pq.ParquetWriter] = None
        self._file_index = 0
        self._rows_in_file = 0
        self.files: List[Path] = []

    def add(self, row: Dict[str, Any]) -> None:
        """One row (a dict with every column)."""
        for name, col in self._cols.items():
            col.append(row[name])
        self.stats.add(row)
        self._pending_rows += 1
        if self._pending_rows >= self.row_group_rows:
            self._write_full_groups()

    def add_table(self, table: pa.Table) -> None:
        """Many rows at once (an Arrow table with this sink's columns; cast to its types)."""
        table = table.select(self.schema.names).cast(self.schema)
        self._materialize()
        self._chunks.append(table)
        self.stats.add_table(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.row_group_rows:
            self._write_full_groups()

    def _materialize(self) -> None:
        """Python-list rows -> one Arrow chunk."""
        n = len(next(iter(self._cols.values())))
        if n:
            self._chunks.append(pa.table({f.name: pa.array(self._cols[f.name], type=f.type) for f in self.schema},
                                         schema=self.schema))
            for col in self._cols.values():
                col.clear()

    def _write_full_groups(self, final: bool = False) -> None:
        self._materialize()
        if not self._chunks:
            return
        pending = pa.concat_tables(self._chunks)
        self._chunks = []
        start = 0
        while pending.num_rows - start >= self.row_group_rows or (final and start < pending.num_rows):
            self._write_group(pending.slice(start, min(self.row_group_rows, pending.num_rows - start)))
            start += self.row_group_rows
        rest = pending.slice(start) if start < pending.num_rows else None
        if rest is not None and rest.num_rows:
            self._chunks.append(rest)
        self._pending_rows = 0 if rest is None else rest.num_rows

    def _write_group(self, group: pa.Table) -> None:
        n = group.num_rows
        if self._writer is None:
            path = self.directory / f"part-{self._file_index:05d}.parquet"
            self._writer = pq.ParquetWriter(path, self.schema)
            self.files.append(path)
        self._writer.write_table(group, row_group_size=n)
        self._rows_in_file += n
        if self._rows_in_file >= self.file_rows:
            self._writer.close()
            self._writer = None
            self._file_index += 1
            self._rows_in_file = 0

    def close(self) -> None:
        self._write_full_groups(final=True)
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@dataclass
class ConversionResult:
    """What a converter wrote: the schema, and rows / label rates per split and scenario."""

    out: Path
    schema: Schema
    splits: Dict[str, Dict[str, Any]]  # split -> scenario name -> {"rows", "<label>_rate"}
    notes: Dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        self.schema.save(self.out / "schema.yaml")
        (self.out / "conversion.json").write_text(json.dumps(
            {"schema": self.schema.name, "splits": self.splits, "notes": self.notes}, indent=2))


def finish(out: Path, schema: Schema, sinks: Dict[str, ParquetSink], names: Dict[Tuple[int, ...], str],
           opts: ConvertOptions, notes: Optional[Dict[str, Any]] = None) -> ConversionResult:
    """Close the sinks, write ``schema.yaml`` and ``conversion.json``, print the summary."""
    for sink in sinks.values():
        sink.close()
    result = ConversionResult(out, schema, {k: s.stats.to_dict(names) for k, s in sinks.items()}, notes or {})
    result.save()
    if not opts.quiet:
        print(f"{schema.name}: wrote {out}/schema.yaml")
        for split, sink in sinks.items():
            print(sink.stats.format(f"{split} ({len(sink.files)} file(s) in {sink.directory})", names))
    return result


def leaf_names(schema: Schema) -> Dict[Tuple[int, ...], str]:
    """Scenario id tuple -> readable name from the schema's ``value_names``."""
    import itertools

    levels = [range(s.num_values) for s in schema.scenarios]
    out = {}
    for key in itertools.product(*levels):
        parts = []
        for lvl, i in zip(schema.scenarios, key):
            parts.append(lvl.value_names[i] if i < len(lvl.value_names) else str(i))
        out[key] = "/".join(parts)
    return out
