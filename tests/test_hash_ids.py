"""Hashed id columns across files: one raw id, one bucket.

Integer ids hash by their 64 bits and string ids by their bytes, so a hashed column that is
int64 in one file and string in another would give one raw id two embedding rows. The reader
refuses such data before reading a row (naming both files, the column and both types); pure
integer and pure string columns, and integer widths mixed between files, keep working.
"""

from typing import Dict

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from dlrm_mtl.data import DataError, ParquetStream, list_row_groups
from dlrm_mtl.data.stream import RowGroupConverter, hash_ids, hash_strings
from dlrm_mtl.schema import Schema

ROWS = 200


@pytest.fixture(scope="module")
def schema(synthetic_small) -> Schema:
    return Schema.load(synthetic_small / "schema.yaml")


@pytest.fixture(scope="module")
def base(synthetic_small) -> pa.Table:
    """Two files' worth of synthetic rows whose user ids repeat across the two halves."""
    t = pq.read_table(synthetic_small / "train" / "part-00000.parquet").slice(0, 2 * ROWS)
    users = np.tile(np.arange(ROWS // 4, dtype=np.int64) * 1_000_003, 8)[: 2 * ROWS]
    return _swap(t, "user_id", pa.array(users))


def _swap(table: pa.Table, name: str, array: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, array)


def _write(path, table: pa.Table):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=64)
    return path


def _user_buckets(schema: Schema, paths, world_size: int = 1) -> Dict[int, int]:
    """row id -> the user_id feature's bucket, over every rank's batches."""
    out: Dict[int, int] = {}
    for rank in range(world_size):
        for b in ParquetStream(schema, paths, 64, rank=rank, world_size=world_size, prefetch_batches=0):
            n = b.num_real_rows
            out.update(zip(b.row_id[:n].tolist(), b.sparse["user_id"].values()[:n].tolist()))
    return out


def _user_feature(schema: Schema):
    f = next(f for f in schema.sparse if f.name == "user_id")
    assert f.hash and f.column == "user_id"
    return f


def test_int64_in_one_file_and_string_in_another_is_refused(tmp_path, schema, base):
    """The same users as int64 in a.parquet and as their decimal strings in b.parquet."""
    a = _write(tmp_path / "d" / "a.parquet", base.slice(0, ROWS))
    second = base.slice(ROWS, ROWS)
    b = _write(tmp_path / "d" / "b.parquet", _swap(second, "user_id", pa.array([str(v) for v in second["user_id"].to_pylist()])))
    for world_size in (1, 2):  # every rank refuses, also the one that would read only one of the files
        for rank in range(world_size):
            with pytest.raises(DataError) as ei:
                ParquetStream(schema, str(tmp_path / "d"), 64, rank=rank, world_size=world_size, prefetch_batches=0)
            msg = str(ei.value)
            for part in (str(a), str(b), "'user_id'", "int64", "string"):
                assert part in msg, (part, msg)


def test_converter_alone_refuses_a_change_of_kind(tmp_path, schema, base):
    """``inspect-data`` drives RowGroupConverter directly: its row groups are checked too."""
    a = _write(tmp_path / "a.parquet", base.slice(0, ROWS))
    second = base.slice(ROWS, ROWS)
    b = _write(tmp_path / "b.parquet", _swap(second, "user_id", pa.array([str(v) for v in second["user_id"].to_pylist()])))
    converter = RowGroupConverter(schema, filesystem=pafs.LocalFileSystem())
    groups = list_row_groups([str(a), str(b)])
    converter.read(groups[0])
    with pytest.raises(DataError) as ei:
        for g in groups[1:]:
            converter.read(g)
    assert str(a) in str(ei.value) and str(b) in str(ei.value) and "'user_id'" in str(ei.value)


def test_pure_integer_ids_keep_their_buckets(tmp_path, schema, base):
    f = _user_feature(schema)
    _write(tmp_path / "d" / "a.parquet", base.slice(0, ROWS))
    _write(tmp_path / "d" / "b.parquet", base.slice(ROWS, ROWS))
    got = _user_buckets(schema, str(tmp_path / "d"), world_size=2)
    raw = dict(zip(base["row_id"].to_pylist(), base["user_id"].to_pylist()))
    assert sorted(got) == sorted(raw)
    want = hash_ids(np.array([raw[r] for r in got], dtype=np.int64), f.num_embeddings)
    assert list(got.values()) == want.tolist()
    assert len(set(got.values())) == ROWS // 4  # one bucket per user (no collision for these 50)


def test_pure_string_ids_keep_their_buckets(tmp_path, schema, base):
    f = _user_feature(schema)
    strings = _swap(base, "user_id", pa.array([f"u{v}" for v in base["user_id"].to_pylist()]))
    _write(tmp_path / "d" / "a.parquet", strings.slice(0, ROWS))
    _write(tmp_path / "d" / "b.parquet", strings.slice(ROWS, ROWS))
    got = _user_buckets(schema, str(tmp_path / "d"), world_size=2)
    raw = dict(zip(strings["row_id"].to_pylist(), strings["user_id"].to_pylist()))
    want = hash_strings(pa.array([raw[r] for r in got]), f.num_embeddings)
    assert list(got.values()) == want.tolist()
    assert len(set(got.values())) == ROWS // 4


def test_integer_widths_and_string_binary_may_differ_between_files(tmp_path, schema, base):
    """int32 vs int64 (and string vs binary) hash alike, so equal values still meet."""
    _write(tmp_path / "i" / "a.parquet", base.slice(0, ROWS))
    _write(tmp_path / "i" / "b.parquet", _swap(base.slice(ROWS, ROWS), "user_id", base.slice(ROWS, ROWS)["user_id"].cast(pa.int32())))
    ints = _user_buckets(schema, str(tmp_path / "i"))
    assert len(set(ints.values())) == ROWS // 4  # each user once, not once per file

    strings = [f"u{v}" for v in base["user_id"].to_pylist()]
    _write(tmp_path / "s" / "a.parquet", _swap(base.slice(0, ROWS), "user_id", pa.array(strings[:ROWS])))
    _write(tmp_path / "s" / "b.parquet", _swap(base.slice(ROWS, ROWS), "user_id", pa.array([s.encode() for s in strings[ROWS:]], pa.binary())))
    assert len(set(_user_buckets(schema, str(tmp_path / "s")).values())) == ROWS // 4


def test_an_empty_file_of_the_other_kind_is_ignored(tmp_path, schema, base):
    """A file without rows contributes no ids, so its column type does not matter."""
    _write(tmp_path / "d" / "a.parquet", base.slice(0, ROWS))
    empty = _swap(base.slice(0, 0), "user_id", pa.array([], pa.string()))
    _write(tmp_path / "d" / "b.parquet", empty)
    assert len(_user_buckets(schema, str(tmp_path / "d"))) == ROWS


def test_uint64_ids_hash_by_their_value_without_wrap_around(tmp_path, schema, base):
    """A uint64 id >= 2**63 is hashed as itself (its 64 bits), whatever its file's row."""
    f = _user_feature(schema)
    big = np.uint64(2**63 + 5)
    users = np.full(ROWS, big, dtype=np.uint64)
    users[1::2] = np.arange(ROWS // 2, dtype=np.uint64)
    _write(tmp_path / "u.parquet", _swap(base.slice(0, ROWS), "user_id", pa.array(users)))
    got = _user_buckets(schema, str(tmp_path / "u.parquet"))
    rows = base.slice(0, ROWS)["row_id"].to_pylist()
    want = hash_ids(users, f.num_embeddings)
    assert [got[r] for r in rows] == want.tolist()
    assert 0 <= int(want[0]) < f.num_embeddings
    # pinned: the 64-bit pattern of 2**63 + 5, hashed like any other id
    assert hash_ids(np.array([2**63 + 5], dtype=np.uint64), 1000).tolist() == hash_ids(
        np.array([-(2**63) + 5], dtype=np.int64), 1000).tolist()
