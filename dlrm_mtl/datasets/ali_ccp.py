"""Ali-CCP (Alibaba Click and Conversion Prediction, Tianchi data set 408; Ma et al.,
SIGIR 2018, ESMM) → dlrm_mtl Parquet with tasks click → purchase.

Raw format (the data set's description): per split, a **sample skeleton** file
``sample_skeleton_{train,test}.csv`` with one impression per line::

    sample_id,click,buy,common_feature_index,feature_num,feature_list

and a **common features** file ``common_features_{train,test}.csv`` with the features shared
by the samples of one request (mostly the user's)::

    common_feature_index,feature_num,feature_list

``feature_list`` is ``feature_num`` features joined by ``\\x01``; a feature is
``field_id\\x02feature_id\\x03value`` (``feature_id`` an integer, ``value`` a float; for
the ``*_14`` behaviour fields the value is a count). ``buy`` = 1 implies ``click`` = 1.

Features: the 23 fields of the ESMM paper. Single-valued fields become one table each
(``f101`` user id, ``f205`` item id, ...); the four ``*_14`` fields (categories, shops,
brands and intentions the user interacted with in 14 days) are multi-hot (mean pooled,
truncated to ``max_len``; their count values are not used). Feature ids are mapped to dense
ids per field in order of first appearance (per split: the common features file in file
order, then the skeleton; train before test), so tables are exactly as large as the
vocabulary. Field **301** (the position context; 3 values in the data) is the
scenario, as in the Scenario-Wise Rec benchmark.

Memory: the skeleton is streamed; the common features of the split being converted are held
in a dict (request → its parsed, truncated features packed into an int64 array), as every
join must. Official train/test split (``out/train``, ``out/test``).

**Preprocessed variant (torch-rechub / Scenario-Wise Rec CSV).** Most copies on disk are the
joined, label-encoded CSVs torch-rechub's Ali-CCP preprocessing writes (Scenario-Wise Rec
ships the same layout): ``ali_ccp_train.csv``, ``ali_ccp_val.csv``, ``ali_ccp_test.csv``
(or the ``*_sample.csv`` excerpts), a header line, then one impression per line::

    click,purchase,101,121,...,853,301,109_14,110_14,127_14,150_14,D109_14,D110_14,D127_14,D150_14,D508,D509,D702,D853

Detection: used when no ``sample_skeleton_*`` file is in the directory; every ``*.csv`` /
``*.csv.gz`` whose header has both ``click`` and ``purchase`` is such a file, and must also
have ``301`` (else an error naming the file and the column). Column mapping: ``click`` →
``click``, ``purchase`` → ``purchase`` (0/1, purchase ⇒ click); ``301`` → ``scenario`` (ids by
first appearance, ``value_names`` ``301=<value>``); each field column ``101`` ... ``853`` →
``f<field>``; ``109_14`` ... ``150_14`` (one id per row in this layout) → the multi-hot
``f<field>`` as a one-id list. Values are the preprocessing's integer codes (0 stands for
"absent or rare" there and is kept as a value of its own); they are re-mapped per field in
order of first appearance (train, val, test) like the raw ids. A field column the file lacks
is written as null (single) or an empty list (multi-hot) and listed; the dense ``D*`` columns
and any other column are ignored and listed in the summary (the schema has no dense features).
``sample_id`` is the row's line number in its CSV (the header is line 1). Split: by file name
(``train`` → ``train``, ``val`` → ``eval``, ``test`` → ``test``); a single file needs
``--opt split=F`` (:class:`~dlrm_mtl.datasets.common.HashSplit`: train / eval by a seeded hash of
the line number). The schema is the same as for the raw files.
"""

from __future__ import annotations

from array import array
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pyarrow as pa

from dlrm_mtl.datasets.common import (
    ConversionResult, ConvertOptions, FormatError, ParquetSink, Vocabulary, csv_chunks, csv_header, finish,
    hash_split, list_array, numbered_lines, plan_files, preprocessed_csvs, refuse_split,
)
from dlrm_mtl.schema import Schema, ScenarioLevel, SparseFeature, Task

SINGLE_FIELDS: List[str] = ["101", "121", "122", "124", "125", "126", "127", "128", "129",
                            "205", "206", "207", "210", "216", "508", "509", "702", "853"]
MULTI_FIELDS: List[str] = ["109_14", "110_14", "127_14", "150_14"]
SCENARIO_FIELD = "301"
KNOWN_FIELDS = set(SINGLE_FIELDS) | set(MULTI_FIELDS) | {SCENARIO_FIELD}
MAX_LEN = 50  # behaviour lists kept per multi-hot field
CSV_LABELS = ["click", "purchase"]  # the preprocessed CSV's label columns (its detection)
CSV_REQUIRED = CSV_LABELS + [SCENARIO_FIELD]
CSV_WHAT = "preprocessed Ali-CCP CSV (torch-rechub layout)"
EMBEDDING_DIM = 16

