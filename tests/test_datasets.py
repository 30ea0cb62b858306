"""Public data set converters on small fixtures written in each raw format (tests/dataset_fixtures.py):
the Parquet output is compared row by row with reference values computed here from the records
the fixtures wrote; splits, scenario ids, schemas and format errors (file + line) are checked."""

from __future__ import annotations

import gzip
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataset_fixtures as fx  # noqa: E402

from dlrm_mtl.data.errors import DataError  # noqa: E402
from dlrm_mtl.datasets import ConvertOptions, FormatError, convert  # noqa: E402
from dlrm_mtl.datasets import ali_ccp as ac  # noqa: E402
from dlrm_mtl.datasets import aliexpress as ax  # noqa: E402
from dlrm_mtl.datasets import census_income as ci  # noqa: E402
from dlrm_mtl.datasets import kuairand as kr  # noqa: E402
from dlrm_mtl.datasets import movielens as ml  # noqa: E402
from dlrm_mtl.datasets.common import stable_unit  # noqa: E402
from dlrm_mtl.schema import Schema  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(quiet=True)


def read_rows(directory: Path) -> list:
    """All rows of a split directory (part files in name order, recursively), as dicts."""
    files = sorted(directory.rglob("part-*.parquet"))
    assert files, directory
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def first_appearance(values) -> dict:
    ids = {}
    for v in values:
        ids.setdefault(v, len(ids))
    return ids


# =========================================================================== Census-income
@pytest.fixture(scope="module")
def census(tmp_path_factory):
    d = tmp_path_factory.mktemp("census")
    recs = fx.write_census(d / "raw", n_train=300, n_test=160)
    res = convert("census-income", d / "raw", d / "out", ConvertOptions(row_group_rows=64, file_rows=128, **QUIET))
    return d, recs, res


def test_census_rows_labels_and_vocabularies(census):
    d, recs, res = census
    train = read_rows(d / "out" / "train")
    assert len(train) == 300
    all_recs = recs["train"] + recs["test"]
    for c in ci.CATEGORICAL:  # reference vocabulary: first appearance, train then test file order
        vocab = first_appearance(r[c] for r in all_recs)
        assert [row[c] for row in train] == [vocab[r[c]] for r in recs["train"]], c
        assert res.schema.sparse[ci.CATEGORICAL.index(c)].num_embeddings == len(vocab)
    for row, rec in zip(train, recs["train"]):
        assert row["income_50k"] == (rec["income"] == "50000+.")
        assert row["never_married"] == (rec["marital_stat"] == "Never married")
        for c in ci.CONTINUOUS:
            assert row[c] == pytest.approx(float(rec[c]))
        assert row["scenario"] == 0
    # marital status and income are labels, the instance weight is dropped: none is a feature
    feats = {f.column for f in res.schema.sparse} | {f.column for f in res.schema.dense}
    assert not feats & {"marital_stat", "income", "instance_weight"}
    assert [(t.name, t.label, t.parent) for t in res.schema.tasks] == [("income", "income_50k", None), ("marital", "never_married", None)]
    # dense standardisation from the training rows (log1p on the money columns)
    for f in res.schema.dense:
        x = np.array([float(r[f.name]) for r in recs["train"]])
        x = np.log1p(x) if f.transform == "log1p" else x
        assert f.standardize and f.mean == pytest.approx(x.mean()) and f.std == pytest.approx(x.std() or 1.0)
    # Parquet layout: row groups of 64 rows, files of <= 128 rows
    files = sorted((d / "out" / "train").glob("part-*.parquet"))
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [128, 128, 44]
    assert pq.ParquetFile(files[0]).metadata.num_row_groups == 2


def test_census_test_file_halved_into_eval_and_test(census):
    d, recs, res = census
    ev, te = read_rows(d / "out" / "eval"), read_rows(d / "out" / "test")
    assert len(ev) + len(te) == 160 and 40 < len(ev) < 120
    ids = sorted(r["row_id"] for r in ev + te)
    assert ids == list(range(300, 460))  # every test-file line exactly once
    for row in ev + te:  # row_id - 300 is the test-file line index
        rec = recs["test"][row["row_id"] - 300]
        assert row["income_50k"] == (rec["income"] == "50000+.") and row["age"] == float(rec["age"])
    assert res.splits["eval"]["everyone"]["rows"] == len(ev)
    assert res.splits["eval"]["everyone"]["income_50k_rate"] == pytest.approx(np.mean([r["income_50k"] for r in ev]))
    # another seed gives another (still complete) split
    res2 = convert("census-income", d / "raw", d / "out_seed1", ConvertOptions(seed=1, **QUIET))
    ev2 = {r["row_id"] for r in read_rows(d / "out_seed1" / "eval")}
    assert ev2 != {r["row_id"] for r in ev}
    assert res2.splits["eval"]["everyone"]["rows"] + res2.splits["test"]["everyone"]["rows"] == 160


def test_census_gzip_input_and_determinism(census, tmp_path):
    d, recs, _ = census
    fx.write_census(tmp_path / "raw", n_train=300, n_test=160, gz=True)
    convert("census-income", tmp_path / "raw", tmp_path / "out", ConvertOptions(row_group_rows=64, file_rows=128, **QUIET))
    for split in ("train", "eval", "test"):
        a = sorted((d / "out" / split).glob("*.parquet"))
        b = sorted((tmp_path / "out" / split).glob("*.parquet"))
        assert [f.name for f in a] == [f.name for f in b]
        for fa, fb in zip(a, b):
            assert pq.read_table(fa).equals(pq.read_table(fb))
    assert (d / "out" / "schema.yaml").read_text() == (tmp_path / "out" / "schema.yaml").read_text()


@pytest.mark.parametrize("mutate,reason", [
    (lambda f: f[:-1], "expected 42 comma-separated fields, found 41"),
    (lambda f: f[:-1] + ["50000"], "income class"),
    (lambda f: ["forty"] + f[1:], "column 'age'"),
])
def test_census_bad_line_names_file_and_line(tmp_path, mutate, reason):
    recs = fx.write_census(tmp_path / "raw", n_train=20, n_test=10)
    lines = (tmp_path / "raw" / "census-income.data").read_text(encoding="latin-1").splitlines()
    lines[6] = ", ".join(mutate([x.strip() for x in lines[6].split(",")]))
    (tmp_path / "raw" / "census-income.data").write_text("\n".join(lines) + "\n", encoding="latin-1")
    with pytest.raises(FormatError, match=r"census-income\.data: line 7: .*" + reason.replace("(", r"\(")) as e:
        convert("census-income", tmp_path / "raw", tmp_path / "out", ConvertOptions(**QUIET))
    assert e.value.line_no == 7 and e.value.path.endswith("census-income.data")
    assert recs



def hashed_reference(line_no: int, train: float, eval_: float, seed: int = 0) -> str:
    """The documented --opt split rule (common.HashSplit), written out here."""
    u = stable_unit(f"split:{line_no}", seed)
    return "train" if u < train else "eval" if u < train + eval_ else "test"


def split_rows(out: Path) -> dict:
    """split name -> rows of every split directory written under ``out``."""
    return {d.name: read_rows(d) for d in sorted(out.iterdir()) if d.is_dir()}


