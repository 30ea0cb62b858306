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
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict, List, Optional

import pyarrow as pa

from dlrm_mtl.datasets.common import (
    ConversionResult, ConvertOptions, FormatError, ParquetSink, RunningMoments, Vocabulary, finish, open_text,
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


def convert(raw: str | Path, out: str | Path, opts: ConvertOptions = ConvertOptions()) -> ConversionResult:
    raw, out = Path(raw), Path(out)
    vocab = {c: Vocabulary() for c in CATEGORICAL + ["tag"]}
    users: Dict[str, Dict[str, int]] = {}
    for _, rec, _ in _csv_rows(_one(raw, "user_features_*.csv*"), ["user_id"] + USER_COLUMNS):
        users[rec["user_id"]] = {c: vocab[c](rec[c]) for c in USER_COLUMNS}
    videos: Dict[str, Dict[str, object]] = {}
    for _, rec, _ in _csv_rows(_one(raw, "video_features_basic_*.csv*"), ["video_id"] + VIDEO_COLUMNS):
        v: Dict[str, object] = {c: vocab[c](rec[c]) for c in VIDEO_COLUMNS if c != "tag"}
        v["tag"] = [vocab["tag"](t.strip()) for t in rec["tag"].split(",") if t.strip()][:TAG_MAX_LEN]
        videos[rec["video_id"]] = v
    wanted_tabs: Optional[List[str]] = [t.strip() for t in str(opts.extra["tabs"]).split(",")] if opts.extra.get("tabs") else None
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
    notes = {"tabs": tab_vocab.values(), "skipped_rows_by_tab": skipped_tabs, "test_from": test_from,
             "vocabulary_sizes": {c: len(v) for c, v in vocab.items()}}
    return finish(out, schema, sinks, names, opts, notes)
