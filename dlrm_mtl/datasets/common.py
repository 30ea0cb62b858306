"""Shared machinery of the public data set converters: streaming text input, format errors,
seeded splits, vocabularies and a row-group Parquet writer that counts what it writes.

A converter reads raw files line by line (``open_text`` also reads ``.gz``), turns each line
into a dict of column values, and hands it to a :class:`ParquetSink`, which buffers at most
one row group per output directory (Python rows or Arrow tables) and writes it with ``pyarrow.parquet.ParquetWriter``.
Nothing holds a whole raw file in memory. Header CSVs (the preprocessed variants) are read
in chunks of whole columns (:func:`csv_chunks`); a download that ships one file is split by
:class:`HashSplit` (``--opt split``).

Example::

    sink = ParquetSink(out / "train", arrow_schema, scenario_columns=["country"],
                       label_columns=["click", "conversion"])
    for line_no, line in numbered_lines(path):
        sink.add({...})
    sink.close()
    print(sink.stats.format("train"))
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
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
    # hashed split of a download that ships one file: "0.8" (train / eval) or "0.8,0.1"
    # (train / eval / test); None reads extra["split"] (--opt split=0.8). See HashSplit.
    split: Optional[str] = None


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


SPLIT_HINT = ("pass --split 0.8 (or --opt split=0.8; ConvertOptions(split='0.8')): that fraction of the rows goes to train "
              "and the rest to eval, each row drawn by a seeded hash of its line number (--seed picks the draw; "
              "'0.8,0.1' gives train / eval / test)")


@dataclass(frozen=True)
class HashSplit:
    """The split of a download that ships one file (``--opt split=F`` or ``F,G``).

    A row goes to ``train`` when ``u < F``, to ``eval`` when ``F <= u < F + G`` and to
    ``test`` otherwise, where ``u = stable_unit("split:<line number>", seed)`` in [0, 1) and
    the line number is the row's 1-based line in its file (a CSV header is line 1). With one
    number ``G = 1 - F`` and there is no ``test``. Deterministic: the same file and seed give
    the same split on every machine, whether the file is gzipped or not.
    """

    train: float
    eval: float
    seed: int = 0

    @property
    def splits(self) -> Tuple[str, ...]:
        return ("train", "eval") if self.train + self.eval >= 1.0 - 1e-12 else ("train", "eval", "test")

    def of(self, line_no: int) -> str:
        u = stable_unit(f"split:{line_no}", self.seed)
        return "train" if u < self.train else "eval" if u < self.train + self.eval else "test"

    def of_many(self, line_nos: Sequence[int]) -> np.ndarray:
        """:meth:`of` of each line number, as an array of split names."""
        return np.array([self.of(int(n)) for n in line_nos])

    def describe(self) -> str:
        parts = [f"train {self.train:g}", f"eval {self.eval:g}"]
        if "test" in self.splits:
            parts.append(f"test {1.0 - self.train - self.eval:g}")
        return f"hashed split of the line numbers (seed {self.seed}): " + ", ".join(parts)


def hash_split(opts: "ConvertOptions") -> Optional[HashSplit]:
    """The :class:`HashSplit` asked for by ``opts.split`` (or ``opts.extra['split']``), or
    None. A value that is not ``F`` or ``F,G`` with 0 < F, 0 < G and F + G <= 1 is a
    :class:`DataError`."""
    text = opts.split if opts.split is not None else opts.extra.get("split")
    if text is None or str(text).strip() == "":
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        nums = []
    ok = len(nums) in (1, 2) and all(math.isfinite(x) and 0.0 < x < 1.0 for x in nums) and sum(nums) <= 1.0 + 1e-12
    if not ok:
        raise DataError(f"--opt split={text}: expected F (train fraction, eval gets the rest) or F,G (train and eval "
                        "fractions, test gets the rest), each between 0 and 1 exclusive, F + G <= 1")
    return HashSplit(nums[0], nums[1] if len(nums) == 2 else 1.0 - nums[0], opts.seed)


def refuse_split(opts: "ConvertOptions", why: str) -> None:
    """A :class:`DataError` when a split was asked for where the input has a split of its own
    (``why`` says which)."""
    if hash_split(opts) is not None:
        raise DataError(f"--opt split: {why}; it is only for a download that ships one file (drop it)")


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

    def map_many(self, values: "pa.Array | np.ndarray | Sequence") -> "np.ndarray":
        """Ids of many values at once (int64 array): the same ids, assigned in the same order,
        as calling the vocabulary on each value in turn (Arrow's dictionary encoding lists the
        distinct values in order of first appearance)."""
        arr = values if isinstance(values, pa.Array) else pa.array(np.asarray(values))
        if not len(arr):
            return np.zeros(0, dtype=np.int64)
        enc = pc.dictionary_encode(arr)
        lookup = np.array([self(v) for v in enc.dictionary.to_pylist()], dtype=np.int64)
        return lookup[enc.indices.to_numpy(zero_copy_only=False)]

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


# --------------------------------------------------------------------------- header CSV files
def csv_header(path: str | Path) -> List[str]:
    """The first line of a CSV file, split into stripped column names (``[]`` when empty; a
    leading byte-order mark is dropped)."""
    with open_text(path) as fh:
        try:
            names = [c.strip() for c in next(csv.reader(fh))]
            if names and names[0].startswith("\ufeff"):
                names[0] = names[0][1:].strip()
            return names
        except StopIteration:
            return []
        except UnicodeDecodeError as e:
            raise FormatError(path, 1, f"not valid utf-8 text ({e.reason})") from None


def require_columns(path: str | Path, header: Sequence[str], required: Sequence[str], what: str) -> None:
    """A :class:`FormatError` on line 1 naming the file and each required column the header lacks."""
    missing = [c for c in required if c not in header]
    if missing:
        raise FormatError(path, 1, f"header lacks required column(s) {', '.join(repr(c) for c in missing)} "
                          f"(needed by {what})", ",".join(header))


class CsvChunk:
    """Consecutive data rows of a header CSV file (each column an Arrow string array) with
    their line numbers; columns are read as whole arrays, and a bad value is a
    :class:`FormatError` naming the file, the line and the column."""

    def __init__(self, path: Path, header: List[str], columns: List[pa.Array], line_nos: "np.ndarray") -> None:
        self.path, self.header, self.columns, self.line_nos = path, header, columns, line_nos
        self._index = {c: i for i, c in enumerate(header)}

    def __len__(self) -> int:
        return len(self.line_nos)

    def take(self, rows: "np.ndarray") -> "CsvChunk":
        """The chunk of the given row positions (in that order)."""
        idx = pa.array(rows, type=pa.int64())
        return CsvChunk(self.path, self.header, [c.take(idx) for c in self.columns], self.line_nos[rows])

    def error(self, i: int, reason: str) -> FormatError:
        line = ",".join(c[i].as_py() or "" for c in self.columns)
        return FormatError(self.path, int(self.line_nos[i]), reason, line)

    def text(self, column: str) -> pa.Array:
        """The column's values as stripped strings."""
        return pc.utf8_trim_whitespace(self.columns[self._index[column]])

    def _first_bad(self, values: pa.Array, ok) -> int:
        for i, v in enumerate(values.to_pylist()):
            if not ok(v):
                return i
        return -1

    def numbers(self, column: str, empty: Optional[str] = None) -> "np.ndarray":
        """float64; a non-numeric value is an error, so is an empty one unless ``empty`` (the
        text to read in its place) is given."""
        t = self.text(column)
        if empty is not None:
            t = pc.if_else(pc.equal(t, ""), empty, t)
        try:
            x = pc.cast(t, pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            x = None
        if x is None or not np.isfinite(x).all():
            i = self._first_bad(t, _is_finite_number)
            raise self.error(i, f"column {column!r}: {t[i].as_py()!r} is not a finite number")
        return x

    def integers(self, column: str) -> "np.ndarray":
        """int64; integral floats (``3.0``) are accepted, anything else is an error."""
        t = self.text(column)
        try:
            return pc.cast(t, pa.int64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        x = self.numbers(column)
        bad = np.flatnonzero((x != np.floor(x)) | (np.abs(x) > 2.0**62))
        if bad.size:
            raise self.error(int(bad[0]), f"column {column!r}: {t[int(bad[0])].as_py()!r} is not an integer")
        return x.astype(np.int64)

    def binary(self, column: str) -> "np.ndarray":
        """int8 labels; anything but 0 or 1 (``0.0`` / ``1.0`` accepted) is an error."""
        t = self.text(column)
        ok = pc.is_in(t, value_set=pa.array(["0", "1", "0.0", "1.0"])).to_numpy(zero_copy_only=False)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            raise self.error(i, f"column {column!r}: label {t[i].as_py()!r} is not 0 or 1")
        return pc.is_in(t, value_set=pa.array(["1", "1.0"])).to_numpy(zero_copy_only=False).astype(np.int8)


def _is_finite_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def csv_chunks(path: str | Path, chunk_rows: int = 65_536, limit: int = 0) -> Iterator[CsvChunk]:
    """The data rows of a CSV file with a header line, in chunks (at most ``limit`` rows when
    > 0). Read with ``pyarrow.csv`` (every column as text); where that reader stops (a blank
    line, a row with another number of fields than the header, a newline inside a quoted value,
    bad UTF-8) the rest of the file is read with Python's ``csv`` module, which skips blank
    lines and names the first bad line in a :class:`FormatError`."""
    path = Path(path)
    header = csv_header(path)
    if not header:
        raise FormatError(path, 1, "empty file (expected a header line)")
    done = 0
    try:
        reader = pacsv.open_csv(
            str(path), read_options=pacsv.ReadOptions(column_names=header, skip_rows=1, block_size=8 << 20),
            parse_options=pacsv.ParseOptions(newlines_in_values=False, ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in header}, strings_can_be_null=False,
                                                 quoted_strings_can_be_null=False))
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            n = batch.num_rows
            blank = _first_blank_row(batch)
            if blank >= 0:
                batch, n = batch.slice(0, blank), blank
            if limit and done + n > limit:
                batch, n = batch.slice(0, limit - done), limit - done
            if n:
                # no blank line so far (one hands over to the line reader): data row k is on line k + 2
                yield CsvChunk(path, header, list(batch.columns), np.arange(done + 2, done + 2 + n, dtype=np.int64))
            done += n
            if limit and done >= limit:
                return
            if blank >= 0:
                break
    except (pa.ArrowInvalid, UnicodeDecodeError):
        pass
    yield from _python_csv_chunks(path, header, chunk_rows, limit, skip=done)


def _first_blank_row(batch: pa.RecordBatch) -> int:
    """Index of the first row the Arrow reader made of an empty line (every value empty), or -1."""
    cand = pc.equal(batch.column(0), "")
    if not pc.any(cand).as_py():
        return -1
    for col in batch.columns[1:]:
        cand = pc.and_(cand, pc.equal(col, ""))
    hits = np.flatnonzero(cand.to_numpy(zero_copy_only=False))
    return int(hits[0]) if hits.size else -1


def _python_csv_chunks(path: Path, header: List[str], chunk_rows: int, limit: int, skip: int) -> Iterator[CsvChunk]:
    """``csv_chunks`` after its first ``skip`` data rows, with Python's csv module."""
    width = len(header)
    with open_text(path) as fh:
        reader = csv.reader(fh)
        rows: List[List[str]] = []
        line_nos: List[int] = []
        n = 0

        def chunk() -> CsvChunk:
            cols = [pa.array(c, type=pa.string()) for c in zip(*rows)]
            return CsvChunk(path, header, cols, np.asarray(line_nos, dtype=np.int64))

        first = True
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except UnicodeDecodeError as e:
                raise FormatError(path, reader.line_num + 1, f"not valid utf-8 text ({e.reason})") from None
            except csv.Error as e:
                raise FormatError(path, reader.line_num, f"not CSV ({e})") from None
            if first:  # the header
                first = False
                continue
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            n += 1
            if n <= skip:
                continue
            if len(fields) != width:
                raise FormatError(path, reader.line_num, f"expected {width} columns (as the header), found {len(fields)}",
                                  ",".join(fields))
            rows.append(fields)
            line_nos.append(reader.line_num)
            if len(rows) >= chunk_rows:
                yield chunk()
                rows, line_nos = [], []
            if limit and n >= limit:
                break
        if rows:
            yield chunk()


def csv_files(raw: Path) -> List[Path]:
    """The ``*.csv`` and ``*.csv.gz`` files directly in ``raw``, by name."""
    return sorted(p for p in raw.iterdir() if p.is_file() and (p.name.endswith(".csv") or p.name.endswith(".csv.gz")))


def preprocessed_csvs(raw: Path, detect: Sequence[str], required: Sequence[str], what: str) -> List[Path]:
    """The CSVs in ``raw`` whose header has every ``detect`` column (a preprocessed variant of a
    data set), each checked for the ``required`` columns (:func:`require_columns`)."""
    found = []
    for path in csv_files(raw):
        header = csv_header(path)
        if all(c in header for c in detect):
            require_columns(path, header, required, what)
            found.append(path)
    return found


_ROLE_WORDS = {"train": "train", "training": "train", "val": "eval", "valid": "eval", "validation": "eval",
               "eval": "eval", "dev": "eval", "test": "test"}


def file_role(path: Path) -> Optional[str]:
    """``train``, ``eval`` or ``test`` from the words of a file name (``ali_ccp_val_sample.csv``
    -> eval), or None when it names no split or more than one."""
    stem = path.name[:-3] if path.name.endswith(".gz") else path.name
    words = re.split(r"[^a-z0-9]+", stem.lower())
    roles = {_ROLE_WORDS[w] for w in words if w in _ROLE_WORDS}
    return roles.pop() if len(roles) == 1 else None


def plan_files(files: Sequence[Path], rule: Optional[HashSplit], raw: Path, what: str) -> List[Tuple[Path, Optional[str]]]:
    """(file, output split) in conversion order for a variant shipped as one or more files.

    One file: every row goes through ``rule`` (split None); without ``rule`` that is a
    :class:`FileNotFoundError` saying how to proceed. Several files: the split of each is
    named by its file (:func:`file_role`: train / val / test), one must be ``train``, no two
    the same, and ``rule`` must not be given."""
    if len(files) == 1:
        if rule is None:
            raise FileNotFoundError(f"{raw}: {what}: only one file, {files[0].name}, so there is no split to use; "
                                    f"to make one from it, {SPLIT_HINT}")
        return [(files[0], None)]
    if rule is not None:
        raise DataError(f"--opt split: {raw} holds {len(files)} {what} files ({', '.join(f.name for f in files)}), "
                        "named by split; it is only for a download that ships one file (drop it, or keep one file)")
    roles: Dict[str, Path] = {}
    for f in files:
        r = file_role(f)
        if r is None:
            raise DataError(f"{f}: {what}: cannot tell from the name whether this is the train, val or test file "
                            f"(other files: {', '.join(g.name for g in files if g != f)}); rename it or keep one file")
        if r in roles:
            raise DataError(f"{raw}: {what}: {roles[r].name} and {f.name} are both {r} files; keep one")
        roles[r] = f
    if "train" not in roles:
        raise FileNotFoundError(f"{raw}: {what}: no train file among {', '.join(f.name for f in files)}")
    return [(roles[r], r) for r in ("train", "eval", "test") if r in roles]


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


def list_array(ids: "np.ndarray", present: "np.ndarray | None" = None) -> pa.Array:
    """A ``list<int64>`` array with one id per row (an empty list where ``present`` is False)."""
    n = len(ids)
    if present is None:
        return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), pa.array(ids, type=pa.int64()))
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(present.astype(np.int32), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids[present], type=pa.int64()))


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