def test_census_only_the_test_file_needs_split_and_then_splits_every_row_once(tmp_path, capsys):
    from dlrm_mtl.cli import main

    recs = fx.write_census(tmp_path / "raw", n_train=10, n_test=48)
    (tmp_path / "raw" / "census-income.data").unlink()
    # without --opt split: an error that says what is missing and how to proceed
    with pytest.raises(FileNotFoundError) as e:
        convert("census-income", tmp_path / "raw", tmp_path / "out", ConvertOptions(**QUIET))
    msg = str(e.value)
    assert "census-income.data" in msg and "only census-income.test" in msg and "--opt split=0.8" in msg
    assert main(["convert", "census-income", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "cli")]) == 2
    assert "--opt split=0.8" in capsys.readouterr().err
    # with it: train / eval only, every line of the file exactly once, in the documented split
    res = convert("census-income", tmp_path / "raw", tmp_path / "out", ConvertOptions(split="0.8", row_group_rows=16, **QUIET))
    got = split_rows(tmp_path / "out")
    assert set(got) == {"train", "eval"} and set(res.splits) == {"train", "eval"}
    rows = sorted((r for rs in got.values() for r in rs), key=lambda r: r["row_id"])
    assert [r["row_id"] for r in rows] == list(range(48))
    for split, rs in got.items():
        for r in rs:  # row_id = line number - 1 of census-income.test
            rec = recs["test"][r["row_id"]]
            assert hashed_reference(r["row_id"] + 1, 0.8, 0.2) == split
            assert r["income_50k"] == (rec["income"] == "50000+.") and r["age"] == float(rec["age"])
        assert res.splits[split]["everyone"]["rows"] == len(rs)
    assert 0 < len(got["eval"]) < len(got["train"])
    # the dense statistics come from the train rows of that file
    age = res.schema.dense[0]
    assert age.name == "age" and age.mean == pytest.approx(np.mean([r["age"] for r in got["train"]]))
    # --opt split=0.8 (the command line's way) is the same split; F,G adds a test split
    assert main(["convert", "census-income", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "cli"),
                 "--opt", "split=0.8"]) == 0
    assert {k: sorted(r["row_id"] for r in v) for k, v in split_rows(tmp_path / "cli").items()} == \
        {k: sorted(r["row_id"] for r in v) for k, v in got.items()}
    assert main(["convert", "census-income", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "cli2"),
                 "--split", "0.8"]) == 0  # the --split flag: the same
    assert {k: sorted(r["row_id"] for r in v) for k, v in split_rows(tmp_path / "cli2").items()} == \
        {k: sorted(r["row_id"] for r in v) for k, v in got.items()}
    convert("census-income", tmp_path / "raw", tmp_path / "three", ConvertOptions(split="0.5,0.25", seed=3, **QUIET))
    three = split_rows(tmp_path / "three")
    assert set(three) == {"train", "eval", "test"}
    assert sorted(r["row_id"] for rs in three.values() for r in rs) == list(range(48))
    assert all(hashed_reference(r["row_id"] + 1, 0.5, 0.25, seed=3) == k for k, rs in three.items() for r in rs)


def test_census_split_option_is_checked_and_refused_with_both_files(tmp_path):
    fx.write_census(tmp_path / "raw", n_train=12, n_test=6)
    with pytest.raises(DataError, match="official train / test split.*drop it"):
        convert("census-income", tmp_path / "raw", tmp_path / "out", ConvertOptions(split="0.8", **QUIET))
    (tmp_path / "raw" / "census-income.test").unlink()
    for bad in ("1.5", "0", "0.8,0.3", "x"):
        with pytest.raises(DataError, match=f"--opt split={bad}: expected F"):
            convert("census-income", tmp_path / "raw", tmp_path / "out", ConvertOptions(split=bad, **QUIET))
    # only census-income.data: the same rule
    res = convert("census-income", tmp_path / "raw", tmp_path / "out", ConvertOptions(extra={"split": "0.5"}, **QUIET))
    assert res.splits["train"]["everyone"]["rows"] + res.splits["eval"]["everyone"]["rows"] == 12
    (tmp_path / "raw" / "census-income.data").unlink()
    with pytest.raises(FileNotFoundError, match="neither census-income.data nor census-income.test"):
        convert("census-income", tmp_path / "raw", tmp_path / "out", ConvertOptions(**QUIET))


# =========================================================================== MovieLens
def reference_age_group(variant: str, age: int) -> int:
    if variant == "1m":
        return {1: 0, 18: 0, 25: 1, 35: 2, 45: 2, 50: 2, 56: 2}[age]
    return 0 if age < 25 else 1 if age < 35 else 2


@pytest.mark.parametrize("variant", ["1m", "100k"])
def test_movielens_rows_and_split(tmp_path, variant):
    recs = fx.write_movielens(tmp_path / "raw", variant, n_ratings=1500)
    res = convert("movielens", tmp_path / "raw", tmp_path / "out", ConvertOptions(row_group_rows=100, **QUIET))
    splits = {s: read_rows(tmp_path / "out" / s) for s in ("train", "eval", "test")}
    rows = sorted((r for s in splits.values() for r in s), key=lambda r: r["row_id"])
    assert [r["row_id"] for r in rows] == list(range(1, 1501))  # row_id = ratings line number, each once
    for row, (u, m, rating, ts) in zip(rows, recs["ratings"]):
        user, movie = recs["users"][u], recs["movies"][m]
        assert (row["user_id"], row["movie_id"], row["rating"], row["timestamp"]) == (u, m, rating, ts)
        assert row["click"] == (rating > 3) and row["like"] == (rating > 4)
        assert row["age_group"] == reference_age_group(variant, user["age"])
        assert row["genres"] == movie["genres"]
        assert row["gender"] == (user["gender"] == "F") and row["zip_prefix"] == user["zip"][:3]
        expected_year = None if movie["date"] == "" else movie["year"]
        assert row["release_year"] == expected_year
    # a (user, movie) pair always lands in the same split; about 80/10/10
    where = {}
    for s, rs in splits.items():
        for r in rs:
            assert where.setdefault((r["user_id"], r["movie_id"]), s) == s
    assert 0.72 < len(splits["train"]) / 1500 < 0.88
    sch = res.schema
    assert [t.name for t in sch.tasks] == ["click", "like"] and sch.tasks[1].parent == "click"
    assert sch.scenarios[0].value_names == ["under_25", "25_34", "35_plus"]
    assert sch.sparse[0].num_embeddings == max(recs["users"]) + 1
    for name in ("under_25", "25_34", "35_plus"):
        sel = [r for r in splits["train"] if r["age_group"] == ml.AGE_GROUP_NAMES.index(name)]
        assert res.splits["train"][name]["rows"] == len(sel)
        assert res.splits["train"][name]["like_rate"] == pytest.approx(np.mean([r["like"] for r in sel]))
    years = [r["release_year"] for r in splits["train"] if r["release_year"] is not None]
    assert sch.dense[0].mean == pytest.approx(np.mean(years)) and sch.dense[0].std == pytest.approx(np.std(years))


