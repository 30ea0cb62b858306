"""KuaiRand (Gao et al., CIKM 2022; https://kuairand.com) → multi-scenario multi-task
Parquet: the app ``tab`` is the scenario, tasks ``click`` (is_click), ``long_view`` and
``like`` (is_like), three independent binary tasks.

Raw format (KuaiRand-Pure and KuaiRand-1K; file names end in ``_pure.csv`` or ``_1k.csv``),
CSV with a header line:

* ``log_standard_4_08_to_4_21_*.csv`` and ``log_standard_4_22_to_5_08_*.csv``: one
  impression per line with ``user_id, video_id, date (YYYYMMDD), hourmin, time_ms,
  is_click, is_like, is_follow, is_comment, is_forward, is_hate, long_view, play_time_ms,
  duration_ms, profile_stay_time, comment_stay_time, is_profile_enter, is_rand, tab``.
  The ``log_random_*`` files (randomly exposed videos) are not used.
* ``user_features_*.csv`` (user_active_degree, ..._range buckets, onehot_feat0..17) and
  ``video_features_basic_*.csv`` (author_id, video_type, upload_type, music_id, music_type,
  tag: a comma-separated list in quotes). Both are read by column name into memory (27K users
  and at most a few million videos for Pure / 1K; KuaiRand-27K's 32M-video table would need an
  external join and is not supported here).

Features: user id, video id, the user and video columns above (one table each, ids by first
appearance), ``tag`` multi-hot, ``duration_ms`` dense (log1p, standardised with the training
split's statistics). ``play_time_ms`` and the other feedback columns are outcomes, not
features. Scenario ids: ``opts.extra['tabs']`` (e.g. ``"0,1,2,4,6"``: rows of other tabs are
skipped and counted) or every tab in order of first appearance. Split by date: rows on or
after ``test_from`` (default 20220501, the last 8 days) form ``test``; the rest ``train``.

**Preprocessed variant (Scenario-Wise Rec CSV).** Scenario-Wise Rec distributes KuaiRand as
one joined CSV (``kuairand_sample.csv``; its script for KuaiRand-1K writes ``kuairand.csv``)
with a header line and the columns ``user_id, video_id, is_click, play_time_ms, duration_ms,
profile_stay_time, comment_stay_time, tab``, the user columns (``user_active_degree`` ...
``register_days_range``, ``onehot_feat0..17``, plus the raw counts ``follow_user_num``,
``fans_user_num``, ``friend_user_num``, ``register_days``) and ``video_type, visible_status,
server_width, server_height``; values are integer codes (some written as ``1.0``).

Detection: used when no ``log_standard_*`` file is in the directory; every ``*.csv`` /
``*.csv.gz`` whose header has ``user_id`` and ``is_click`` is such a file and must also have
``video_id`` and ``tab`` (else an error naming the file and the column). Column mapping, by
name: ``is_click`` → ``click``; ``long_view`` → ``long_view`` and ``is_like`` → ``like`` where
present, else null (masked in training; Scenario-Wise Rec's file has neither); ``tab`` → the
scenario as above; ``user_id``, ``video_id`` and every column of the raw converter's features
the file has (``USER_COLUMNS``, ``author_id``, ``video_type``, ``upload_type``, ``music_id``,
``music_type``, ``tag``, ``duration_ms``) → the same output columns, ids by first appearance of
the value text; a feature column the file lacks is null (an empty ``tag`` list) and listed;
every other column (``play_time_ms``, the raw counts, ``visible_status``, ...) is ignored and
listed in the summary. Split: with a ``date`` column, by date as above; several files, by
name (``train`` / ``val`` → ``eval`` / ``test``); one file without ``date`` needs
``--opt split=F`` (:class:`~dlrm_mtl.datasets.common.HashSplit`: train / eval by a seeded hash of
the line number; ``F,G`` adds test, as Scenario-Wise Rec's 80/10/10 random split). The schema
is the same as for the raw files.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa

from dlrm_mtl.datasets.common import (
    ConversionResult, ConvertOptions, FormatError, ParquetSink, RunningMoments, Vocabulary, csv_chunks,
    csv_header, finish, hash_split, list_array, open_text, plan_files, preprocessed_csvs, refuse_split,
)
from dlrm_mtl.schema import DenseFeature, Schema, ScenarioLevel, SparseFeature, Task

USER_COLUMNS: List[str] = (
    ["user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author", "follow_user_num_range",
     "fans_user_num_range", "friend_user_num_range", "register_days_range"] + [f"onehot_feat{i}" for i in range(18)]
)
VIDEO_COLUMNS: List[str] = ["author_id", "video_type", "upload_type", "music_id", "music_type", "tag"]
LOG_COLUMNS: List[str] = ["user_id", "video_id", "date", "is_click", "is_like", "long_view", "duration_ms", "tab"]
LABELS = {"is_click": "click", "long_view": "long_view", "is_like": "like"}
TAG_MAX_LEN = 8
EMBEDDING_DIM = 16
CATEGORICAL = ["user_id", "video_id"] + USER_COLUMNS + [c for c in VIDEO_COLUMNS if c != "tag"]
CSV_DETECT = ["user_id", "is_click"]  # a header with these is a preprocessed interaction CSV
CSV_REQUIRED = ["user_id", "video_id", "tab", "is_click"]
CSV_WHAT = "preprocessed KuaiRand CSV (Scenario-Wise Rec layout)"


def kuairand_schema(table_sizes: Dict[str, int], tabs: List[str], duration_stats: tuple) -> Schema:
    sparse = [SparseFeature(c, f"t_{c}", table_sizes[c], EMBEDDING_DIM) for c in CATEGORICAL]
    sparse.append(SparseFeature("tag", "t_tag", table_sizes["tag"], EMBEDDING_DIM, multi_hot=True,
                                max_len=TAG_MAX_LEN, pooling="mean"))
    return Schema(
        name="kuairand",
        row_id="row_id",
        sparse=sparse,
        dense=[DenseFeature("duration_ms", "log1p", default=0.0, standardize=True,
                            mean=duration_stats[0], std=duration_stats[1])],
        scenarios=[ScenarioLevel("tab", len(tabs), value_names=[f"tab{t}" for t in tabs])],
        tasks=[Task("click", "click"), Task("long_view", "long_view"), Task("like", "like")],
    )


def _arrow_schema() -> pa.Schema:
    return pa.schema(
        [("row_id", pa.int64())] + [(c, pa.int64()) for c in CATEGORICAL] + [("tag", pa.list_(pa.int64()))]
        + [("duration_ms", pa.float32()), ("date", pa.int32()), ("tab", pa.int64()),
           ("click", pa.int8()), ("long_view", pa.int8()), ("like", pa.int8())]
    )


def _one(raw: Path, pattern: str) -> Path:
    found = sorted(raw.glob(pattern))
    if not found:
        raise FileNotFoundError(f"{raw}: no file matching {pattern} (KuaiRand-Pure or KuaiRand-1K, unpacked)")
    return found[0]


def _csv_rows(path: Path, required: List[str]):
    """(line number, dict) per data line, the header checked for ``required`` columns."""
    with open_text(path) as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise FormatError(path, 1, "empty file (expected a header line)") from None
        missing = [c for c in required if c not in header]
        if missing:
            raise FormatError(path, 1, f"header lacks column(s) {missing}", ",".join(header))
        idx = {c: header.index(c) for c in required}
        for fields in reader:
            line_no = reader.line_num
            if not fields:
                continue
            if len(fields) != len(header):
                raise FormatError(path, line_no, f"expected {len(header)} columns, found {len(fields)}", ",".join(fields))
            yield line_no, {c: fields[i] for c, i in idx.items()}, fields


def preprocessed_files(raw: Path) -> List[Path]:
    """The preprocessed CSVs in ``raw``: files whose header has ``user_id`` and ``is_click``
    (each checked for ``video_id`` and ``tab``)."""
    return preprocessed_csvs(raw, CSV_DETECT, CSV_REQUIRED, CSV_WHAT)


def _tabs(opts: ConvertOptions) -> Optional[List[str]]:
    return [t.strip() for t in str(opts.extra["tabs"]).split(",")] if opts.extra.get("tabs") else None


def convert(raw: str | Path, out: str | Path, opts: ConvertOptions = ConvertOptions()) -> ConversionResult:
    """Convert the KuaiRand logs and feature files in ``raw`` into ``out/{train,test}``, or,
    where there are no ``log_standard_*`` files, the preprocessed CSV(s) (module docstring)."""
    raw, out = Path(raw), Path(out)
    if not sorted(raw.glob("log_standard_*.csv*")):
        files = preprocessed_files(raw)
        if files:
            return convert_preprocessed(raw, out, files, opts)
        raise FileNotFoundError(f"{raw}: no log_standard_*.csv files (KuaiRand-Pure or KuaiRand-1K, unpacked) and no "
                                "preprocessed CSV whose header has user_id, video_id, tab and is_click "
                                "(Scenario-Wise Rec's kuairand_sample.csv / kuairand.csv)")
    refuse_split(opts, f"{raw} holds the KuaiRand logs, split by date (--opt test_from=YYYYMMDD)")
    return convert_raw(raw, out, opts)


def convert_raw(raw: Path, out: Path, opts: ConvertOptions) -> ConversionResult:
    """The raw logs + feature files (module docstring)."""
    vocab = {c: Vocabulary() for c in CATEGORICAL + ["tag"]}
    users: Dict[str, Dict[str, int]] = {}
    for _, rec, _ in _csv_rows(_one(raw, "user_features_*.csv*"), ["user_id"] + USER_COLUMNS):
        users[rec["user_id"]] = {c: vocab[c](rec[c]) for c in USER_COLUMNS}
    videos: Dict[str, Dict[str, object]] = {}
    for _, rec, _ in _csv_rows(_one(raw, "video_features_basic_*.csv*"), ["video_id"] + VIDEO_COLUMNS):
        v: Dict[str, object] = {c: vocab[c](rec[c]) for c in VIDEO_COLUMNS if c != "tag"}
        v["tag"] = [vocab["tag"](t.strip()) for t in rec["tag"].split(",") if t.strip()][:TAG_MAX_LEN]
        videos[rec["video_id"]] = v
    wanted_tabs = _tabs(opts)
    tab_vocab = Vocabulary(wanted_tabs or ())
    test_from = int(opts.extra.get("test_from", 20220501))
    arrow = _arrow_schema()
    sinks = {s: ParquetSink(out / s, arrow, ["tab"], ["click", "long_view", "like"], opts.row_group_rows, opts.file_rows)
             for s in ("train", "test")}
    duration = RunningMoments()
    skipped_tabs: Dict[str, int] = {}
    row_id = 0
    logs = sorted(raw.glob("log_standard_*.csv*"))
    if not logs:
        raise FileNotFoundError(f"{raw}: no log_standard_*.csv files (KuaiRand-Pure or KuaiRand-1K, unpacked)")
    for path in logs:
        n = 0
        for line_no, rec, fields in _csv_rows(path, LOG_COLUMNS):
            line = ",".join(fields)
            for c in ("is_click", "is_like", "long_view"):
                if rec[c] not in ("0", "1"):
                    raise FormatError(path, line_no, f"{c} {rec[c]!r} is not 0 or 1", line)
            try:
                date, tab_int, dur = int(rec["date"]), int(rec["tab"]), float(rec["duration_ms"] or 0)
            except ValueError:
                raise FormatError(path, line_no, "date, tab and duration_ms must be numbers", line) from None
            if not 20000101 <= date <= 21000101 or not math.isfinite(dur) or dur < 0:
                raise FormatError(path, line_no, f"date {rec['date']!r} is not YYYYMMDD or duration_ms is negative", line)
            tab = str(tab_int)
            if wanted_tabs is not None and tab not in wanted_tabs:
                skipped_tabs[tab] = skipped_tabs.get(tab, 0) + 1
                continue
            if rec["user_id"] not in users:
                raise FormatError(path, line_no, f"user_id {rec['user_id']} is not in the user features file", line)
            video = videos.get(rec["video_id"])
            split = "test" if date >= test_from else "train"
            row = {"row_id": row_id, "user_id": vocab["user_id"](rec["user_id"]), "video_id": vocab["video_id"](rec["video_id"]),
                   **users[rec["user_id"]], "duration_ms": dur, "date": date, "tab": tab_vocab(tab),
                   "click": int(rec["is_click"]), "long_view": int(rec["long_view"]), "like": int(rec["is_like"])}
            for c in VIDEO_COLUMNS:  # a video without features: empty bags
                row[c] = (video or {}).get(c, [] if c == "tag" else None)
            sinks[split].add(row)
            if split == "train":
                duration.add(math.log1p(dur))
            row_id += 1
            n += 1
            if opts.limit and n >= opts.limit:
                break
    schema = kuairand_schema({c: max(len(v), 1) for c, v in vocab.items()}, tab_vocab.values(), duration.result())
    names = {(i,): f"tab{t}" for i, t in enumerate(tab_vocab.values())}
    notes = {"variant": "kuairand logs", "tabs": tab_vocab.values(), "skipped_rows_by_tab": skipped_tabs, "test_from": test_from,
             "vocabulary_sizes": {c: len(v) for c, v in vocab.items()}}
    return finish(out, schema, sinks, names, opts, notes)


def convert_preprocessed(raw: Path, out: Path, files: List[Path], opts: ConvertOptions) -> ConversionResult:
    """The Scenario-Wise Rec CSV variant (module docstring)."""
    rule = hash_split(opts)
    headers = {p: csv_header(p) for p in files}
    test_from = int(opts.extra.get("test_from", 20220501))
    by_date = len(files) == 1 and "date" in headers[files[0]]
    if by_date:
        refuse_split(opts, f"{files[0]} has a date column, split by date (--opt test_from=YYYYMMDD)")
        planned: List[tuple] = [(files[0], "by date")]
        split_names: tuple = ("train", "test")
    else:
        planned = plan_files(files, rule, raw, CSV_WHAT)
        split_names = rule.splits if planned[0][1] is None else tuple(r for _, r in planned)
    arrow = _arrow_schema()
    sinks = {s: ParquetSink(out / s, arrow, ["tab"], ["click", "long_view", "like"], opts.row_group_rows, opts.file_rows)
             for s in split_names}
    vocab = {c: Vocabulary() for c in CATEGORICAL + ["tag"]}
    wanted_tabs = _tabs(opts)
    tab_vocab = Vocabulary(wanted_tabs or ())
    duration = RunningMoments()
    skipped_tabs: Dict[str, int] = {}
    used = set(CSV_REQUIRED) | set(CATEGORICAL) | {"tag", "duration_ms", "date", "long_view", "is_like"}
    ignored: Dict[str, List[str]] = {}
    absent: Dict[str, List[str]] = {}
    row_id = 0
    for path, role in planned:
        header = headers[path]
        ignored[path.name] = [c for c in header if c not in used]
        absent[path.name] = [c for c in CATEGORICAL + ["tag", "duration_ms", "long_view", "is_like"] if c not in header]
        for chunk in csv_chunks(path, chunk_rows=opts.row_group_rows, limit=opts.limit):
            tab = chunk.integers("tab").astype(str)
            if wanted_tabs is not None:
                keep = np.isin(tab, wanted_tabs)
                if not keep.all():
                    for t, k in zip(*np.unique(tab[~keep], return_counts=True)):
                        skipped_tabs[str(t)] = skipped_tabs.get(str(t), 0) + int(k)
                    chunk, tab = chunk.take(np.flatnonzero(keep)), tab[keep]
            n = len(chunk)
            if not n:
                continue
            cols: Dict[str, pa.Array] = {"row_id": pa.array(np.arange(row_id, row_id + n, dtype=np.int64))}
            labels = {"click": chunk.binary("is_click")}
            for out_name, col in (("long_view", "long_view"), ("like", "is_like")):
                labels[out_name] = chunk.binary(col) if col in header else None
            for c in CATEGORICAL:
                cols[c] = pa.array(vocab[c].map_many(chunk.text(c))) if c in header else pa.nulls(n, pa.int64())
            if "tag" in header:
                tags = [[vocab["tag"](t.strip()) for t in text.split(",") if t.strip()][:TAG_MAX_LEN]
                        for text in chunk.text("tag").to_pylist()]
                cols["tag"] = pa.array(tags, type=pa.list_(pa.int64()))
            else:
                cols["tag"] = list_array(np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool))
            dur = chunk.numbers("duration_ms", empty="0") if "duration_ms" in header else None
            if dur is not None and (dur < 0).any():
                raise chunk.error(int(np.flatnonzero(dur < 0)[0]), "column 'duration_ms': negative")
            cols["duration_ms"] = pa.array(dur, type=pa.float32()) if dur is not None else pa.nulls(n, pa.float32())
            date = chunk.integers("date") if "date" in header else None
            if date is not None:
                bad = np.flatnonzero((date < 20000101) | (date > 21000101))
                if bad.size:
                    raise chunk.error(int(bad[0]), f"column 'date': {int(date[bad[0]])} is not YYYYMMDD")
            cols["date"] = pa.array(date.astype(np.int32)) if date is not None else pa.nulls(n, pa.int32())
            cols["tab"] = pa.array(tab_vocab.map_many(tab))
            for name, v in labels.items():
                cols[name] = pa.array(v) if v is not None else pa.nulls(n, pa.int8())
            table = pa.Table.from_arrays([cols[name] for name in arrow.names], schema=arrow)
            if role == "by date":
                where = np.where(date >= test_from, "test", "train")
            elif role is not None:
                where = np.full(n, role)
            else:
                where = rule.of_many(chunk.line_nos)
            for split in split_names:
                mask = where == split
                if mask.any():
                    sinks[split].add_table(table.filter(pa.array(mask)))
                    if split == "train" and dur is not None:
                        duration.add_batch(np.log1p(dur[mask]))
            row_id += n
    schema = kuairand_schema({c: max(len(v), 1) for c, v in vocab.items()}, tab_vocab.values(), duration.result())
    names = {(i,): f"tab{t}" for i, t in enumerate(tab_vocab.values())}
    ignored_all = sorted({c for cs in ignored.values() for c in cs})
    absent_all = sorted({c for cs in absent.values() for c in cs})
    how = f"by date (test from {test_from})" if by_date else rule.describe() if rule is not None else "by file name"
    notes = {"variant": "scenario-wise rec csv", "files": {p.name: (r or "hashed") for p, r in planned}, "split": how,
             "tabs": tab_vocab.values(), "skipped_rows_by_tab": skipped_tabs,
             "vocabulary_sizes": {c: len(v) for c, v in vocab.items()}, "ignored_columns": ignored, "absent_columns": absent}
    if by_date:
        notes["test_from"] = test_from
    if not opts.quiet:
        print(f"kuairand: {CSV_WHAT}: {', '.join(p.name for p, _ in planned)}, split {how}")
        print(f"kuairand: ignored {len(ignored_all)} column(s) the schema does not use: {', '.join(ignored_all) or '-'}")
        if absent_all:
            print(f"kuairand: {len(absent_all)} column(s) absent, written as null: {', '.join(absent_all)}")
    return finish(out, schema, sinks, names, opts, notes)
