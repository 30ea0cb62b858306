"""AliExpress (Tianchi data set 74690; Li et al., CIKM 2020) → one multi-scenario data set
with the country as scenario, as trained jointly by AESM² (Zou et al., SIGIR 2022) and per
country by MTReclib.

Raw format: one directory per country, ``AliExpress_NL/``, ``AliExpress_ES/``,
``AliExpress_FR/``, ``AliExpress_US/`` (and ``AliExpress_RU/``), each with ``train.csv`` and
``test.csv`` (optionally gzipped). Each CSV has a header line and 82 columns: a search id,
16 categorical features (integer ids), 63 numerical features, then the ``click`` and
``conversion`` labels (0/1) — the layout MTReclib's ``AliExpressDataset`` reads by
position. A conversion implies a click (the ESMM chain click → conversion).

Output: ``out/train/<CC>/part-*.parquet`` and ``out/test/<CC>/part-*.parquet``, so that
``out/train`` is the joint multi-scenario set and ``out/train/NL`` one country. Scenario
ids follow the fixed order NL, ES, FR, US, RU among the countries converted. Categorical
columns keep their integer ids (tables sized max id + 1 over all files); numerical columns
are standardised with the joint training split's statistics. Official train/test split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from dlrm_mtl.datasets.common import (
    ConversionResult, ConvertOptions, FormatError, ParquetSink, RunningMoments, finish, numbered_lines, refuse_split,
)
from dlrm_mtl.schema import DenseFeature, Schema, ScenarioLevel, SparseFeature, Task

COUNTRIES: List[str] = ["NL", "ES", "FR", "US", "RU"]
NUM_CATEGORICAL = 16
NUM_NUMERICAL = 63
NUM_COLUMNS = 1 + NUM_CATEGORICAL + NUM_NUMERICAL + 2
CATEGORICAL = [f"cat_{i:02d}" for i in range(1, NUM_CATEGORICAL + 1)]
NUMERICAL = [f"num_{i:02d}" for i in range(1, NUM_NUMERICAL + 1)]
EMBEDDING_DIM = 16


def aliexpress_schema(countries: List[str], table_sizes: Dict[str, int], stats: Dict[str, tuple]) -> Schema:
    return Schema(
        name="aliexpress",
        row_id="row_id",
        sparse=[SparseFeature(c, f"t_{c}", table_sizes[c], EMBEDDING_DIM) for c in CATEGORICAL],
        dense=[DenseFeature(c, standardize=True, mean=stats[c][0], std=stats[c][1]) for c in NUMERICAL],
        scenarios=[ScenarioLevel("country", len(countries), value_names=list(countries))],
        tasks=[Task("ctr", "click"), Task("cvr", "conversion", parent="ctr", loss_space="entire", entire_name="ctcvr")],
    )


def _arrow_schema() -> pa.Schema:
    return pa.schema(
        [("row_id", pa.int64()), ("search_id", pa.string())] + [(c, pa.int64()) for c in CATEGORICAL]
        + [(c, pa.float32()) for c in NUMERICAL]
        + [("country", pa.int64()), ("click", pa.int8()), ("conversion", pa.int8())]
    )


def find_country_file(raw: Path, country: str, split: str) -> Path | None:
    for d in (raw / f"AliExpress_{country}", raw / country):
        for name in (f"{split}.csv", f"{split}.csv.gz"):
            if (d / name).exists():
                return d / name
    return None


def countries_present(raw: Path) -> List[str]:
    found = [c for c in COUNTRIES if find_country_file(raw, c, "train") and find_country_file(raw, c, "test")]
    if not found:
        raise FileNotFoundError(f"{raw}: no AliExpress_<CC>/train.csv + test.csv for any of {COUNTRIES}")
    return found


def _label(path: Path, line_no: int, line: str, name: str, text: str) -> int:
    t = text.strip()
    if t in ("0", "1", "0.0", "1.0"):
        return int(float(t))
    raise FormatError(path, line_no, f"{name} label {text!r} is not 0 or 1", line)


def convert(raw: str | Path, out: str | Path, opts: ConvertOptions = ConvertOptions()) -> ConversionResult:
    """Convert the per-country CSVs under ``raw``; ``opts.extra['countries']`` (e.g.
    ``"NL,US"``) restricts the countries (default: all present)."""
    raw, out = Path(raw), Path(out)
    refuse_split(opts, "AliExpress ships train.csv and test.csv per country")
    present = countries_present(raw)
    wanted = opts.extra.get("countries")
    if wanted:
        req = [c.strip().upper() for c in str(wanted).split(",") if c.strip()]
        missing = [c for c in req if c not in present]
        if missing:
            raise FileNotFoundError(f"{raw}: no train.csv + test.csv for countries {missing} (present: {present})")
        countries = [c for c in COUNTRIES if c in req]
    else:
        countries = present
    arrow = _arrow_schema()
    max_id = {c: 0 for c in CATEGORICAL}
    moments = {c: RunningMoments() for c in NUMERICAL}
    sinks: Dict[str, ParquetSink] = {}
    state = {"row_id": 0, "header": None}
    for split in ("train", "test"):
        for sid, country in enumerate(countries):
            path = find_country_file(raw, country, split)
            out_dir = out / split / country
            snapshot = (state["row_id"], dict(max_id), {c: (m.n, m.mean, m.m2) for c, m in moments.items()})
            sink = ParquetSink(out_dir, arrow, ["country"], ["click", "conversion"], opts.row_group_rows, opts.file_rows)
            try:
                _convert_file_fast(path, split, sid, sink, max_id, moments, state, opts.limit)
            except _SlowPath:
                # start this file over with the line-by-line parser (it names the bad line)
                state["row_id"] = snapshot[0]
                max_id.update(snapshot[1])
                for c, (n, mean, m2) in snapshot[2].items():
                    moments[c].n, moments[c].mean, moments[c].m2 = n, mean, m2
                sink.close()
                sink = ParquetSink(out_dir, arrow, ["country"], ["click", "conversion"], opts.row_group_rows, opts.file_rows)
                _convert_file_lines(path, split, sid, sink, max_id, moments, state, opts.limit)
            sinks[f"{split}/{country}"] = sink
    header = state["header"]
    schema = aliexpress_schema(countries, {c: m + 1 for c, m in max_id.items()}, {c: m.result() for c, m in moments.items()})
    names = {(i,): c for i, c in enumerate(countries)}
    return finish(out, schema, sinks, names, opts, {"countries": countries, "header": header})


class _SlowPath(Exception):
    """The fast reader met something it cannot diagnose: use the line-by-line parser."""


def _read_header(path: Path) -> List[str]:
    for line_no, line in numbered_lines(path, limit=1):
        fields = line.split(",")
        if len(fields) != NUM_COLUMNS or all(_is_number(f) for f in fields):
            raise _SlowPath()
        return [f.strip() for f in fields]
    raise _SlowPath()


def _convert_file_fast(path: Path, split: str, sid: int, sink: ParquetSink, max_id: Dict[str, int],
                       moments: Dict[str, RunningMoments], state: dict, limit: int) -> None:
    header = _read_header(path)
    state["header"] = state["header"] or header
    names = ["search_id"] + CATEGORICAL + NUMERICAL + ["click", "conversion"]
    types = {"search_id": pa.string(), **{c: pa.int64() for c in CATEGORICAL}, **{c: pa.float64() for c in NUMERICAL},
             "click": pa.int64(), "conversion": pa.int64()}
    try:
        reader = pacsv.open_csv(
            str(path), read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, block_size=16 << 20),
            parse_options=pacsv.ParseOptions(newlines_in_values=False),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False, quoted_strings_can_be_null=False))
        done = 0
        for batch in reader:
            table = pa.Table.from_batches([batch])
            if limit and done + table.num_rows > limit:
                table = table.slice(0, limit - done)
            if any(table[c].null_count for c in names[1:]):
                raise _SlowPath()
            click, conv = table["click"].to_numpy(), table["conversion"].to_numpy()
            cats = {c: table[c].to_numpy() for c in CATEGORICAL}
            nums = {c: table[c].to_numpy() for c in NUMERICAL}
            if (((click != 0) & (click != 1)).any() or ((conv != 0) & (conv != 1)).any() or (conv > click).any()
                    or any((v < 0).any() for v in cats.values()) or not all(np.isfinite(v).all() for v in nums.values())):
                raise _SlowPath()
            n = table.num_rows
            for c, v in cats.items():
                if n:
                    max_id[c] = max(max_id[c], int(v.max()))
            if split == "train":
                for c, v in nums.items():
                    moments[c].add_batch(v)
            table = table.append_column("row_id", pa.array(np.arange(state["row_id"], state["row_id"] + n, dtype=np.int64)))
            table = table.append_column("country", pa.array(np.full(n, sid, dtype=np.int64)))
            sink.add_table(table)
            state["row_id"] += n
            done += n
            if limit and done >= limit:
                break
    except pa.ArrowInvalid:
        raise _SlowPath() from None


def _convert_file_lines(path: Path, split: str, sid: int, sink: ParquetSink, max_id: Dict[str, int],
                        moments: Dict[str, RunningMoments], state: dict, limit: int) -> None:
    """The line-by-line parser: slow, but names the first bad line."""
    first = True
    for line_no, line in numbered_lines(path, limit=limit + 1 if limit else 0):
        fields = line.split(",")
        if len(fields) != NUM_COLUMNS:
            raise FormatError(path, line_no, f"expected {NUM_COLUMNS} comma-separated columns "
                              f"(id, {NUM_CATEGORICAL} categorical, {NUM_NUMERICAL} numerical, click, conversion), "
                              f"found {len(fields)}", line)
        if first:  # the header line
            first = False
            if all(_is_number(f) for f in fields):
                raise FormatError(path, line_no, "expected a header line, found data", line)
            state["header"] = state["header"] or [f.strip() for f in fields]
            continue
        row = {"row_id": state["row_id"], "search_id": fields[0].strip(), "country": sid}
        for c, text in zip(CATEGORICAL, fields[1:1 + NUM_CATEGORICAL]):
            try:
                v = int(float(text))
            except ValueError:
                raise FormatError(path, line_no, f"categorical column {c}: {text!r} is not an integer id", line) from None
            if v < 0 or v != float(text):
                raise FormatError(path, line_no, f"categorical column {c}: {text!r} is not a non-negative integer id", line)
            row[c] = v
            if v > max_id[c]:
                max_id[c] = v
        for c, text in zip(NUMERICAL, fields[1 + NUM_CATEGORICAL:-2]):
            try:
                x = float(text)
            except ValueError:
                raise FormatError(path, line_no, f"numerical column {c}: {text!r} is not a number", line) from None
            if x != x or x in (float("inf"), float("-inf")):
                raise FormatError(path, line_no, f"numerical column {c}: {text!r} is not finite", line)
            row[c] = x
            if split == "train":
                moments[c].add(x)
        row["click"] = _label(path, line_no, line, "click", fields[-2])
        row["conversion"] = _label(path, line_no, line, "conversion", fields[-1])
        if row["conversion"] and not row["click"]:
            raise FormatError(path, line_no, "conversion = 1 on a row with click = 0 (a conversion must follow a click)", line)
        sink.add(row)
        state["row_id"] += 1


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