@pytest.mark.parametrize("variant,file,bad,reason", [
    ("1m", "ratings.dat", "1::2::5", "expected 4 '::'-separated fields, found 3"),
    ("1m", "ratings.dat", "1::2::7::978300760", "rating 7 outside 1..5"),
    ("1m", "ratings.dat", "9999::2::4::978300760", "user 9999 is not in the users file"),
    ("1m", "movies.dat", "7::Film (1990)::Action|Cooking", "unknown genre 'Cooking'"),
    ("100k", "u.data", "1\t2\tfive\t881250949", "rating 'five' is not an integer"),
    ("100k", "u.user", "3|30|X|writer|12345", "gender 'X'"),
])
def test_movielens_bad_line_names_file_and_line(tmp_path, variant, file, bad, reason):
    fx.write_movielens(tmp_path / "raw", variant, n_ratings=50)
    p = tmp_path / "raw" / file
    lines = p.read_text(encoding="latin-1").splitlines()
    lines[2] = bad
    p.write_text("\n".join(lines) + "\n", encoding="latin-1")
    with pytest.raises(FormatError, match=rf"{file}: line 3: {reason}"):
        convert("movielens", tmp_path / "raw", tmp_path / "out", ConvertOptions(**QUIET))


# =========================================================================== AliExpress
def test_aliexpress_joint_and_per_country(tmp_path):
    recs = fx.write_aliexpress(tmp_path / "raw", n=120)
    res = convert("aliexpress", tmp_path / "raw", tmp_path / "out", ConvertOptions(row_group_rows=50, **QUIET))
    countries = ["NL", "ES", "FR", "US"]
    assert res.schema.scenarios[0].value_names == countries
    for split in ("train", "test"):
        for sid, c in enumerate(countries):
            rows = read_rows(tmp_path / "out" / split / c)
            raw_rows = recs[f"{split}/{c}"]
            assert len(rows) == len(raw_rows)
            for row, r in zip(rows, raw_rows):
                assert row["search_id"] == r[0] and row["country"] == sid
                assert [row[k] for k in ax.CATEGORICAL] == r[1:17]
                assert np.allclose([row[k] for k in ax.NUMERICAL], r[17:80], atol=1e-6)
                assert (row["click"], row["conversion"]) == (r[80], r[81])
            assert res.splits[f"{split}/{c}"][c]["rows"] == len(raw_rows)
    every = [r for k, v in recs.items() for r in v]
    for j, f in enumerate(res.schema.sparse):  # tables: max id + 1 over all files
        assert f.num_embeddings == max(r[1 + j] for r in every) + 1
    train = np.array([r[17:80] for k, v in recs.items() if k.startswith("train") for r in v], dtype=np.float64)
    assert np.allclose([f.mean for f in res.schema.dense], train.mean(0))
    assert np.allclose([f.std for f in res.schema.dense], train.std(0))
    assert res.schema.tasks[1].parent == "ctr" and res.schema.entire_name(res.schema.tasks[1]) == "ctcvr"
    # a subset of countries: ids follow NL, ES, FR, US, RU among those chosen
    res2 = convert("aliexpress", tmp_path / "raw", tmp_path / "out2", ConvertOptions(extra={"countries": "us,nl"}, **QUIET))
    assert res2.schema.scenarios[0].value_names == ["NL", "US"]
    assert {r["country"] for r in read_rows(tmp_path / "out2" / "train" / "US")} == {1}
    assert not (tmp_path / "out2" / "train" / "ES").exists()


def test_aliexpress_fast_reader_equals_line_parser(tmp_path, monkeypatch):
    """The vectorised pyarrow CSV path and the line-by-line parser write the same rows and
    the same schema (statistics equal up to rounding)."""
    fx.write_aliexpress(tmp_path / "raw", countries=("NL", "US"), n=90)
    plain = tmp_path / "raw" / "AliExpress_US" / "train.csv"  # a gzipped file is read the same way
    with gzip.open(str(plain) + ".gz", "wb") as fh:
        fh.write(plain.read_bytes())
    plain.unlink()
    fast = convert("aliexpress", tmp_path / "raw", tmp_path / "fast", ConvertOptions(row_group_rows=32, **QUIET))

    def no_fast_path(*args, **kwargs):
        raise ax._SlowPath()

    monkeypatch.setattr(ax, "_convert_file_fast", no_fast_path)
    slow = convert("aliexpress", tmp_path / "raw", tmp_path / "slow", ConvertOptions(row_group_rows=32, **QUIET))
    for split in ("train/NL", "train/US", "test/NL", "test/US"):
        a, b = sorted((tmp_path / "fast" / split).glob("*.parquet")), sorted((tmp_path / "slow" / split).glob("*.parquet"))
        assert len(a) == len(b) and all(pq.read_table(x).equals(pq.read_table(y)) for x, y in zip(a, b)), split
        assert [pq.ParquetFile(x).metadata.num_row_groups for x in a] == [pq.ParquetFile(y).metadata.num_row_groups for y in b]
    assert fast.splits == slow.splits
    assert [f.num_embeddings for f in fast.schema.sparse] == [f.num_embeddings for f in slow.schema.sparse]
    assert np.allclose([(f.mean, f.std) for f in fast.schema.dense], [(f.mean, f.std) for f in slow.schema.dense], rtol=1e-9)
    assert fast.splits["train/US"]["US"]["rows"] == 90
    monkeypatch.undo()  # --limit: at most that many data lines per raw file, on both paths
    limited = convert("aliexpress", tmp_path / "raw", tmp_path / "limited", ConvertOptions(limit=7, **QUIET))
    assert {k: v[k.split("/")[1]]["rows"] for k, v in limited.splits.items()} == {
        "train/NL": 7, "train/US": 7, "test/NL": 7, "test/US": 7}


@pytest.mark.parametrize("line_index,mutate,reason", [
    (5, lambda f: f[:-1], "expected 82 comma-separated columns"),
    (5, lambda f: f[:-2] + ["0", "1"], "conversion = 1 on a row with click = 0"),
    (5, lambda f: f[:3] + ["x7"] + f[4:], "categorical column cat_03"),
    (5, lambda f: f[:-1] + ["2"], "conversion label '2' is not 0 or 1"),
    (0, lambda f: ["1"] * len(f), "expected a header line"),
])
def test_aliexpress_bad_line(tmp_path, line_index, mutate, reason):
    fx.write_aliexpress(tmp_path / "raw", countries=("NL", "FR"), n=20)
    p = tmp_path / "raw" / "AliExpress_FR" / "test.csv"
    lines = p.read_text().splitlines()
    lines[line_index] = ",".join(mutate(lines[line_index].split(",")))
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(FormatError, match=rf"AliExpress_FR/test\.csv: line {line_index + 1}: {reason}"):
        convert("aliexpress", tmp_path / "raw", tmp_path / "out", ConvertOptions(**QUIET))