Features = Dict[str, List[int]]  # field -> raw feature ids
PACK_ORDER = SINGLE_FIELDS + MULTI_FIELDS + [SCENARIO_FIELD]


def column(field: str) -> str:
    return "f" + field


def ali_ccp_schema(table_sizes: Dict[str, int], scenario_values: List[str]) -> Schema:
    sparse = [SparseFeature(column(f), f"t_{f}", table_sizes[f], EMBEDDING_DIM) for f in SINGLE_FIELDS]
    sparse += [SparseFeature(column(f), f"t_{f}", table_sizes[f], EMBEDDING_DIM, multi_hot=True, max_len=MAX_LEN,
                             pooling="mean") for f in MULTI_FIELDS]
    return Schema(
        name="ali_ccp",
        row_id="row_id",
        sparse=sparse,
        dense=[],
        scenarios=[ScenarioLevel("context", max(len(scenario_values), 1), column="scenario",
                                 value_names=[v if v == "none" else f"301={v}" for v in scenario_values] or ["none"])],
        tasks=[Task("ctr", "click"), Task("cvr", "purchase", parent="ctr", loss_space="entire", entire_name="ctcvr")],
    )


def _arrow_schema() -> pa.Schema:
    return pa.schema(
        [("row_id", pa.int64()), ("sample_id", pa.int64())]
        + [(column(f), pa.int64()) for f in SINGLE_FIELDS]
        + [(column(f), pa.list_(pa.int64())) for f in MULTI_FIELDS]
        + [("scenario", pa.int64()), ("click", pa.int8()), ("purchase", pa.int8())]
    )


def parse_features(path: Path, line_no: int, line: str, count_text: str, feature_list: str,
                   unknown: Dict[str, int]) -> Features:
    """``field\\x02id\\x03value`` items joined by ``\\x01`` -> field -> ids (known fields)."""
    try:
        count = int(count_text)
    except ValueError:
        raise FormatError(path, line_no, f"feature_num {count_text!r} is not an integer", line) from None
    items = feature_list.split("\x01") if feature_list else []
    if len(items) != count:
        raise FormatError(path, line_no, f"feature_num says {count} features, the feature list has {len(items)}", line)
    out: Features = {}
    for item in items:
        field, sep1, rest = item.partition("\x02")
        fid, sep2, value = rest.partition("\x03")
        if not sep1 or not sep2:
            raise FormatError(path, line_no, f"feature {item!r} is not field\\x02id\\x03value", line)
        try:
            ident = int(fid)
            float(value)
        except ValueError:
            raise FormatError(path, line_no, f"feature {item!r}: id must be an integer and value a number", line) from None
        if field not in KNOWN_FIELDS:
            unknown[field] = unknown.get(field, 0) + 1
            continue
        ids = out.setdefault(field, [])
        if field in MULTI_FIELDS:
            if len(ids) < MAX_LEN:
                ids.append(ident)
        elif not ids:  # single-valued field: the first occurrence
            ids.append(ident)
    return out


def pack(features: Features) -> array:
    """Features as one int64 array (per field of ``PACK_ORDER``: count, then ids): about
    8 bytes per id instead of ~36 for a list of Python ints, so a split's common features
    (~730k requests, at most 9 + 4 x 50 ids each) fit in about a gigabyte at worst."""
    a = array("q")
    for f in PACK_ORDER:
        ids = features.get(f, ())
        a.append(len(ids))
        a.extend(ids)
    return a


def unpack(a: array) -> Features:
    out: Features = {}
    i = 0
    for f in PACK_ORDER:
        n = a[i]
        if n:
            out[f] = a[i + 1:i + 1 + n].tolist()
        i += 1 + n
    return out


def to_dense(features: Features, vocab: Dict[str, Vocabulary], scenario_vocab: Vocabulary) -> Features:
    """Raw feature ids -> dense ids (per-field vocabularies; field 301 -> scenario id)."""
    out: Features = {}
    for f, ids in features.items():
        v = scenario_vocab if f == SCENARIO_FIELD else vocab[f]
        out[f] = [v(i) for i in ids]
    return out


