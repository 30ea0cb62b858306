"""ParquetStream: exactly once over uneven files and ranks, shuffle, bad input errors, hashing."""

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dlrm_mtl.data import ParquetStream, RowGroup, assign_row_groups, list_row_groups
from dlrm_mtl.data.stream import DataError, hash_ids
from dlrm_mtl.schema import Schema

B = 16


@pytest.fixture(scope="module")
def schema(synthetic_small):
    return Schema.load(synthetic_small / "schema.yaml")


@pytest.fixture(scope="module")
def source(synthetic_small):
    """One synthetic train file as an Arrow table (3200 rows)."""
    return pq.read_table(synthetic_small / "train" / "part-00000.parquet")


# (rows, row_group_size) of the uneven files; 0 rows = an empty file with the right schema
UNEVEN = [(7, 3), (130, 50), (0, None), (61, 20)]


@pytest.fixture(scope="module")
def uneven_dir(tmp_path_factory, source):
    d = tmp_path_factory.mktemp("uneven")
    start = 0
    for i, (n, rg) in enumerate(UNEVEN):
        pq.write_table(source.slice(start, n), d / f"part-{i}.parquet", row_group_size=rg)
        start += n
    return d


def _batches(stream):
    return list(stream)


def _check_batch_shape(batch, schema):
    assert batch.batch_size == B
    assert batch.row_id.shape == (B,)
    assert batch.dense.shape == (B, len(schema.dense))
    assert batch.scenario.shape == (B, len(schema.scenarios))
    assert batch.labels.shape == (B, len(schema.tasks))
    assert batch.label_mask.shape == (B, len(schema.tasks))
    assert batch.weight.shape == (B,)
    assert batch.oracle is not None and batch.oracle.shape == (B, len(schema.tasks))
    assert batch.sparse.stride() == B


# ---------------------------------------------------------------- exactly once
def test_uneven_files_layout(uneven_dir):
    groups = list_row_groups(str(uneven_dir))
    assert sum(g.num_rows for g in groups) == sum(n for n, _ in UNEVEN)
    by_file = {}
    for g in groups:
        by_file.setdefault(g.file_index, []).append(g)
    assert [sum(g.num_rows for g in by_file[i]) for i in range(4)] == [7, 130, 0, 61]
    assert [g.num_rows for g in by_file[0]] == [3, 3, 1]
    assert [g.first_row for g in by_file[3]] == [0, 20, 40, 60]


