"""Synthetic generator: determinism, layout, label semantics, leaf scenario shapes, schema."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dlrm_mtl.schema import Schema
from dlrm_mtl.synthetic import SyntheticSpec, describe, generate, synthetic_schema

SPEC = SyntheticSpec(train_files=3, eval_files=2, row_group_rows=100)
ROWS = 1500


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*.parquet"))


def _all(root):
    return pa.concat_tables([pq.read_table(root / f) for f in _files(root)])


@pytest.fixture(scope="module")
def gen_a(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen_a")
    schema = generate(out, rows=ROWS, seed=7, spec=SPEC)
    return out, schema


def test_same_seed_identical(gen_a, tmp_path):
    a, schema_a = gen_a
    schema_b = generate(tmp_path, rows=ROWS, seed=7, spec=SPEC)
    assert _files(a) == _files(tmp_path)
    for f in _files(a):
        ta, tb = pq.read_table(a / f), pq.read_table(tmp_path / f)
        assert ta.schema == tb.schema
        assert ta.equals(tb), f
    assert schema_a.to_dict() == schema_b.to_dict()
    assert (a / "schema.yaml").read_text() == (tmp_path / "schema.yaml").read_text()


def test_different_seed_differs(gen_a, tmp_path):
    a, _ = gen_a
    generate(tmp_path, rows=ROWS, seed=8, spec=SPEC)
    ta, tb = _all(a), _all(tmp_path)
    assert ta.num_rows == tb.num_rows
    assert not np.array_equal(ta["click"].to_numpy(), tb["click"].to_numpy())
    assert not np.array_equal(ta["true_pctr"].to_numpy(), tb["true_pctr"].to_numpy())
    # row ids are positional, not random
    assert np.array_equal(ta["row_id"].to_numpy(), tb["row_id"].to_numpy())


def test_layout_files_and_row_groups(gen_a):
    out, _ = gen_a
    train = sorted((out / "train").glob("*.parquet"))
    evl = sorted((out / "eval").glob("*.parquet"))
    assert [p.name for p in train] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [p.name for p in evl] == ["part-00000.parquet", "part-00001.parquet"]
    n_train = sum(pq.ParquetFile(p).metadata.num_rows for p in train)
    n_eval = sum(pq.ParquetFile(p).metadata.num_rows for p in evl)
    assert n_eval == round(ROWS * SPEC.eval_fraction) == 300
    assert n_train + n_eval == ROWS
    for p in train + evl:
        md = pq.ParquetFile(p).metadata
        assert md.num_row_groups >= 2, p
        sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        assert max(sizes) <= SPEC.row_group_rows
        assert all(s == SPEC.row_group_rows for s in sizes[:-1])
    # file sizes differ by at most one row within a split
    tr = [pq.ParquetFile(p).metadata.num_rows for p in train]
    assert max(tr) - min(tr) <= 1


def test_regenerate_removes_old_parts(tmp_path):
    generate(tmp_path, rows=300, seed=1, spec=SyntheticSpec(train_files=4, eval_files=3, row_group_rows=50))
    generate(tmp_path, rows=300, seed=1, spec=SyntheticSpec(train_files=2, eval_files=1, row_group_rows=50))
    assert len(list((tmp_path / "train").glob("*.parquet"))) == 2
    assert len(list((tmp_path / "eval").glob("*.parquet"))) == 1
    assert _all(tmp_path).num_rows == 300


def test_label_semantics(gen_a):
    t = _all(gen_a[0])
    click, conv = t["click"].to_numpy(), t["conversion"].to_numpy()
    assert set(np.unique(click)) <= {0, 1} and set(np.unique(conv)) <= {0, 1}
    assert conv.sum() > 0 and click.sum() > conv.sum()
    assert np.all(click[conv == 1] == 1)  # conversion => click
    pctr, pcvr, pctcvr = (t[c].to_numpy().astype(np.float64) for c in ("true_pctr", "true_pcvr", "true_pctcvr"))
    for p in (pctr, pcvr, pctcvr):
        assert np.all((p > 0) & (p < 1))
    np.testing.assert_allclose(pctcvr, pctr * pcvr, rtol=1e-5, atol=1e-8)


def test_columns_and_types(gen_a):
    out, schema = gen_a
    t = _all(out)
    for c in schema.columns():
        assert c in t.column_names, c
    assert "true_pctcvr" in t.column_names
    for c in ("row_id", "user_id", "item_id", "user_segment", "click", "conversion", "channel", "domain"):
        assert t.schema.field(c).type == pa.int64(), c
    spec = SPEC
    assert t["user_segment"].to_numpy().max() < spec.num_segments
    assert t["item_category"].to_numpy().max() < spec.num_categories
    assert t["device"].to_numpy().max() < 8
    assert t["channel"].to_numpy().max() <= 1 and t["domain"].to_numpy().max() <= 1
    assert t.schema.field("price").type == pa.float32()


def test_hist_categories_list_column(gen_a):
    t = _all(gen_a[0])
    col = t["hist_categories"].combine_chunks()
    assert pa.types.is_list(col.type) and col.type.value_type == pa.int64()
    assert col.null_count == 0
    lengths = pa.compute.list_value_length(col).to_numpy()
    assert lengths.min() >= 1 and lengths.max() <= SPEC.max_hist
    assert len(np.unique(lengths)) > 2  # lengths vary
    values = pa.compute.list_flatten(col).to_numpy()
    assert values.min() >= 0 and values.max() < SPEC.num_categories


def test_row_id_unique_across_splits(gen_a):
    out, _ = gen_a
    ids = np.concatenate([
        pq.read_table(out / s, columns=["row_id"])["row_id"].to_numpy() for s in ("train", "eval")
    ])
    assert len(ids) == ROWS
    assert len(np.unique(ids)) == ROWS
    assert ids.min() == 0 and ids.max() == ROWS - 1


def test_schema_written_matches(gen_a):
    out, schema = gen_a
    loaded = Schema.load(out / "schema.yaml")
    assert loaded.to_dict() == synthetic_schema(SPEC).to_dict() == schema.to_dict()
    assert [f.name for f in loaded.sparse if f.hash] == ["user_id", "item_id"]


def test_leaf_scenarios(synthetic_small):
    """4 leaves of very different sizes; the smallest is the most conversion-rich."""
    stats = describe(synthetic_small / "train")
    assert [s["leaf"] for s in stats] == [0, 1, 2, 3]
    rows = np.array([s["rows"] for s in stats])
    assert rows.sum() == sum(pq.ParquetFile(p).metadata.num_rows for p in (synthetic_small / "train").glob("*.parquet"))
    assert rows.min() > 0
    assert rows.max() >= 4 * rows.min()
    smallest = int(np.argmin(rows))
    cvr = np.array([s["cvr"] for s in stats])
    assert int(np.argmax(cvr)) == smallest
    # conversions per impression too
    t = pq.read_table(synthetic_small / "train", columns=["channel", "domain", "conversion"])
    leaf = t["channel"].to_numpy() * 2 + t["domain"].to_numpy()
    conv = t["conversion"].to_numpy()
    per_imp = np.array([conv[leaf == s].mean() for s in range(4)])
    assert int(np.argmax(per_imp)) == smallest


def test_describe(gen_a):
    out, _ = gen_a
    path = out / "train" / "part-00000.parquet"
    stats = describe(path)
    t = pq.read_table(path)
    leaf = t["channel"].to_numpy() * 2 + t["domain"].to_numpy()
    click, conv = t["click"].to_numpy(), t["conversion"].to_numpy()
    assert len(stats) == 4
    assert sum(s["rows"] for s in stats) == t.num_rows
    for s in stats:
        m = leaf == s["leaf"]
        assert s["rows"] == int(m.sum())
        assert s["ctr"] == pytest.approx(click[m].mean())
        assert s["cvr"] == pytest.approx(conv[m].sum() / max(click[m].sum(), 1))
        assert 0 <= s["cvr"] <= 1 and 0 <= s["ctr"] <= 1


def test_small_leaf_conflict_flips_the_shared_affinity_only_in_the_smallest_leaf(tmp_path):
    """Same seed with and without the conflict: other leaves are row-for-row identical; in the
    smallest leaf both logits move by the shared affinity term, −2c·<u,v> for click and
    0.6·(−2c)·<u,v> for conversion, so their shifts have the fixed ratio 0.6."""
    spec = SyntheticSpec(train_files=1, eval_files=1, row_group_rows=5000)
    generate(tmp_path / "a", rows=6000, seed=4, spec=spec)
    generate(tmp_path / "b", rows=6000, seed=4, spec=SyntheticSpec(train_files=1, eval_files=1, row_group_rows=5000, small_leaf_conflict=0.75))
    cols = ["channel", "domain", "true_pctr", "true_pcvr"]
    a = pq.ParquetDataset(tmp_path / "a" / "train").read(columns=cols).to_pydict()
    b = pq.ParquetDataset(tmp_path / "b" / "train").read(columns=cols).to_pydict()
    leaf = np.array(a["channel"]) * 2 + np.array(a["domain"])
    assert (leaf == 3).sum() > 100
    logit = lambda p: np.log(p) - np.log1p(-p)
    for col in ("true_pctr", "true_pcvr"):
        np.testing.assert_array_equal(np.array(a[col])[leaf != 3], np.array(b[col])[leaf != 3])
    d_ctr = (logit(np.array(b["true_pctr"])) - logit(np.array(a["true_pctr"])))[leaf == 3]
    d_cvr = (logit(np.array(b["true_pcvr"])) - logit(np.array(a["true_pcvr"])))[leaf == 3]
    big = np.abs(d_ctr) > 1e-3
    assert big.mean() > 0.9  # the conflict changes nearly every row of the leaf
    np.testing.assert_allclose(d_cvr[big] / d_ctr[big], 0.6, rtol=1e-4)