def load_common(path: Path, unknown: Dict[str, int], vocab: Dict[str, Vocabulary], scenario_vocab: Vocabulary,
                limit: int = 0) -> Dict[str, array]:
    """common_feature_index -> packed dense-id features of one common features file. Ids are
    assigned here, in file order (once per request rather than once per sample)."""
    common: Dict[str, array] = {}
    for line_no, line in numbered_lines(path, limit=limit):
        parts = line.split(",", 2)
        if len(parts) != 3:
            raise FormatError(path, line_no, "expected common_feature_index,feature_num,feature_list", line)
        raw_features = parse_features(path, line_no, line, parts[1], parts[2], unknown)
        common[parts[0]] = pack(to_dense(raw_features, vocab, scenario_vocab))
    return common


def _raw_file(raw: Path, stem: str) -> Path:
    for cand in (raw / f"{stem}.csv", raw / f"{stem}.csv.gz"):
        if cand.exists():
            return cand
    raise FileNotFoundError(f"{raw}: {stem}.csv not found (Ali-CCP sample_train.tar.gz / sample_test.tar.gz, unpacked)")


def _has_raw_files(raw: Path) -> bool:
    return any(p.name.startswith(("sample_skeleton_", "common_features_")) for p in raw.iterdir())


def preprocessed_files(raw: Path) -> List[Path]:
    """The preprocessed CSVs in ``raw``: files whose header has ``click`` and ``purchase``
    (each checked for ``301``)."""
    return preprocessed_csvs(raw, CSV_LABELS, CSV_REQUIRED, CSV_WHAT)


def convert(raw: str | Path, out: str | Path, opts: ConvertOptions = ConvertOptions()) -> ConversionResult:
    """Convert ``raw/{sample_skeleton,common_features}_{train,test}.csv`` into
    ``out/{train,test}`` + schema, or, where those are absent, the preprocessed CSVs
    (module docstring) into ``out/{train,eval,test}``."""
    raw, out = Path(raw), Path(out)
    if not _has_raw_files(raw):
        files = preprocessed_files(raw)
        if files:
            return convert_preprocessed(raw, out, files, opts)
        raise FileNotFoundError(
            f"{raw}: neither the Tianchi files (sample_skeleton_train.csv, common_features_train.csv, ... from "
            "sample_train.tar.gz / sample_test.tar.gz) nor a preprocessed CSV whose header has click, purchase and 301 "
            "(torch-rechub's ali_ccp_train.csv, ali_ccp_val.csv, ali_ccp_test.csv) found")
    refuse_split(opts, f"{raw} holds the Tianchi files, split into train and test")
    vocab = {f: Vocabulary() for f in SINGLE_FIELDS + MULTI_FIELDS}
    scenario_vocab = Vocabulary()
    unknown: Dict[str, int] = {}
    arrow = _arrow_schema()
    sinks = {s: ParquetSink(out / s, arrow, ["scenario"], ["click", "purchase"], opts.row_group_rows, opts.file_rows)
             for s in ("train", "test")}
    missing_common = 0
    row_id = 0
    for split in ("train", "test"):
        skeleton, common_path = _raw_file(raw, f"sample_skeleton_{split}"), _raw_file(raw, f"common_features_{split}")
        common = load_common(common_path, unknown, vocab, scenario_vocab)
        for line_no, line in numbered_lines(skeleton, limit=opts.limit):
            parts = line.split(",", 5)
            if len(parts) != 6:
                raise FormatError(skeleton, line_no, "expected sample_id,click,buy,common_feature_index,feature_num,feature_list", line)
            sample_id, click, buy, index, count, feats = parts
            if click not in ("0", "1") or buy not in ("0", "1"):
                raise FormatError(skeleton, line_no, f"click {click!r} / buy {buy!r} must be 0 or 1", line)
            if buy == "1" and click == "0":
                raise FormatError(skeleton, line_no, "buy = 1 on a sample with click = 0 (a purchase must follow a click)", line)
            try:
                sid = int(sample_id)
            except ValueError:
                raise FormatError(skeleton, line_no, f"sample_id {sample_id!r} is not an integer", line) from None
            packed = common.get(index)
            if packed is None:
                missing_common += 1
            features = unpack(packed) if packed is not None else {}
            own = parse_features(skeleton, line_no, line, count, feats, unknown)
            features.update(to_dense(own, vocab, scenario_vocab))  # the sample's own fields win
            scen = features.get(SCENARIO_FIELD)
            row = {"row_id": row_id, "sample_id": sid, "click": int(click), "purchase": int(buy),
                   "scenario": scen[0] if scen else scenario_vocab("none")}
            for f in SINGLE_FIELDS:
                ids = features.get(f)
                row[column(f)] = ids[0] if ids else None  # absent: an empty bag
            for f in MULTI_FIELDS:
                row[column(f)] = features.get(f, [])
            sinks[split].add(row)
            row_id += 1
        del common
    schema = ali_ccp_schema({f: max(len(v), 1) for f, v in vocab.items()}, [str(v) for v in scenario_vocab.values()])
    names: Dict[Tuple[int, ...], str] = {(i,): n for i, n in enumerate(schema.scenarios[0].value_names)}
    notes = {"variant": "tianchi", "vocabulary_sizes": {f: len(v) for f, v in vocab.items()},
             "scenario_values": [str(v) for v in scenario_vocab.values()],
             "samples_without_common_features": missing_common, "unknown_fields": unknown}
    if unknown and not opts.quiet:
        print(f"ali-ccp: ignored features of fields not in the ESMM list: {unknown}")
    return finish(out, schema, sinks, names, opts, notes)