@pytest.mark.parametrize("shuffle", [0, 40])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_exactly_once_across_ranks(uneven_dir, source, schema, world_size, shuffle):
    total = sum(n for n, _ in UNEVEN)
    expected_ids = set(source["row_id"].to_numpy()[:total].tolist())
    click_by_id = dict(zip(source["row_id"].to_pylist()[:total], source["click"].to_pylist()[:total]))
    streams = [
        ParquetStream(schema, str(uneven_dir), batch_size=B, rank=r, world_size=world_size,
                      shuffle_buffer_rows=shuffle, seed=3, prefetch_batches=0)
        for r in range(world_size)
    ]
    num_batches = streams[0].num_batches
    assert all(s.num_batches == num_batches for s in streams)
    assert sum(s.num_rows for s in streams) == total
    assert num_batches == max(-(-s.num_rows // B) for s in streams)
    seen = []
    for s in streams:
        batches = _batches(s)
        assert len(batches) == num_batches == len(s)
        n_real = 0
        for b in batches:
            _check_batch_shape(b, schema)
            real = b.row_id >= 0
            pad = ~real
            n_real += int(real.sum())
            seen.extend(b.row_id[real].tolist())
            # padding rows: row_id -1, weight 0, no labels, no sparse ids
            assert (b.row_id[pad] == -1).all()
            assert (b.weight[pad] == 0).all()
            assert not b.label_mask[pad].any()
            assert (b.weight[real] == 1).all()
            assert b.label_mask[real].all()
            lengths = b.sparse.lengths().view(len(schema.sparse), B)
            assert (lengths[:, pad] == 0).all()
            assert (lengths[:, real] > 0).all()
            # padding sits at the end of the batch
            if pad.any():
                assert not real[int(np.argmax(pad.numpy())):].any()
            for rid, y in zip(b.row_id[real].tolist(), b.labels[real][:, 0].tolist()):
                assert y == click_by_id[rid]
        assert n_real == s.num_rows
    assert len(seen) == len(set(seen)), "a row was read twice"
    assert set(seen) == expected_ids


def test_every_rank_yields_num_batches_with_prefetch(uneven_dir, schema):
    """Same accounting with the background reader thread."""
    streams = [ParquetStream(schema, str(uneven_dir), batch_size=B, rank=r, world_size=3, prefetch_batches=2)
               for r in range(3)]
    counts = [len(_batches(s)) for s in streams]
    assert counts == [streams[0].num_batches] * 3


def test_more_ranks_than_rows(tmp_path, source, schema):
    pq.write_table(source.slice(0, 5), tmp_path / "tiny.parquet", row_group_size=5)
    seen = []
    for r in range(3):
        s = ParquetStream(schema, str(tmp_path), batch_size=B, rank=r, world_size=3, prefetch_batches=0)
        bs = _batches(s)
        assert len(bs) == s.num_batches == 1
        seen.extend(bs[0].row_id[bs[0].row_id >= 0].tolist())
    assert sorted(seen) == source["row_id"].to_pylist()[:5]


def test_hashed_ids_in_batch(uneven_dir, source, schema):
    """Hashed features carry hash_ids(raw id) in the batch, not the raw id."""
    s = ParquetStream(schema, str(uneven_dir), batch_size=B, prefetch_batches=0)
    b = next(iter(s))
    raw = dict(zip(source["row_id"].to_pylist(), source["user_id"].to_pylist()))
    rids = b.row_id[b.row_id >= 0].numpy()
    f = schema.sparse[0]
    assert f.name == "user_id" and f.hash
    want = hash_ids(np.array([raw[int(r)] for r in rids], dtype=np.int64), f.num_embeddings)
    got = b.sparse["user_id"].values().numpy()[: len(rids)]
    np.testing.assert_array_equal(got, want)


def _load(shards):
    return [sum(g.num_rows for g in s) for s in shards]


def test_assign_row_groups_deterministic_and_balanced(uneven_dir, synthetic_small):
    rng = np.random.default_rng(0)
    fake = [RowGroup(f"f{i // 3}", i // 3, i % 3, 0, int(n)) for i, n in enumerate(rng.integers(0, 500, 40))]
    for groups in (list_row_groups(str(uneven_dir)), list_row_groups(str(synthetic_small / "train")), fake):
        largest = max(g.num_rows for g in groups)
        for ws in (1, 2, 3, 5):
            a = assign_row_groups(groups, ws)
            b = assign_row_groups(list(groups), ws)
            assert a == b
            assert len(a) == ws
            flat = [g for s in a for g in s]
            assert sorted(flat, key=lambda g: (g.file_index, g.index)) == sorted(groups, key=lambda g: (g.file_index, g.index))
            assert len(flat) == len(set(flat))
            load = _load(a)
            assert max(load) - min(load) <= largest, (ws, load)
            for s in a:  # each shard in file order
                assert s == sorted(s, key=lambda g: (g.file_index, g.index))


# ---------------------------------------------------------------- shuffle
def _order(stream):
    out = []
    for b in stream:
        out.extend(b.row_id[b.row_id >= 0].tolist())
    return out


def test_shuffle_deterministic_per_epoch(uneven_dir, source, schema):
    def make(seed=5):
        return ParquetStream(schema, str(uneven_dir), batch_size=B, shuffle_buffer_rows=40, seed=seed, prefetch_batches=0)

    s = make()
    e0 = _order(s)
    assert _order(make()) == e0  # same seed, same epoch
    assert _order(s) == e0  # re-iterating the same epoch
    s.set_epoch(1)
    e1 = _order(s)
    assert e1 != e0
    assert sorted(e1) == sorted(e0)
    s.set_epoch(0)
    assert _order(s) == e0
    other_seed = _order(make(seed=6))
    assert other_seed != e0 and sorted(other_seed) == sorted(e0)
    # without shuffle: file order
    plain = _order(ParquetStream(schema, str(uneven_dir), batch_size=B, prefetch_batches=0))
    assert plain == source["row_id"].to_pylist()[: len(plain)]
    assert sorted(e0) == plain
    assert e0 != plain


# ---------------------------------------------------------------- bad input
N_BAD = 100  # rows in the bad file; row groups of 30 -> rows 60..89 are group 2
RG_BAD = 30


def _with_value(t: pa.Table, column: str, row: int, value) -> pa.Table:
    field = t.schema.field(column)
    vals = t[column].to_pylist()
    vals[row] = value
    return t.set_column(t.schema.get_field_index(column), field, pa.array(vals, type=field.type))


def _write_bad(tmp_path, t: pa.Table):
    path = tmp_path / "bad-part.parquet"
    pq.write_table(t, path, row_group_size=RG_BAD)
    return path


def _expect_error(schema, path, *fragments, row=None, prefetch=0):
    with pytest.raises(DataError) as ei:
        for _ in ParquetStream(schema, str(path), batch_size=B, prefetch_batches=prefetch):
            pass
    msg = str(ei.value)
    assert str(path) in msg, msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    if row is not None:
        m = re.search(r"\brow (\d+)\b", msg)
        assert m is not None, msg
        assert int(m.group(1)) == row, msg
    return msg


@pytest.fixture
def base(source):
    return source.slice(0, N_BAD)


@pytest.mark.parametrize("row, prefetch", [(0, 0), (45, 0), (70, 2), (99, 0)])
def test_out_of_range_id(tmp_path, schema, base, row, prefetch):
    path = _write_bad(tmp_path, _with_value(base, "user_segment", row, 999))
    _expect_error(schema, path, "'user_segment'", "999", "hash: true", row=row, prefetch=prefetch)


def test_out_of_range_raw_id_when_not_hashed(tmp_path, schema, base):
    d = schema.to_dict()
    assert d["sparse"][0]["name"] == "user_id"
    d["sparse"][0]["hash"] = False
    unhashed = Schema.from_dict(d)
    path = _write_bad(tmp_path, base)
    raw = base["user_id"][0].as_py()
    _expect_error(unhashed, path, "'user_id'", str(raw), row=0)


def test_negative_id(tmp_path, schema, base):
    path = _write_bad(tmp_path, _with_value(base, "user_segment", 61, -5))
    _expect_error(schema, path, "'user_segment'", "-5", row=61)


def test_nan_dense(tmp_path, schema, base):
    path = _write_bad(tmp_path, _with_value(base, "price", 33, float("nan")))
    _expect_error(schema, path, "'price'", "nan", row=33)


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_inf_dense(tmp_path, schema, base, value):
    path = _write_bad(tmp_path, _with_value(base, "quality", 88, value))
    _expect_error(schema, path, "'quality'", "inf", row=88)


def test_null_dense(tmp_path, schema, base):
    path = _write_bad(tmp_path, _with_value(base, "position", 12, None))
    _expect_error(schema, path, "'position'", "null", row=12)


def test_negative_log1p_dense(tmp_path, schema, base):
    path = _write_bad(tmp_path, _with_value(base, "activity", 64, -2.0))
    _expect_error(schema, path, "'activity'", "-2", row=64)


def test_label_not_binary(tmp_path, schema, base):
    path = _write_bad(tmp_path, _with_value(base, "click", 77, 2))
    _expect_error(schema, path, "'click'", "2", row=77)


def test_conversion_without_click(tmp_path, schema, base):
    click = base["click"].to_numpy()
    row = int(np.flatnonzero(click[50:] == 0)[0]) + 50
    path = _write_bad(tmp_path, _with_value(base, "conversion", row, 1))
    _expect_error(schema, path, "'conversion'", "'ctr'", row=row)


@pytest.mark.parametrize("column, value", [("channel", 2), ("domain", -1)])
def test_scenario_out_of_range(tmp_path, schema, base, column, value):
    path = _write_bad(tmp_path, _with_value(base, column, 91, value))
    _expect_error(schema, path, f"'{column}'", str(value), row=91)


def test_missing_column(tmp_path, schema, base):
    path = _write_bad(tmp_path, base.drop_columns(["device"]))
    _expect_error(schema, path, "device", "missing")


def test_garbage_file(tmp_path, schema):
    path = tmp_path / "garbage.parquet"
    path.write_bytes(b"this is not parquet" * 50)
    for p in (path, tmp_path):  # the file itself, or its directory
        with pytest.raises(DataError) as ei:
            for _ in ParquetStream(schema, str(p), batch_size=B, prefetch_batches=0):
                pass
        assert str(path) in str(ei.value)


def test_garbage_file_among_good_ones(tmp_path, schema, base):
    pq.write_table(base, tmp_path / "a.parquet")
    bad = tmp_path / "b.parquet"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(DataError) as ei:
        for _ in ParquetStream(schema, str(tmp_path), batch_size=B, prefetch_batches=0):
            pass
    assert str(bad) in str(ei.value)


def test_truncated_file(tmp_path, schema, base):
    good = tmp_path / "full.parquet"
    pq.write_table(base, good)
    data = good.read_bytes()
    good.unlink()
    path = tmp_path / "truncated.parquet"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as ei:
        for _ in ParquetStream(schema, str(path), batch_size=B, prefetch_batches=0):
            pass
    assert str(path) in str(ei.value)


def test_corrupted_pages(tmp_path, schema, base):
    """Footer intact, data pages overwritten: the read fails with a DataError naming the file."""
    path = tmp_path / "corrupt.parquet"
    pq.write_table(base, path, row_group_size=RG_BAD)
    data = bytearray(path.read_bytes())
    data[4:2004] = b"\xff" * 2000
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as ei:
        for _ in ParquetStream(schema, str(path), batch_size=B, prefetch_batches=0):
            pass
    assert str(path) in str(ei.value)


@pytest.mark.parametrize("row, empty_before", [(70, True), (60, False), (99, False), (1, True)])
def test_multi_hot_out_of_range(tmp_path, schema, base, row, empty_before):
    t = _with_value(base, "hist_categories", row, [3, 999, 4])
    if empty_before:
        t = _with_value(t, "hist_categories", row - 1, [])
    path = _write_bad(tmp_path, t)
    _expect_error(schema, path, "'hist_categories'", "999", row=row)


def test_multi_hot_bad_id_after_max_len_is_truncated(tmp_path, schema, base):
    max_len = schema.sparse[4].max_len
    path = _write_bad(tmp_path, _with_value(base, "hist_categories", 10, [1] * max_len + [999]))
    s = ParquetStream(schema, str(path), batch_size=128, prefetch_batches=0)
    (b,) = list(s)
    lengths = b.sparse["hist_categories"].lengths()
    assert int(lengths[10]) == max_len
    assert int(b.sparse["hist_categories"].values().max()) < schema.sparse[4].num_embeddings


# ---------------------------------------------------------------- null labels
def test_null_conversion_label(tmp_path, schema, base):
    t = _with_value(base, "conversion", 42, None)
    t = _with_value(t, "click", 17, None)
    path = _write_bad(tmp_path, t)
    s = ParquetStream(schema, str(path), batch_size=B, prefetch_batches=0)
    rid = base["row_id"].to_pylist()
    masks, labels = {}, {}
    for b in s:
        for i, r in enumerate(b.row_id.tolist()):
            if r >= 0:
                masks[r] = b.label_mask[i].tolist()
                labels[r] = b.labels[i].tolist()
    assert len(masks) == N_BAD
    assert masks[rid[42]] == [True, False]
    assert labels[rid[42]][1] == 0.0
    assert labels[rid[42]][0] == float(base["click"][42].as_py())
    assert masks[rid[17]] == [False, True]
    for i, r in enumerate(rid):
        if i not in (17, 42):
            assert masks[r] == [True, True]


# ---------------------------------------------------------------- hashing
def test_hash_ids_pinned():
    """Pins the hash across releases: changing it silently remaps every trained embedding row."""
    assert hash_ids(np.array([0, 1, 2**62]), 1000).tolist() == [535, 465, 75]
    assert hash_ids(np.array([-1], dtype=np.int64), 1000).tolist() == [936]


def test_hash_ids_deterministic_and_in_range():
    rng = np.random.default_rng(1)
    ids = np.concatenate([rng.integers(-(2**63), 2**63 - 1, 5000, dtype=np.int64), np.array([0, -1, 2**63 - 1, -(2**63)])])
    for n in (1, 7, 1000, 500_000, 2**40 + 3):
        h = hash_ids(ids, n)
        assert h.dtype == np.int64
        assert h.shape == ids.shape
        assert (h >= 0).all() and (h < n).all()
        np.testing.assert_array_equal(h, hash_ids(ids.copy(), n))
    assert (hash_ids(ids, 1) == 0).all()


@pytest.mark.parametrize("ids", [np.arange(10_000), np.arange(10_000) * 100, np.arange(10_000) << 40])
def test_hash_ids_spreads_structured_ids(ids):
    counts = np.bincount(hash_ids(ids.astype(np.int64), 100), minlength=100)
    mean = len(ids) / 100
    assert counts.min() >= 0.5 * mean and counts.max() <= 1.5 * mean, (counts.min(), counts.max())


# ---------------------------------------------------------------- type edge cases
def _iterate(schema, path):
    return list(ParquetStream(schema, str(path), batch_size=B, prefetch_batches=0))


def test_string_label_column_is_data_error(tmp_path, schema, base):
    i = base.schema.get_field_index("click")
    path = _write_bad(tmp_path, base.set_column(i, "click", base["click"].cast(pa.string())))
    with pytest.raises(DataError) as ei:
        _iterate(schema, path)
    assert str(path) in str(ei.value) and "'click'" in str(ei.value)


def test_bool_label_columns(tmp_path, schema, base):
    t = base
    for c in ("click", "conversion"):
        t = t.set_column(t.schema.get_field_index(c), c, t[c].cast(pa.bool_()))
    path = _write_bad(tmp_path, t)
    got = []
    for b in _iterate(schema, path):
        got.extend(b.labels[b.row_id >= 0][:, 0].tolist())
    assert got == [float(v) for v in base["click"].to_pylist()]


def test_non_integral_scenario_id(tmp_path, schema, base):
    i = base.schema.get_field_index("channel")
    t = _with_value(base.set_column(i, "channel", base["channel"].cast(pa.float64())), "channel", 37, 0.5)
    path = _write_bad(tmp_path, t)
    _expect_error(schema, path, "'channel'", row=37)


def test_null_element_in_multi_hot(tmp_path, schema, base):
    path = _write_bad(tmp_path, _with_value(base, "hist_categories", 5, [1, None, 2]))
    try:
        batches = _iterate(schema, path)
    except DataError as e:  # rejecting it is fine too
        assert "'hist_categories'" in str(e) and re.search(r"\brow 5\b", str(e))
        return
    jt = batches[0].sparse["hist_categories"]
    lengths = jt.lengths().tolist()
    start = sum(lengths[:5])
    assert jt.values()[start : start + lengths[5]].tolist() == [1, 2]


# ---------------------------------------------------------------- uint64 columns
BIG = 2**63 + 5  # above the int64 range: wrapped to int64 it would read -9223372036854775803
WRAPPED = str(BIG - 2**64)


def _as_uint64(t: pa.Table, column: str, row: int, value: int) -> pa.Table:
    """``t`` with ``column`` cast to uint64 (lists: list<uint64>) and ``value`` at ``row``."""
    field = t.schema.field(column)
    typ = pa.list_(pa.uint64()) if pa.types.is_list(field.type) else pa.uint64()
    vals = t[column].to_pylist()
    vals[row] = [1, value] if pa.types.is_list(field.type) else value
    return t.set_column(t.schema.get_field_index(column), pa.field(column, typ), pa.array(vals, type=typ))


@pytest.mark.parametrize("column, row", [("user_segment", 61), ("hist_categories", 77), ("channel", 12)])
def test_uint64_id_above_int64_is_reported_with_its_real_value(tmp_path, schema, base, column, row):
    """A uint64 id >= 2**63 is named as itself, never after wrap-around to a negative int64."""
    path = _write_bad(tmp_path, _as_uint64(base, column, row, BIG))
    msg = _expect_error(schema, path, f"'{column}'", str(BIG), row=row)
    assert WRAPPED not in msg, msg


def test_uint64_row_id_above_int64_is_a_data_error(tmp_path, schema, base):
    path = _write_bad(tmp_path, _as_uint64(base, "row_id", 33, BIG))
    _expect_error(schema, path, "'row_id'", str(BIG), row=33)


def test_uint64_ids_within_range_are_read(tmp_path, schema, base):
    """uint64 columns holding in-range ids read like int64 ones."""
    t = _as_uint64(base, "user_segment", 0, base["user_segment"][0].as_py())
    t = _as_uint64(t, "row_id", 0, base["row_id"][0].as_py())
    batches = _iterate(schema, _write_bad(tmp_path, t))
    got = [v for b in batches for v in b.sparse["user_segment"].values()[: b.num_real_rows].tolist()]
    assert got == base["user_segment"].to_pylist()
    assert [r for b in batches for r in b.row_id[: b.num_real_rows].tolist()] == base["row_id"].to_pylist()