# =========================================================================== Ali-CCP
def test_ali_ccp_join_ids_scenarios_and_labels(tmp_path):
    recs = fx.write_ali_ccp(tmp_path / "raw", n_common=20, n_samples=300)
    res = convert("ali-ccp", tmp_path / "raw", tmp_path / "out", ConvertOptions(row_group_rows=64, **QUIET))
    # reference: per split, ids by first appearance over the common features file (file order;
    # multi-hot lists truncated, single fields' first occurrence), then over the samples' own
    # features; each sample joined with its request's features (its own fields win)
    vocab = {f: {} for f in ac.SINGLE_FIELDS + ac.MULTI_FIELDS + ["301"]}

    def dense(items):
        feats = {}
        for f, i, _ in items:
            if f not in vocab:
                continue
            ids = feats.setdefault(f, [])
            if (f in ac.MULTI_FIELDS and len(ids) < ac.MAX_LEN) or not ids:
                ids.append(i)
        return {f: [vocab[f].setdefault(i, len(vocab[f])) for i in ids] for f, ids in feats.items()}

    expected = {"train": [], "test": []}
    for split in ("train", "test"):
        commons = {k: dense(items) for k, items in recs[split]["commons"].items()}
        for s in recs[split]["samples"]:
            feats = dict(commons[s["common"]])
            feats.update(dense(s["items"]))
            row = {"sample_id": s["sample_id"], "click": s["click"], "purchase": s["buy"], "scenario": feats["301"][0]}
            for f in ac.SINGLE_FIELDS:
                row["f" + f] = feats[f][0] if f in feats else None
            for f in ac.MULTI_FIELDS:
                row["f" + f] = feats.get(f, [])
            expected[split].append(row)
    scen = vocab["301"]
    for split in ("train", "test"):
        got = read_rows(tmp_path / "out" / split)
        assert [{k: r[k] for k in expected[split][0]} for r in got] == expected[split]
    assert any(len(r["f109_14"]) == ac.MAX_LEN for r in expected["train"])  # truncation exercised
    assert res.schema.scenarios[0].value_names == [f"301={v}" for v in scen]
    for f in res.schema.sparse:
        assert f.num_embeddings == len(vocab[f.name[1:]])
    assert res.notes["unknown_fields"].get("999", 0) > 0
    assert [(t.name, t.label, t.parent) for t in res.schema.tasks] == [("ctr", "click", None), ("cvr", "purchase", "ctr")]


def _bump_feature_num(line: str) -> str:
    parts = line.split(",", 5)
    parts[4] = str(int(parts[4]) + 1)
    return ",".join(parts)


@pytest.mark.parametrize("file,mutate,reason", [
    ("sample_skeleton_train.csv", lambda l: _bump_feature_num(l), "feature_num says"),
    ("sample_skeleton_train.csv", lambda l: "x" + l, "sample_id 'x"),
    ("sample_skeleton_train.csv", lambda l: l.split(",", 3)[0] + ",0,1," + l.split(",", 3)[3], "buy = 1 on a sample with click = 0"),
    ("common_features_test.csv", lambda l: l.replace("\x03", "", 1), "feature .* is not field"),
])
def test_ali_ccp_bad_line(tmp_path, file, mutate, reason):
    fx.write_ali_ccp(tmp_path / "raw", n_common=5, n_samples=20)
    p = tmp_path / "raw" / file
    lines = p.read_text().split("\n")
    lines[3] = mutate(lines[3])
    p.write_text("\n".join(lines))
    with pytest.raises(FormatError, match=rf"{file}: line 4: {reason}"):
        convert("ali-ccp", tmp_path / "raw", tmp_path / "out", ConvertOptions(**QUIET))



# --------------------------------------------------------------------------- Ali-CCP, torch-rechub CSVs
def test_ali_ccp_rechub_csvs_by_file_name(tmp_path, capsys):
    recs = fx.write_ali_ccp_rechub(tmp_path / "raw", files=("train", "val", "test"), n=30, extra=("junk",))
    res = convert("ali-ccp", tmp_path / "raw", tmp_path / "out", ConvertOptions(row_group_rows=8))
    printed = capsys.readouterr().out
    # reference: codes re-mapped per field by first appearance over train, val, test
    order = ["ali_ccp_train.csv", "ali_ccp_val.csv", "ali_ccp_test.csv"]
    every = [r for f in order for r in recs[f]]
    vocab = {c: first_appearance(int(r[c]) for r in every) for c in fx.ALI_CCP_RECHUB_SPARSE}
    got = split_rows(tmp_path / "out")
    assert set(got) == {"train", "eval", "test"}
    row_id = 0
    for split, fname in zip(("train", "eval", "test"), order):
        rows = got[split]
        assert len(rows) == len(recs[fname]) == res.splits[split]["301=1"]["rows"] + res.splits[split]["301=2"]["rows"] \
            + res.splits[split]["301=3"]["rows"]
        for k, (row, rec) in enumerate(zip(rows, recs[fname])):
            assert row["row_id"] == row_id and row["sample_id"] == k + 2  # line number (the header is line 1)
            assert (row["click"], row["purchase"]) == (int(rec["click"]), int(rec["purchase"]))
            assert row["scenario"] == vocab["301"][int(rec["301"])]
            for f in ac.SINGLE_FIELDS:
                assert row["f" + f] == vocab[f][int(rec[f])], f
            for f in ac.MULTI_FIELDS:
                assert row["f" + f] == [vocab[f][int(rec[f])]], f
            row_id += 1
    assert res.schema.scenarios[0].value_names == [f"301={v}" for v in vocab["301"]]
    assert {f.name: f.num_embeddings for f in res.schema.sparse} == {"f" + c: len(vocab[c]) for c in vocab if c != "301"}
    assert _layout(res.schema) == _layout(Schema.load(ROOT / "datasets" / "ali_ccp" / "schema.yaml"))
    # the dense D* columns and the unknown one: ignored, listed and counted in the summary
    ignored = fx.ALI_CCP_RECHUB_DENSE + ["junk"]
    assert res.notes["ignored_columns"] == {f: ignored for f in order}
    assert f"ignored {len(ignored)} column(s)" in printed and "junk" in printed and "D853" in printed
    # --opt split is refused where the files carry the split
    with pytest.raises(DataError, match="--opt split: .* 3 preprocessed Ali-CCP CSV"):
        convert("ali-ccp", tmp_path / "raw", tmp_path / "o2", ConvertOptions(split="0.8", **QUIET))


def test_ali_ccp_rechub_one_csv_needs_split_and_then_splits_every_row_once(tmp_path):
    recs = fx.write_ali_ccp_rechub(tmp_path / "raw", files=("train",), n=50, name="ali_ccp_{}_sample.csv", drop=("127_14",))
    rec = recs["ali_ccp_train_sample.csv"]
    with pytest.raises(FileNotFoundError, match="only one file, ali_ccp_train_sample.csv.*--opt split=0.8"):
        convert("ali-ccp", tmp_path / "raw", tmp_path / "out", ConvertOptions(**QUIET))
    res = convert("ali-ccp", tmp_path / "raw", tmp_path / "out", ConvertOptions(split="0.7", seed=5, row_group_rows=16, **QUIET))
    got = split_rows(tmp_path / "out")
    assert set(got) == {"train", "eval"}
    rows = sorted((r for rs in got.values() for r in rs), key=lambda r: r["row_id"])
    assert [r["row_id"] for r in rows] == list(range(50))
    scen = first_appearance(int(r["301"]) for r in rec)
    for split, rs in got.items():
        for r in rs:
            src = rec[r["row_id"]]
            assert r["sample_id"] == r["row_id"] + 2 and hashed_reference(r["sample_id"], 0.7, 0.3, seed=5) == split
            assert (r["click"], r["purchase"], r["scenario"]) == (int(src["click"]), int(src["purchase"]), scen[int(src["301"])])
            assert r["f127_14"] == []  # a field column the file lacks: empty, and listed
    assert res.notes["absent_fields"] == {"ali_ccp_train_sample.csv": ["127_14"]}
    assert sum(d["rows"] for d in res.splits["train"].values()) == len(got["train"])