def convert_preprocessed(raw: Path, out: Path, files: List[Path], opts: ConvertOptions) -> ConversionResult:
    """The torch-rechub CSV variant (module docstring): ``files`` split by name, or one file
    split by ``--opt split``."""
    rule = hash_split(opts)
    planned = plan_files(files, rule, raw, CSV_WHAT)
    split_names = rule.splits if planned[0][1] is None else tuple(r for _, r in planned)
    arrow = _arrow_schema()
    sinks = {s: ParquetSink(out / s, arrow, ["scenario"], ["click", "purchase"], opts.row_group_rows, opts.file_rows)
             for s in split_names}
    vocab = {f: Vocabulary() for f in SINGLE_FIELDS + MULTI_FIELDS}
    scenario_vocab = Vocabulary()
    used = set(CSV_REQUIRED) | set(SINGLE_FIELDS) | set(MULTI_FIELDS)
    ignored: Dict[str, List[str]] = {}
    absent: Dict[str, List[str]] = {}
    row_id = 0
    for path, role in planned:
        header = csv_header(path)
        ignored[path.name] = [c for c in header if c not in used]
        absent[path.name] = [f for f in SINGLE_FIELDS + MULTI_FIELDS if f not in header]
        for chunk in csv_chunks(path, chunk_rows=opts.row_group_rows, limit=opts.limit):
            n = len(chunk)
            click, purchase = chunk.binary("click"), chunk.binary("purchase")
            bad = np.flatnonzero(purchase > click)
            if bad.size:
                raise chunk.error(int(bad[0]), "purchase = 1 on a row with click = 0 (a purchase must follow a click)")
            cols: Dict[str, pa.Array] = {
                "row_id": pa.array(np.arange(row_id, row_id + n, dtype=np.int64)),
                "sample_id": pa.array(chunk.line_nos),
            }
            for f in SINGLE_FIELDS:
                cols[column(f)] = (pa.array(vocab[f].map_many(chunk.integers(f))) if f in header
                                   else pa.nulls(n, pa.int64()))
            for f in MULTI_FIELDS:
                cols[column(f)] = (list_array(vocab[f].map_many(chunk.integers(f))) if f in header
                                   else list_array(np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)))
            cols["scenario"] = pa.array(scenario_vocab.map_many(chunk.integers(SCENARIO_FIELD)))
            cols["click"], cols["purchase"] = pa.array(click), pa.array(purchase)
            table = pa.Table.from_arrays([cols[name] for name in arrow.names], schema=arrow)
            if role is not None:
                sinks[role].add_table(table)
            else:
                where = rule.of_many(chunk.line_nos)
                for split in split_names:
                    mask = where == split
                    if mask.any():
                        sinks[split].add_table(table.filter(pa.array(mask)))
            row_id += n
    scenario_values = [str(v) for v in scenario_vocab.values()]
    schema = ali_ccp_schema({f: max(len(v), 1) for f, v in vocab.items()}, scenario_values)
    names: Dict[Tuple[int, ...], str] = {(i,): n for i, n in enumerate(schema.scenarios[0].value_names)}
    ignored_all = sorted({c for cs in ignored.values() for c in cs})
    absent_all = sorted({c for cs in absent.values() for c in cs})
    notes = {"variant": "torch-rechub csv", "files": {p.name: (r or "hashed") for p, r in planned},
             "split": rule.describe() if rule is not None else "by file name",
             "vocabulary_sizes": {f: len(v) for f, v in vocab.items()}, "scenario_values": scenario_values,
             "ignored_columns": ignored, "absent_fields": absent}
    if not opts.quiet:
        print(f"ali-ccp: {CSV_WHAT}: {', '.join(f'{p.name} -> {r or rule.describe()}' for p, r in planned)}")
        print(f"ali-ccp: ignored {len(ignored_all)} column(s) the schema does not use: {', '.join(ignored_all) or '-'}")
        if absent_all:
            print(f"ali-ccp: {len(absent_all)} field column(s) absent, written as empty: {', '.join(absent_all)}")
    return finish(out, schema, sinks, names, opts, notes)
