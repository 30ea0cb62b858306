"""inspect_data / format_report / dense_stats: exact values on synthetic and hand-written data."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dlrm_mtl.data import ParquetStream, assign_row_groups, list_row_groups
from dlrm_mtl.data.errors import DataError
from dlrm_mtl.data.stream import hash_ids
from dlrm_mtl.inspect_data import _DistinctIds, dense_stats, format_report, inspect_data
from dlrm_mtl.metrics import scenario_names
from dlrm_mtl.schema import DenseFeature, Schema, ScenarioLevel, SparseFeature, Task


# ---------------------------------------------------------------- synthetic data
@pytest.fixture(scope="module")
def schema(synthetic_small):
    return Schema.load(synthetic_small / "schema.yaml")


@pytest.fixture(scope="module")
def train(synthetic_small):
    return synthetic_small / "train"


@pytest.fixture(scope="module")
def table(train):
    """The whole (tiny) train split, for numpy reference values."""
    return pq.read_table(train)


@pytest.fixture(scope="module")
def report(schema, train):
    return inspect_data(schema, str(train), world_size=2, batch_size=500)


def test_totals_match_pyarrow(report, train, table):
    files = sorted(train.glob("*.parquet"))
    metas = [pq.ParquetFile(f).metadata for f in files]
    assert report["total_rows"] == table.num_rows == sum(m.num_rows for m in metas) == 9600
    assert report["num_files"] == len(files) == 3
    assert report["num_row_groups"] == sum(m.num_row_groups for m in metas) == 12
    assert report["empty_row_groups"] == 0
    assert [f["rows"] for f in report["files"]] == [m.num_rows for m in metas]
    assert [f["row_groups"] for f in report["files"]] == [m.num_row_groups for m in metas]
    json.dumps(report)  # serialisable as is (for a --json flag)


def test_scenario_rows_and_label_rates_match_numpy(report, schema, table):
    leaf = table["channel"].to_numpy() * 2 + table["domain"].to_numpy()
    click = table["click"].to_numpy()
    conv = table["conversion"].to_numpy()
    names = scenario_names(schema)
    assert names == ["home/hot_card", "home/product_card", "vertical/hot_card", "vertical/product_card"]
    sc = report["scenarios"]
    assert sc["all"]["rows"] == table.num_rows
    for i, name in enumerate(names):
        m = leaf == i
        assert sc[name]["rows"] == int(m.sum()) > 0
        ctr, cvr = sc[name]["tasks"]["ctr"], sc[name]["tasks"]["cvr"]
        assert ctr["labeled"] == int(m.sum()) and ctr["positives"] == int(click[m].sum())
        assert ctr["rate"] == pytest.approx(click[m].mean(), abs=1e-12)
        assert "rate_given_parent" not in ctr
        assert cvr["positives"] == int(conv[m].sum())
        assert cvr["rate"] == pytest.approx(conv[m].mean(), abs=1e-12)
        clicked = m & (click == 1)
        assert cvr["parent_labeled"] == int(clicked.sum())
        assert cvr["rate_given_parent"] == pytest.approx(conv[clicked].mean(), abs=1e-12)
    assert sc["all"]["tasks"]["cvr"]["rate_given_parent"] == pytest.approx(conv[click == 1].mean(), abs=1e-12)


def test_no_nulls_and_no_counters_on_clean_data(report, schema):
    assert list(report["null_rates"]) == schema.columns()
    for c, v in report["null_rates"].items():
        assert (v["rows"], v["nulls"], v["rate"]) == (9600, 0, 0.0), c
    assert report["counters"] == {}


def test_cardinality_matches_numpy(report, table):
    card = report["cardinality"]
    seg = np.unique(table["user_segment"].to_numpy())
    assert card["user_segment"] == {"distinct": len(seg), "exact": True, "num_embeddings": 64, "hashed": False}
    assert card["item_category"]["distinct"] == len(np.unique(table["item_category"].to_numpy()))
    hist = table["hist_categories"].combine_chunks().flatten().to_numpy()
    assert card["hist_categories"]["distinct"] == len(np.unique(hist))
    users = hash_ids(table["user_id"].to_numpy(), 500_000)  # hashed ids, not raw ids
    assert card["user_id"]["distinct"] == len(np.unique(users))
    assert card["user_id"]["distinct"] < len(np.unique(table["user_id"].to_numpy())) + 1


def test_cardinality_cap(schema, train):
    r = inspect_data(schema, str(train), max_distinct=50)
    assert r["cardinality"]["user_segment"]["distinct"] == 50
    assert r["cardinality"]["user_segment"]["exact"] is False
    assert r["cardinality"]["device"] == {"distinct": 8, "exact": True, "num_embeddings": 8, "hashed": False}
    assert ">= 50" in format_report(r)


def test_distinct_ids_merges_buffered_chunks():
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 300_000, 20_000) for _ in range(12)]
    d = _DistinctIds(cap=10**6)
    for c in chunks:
        d.add(c)
    assert d.result() == {"distinct": len(np.unique(np.concatenate(chunks))), "exact": True}
    capped = _DistinctIds(cap=1000)
    for c in chunks:
        capped.add(c)
    assert capped.result() == {"distinct": 1000, "exact": False} and capped.known.size == 0


def test_dense_stats_in_report(report, table):
    price = np.log1p(table["price"].to_numpy().astype(np.float32))
    pos = table["position"].to_numpy().astype(np.float64)
    d = report["dense"]
    assert d["price"]["count"] == 9600 and d["price"]["standardized"] is False
    assert d["price"]["min"] == pytest.approx(price.min(), rel=1e-6)
    assert d["price"]["max"] == pytest.approx(price.max(), rel=1e-6)
    assert d["price"]["mean"] == pytest.approx(price.astype(np.float64).mean(), rel=1e-6)
    assert (d["position"]["min"], d["position"]["max"]) == (1.0, 10.0)
    assert d["position"]["mean"] == pytest.approx(pos.mean(), rel=1e-12)
    assert d["position"]["std"] == pytest.approx(pos.std(), rel=1e-9)


@pytest.mark.parametrize("world_size", [1, 2, 5])
def test_rank_split_matches_assign_row_groups(schema, train, world_size):
    r = inspect_data(schema, str(train), world_size=world_size, batch_size=700)
    shards = assign_row_groups(list_row_groups(str(train)), world_size)
    expected = [{"rank": i, "row_groups": len(s), "rows": sum(g.num_rows for g in s)} for i, s in enumerate(shards)]
    assert r["ranks"] == expected
    assert sum(e["rows"] for e in r["ranks"]) == r["total_rows"] == 9600
    assert sum(e["row_groups"] for e in r["ranks"]) == 12
    assert r["steps_per_epoch"] == max(math.ceil(e["rows"] / 700) for e in expected)
    stream = ParquetStream(schema, str(train), batch_size=700, rank=0, world_size=world_size, prefetch_batches=0)
    assert r["steps_per_epoch"] == len(stream) and [e["rows"] for e in r["ranks"]] == stream.rows_per_rank


def test_format_report(report, schema):
    text = format_report(report)
    for name in scenario_names(schema):
        line = next(l for l in text.splitlines() if l.startswith(name + " "))
        e = report["scenarios"][name]
        assert str(e["rows"]) in line
        assert f"{e['tasks']['ctr']['rate']:.4f}" in line
        assert f"{e['tasks']['cvr']['rate_given_parent']:.4f}" in line
    for section in ["files & row groups", "scenarios", "null rates", "id cardinality", "dense features",
                    "policy counters", "split over 2 rank(s), batch size 500"]:
        assert section in text
    assert "rows: 9600" in text and "12 (0 empty)" in text
    assert f"{report['steps_per_epoch']} steps per epoch" in text
    for e in report["ranks"]:
        assert f"rank {e['rank']}: {e['row_groups']} row groups, {e['rows']} rows" in text
    assert "user_segment" in text and " 64 of 64 " in text


# ---------------------------------------------------------------- dense_stats
def test_dense_stats_match_numpy(schema, train, table, tmp_path):
    std_schema = dense_stats(schema, str(train))
    assert schema.dense[0].standardize is False and schema.dense[0].mean is None  # input untouched
    price = np.log1p(table["price"].to_numpy().astype(np.float32)).astype(np.float64)
    d = {f.name: f for f in std_schema.dense}
    assert d["price"].mean == pytest.approx(price.mean(), rel=1e-9)
    assert d["price"].std == pytest.approx(price.std(), rel=1e-9)
    act = np.log1p(table["activity"].to_numpy().astype(np.float32)).astype(np.float64)
    assert d["activity"].mean == pytest.approx(act.mean(), rel=1e-9)
    assert d["activity"].std == pytest.approx(act.std(), rel=1e-9)
    assert all(f.standardize and isinstance(f.mean, float) and isinstance(f.std, float) for f in std_schema.dense)
    # the returned schema validates and round-trips through YAML
    std_schema.validate()
    std_schema.save(tmp_path / "schema.yaml")
    again = Schema.load(tmp_path / "schema.yaml")
    assert [(f.mean, f.std, f.standardize) for f in again.dense] == [(f.mean, f.std, f.standardize) for f in std_schema.dense]


def test_standardized_stream_has_zero_mean_unit_std(schema, train):
    std_schema = dense_stats(schema, str(train))
    stream = ParquetStream(std_schema, str(train), batch_size=4096, prefetch_batches=0, num_workers=1)
    parts = [b.dense[b.row_id >= 0].double().numpy() for b in stream]
    x = np.concatenate(parts)
    assert x.shape == (9600, len(schema.dense))
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(x.std(axis=0), 1.0, atol=1e-3)
    # inspect_data on the standardized schema reports the reader's (standardized) values
    r = inspect_data(std_schema, str(train))
    assert all(abs(v["mean"]) < 1e-3 and abs(v["std"] - 1) < 1e-3 and v["standardized"] for v in r["dense"].values())


# ---------------------------------------------------------------- hand-written data
def tiny_schema(**dense_x) -> Schema:
    return Schema(
        name="tiny",
        sparse=[
            SparseFeature("a", "t_a", 10),
            SparseFeature("h", "t_h", 10, multi_hot=True, max_len=2),
        ],
        dense=[
            DenseFeature("x", default=2.0, **dense_x),
            DenseFeature("y", "log1p", clip_max=1.0),
        ],
        scenarios=[ScenarioLevel("s", 3)],
        tasks=[Task("click", "click"), Task("buy", "buy", parent="click")],
    )


TINY = {
    "a": pa.array([1, None, 3, 3, None, 9], pa.int64()),
    "h": pa.array([[1, 2], None, [2, 3, 4], [], [5], [1]], pa.list_(pa.int64())),
    "x": pa.array([1.0, None, None, 4.0, 5.0, 6.0], pa.float32()),
    "y": pa.array([0.0, 1.0, 3.0, 0.0, 0.0, 0.0], pa.float32()),
    "s": pa.array([0, 0, 1, 1, 1, 2], pa.int64()),
    "click": pa.array([1, 0, 1, None, 1, 0], pa.int64()),
    "buy": pa.array([1, 0, None, 0, 1, 0], pa.int64()),
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    t = pa.table(TINY)
    pq.write_table(t, d / "part-0.parquet", row_group_size=3)
    pq.write_table(t.slice(0, 0), d / "part-1.parquet")  # an empty file: one empty row group
    return d


def test_tiny_exact_report(tiny_dir):
    r = inspect_data(tiny_schema(), str(tiny_dir), world_size=2, batch_size=2)
    assert (r["total_rows"], r["num_files"], r["num_row_groups"], r["empty_row_groups"]) == (6, 2, 3, 1)
    assert [f["rows"] for f in r["files"]] == [6, 0]
    nr = {c: (v["nulls"], v["rows"]) for c, v in r["null_rates"].items()}
    assert nr == {"a": (2, 6), "h": (1, 6), "x": (2, 6), "y": (0, 6), "s": (0, 6), "click": (1, 6), "buy": (1, 6)}
    assert r["null_rates"]["a"]["rate"] == pytest.approx(1 / 3)
    assert r["counters"] == {
        "null_ids/a": 2, "null_lists/h": 1, "truncated_ids/h": 1, "null_dense/x": 2, "clipped_dense/y": 1,
        "null_labels/click": 1, "null_labels/buy": 1,
    }
    # null single-hot ids are not ids; multi-hot after truncation to 2: {1, 2, 3, 5}
    assert r["cardinality"]["a"]["distinct"] == 3
    assert r["cardinality"]["h"]["distinct"] == 4
    x = r["dense"]["x"]
    assert (x["min"], x["max"], x["count"]) == (1.0, 6.0, 6)
    assert x["mean"] == pytest.approx(20 / 6)
    y = r["dense"]["y"]
    assert (y["min"], y["max"]) == (0.0, 1.0)  # log1p(3) clipped to 1
    assert y["mean"] == pytest.approx((np.log1p(np.float32(1.0)) + 1.0) / 6, rel=1e-6)
    sc = r["scenarios"]
    assert [sc[n]["rows"] for n in ["s0", "s1", "s2"]] == [2, 3, 1]
    click = {n: (sc[n]["tasks"]["click"]["positives"], sc[n]["tasks"]["click"]["labeled"]) for n in sc}
    assert click == {"all": (3, 5), "s0": (1, 2), "s1": (2, 2), "s2": (0, 1)}
    buy = {n: sc[n]["tasks"]["buy"] for n in sc}
    assert {n: (b["positives"], b["labeled"]) for n, b in buy.items()} == {"all": (2, 5), "s0": (1, 2), "s1": (1, 2), "s2": (0, 1)}
    # among rows with a labeled positive click and a labeled buy: rows 0 and 4 (row 2's buy is null)
    assert {n: (b["parent_positives"], b["parent_labeled"]) for n, b in buy.items()} == {
        "all": (2, 2), "s0": (1, 1), "s1": (1, 1), "s2": (0, 0)}
    assert buy["s2"]["rate_given_parent"] is None and buy["s1"]["rate"] == 0.5
    assert sorted(e["rows"] for e in r["ranks"]) == [3, 3]
    assert sum(e["row_groups"] for e in r["ranks"]) == 3
    assert r["steps_per_epoch"] == 2
    text = format_report(r)
    assert "3 (1 empty)" in text and "null_dense/x: 2" in text and "truncated_ids/h: 1" in text
    assert "0.3333  (2 of 6)" in text


def test_tiny_dense_stats_after_default_and_clip(tiny_dir):
    s = dense_stats(tiny_schema(clip_min=1.5), str(tiny_dir))
    x = np.array([1.5, 2, 2, 4, 5, 6])  # nulls -> default 2.0, then clip_min 1.5
    y = np.array([0, np.log1p(np.float32(1.0)), 1.0, 0, 0, 0], dtype=np.float64)
    assert s.dense[0].mean == pytest.approx(x.mean()) and s.dense[0].std == pytest.approx(x.std())
    assert s.dense[1].mean == pytest.approx(y.mean(), rel=1e-6) and s.dense[1].std == pytest.approx(y.std(), rel=1e-6)
    assert s.dense[0].clip_min == 1.5 and s.dense[0].default == 2.0 and s.dense[1].transform == "log1p"


def test_dense_stats_constant_feature_gets_unit_std(tmp_path):
    t = pa.table({k: v for k, v in TINY.items() if k != "x"}).append_column("x", pa.array([3.0] * 6, pa.float32()))
    pq.write_table(t, tmp_path / "c.parquet")
    s = dense_stats(tiny_schema(), str(tmp_path / "c.parquet"))
    assert (s.dense[0].mean, s.dense[0].std, s.dense[0].standardize) == (3.0, 1.0, True)


def test_dense_stats_of_a_standardized_schema_recomputes_from_raw(tiny_dir):
    once = dense_stats(tiny_schema(), str(tiny_dir))
    twice = dense_stats(once, str(tiny_dir))
    assert [(f.mean, f.std) for f in twice.dense] == [(f.mean, f.std) for f in once.dense]


def test_bad_id_raises_data_error_naming_file_column_row(tmp_path):
    t = pa.table(TINY).set_column(0, "a", pa.array([1, 2, 3, 4, 10, 5], pa.int64()))
    path = tmp_path / "bad.parquet"
    pq.write_table(t, path, row_group_size=3)  # the bad id is local row 1 of row group 1
    with pytest.raises(DataError) as e:
        inspect_data(tiny_schema(), str(path))
    msg = str(e.value)
    assert str(path) in msg and "column 'a'" in msg and "row 4" in msg and "id 10 outside [0, 10)" in msg
    with pytest.raises(DataError, match="row 4"):
        dense_stats(tiny_schema(), str(path))


def test_null_dense_without_default_raises(tiny_dir):
    s = tiny_schema()
    s.dense[0].default = None
    with pytest.raises(DataError, match=r"column 'x', row 1: null dense value"):
        inspect_data(s, str(tiny_dir))


def test_glob_and_list_sources(tiny_dir):
    a = inspect_data(tiny_schema(), str(tiny_dir / "part-*.parquet"))
    b = inspect_data(tiny_schema(), [str(tiny_dir / "part-0.parquet"), str(tiny_dir / "part-1.parquet")])
    assert a["total_rows"] == b["total_rows"] == 6 and a["num_files"] == b["num_files"] == 2


def test_only_empty_row_groups(tiny_dir):
    r = inspect_data(tiny_schema(), str(tiny_dir / "part-1.parquet"), world_size=2)
    assert (r["total_rows"], r["num_row_groups"], r["empty_row_groups"]) == (0, 1, 1)
    assert r["steps_per_epoch"] == 1  # as ParquetStream: one (padding) step per epoch
    assert r["scenarios"]["s0"]["tasks"]["click"]["rate"] is None
    assert r["dense"]["x"]["count"] == 0 and r["cardinality"]["a"]["distinct"] == 0
    assert "n/a" in format_report(r)
    with pytest.raises(DataError, match="no rows"):
        dense_stats(tiny_schema(), str(tiny_dir / "part-1.parquet"))