def _set_field(line: str, i: int, value: str) -> str:
    f = line.split(",")
    f[i] = value
    return ",".join(f)


def test_ali_ccp_rechub_gzip_and_blank_lines_keep_line_numbers(tmp_path):
    """A gzipped CSV with blank lines (the Arrow reader stops there and the line reader takes
    over): every data row once, sample_id = its true line number, the split by that number,
    and a bad row after the blank lines named by its line."""
    recs = fx.write_ali_ccp_rechub(tmp_path / "raw", files=("train",), n=30, seed=4)["ali_ccp_train.csv"]
    plain = tmp_path / "raw" / "ali_ccp_train.csv"
    lines = plain.read_text().splitlines()
    lines = lines[:11] + ["", "  "] + lines[11:21] + [""] + lines[21:] + [""]  # blank lines 12, 13, 24 and at the end
    with gzip.open(str(plain) + ".gz", "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    plain.unlink()
    convert("ali-ccp", tmp_path / "raw", tmp_path / "out", ConvertOptions(split="0.5", row_group_rows=4, **QUIET))
    rows = sorted((r for rs in split_rows(tmp_path / "out").values() for r in rs), key=lambda r: r["row_id"])
    expected_lines = [i + 1 for i, line in enumerate(lines) if line.strip()][1:]
    assert [r["sample_id"] for r in rows] == expected_lines and len(rows) == len(recs)
    assert [(r["click"], r["purchase"]) for r in rows] == [(int(x["click"]), int(x["purchase"])) for x in recs]
    for split, rs in split_rows(tmp_path / "out").items():
        assert all(hashed_reference(r["sample_id"], 0.5, 0.5) == split for r in rs)
    lines[25] = _set_field(lines[25], 0, "7")
    with gzip.open(str(plain) + ".gz", "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    with pytest.raises(FormatError, match=r"ali_ccp_train\.csv\.gz: line 26: column 'click': label '7' is not 0 or 1"):
        convert("ali-ccp", tmp_path / "raw", tmp_path / "out", ConvertOptions(split="0.5", **QUIET))


@pytest.mark.parametrize("mutate,reason", [
    (lambda h, r: (h.replace(",301,", ",scene,"), r), r"line 1: header lacks required column\(s\) '301'"),
    (lambda h, r: (h, r[:3] + [r[3].replace("0,0,", "0,1,", 1)] + r[4:]), "line 5: purchase = 1 on a row with click = 0"),
    (lambda h, r: (h, r[:6] + [_set_field(r[6], 4, "1.5")] + r[7:]), "line 8: column '122': '1.5' is not an integer"),
    (lambda h, r: (h, r[:6] + [_set_field(r[6], 20, "")] + r[7:]), "line 8: column '301': '' is not a finite number"),
    (lambda h, r: (h, r[:2] + [r[2] + ",1"] + r[3:]), "line 4: expected 34 columns"),
])
def test_ali_ccp_rechub_bad_input_names_file_column_and_line(tmp_path, mutate, reason):
    fx.write_ali_ccp_rechub(tmp_path / "raw", files=("train", "test"), n=12, seed=1, extra=("junk",))
    p = tmp_path / "raw" / "ali_ccp_test.csv"
    header, *rows = p.read_text().splitlines()
    rows = ["0,0," + r[4:] for r in rows]  # no purchase anywhere, so the mutation is the only bad row
    header, rows = mutate(header, rows)
    p.write_text("\n".join([header] + rows) + "\n")
    with pytest.raises(FormatError, match=rf"ali_ccp_test\.csv: {reason}"):
        convert("ali-ccp", tmp_path / "raw", tmp_path / "out", ConvertOptions(**QUIET))


# =========================================================================== KuaiRand
def test_kuairand_tabs_split_by_date_and_labels(tmp_path):
    recs = fx.write_kuairand(tmp_path / "raw", n=400)
    res = convert("kuairand", tmp_path / "raw", tmp_path / "out", ConvertOptions(row_group_rows=64, **QUIET))
    tabs = first_appearance(r["tab"] for r in recs["rows"])
    rows = read_rows(tmp_path / "out" / "train") + read_rows(tmp_path / "out" / "test")
    rows.sort(key=lambda r: r["row_id"])
    assert len(rows) == len(recs["rows"])
    for row, r in zip(rows, recs["rows"]):
        assert (row["click"], row["long_view"], row["like"]) == (r["is_click"], r["long_view"], r["is_like"])
        assert row["tab"] == tabs[r["tab"]] and row["date"] == r["date"]
    assert {r["date"] for r in read_rows(tmp_path / "out" / "test")} == {d for d in range(20220501, 20220509)} & {r["date"] for r in recs["rows"]}
    assert res.schema.scenarios[0].value_names == [f"tab{t}" for t in tabs]
    assert all(t.parent is None for t in res.schema.tasks)
    assert all(0 < len(r["tag"]) <= 2 for r in rows)
    # only some tabs: ids in the given order, the rest skipped and counted
    res2 = convert("kuairand", tmp_path / "raw", tmp_path / "out2", ConvertOptions(extra={"tabs": "4,1"}, **QUIET))
    kept = [r for r in recs["rows"] if r["tab"] in (1, 4)]
    got = read_rows(tmp_path / "out2" / "train") + read_rows(tmp_path / "out2" / "test")
    assert len(got) == len(kept) and res2.schema.scenarios[0].value_names == ["tab4", "tab1"]
    assert sum(res2.notes["skipped_rows_by_tab"].values()) == len(recs["rows"]) - len(kept)
    assert {r["tab"] for r in got} == {0, 1}


def test_kuairand_bad_line(tmp_path):
    fx.write_kuairand(tmp_path / "raw", n=40)
    p = tmp_path / "raw" / "log_standard_4_22_to_5_08_pure.csv"
    lines = p.read_text().splitlines()
    f = lines[4].split(",")
    f[fx.KUAIRAND_LOG_COLUMNS.index("is_click")] = "2"
    lines[4] = ",".join(f)
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(FormatError, match=r"log_standard_4_22_to_5_08_pure\.csv: line 5: is_click '2' is not 0 or 1"):
        convert("kuairand", tmp_path / "raw", tmp_path / "out", ConvertOptions(**QUIET))



# --------------------------------------------------------------------------- KuaiRand, Scenario-Wise Rec CSV
def test_kuairand_swr_csv_needs_split_and_then_maps_every_row_once(tmp_path, capsys):
    recs = fx.write_kuairand_swr(tmp_path / "raw", n=60)
    with pytest.raises(FileNotFoundError, match="only one file, kuairand_sample.csv.*--opt split=0.8"):
        convert("kuairand", tmp_path / "raw", tmp_path / "out", ConvertOptions(**QUIET))
    res = convert("kuairand", tmp_path / "raw", tmp_path / "out", ConvertOptions(split="0.6,0.2", row_group_rows=16))
    printed = capsys.readouterr().out
    got = split_rows(tmp_path / "out")
    assert set(got) == {"train", "eval", "test"}
    rows = sorted((r for rs in got.values() for r in rs), key=lambda r: r["row_id"])
    assert [r["row_id"] for r in rows] == list(range(60))  # every line once (row_id = line number - 2)
    tabs = first_appearance(r["tab"] for r in recs)
    users = first_appearance(r["user_id"] for r in recs)
    videos = first_appearance(r["video_id"] for r in recs)
    degree = first_appearance(r["user_active_degree"] for r in recs)
    feat4 = first_appearance(r["onehot_feat4"] for r in recs)
    vtype = first_appearance(r["video_type"] for r in recs)
    for split, rs in got.items():
        for r in rs:
            src = recs[r["row_id"]]
            assert hashed_reference(r["row_id"] + 2, 0.6, 0.2) == split
            assert r["click"] == int(src["is_click"]) and r["long_view"] is None and r["like"] is None
            assert r["tab"] == tabs[src["tab"]] and r["date"] is None
            assert (r["user_id"], r["video_id"]) == (users[src["user_id"]], videos[src["video_id"]])
            assert (r["user_active_degree"], r["onehot_feat4"], r["video_type"]) == \
                (degree[src["user_active_degree"]], feat4[src["onehot_feat4"]], vtype[src["video_type"]])
            assert r["duration_ms"] == float(src["duration_ms"]) and r["tag"] == [] and r["author_id"] is None
        for t, name in enumerate(res.schema.scenarios[0].value_names):
            sel = [r for r in rs if r["tab"] == t]
            if sel:
                assert res.splits[split][name]["rows"] == len(sel)
                assert res.splits[split][name]["click_rate"] == pytest.approx(np.mean([r["click"] for r in sel]))
                assert res.splits[split][name]["like_rate"] is None
    assert res.schema.scenarios[0].value_names == [f"tab{t}" for t in tabs]
    dur = np.log1p([float(recs[r["row_id"]]["duration_ms"]) for r in got["train"]])
    assert res.schema.dense[0].mean == pytest.approx(dur.mean()) and res.schema.dense[0].std == pytest.approx(dur.std())
    assert _layout(res.schema) == _layout(Schema.load(ROOT / "datasets" / "kuairand" / "schema.yaml"))
    ignored = ["play_time_ms", "profile_stay_time", "comment_stay_time", "follow_user_num", "fans_user_num",
               "friend_user_num", "register_days", "visible_status", "server_width", "server_height"]
    assert res.notes["ignored_columns"] == {"kuairand_sample.csv": ignored}
    assert "ignored 10 column(s)" in printed and "server_height" in printed
    assert {"long_view", "is_like", "tag", "author_id"} <= set(res.notes["absent_columns"]["kuairand_sample.csv"])
    # some tabs only: the others skipped and counted
    res2 = convert("kuairand", tmp_path / "raw", tmp_path / "out2", ConvertOptions(split="0.8", extra={"tabs": "4,1"}, **QUIET))
    kept = [r for r in recs if r["tab"] in ("1", "4")]
    got2 = [r for rs in split_rows(tmp_path / "out2").values() for r in rs]
    assert len(got2) == len(kept) and res2.schema.scenarios[0].value_names == ["tab4", "tab1"]
    assert sum(res2.notes["skipped_rows_by_tab"].values()) == 60 - len(kept)


def test_kuairand_swr_csv_with_a_date_column_splits_by_date(tmp_path):
    recs = fx.write_kuairand_swr(tmp_path / "raw", n=40, seed=2, date=True)
    res = convert("kuairand", tmp_path / "raw", tmp_path / "out", ConvertOptions(**QUIET))
    got = split_rows(tmp_path / "out")
    assert set(got) == {"train", "test"}
    for split, rs in got.items():
        for r in rs:
            src = recs[r["row_id"]]
            assert r["date"] == int(src["date"]) and (split == "test") == (int(src["date"]) >= 20220501)
    assert sum(len(rs) for rs in got.values()) == 40 and res.notes["test_from"] == 20220501
    with pytest.raises(DataError, match="split by date"):
        convert("kuairand", tmp_path / "raw", tmp_path / "out", ConvertOptions(split="0.8", **QUIET))


@pytest.mark.parametrize("drop,column", [("tab", "'tab'"), ("video_id", "'video_id'")])
def test_kuairand_swr_csv_missing_required_column(tmp_path, drop, column):
    fx.write_kuairand_swr(tmp_path / "raw", n=10, drop=(drop,))
    with pytest.raises(FormatError, match=rf"kuairand_sample\.csv: line 1: header lacks required column\(s\) {column}"):
        convert("kuairand", tmp_path / "raw", tmp_path / "out", ConvertOptions(split="0.8", **QUIET))


def test_kuairand_swr_csv_bad_value_names_file_column_and_line(tmp_path):
    fx.write_kuairand_swr(tmp_path / "raw", n=10)
    p = tmp_path / "raw" / "kuairand_sample.csv"
    lines = p.read_text().splitlines()
    lines[6] = _set_field(lines[6], fx.KUAIRAND_SWR_COLUMNS.index("is_click"), "2")
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(FormatError, match=r"kuairand_sample\.csv: line 7: column 'is_click': label '2' is not 0 or 1"):
        convert("kuairand", tmp_path / "raw", tmp_path / "out", ConvertOptions(split="0.8", **QUIET))


# =========================================================================== CLI, committed schemas
def test_cli_convert_and_its_errors(tmp_path, capsys):
    from dlrm_mtl.cli import main

    fx.write_movielens(tmp_path / "raw", "100k", n_ratings=60)
    assert main(["convert", "movielens", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "out"),
                 "--row-group-rows", "16"]) == 0
    out = capsys.readouterr().out
    assert "movielens_100k" in out and "under_25" in out and "click" in out
    assert Schema.load(tmp_path / "out" / "schema.yaml").name == "movielens_100k"
    assert all(pq.ParquetFile(f).metadata.row_group(0).num_rows <= 16 for f in (tmp_path / "out" / "train").glob("*.parquet"))
    (tmp_path / "raw" / "u.data").write_text("1\t2\n")
    assert main(["convert", "movielens", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "out")]) == 2
    assert "u.data: line 1: expected 4" in capsys.readouterr().err
    assert main(["convert", "census-income", "--raw", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "not a directory" in capsys.readouterr().err


def _layout(schema: Schema) -> dict:
    """What must not drift between the committed schema and the converter (sizes and
    statistics come from the data)."""
    return {
        "sparse": [(f.name, f.table, f.dim, f.multi_hot, f.max_len, f.pooling, f.hash) for f in schema.sparse],
        "dense": [(d.name, d.transform, d.standardize) for d in schema.dense],
        "scenarios": [(s.name, s.column) for s in schema.scenarios],
        "tasks": [(t.name, t.label, t.parent, t.loss_space) for t in schema.tasks],
        "row_id": schema.row_id,
    }


@pytest.mark.parametrize("name,folder,writer", [
    ("census-income", "census_income", lambda p: fx.write_census(p, 30, 10)),
    ("movielens", "movielens", lambda p: fx.write_movielens(p, "1m", n_ratings=40)),
    ("aliexpress", "aliexpress", lambda p: fx.write_aliexpress(p, n=10)),
    ("ali-ccp", "ali_ccp", lambda p: fx.write_ali_ccp(p, 4, 20)),
    ("kuairand", "kuairand", lambda p: fx.write_kuairand(p, 40)),
])
def test_committed_schema_matches_converter_layout(tmp_path, name, folder, writer):
    writer(tmp_path / "raw")
    res = convert(name, tmp_path / "raw", tmp_path / "out", ConvertOptions(**QUIET))
    committed = Schema.load(ROOT / "datasets" / folder / "schema.yaml")
    assert _layout(committed) == _layout(res.schema)


# =========================================================================== training on converted fixtures
TRAIN_CASES = [  # (case, converter, fixture writer, eval split, converter options)
    ("census-income", "census-income", lambda p: fx.write_census(p, 200, 80), "eval", {}),
    ("movielens", "movielens", lambda p: fx.write_movielens(p, "1m", n_ratings=600), "eval", {}),
    ("aliexpress", "aliexpress", lambda p: fx.write_aliexpress(p, n=80), "test", {}),
    ("ali-ccp", "ali-ccp", lambda p: fx.write_ali_ccp(p, 10, 200), "test", {}),
    ("ali-ccp-rechub-csv", "ali-ccp", lambda p: fx.write_ali_ccp_rechub(p, n=120), "test", {}),
    ("kuairand", "kuairand", lambda p: fx.write_kuairand(p, 300), "test", {}),
    ("kuairand-swr-csv", "kuairand", lambda p: fx.write_kuairand_swr(p, n=300), "eval", {"split": "0.7"}),
]


FRAGMENT_SCENARIO_TYPES = {"separate", "cgc", "star", "hmoe", "hinet", "aesm"}
FRAGMENT_TASK_TYPES = {"separate", "shared_bottom", "omoe", "mmoe", "cross_stitch", "cgc", "ple", "aesm"}


@pytest.mark.slow
def test_train_a_few_steps_on_every_converted_fixture(tmp_path):
    """Every converted data set (and preprocessed variant) trains through the real path (DMP,
    fused tables, task graph) with its committed base config alone and composed with each
    architecture fragment its ARCHS lists; the evaluation covers every labelled eval row of
    every scenario and task (counts equal the converter's own counts; a task whose labels the
    variant lacks has none)."""
    from dlrm_mtl.config import Config
    from dlrm_mtl.models.arch import SCENARIO_LAYERS, TASK_LAYERS
    from dlrm_mtl.train import train

    trained, expected, unlabelled_by_case = [], [], {}
    for case, name, writer, eval_split, extra in TRAIN_CASES:
        raw, out = tmp_path / case / "raw", tmp_path / case / "out"
        writer(raw)
        res = convert(name, raw, out, ConvertOptions(row_group_rows=64, extra=extra, **QUIET))
        folder = ROOT / "datasets" / name.replace("-", "_")
        per_scenario = {}
        for split_name, split in res.splits.items():
            if split_name == eval_split or split_name.startswith(eval_split + "/"):
                for scen, d in split.items():
                    per_scenario[scen] = per_scenario.get(scen, 0) + d["rows"]
        eval_rows = read_rows(out / eval_split)
        root_tasks = [t for t in res.schema.tasks if t.parent is None]
        unlabelled = unlabelled_by_case[case] = {t.name for t in root_tasks if all(r[t.label] is None for r in eval_rows)}
        archs = ["default"] + (folder / "ARCHS").read_text().split()
        expected += [(case, a) for a in archs]
        for arch in archs:
            configs = [str(folder / "configs" / "base.yaml")] + ([] if arch == "default" else [str(folder / "configs" / f"{arch}.yaml")])
            cfg = Config.load(configs, [
                f"data.train={out / 'train'}", f"data.eval={out / eval_split}", f"data.schema={out / 'schema.yaml'}",
                f"train.run_dir={tmp_path / case / arch}", "train.max_steps=2", "train.epochs=1", "data.batch_size=32",
                "train.progress=false", "data.shuffle_buffer_rows=256",
            ])
            assert all(l.type in SCENARIO_LAYERS for l in cfg.model.scenario_layers), (case, arch)
            assert all(l.type in TASK_LAYERS for l in cfg.model.task_layers), (case, arch)
            result = train(cfg)
            metrics = {(m["scenario"], m["task"]): m for m in result["metrics"]}
            for task in root_tasks:
                scale = 0 if task.name in unlabelled else 1
                assert metrics[("all", task.name)]["count"] == scale * sum(per_scenario.values()), (case, arch, task.name)
                for scen, n in per_scenario.items():
                    if len(per_scenario) > 1:
                        assert metrics[(scen, task.name)]["count"] == scale * n, (case, arch, scen, task.name)
            assert all(math.isfinite(m["logloss"]) for m in result["metrics"] if m["count"]), (case, arch)
            shutil.rmtree(tmp_path / case / arch, ignore_errors=True)
            trained.append((case, arch))
    assert trained == expected
    # only the Scenario-Wise Rec CSV lacks labels: it has click alone
    assert {c: u for c, u in unlabelled_by_case.items() if u} == {"kuairand-swr-csv": {"long_view", "like"}}


def test_datasets_readme_names_the_registered_layer_types():
    """datasets/README.md names the layer types the registry has, and every type an
    architecture fragment uses is among them (so no listed fragment stops on its type)."""
    import re

    from dlrm_mtl.models.arch import SCENARIO_LAYERS, TASK_LAYERS

    text = (ROOT / "datasets" / "README.md").read_text()
    assert "unknown type" not in text
    flat = " ".join(text.split())
    listed = {kind: set(re.search(rf"the {kind} types `([a-z_, ]+)`", flat).group(1).replace(" ", "").split(","))
              for kind in ("scenario", "task")}
    assert listed["scenario"] == set(SCENARIO_LAYERS) and listed["task"] <= set(TASK_LAYERS)
    for fragment in sorted((ROOT / "datasets").glob("*/configs/*.yaml")):
        model = (yaml.safe_load(fragment.read_text()) or {}).get("model") or {}
        assert {l["type"] for l in model.get("scenario_layers") or []} <= listed["scenario"], fragment
        assert {l["type"] for l in model.get("task_layers") or []} <= listed["task"], fragment


# =========================================================================== comparison tool
def test_results_table_means_stds_and_best():
    from dlrm_mtl.datasets.compare import results_table, summarise

    def rows(auc_all, auc_nl):
        return [{"scenario": "all", "task": "ctr", "auc": auc_all, "logloss": 0.3},
                {"scenario": "NL", "task": "ctr", "auc": auc_nl, "logloss": 0.4}]

    runs = {"mmoe": [rows(0.70, 0.60), rows(0.72, 0.62)], "ple": [rows(0.75, 0.55), rows(0.73, 0.57)]}
    s = summarise(runs)
    assert s[("all", "ctr")]["mmoe"][0] == pytest.approx(0.71)
    assert s[("all", "ctr")]["ple"][1] == pytest.approx(np.std([0.75, 0.73], ddof=1))
    md = results_table(runs).splitlines()
    assert md[0] == "| task | scenario | mmoe | ple |"
    assert md[2].startswith("| ctr | all | 0.7100 ± 0.0141 | **0.7400 ± 0.0141** |")
    assert md[3].startswith("| ctr | NL | **0.6100 ± 0.0141** | 0.5600 ± 0.0141 |")


def test_comparison_commands_compose_base_then_architecture(tmp_path, capsys):
    from dlrm_mtl.datasets.compare import main

    assert main(["--dataset", "aliexpress", "--data", str(tmp_path / "ax"), "--out", str(tmp_path / "runs"),
                 "--seeds", "0,1", "--dry-run", "--set", "train.epochs=1"]) == 0
    cmds = [line[2:].split() for line in capsys.readouterr().out.splitlines() if line.startswith("+ ")]
    archs = (ROOT / "datasets" / "aliexpress" / "ARCHS").read_text().split()
    assert len(cmds) == 2 * len(archs)
    for cmd, (arch, seed) in zip(cmds, [(a, s) for a in archs for s in (0, 1)]):
        configs = [cmd[i + 1] for i, x in enumerate(cmd) if x == "--config"]
        assert configs == ["datasets/aliexpress/configs/base.yaml", f"datasets/aliexpress/configs/{arch}.yaml"]
        sets = [cmd[i + 1] for i, x in enumerate(cmd) if x == "--set"]
        assert f"train.seed={seed}" in sets and f"train.run_dir={tmp_path / 'runs' / arch / f'seed{seed}'}" in sets
        assert sets[-1] == "train.epochs=1" and f"data.eval={tmp_path / 'ax' / 'test'}" in sets


@pytest.mark.parametrize("folder", ["census_income", "aliexpress", "ali_ccp", "movielens", "kuairand"])
def test_every_listed_architecture_has_a_fragment_that_composes(folder):
    from dlrm_mtl.config import Config

    d = ROOT / "datasets" / folder
    archs = (d / "ARCHS").read_text().split()
    assert archs and (d / "README.md").exists() and (d / "run_comparison.sh").exists()
    scenario_level = Schema.load(d / "schema.yaml").scenarios[0].name
    base = Config.load([str(d / "configs" / "base.yaml")])
    for arch in archs:
        fragment = yaml.safe_load((d / "configs" / f"{arch}.yaml").read_text())["model"]
        cfg = Config.load([str(d / "configs" / "base.yaml"), str(d / "configs" / f"{arch}.yaml")])
        # the fragment replaces the layer stacks; the base's data and training settings stay
        assert [l.type for l in cfg.model.scenario_layers] == [l["type"] for l in fragment["scenario_layers"]]
        assert [l.type for l in cfg.model.task_layers] == [l["type"] for l in fragment["task_layers"]]
        assert cfg.data == base.data and cfg.train.epochs == base.train.epochs
        assert cfg.train.run_dir == f"runs/{folder}/{arch}"
        assert {l.type for l in cfg.model.scenario_layers} <= FRAGMENT_SCENARIO_TYPES
        assert cfg.model.task_layers and {l.type for l in cfg.model.task_layers} <= FRAGMENT_TASK_TYPES
        for layer in cfg.model.scenario_layers:
            assert layer.level == scenario_level, (folder, arch)


@pytest.mark.slow
def test_comparison_runs_and_tables_the_runs_metrics(tmp_path):
    """End to end on the converted Census fixture: the default architecture and the MMoE
    fragment, two seeds, a few steps each, the tool's command lines run by the CLI in this
    process; results.md carries the mean and std of the AUCs the runs wrote into metrics.json."""
    import json
    import os

    from dlrm_mtl.cli import main as cli_main
    from dlrm_mtl.datasets.compare import run_comparison

    fx.write_census(tmp_path / "raw", 200, 80)
    convert("census-income", tmp_path / "raw", tmp_path / "data", ConvertOptions(row_group_rows=64, **QUIET))
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        run_comparison("census_income", tmp_path / "data", tmp_path / "runs", ["default", "mmoe"], [0, 1],
                       overrides=["train.max_steps=2", "data.batch_size=32"],
                       runner=lambda cmd: cli_main(cmd[cmd.index("train"):]))
    finally:
        os.chdir(cwd)
    md = (tmp_path / "runs" / "results.md").read_text()
    for task in ("income", "marital"):
        cells = []
        for arch in ("default", "mmoe"):
            aucs = [next(m["auc"] for m in json.loads((tmp_path / "runs" / arch / f"seed{s}" / "metrics.json").read_text())["metrics"]
                         if m["scenario"] == "all" and m["task"] == task) for s in (0, 1)]
            cells.append(f"{np.mean(aucs):.4f} ± {np.std(aucs, ddof=1):.4f}")
        row = next(line for line in md.splitlines() if line.startswith(f"| {task} | all |"))
        assert [c.strip().strip("*") for c in row.split("|")[3:5]] == cells, row
    saved = yaml.safe_load((tmp_path / "runs" / "mmoe" / "seed1" / "config.yaml").read_text())
    assert [l["type"] for l in saved["model"]["task_layers"]] == ["mmoe"] and saved["train"]["seed"] == 1


@pytest.mark.slow
def test_run_comparison_script_converts_once_then_plans_every_arch_and_seed(tmp_path):
    """datasets/census_income/run_comparison.sh -> datasets/run_comparison.sh: converts the raw
    files into $DATA with the converter named after the folder, then hands every listed
    architecture x seed to dlrm_mtl.datasets.compare (--dry-run prints the commands)."""
    import os
    import subprocess
    import sys

    fx.write_census(tmp_path / "raw", 120, 60)
    env = dict(os.environ, PY=sys.executable, RAW=str(tmp_path / "raw"), DATA=str(tmp_path / "data"),
               OUT=str(tmp_path / "runs"), SEEDS="0,1")
    script = ROOT / "datasets" / "census_income" / "run_comparison.sh"
    r = subprocess.run(["bash", str(script), "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data" / "schema.yaml").exists() and list((tmp_path / "data" / "train").glob("*.parquet"))
    archs = (ROOT / "datasets" / "census_income" / "ARCHS").read_text().split()
    for arch in archs:
        for seed in (0, 1):
            assert str(tmp_path / "runs" / arch / f"seed{seed}") in r.stdout, (arch, seed, r.stdout)
    # a second run finds $DATA converted and does not need RAW
    env.pop("RAW")
    assert subprocess.run(["bash", str(script), "--dry-run"], env=env, capture_output=True, text=True, timeout=120).returncode == 0
    # an unknown folder is refused by name
    bad = subprocess.run(["bash", str(ROOT / "datasets" / "run_comparison.sh"), "nope"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "datasets/nope/ARCHS not found" in bad.stderr and "census_income" in bad.stderr
