"""Parquet -> Batch: contents equal the rows read back with pyarrow; exactly once across ranks."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dlrm_mtl.data import ParquetStream, assign_row_groups, list_row_groups
from dlrm_mtl.data.stream import DataError, hash_ids
from dlrm_mtl.schema import Schema


def _rows_by_id(path):
    t = pq.read_table(path)
    ids = t["row_id"].to_numpy()
    return t, {int(r): i for i, r in enumerate(ids)}


@pytest.mark.parametrize("shuffle", [0, 2500])
def test_batches_equal_parquet_rows(synthetic_small, shuffle):
    schema = Schema.load(synthetic_small / "schema.yaml")
    table, pos = _rows_by_id(synthetic_small / "train")
    stream = ParquetStream(schema, str(synthetic_small / "train"), batch_size=512, shuffle_buffer_rows=shuffle, seed=1)
    seen = 0
    for batch in stream:
        real = batch.row_id >= 0
        idx = np.array([pos[int(r)] for r in batch.row_id[real]])
        rows = table.take(pa.array(idx))
        n = len(idx)
        seen += n
        for f in schema.sparse:
            jt = batch.sparse[f.name]
            lengths = jt.lengths()[:n]
            offsets = np.concatenate([[0], np.cumsum(lengths.numpy())])
            vals = jt.values().numpy()
            expected = rows[f.name].to_pylist()
            if f.hash:
                expected = hash_ids(np.array(expected, dtype=np.int64), f.num_embeddings).tolist()
            for i in range(n):
                got = vals[offsets[i] : offsets[i + 1]].tolist()
                exp = expected[i] if f.multi_hot else [expected[i]]
                assert got == exp, (f.name, i)
            assert int(jt.lengths()[n:].sum()) == 0  # padding rows have no ids
        for j, d in enumerate(schema.dense):
            x = rows[d.column].to_numpy().astype(np.float32)
            x = np.log1p(x) if d.transform == "log1p" else x
            np.testing.assert_allclose(batch.dense[real][:, j].numpy(), x, rtol=1e-6)
        for j, lvl in enumerate(schema.scenarios):
            assert batch.scenario[real][:, j].tolist() == rows[lvl.column].to_pylist()
        for j, t in enumerate(schema.tasks):
            assert batch.labels[real][:, j].tolist() == [float(v) for v in rows[t.label].to_pylist()]
            np.testing.assert_allclose(batch.oracle[real][:, j].numpy(), rows[t.oracle].to_numpy())
        assert not batch.label_mask[~real].any()
        assert (batch.weight[~real] == 0).all() and (batch.weight[real] == 1).all()
    assert seen == table.num_rows


def test_batch_kjt_carries_per_key_lengths_and_offsets(synthetic_small):
    """The reader hands TorchRec per-key lengths and offsets, and the bags' offsets, computed
    on the host (the input dist would otherwise read them back from the device every step);
    they must match the lengths, also on the padded last batch."""
    schema = Schema.load(synthetic_small / "schema.yaml")
    stream = ParquetStream(schema, str(synthetic_small / "train"), 1000, 0, 1, shuffle_buffer_rows=0, prefetch_batches=0)
    batches = list(stream)
    stream_small = ParquetStream(schema, str(synthetic_small / "train"), 4096, 0, 1, shuffle_buffer_rows=0, prefetch_batches=0)
    batches.append(list(stream_small)[-1])  # 9600 rows: the last batch of 4096 is padded
    assert (batches[-1].row_id < 0).any()
    for b in batches:
        kjt = b.sparse
        assert kjt._length_per_key is not None and kjt._offset_per_key is not None
        lengths = kjt.lengths().view(len(kjt.keys()), -1)
        assert kjt._length_per_key == lengths.sum(1).tolist()
        assert kjt._offset_per_key == [0] + torch.cumsum(lengths.sum(1), 0).tolist()
        assert kjt.offsets()[-1].item() == kjt.values().numel()
        # the bag offsets come with the batch, int64 as the lookup kernels take them (the
        # step then runs no cumsum and no int32 -> int64 copy)
        assert kjt._offsets is not None and kjt._offsets.dtype == torch.int64
        assert torch.equal(kjt._offsets, torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(kjt.lengths().long(), 0)]))
        pad = b.row_id < 0
        assert (lengths[:, pad] == 0).all()
        assert b.real_rows == int((~pad).sum())  # the reader's host count of real rows


def test_batch_columns_cut_the_same_batches_as_converting_each_slice(tmp_path):
    """The reader converts a drained buffer once (BatchColumns) and cuts its batches with numpy
    slices; every batch equals converting that slice on its own (multi-hot lists with nulls
    and empty lists, nullable single-hot ids, padding)."""
    from dlrm_mtl.data.batch_columns import BatchColumns, table_to_batch
    from dlrm_mtl.data.stream import RowGroup, RowGroupConverter
    from dlrm_mtl.schema import DenseFeature, ScenarioLevel, SparseFeature, Task

    schema = Schema("bc", [SparseFeature("a", "ta", 50, 4), SparseFeature("m", "tm", 30, 4, multi_hot=True),
                           SparseFeature("u", "tu", 1000, 4, hash=True)],
                    [DenseFeature("x"), DenseFeature("y")], [ScenarioLevel("s", 3)], [Task("c", "c"), Task("v", "v", parent="c")],
                    row_id="row_id")
    rng = np.random.default_rng(0)
    n = 900
    lists = [None if i % 17 == 0 else list(rng.integers(0, 30, rng.integers(0, 4))) for i in range(n)]
    users = [None if i % 11 == 0 else int(v) for i, v in enumerate(rng.integers(0, 10**9, n))]
    c = rng.integers(0, 2, n).astype(float)
    t = pa.table({
        "row_id": np.arange(n), "a": rng.integers(0, 50, n), "m": pa.array(lists, pa.list_(pa.int64())),
        "u": pa.array(users, pa.int64()), "x": rng.normal(size=n), "y": rng.normal(size=n), "s": rng.integers(0, 3, n),
        "c": c, "v": pa.array([None if i % 3 else float(i % 2) * c[i] for i in range(n)]),
    })
    pq.write_table(t, tmp_path / "p.parquet")
    conv = RowGroupConverter(schema, with_oracle=False, filesystem=pa.fs.LocalFileSystem())
    clean = conv.read(RowGroup(str(tmp_path / "p.parquet"), 0, 0, 0, n))
    clean = clean.take(pa.array(rng.permutation(n)))  # a shuffled buffer, as the reader drains it
    cols = BatchColumns(clean, schema, with_oracle=False)
    for start, rows in [(0, 256), (256, 256), (768, 132), (512, 0)]:
        a, b = cols.batch(start, rows, 256), table_to_batch(clean.slice(start, rows), schema, 256, False)
        for f in ("dense", "scenario", "labels", "label_mask", "row_id", "weight"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f
        assert a.sparse.keys() == b.sparse.keys()
        assert torch.equal(a.sparse.values(), b.sparse.values()) and torch.equal(a.sparse.lengths(), b.sparse.lengths())
        assert a.sparse._length_per_key == b.sparse._length_per_key and a.sparse._offset_per_key == b.sparse._offset_per_key
        ref = clean.slice(start, rows)
        assert a.row_id[:rows].tolist() == ref["row_id"].to_pylist() and (a.row_id[rows:] == -1).all()
        m_lengths = a.sparse.lengths().view(3, 256)[1, :rows].tolist()
        assert m_lengths == [len(v) if v is not None else 0 for v in ref["m"].to_pylist()]


def _assert_same_batch(a, b):
    for f in ("dense", "scenario", "labels", "label_mask", "row_id", "weight", "oracle", "term_labels", "term_rows"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), f
    assert a.sparse.keys() == b.sparse.keys()
    assert torch.equal(a.sparse.values(), b.sparse.values()) and torch.equal(a.sparse.lengths(), b.sparse.lengths())
    assert torch.equal(a.sparse.offsets(), b.sparse.offsets())
    assert a.sparse._length_per_key == b.sparse._length_per_key and a.sparse._offset_per_key == b.sparse._offset_per_key


@pytest.mark.parametrize("native_on", [True, False])
def test_batch_columns_take_slice_concat_equal_the_arrow_row_operations(tmp_path, native_on, monkeypatch):
    """The reader converts each row group once and shuffles numpy columns: BatchColumns'
    concat, take and slice give the batches that converting pa.concat_tables / Table.take /
    Table.slice of the same tables gives — multi-hot lists with nulls and empty lists, a
    single-hot column with nulls in one group only (single-hot in the others), oracle and
    loss-term columns, a key order other than the schema's; the shuffle's gathers in C
    (``native.take_rows``/``take_lists``) or by numpy."""
    from dlrm_mtl import native
    from dlrm_mtl.data.batch_columns import BatchColumns

    monkeypatch.setattr(native, "_enabled", native_on)
    from dlrm_mtl.data.stream import RowGroup, RowGroupConverter
    from dlrm_mtl.losses import TermInputs
    from dlrm_mtl.schema import DenseFeature, ScenarioLevel, SparseFeature, Task

    schema = Schema("bc", [SparseFeature("a", "ta", 50, 4), SparseFeature("m", "tm", 30, 4, multi_hot=True),
                           SparseFeature("u", "tu", 1000, 4, hash=True), SparseFeature("b", "tb", 20, 4)],
                    [DenseFeature("x")], [ScenarioLevel("s", 3)], [Task("c", "c", oracle="oc"), Task("v", "v", parent="c", oracle="ov")],
                    row_id="row_id")
    rng = np.random.default_rng(3)
    conv = RowGroupConverter(schema, with_oracle=True, filesystem=pa.fs.LocalFileSystem())
    tables = []
    for g, n in enumerate([300, 1, 250]):
        lists = [None if i % 17 == 0 else list(rng.integers(0, 30, rng.integers(0, 4))) for i in range(n)]
        users = [None if g == 0 and i % 11 == 0 else int(v) for i, v in enumerate(rng.integers(0, 10**9, n))]
        c = rng.integers(0, 2, n).astype(float)
        t = pa.table({
            "row_id": np.arange(n) + 1000 * g, "a": rng.integers(0, 50, n), "m": pa.array(lists, pa.list_(pa.int64())),
            "u": pa.array(users, pa.int64()), "b": rng.integers(0, 20, n), "x": rng.normal(size=n), "s": rng.integers(0, 3, n),
            "c": c, "v": pa.array([None if i % 3 else float(i % 2) * c[i] for i in range(n)]),
            "oc": rng.random(n), "ov": rng.random(n),
        })
        pq.write_table(t, tmp_path / f"p{g}.parquet")
        tables.append(conv.read(RowGroup(str(tmp_path / f"p{g}.parquet"), g, 0, 0, n)))
    order = ["u", "a", "b", "m"]
    h = lambda k, t: np.eye(k, t, dtype=np.float32)  # noqa: E731 - any fixed term matrices
    terms = TermInputs(h(8, 3), h(8, 3), np.ones(3, np.float32), np.ones(3, np.float32), np.array([True, False, False]))
    convert = lambda t: BatchColumns(t, schema, True, order, terms)  # noqa: E731
    whole = pa.concat_tables(tables)
    perm = rng.permutation(whole.num_rows)
    shuffled = BatchColumns.concat([convert(t) for t in tables]).take(perm)
    reference = convert(whole.take(pa.array(perm)))
    assert shuffled.num_rows == reference.num_rows == whole.num_rows
    for start, rows in [(0, 128), (128, 128), (512, 39), (300, 0)]:
        _assert_same_batch(shuffled.batch(start, rows, 128), reference.batch(start, rows, 128))
    shuffled_table = whole.take(pa.array(perm))
    rest = shuffled.slice(500)  # what a drain keeps for the next buffer
    _assert_same_batch(rest.batch(0, rest.num_rows, 64), convert(shuffled_table.slice(500)).batch(0, rest.num_rows, 64))
    back = np.arange(rest.num_rows + 300)[::-1].copy()
    again = BatchColumns.concat([rest, convert(tables[0])]).take(back)
    ref = convert(pa.concat_tables([shuffled_table.slice(500), tables[0]]).take(pa.array(back)))
    _assert_same_batch(again.batch(0, 200, 200), ref.batch(0, 200, 200))
    _assert_same_batch(again.batch(200, again.num_rows - 200, 200), ref.batch(200, ref.num_rows - 200, 200))
    # join: slices of one base (the reader's consolidated groups, out of order; a drain's rest)
    # are taken from the base without a concatenation, with the same rows
    base = BatchColumns.concat([convert(t) for t in tables])
    views = [base.slice(0, 300), base.slice(300, 1), base.slice(301, 250)]
    idx = rng.permutation(551)
    joined = BatchColumns.join([views[2], views[0], views[1]], idx)
    ref = convert(pa.concat_tables([tables[2], tables[0], tables[1]]).take(pa.array(idx)))
    _assert_same_batch(joined.batch(0, 551, 551), ref.batch(0, 551, 551))
    tail = BatchColumns.join([rest], np.arange(rest.num_rows)[::-1].copy())
    _assert_same_batch(tail.batch(0, tail.num_rows, 64),
                       convert(shuffled_table.slice(500).take(pa.array(np.arange(rest.num_rows)[::-1].copy()))).batch(0, tail.num_rows, 64))
    in_order = BatchColumns.join([views[1], views[2]])  # adjacent slices, unshuffled: a slice of the base
    assert in_order.base is base and in_order.offset == 300
    _assert_same_batch(in_order.batch(0, 251, 251), convert(pa.concat_tables(tables[1:])).batch(0, 251, 251))
    assert shuffled.nbytes > 0


@pytest.mark.parametrize("native_on", [True, False])
@pytest.mark.parametrize("layout", ["single_hot", "mixed", "lists_first"])
def test_id_blocks_cut_each_key_s_ids_and_lengths(layout, native_on, monkeypatch):
    """IdBlocks keeps runs of adjacent single-hot columns as one matrix (and, when every key is
    single-hot, one lengths/offsets layout per batch shape); every batch's KJT still holds each
    key's own ids and lengths in key order, padding rows empty, and no two batches share ids —
    cut by the C kernels (dlrm_mtl/native.py) or by numpy, and from a slice of the blocks (its
    matrices views with a longer row stride) as from the blocks themselves."""
    from dlrm_mtl import native
    from dlrm_mtl.data.batch_columns import IdBlocks

    monkeypatch.setattr(native, "_enabled", native_on)

    rng = np.random.default_rng(1)
    n, B = 300, 128
    single = lambda: (None, None, rng.integers(0, 100, n))  # noqa: E731
    lens = rng.integers(0, 4, n).astype(np.int32)
    multi = (lens, np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]), rng.integers(0, 100, int(lens.sum())))
    nulls = rng.integers(0, 2, n).astype(np.int32)  # a single-hot key with nulls: lists of 0 or 1 id
    with_nulls = (nulls, np.concatenate([[0], np.cumsum(nulls, dtype=np.int64)]), rng.integers(0, 100, int(nulls.sum())))
    columns = {"single_hot": [single(), single(), single()], "mixed": [single(), single(), multi, single()],
               "lists_first": [multi, with_nulls, single(), single(), single()]}[layout]
    blocks = IdBlocks(columns)
    assert blocks.single_hot == (layout == "single_hot")
    # mixed: [0, 2) as one matrix, then 2, then 3; lists_first: 0, 1, then [2, 5)
    assert len(blocks.runs) == {"single_hot": 1, "mixed": 3, "lists_first": 3}[layout]
    keys = [f"f{k}" for k in range(len(columns))]
    cut = []
    for start, rows in [(0, B), (B, B), (256, 44), (44, 0)]:
        kjt = blocks.kjt(keys, start, start + rows, B)
        cut.append(kjt)
        assert kjt.keys() == keys and kjt.stride() == B
        per_key = kjt.lengths().view(len(keys), B)
        want_values = []
        for k, (klens, offs, vals) in enumerate(columns):
            want_lens = np.ones(rows, np.int32) if klens is None else klens[start:start + rows]
            np.testing.assert_array_equal(per_key[k, :rows].numpy(), want_lens)
            assert (per_key[k, rows:] == 0).all()
            want_values.append(vals[start:start + rows] if klens is None else vals[offs[start]:offs[start + rows]])
        np.testing.assert_array_equal(kjt.values().numpy(), np.concatenate(want_values))
        assert kjt.length_per_key() == per_key.sum(1).tolist()
        assert kjt.offset_per_key() == [0] + np.cumsum(per_key.sum(1).numpy()).tolist()
        np.testing.assert_array_equal(kjt.offsets().numpy(), np.concatenate([[0], np.cumsum(kjt.lengths().numpy())]))
    assert cut[0].values().data_ptr() != cut[1].values().data_ptr()
    if layout == "single_hot":  # full batches share their (read-only) layout; the padded one has its own
        assert cut[0].offsets() is cut[1].offsets() and cut[2].offsets() is not cut[0].offsets()
    else:
        assert blocks._native_layout()
    part = blocks.slice(10, 290)  # views: the C cut reads their row stride
    for start, rows in [(0, B), (200, 80)]:
        got = part.kjt(keys, start, start + rows, B)
        want = blocks.kjt(keys, 10 + start, 10 + start + rows, B)
        for a, b in ((got.values(), want.values()), (got.lengths(), want.lengths()), (got.offsets(), want.offsets())):
            assert torch.equal(a, b)
        assert got.length_per_key() == want.length_per_key() and got.offset_per_key() == want.offset_per_key()


@pytest.mark.parametrize("shuffle", [0, 2500])
def test_a_short_last_batch_holds_the_same_rows_without_padding(synthetic_small, shuffle):
    """``pad_last=False`` (a world of one): the same batches, rows and order as the padded
    stream, except that the epoch's last batch ends at its last real row; every row once."""
    schema = Schema.load(synthetic_small / "schema.yaml")
    kw = dict(batch_size=512, shuffle_buffer_rows=shuffle, seed=1, prefetch_batches=0, num_workers=0)
    padded = list(ParquetStream(schema, str(synthetic_small / "train"), **kw))
    short = list(ParquetStream(schema, str(synthetic_small / "train"), pad_last=False, **kw))
    assert len(short) == len(padded)
    assert [b.row_id.shape[0] for b in short[:-1]] == [512] * (len(short) - 1)
    last = short[-1]
    n = last.row_id.shape[0]
    assert 0 < n < 512 and (last.row_id >= 0).all()  # 9,600 training rows: 18 full batches and 384 rows
    assert torch.equal(last.row_id, padded[-1].row_id[:n]) and (padded[-1].row_id[n:] == -1).all()
    assert torch.equal(last.dense, padded[-1].dense[:n]) and torch.equal(last.labels, padded[-1].labels[:n])
    assert last.sparse.stride() == n
    assert torch.equal(last.sparse.values(), padded[-1].sparse.values())  # padding rows have no ids
    for a, b in zip(short[:-1], padded[:-1]):
        assert torch.equal(a.row_id, b.row_id)
    ids = torch.cat([b.row_id for b in short])
    real = torch.cat([b.row_id[b.row_id >= 0] for b in padded])
    assert ids.numel() == real.numel() == 9_600 and torch.equal(ids.unique(), real.unique())


def test_a_short_last_batch_needs_a_world_of_one(synthetic_small):
    schema = Schema.load(synthetic_small / "schema.yaml")
    with pytest.raises(ValueError, match="world of one"):
        ParquetStream(schema, str(synthetic_small / "train"), batch_size=512, rank=0, world_size=2, pad_last=False)


def test_batches_carry_the_loss_terms_inputs_once_given_them(synthetic_small):
    """``set_loss_terms``: every batch carries the terms' labels and row weights, equal to the
    loss's own derivation from the batch's labels, mask and weight (0 on padding rows);
    without it the fields are None."""
    from dlrm_mtl.losses import EntireSpaceLoss

    schema = Schema.load(synthetic_small / "schema.yaml")
    m = EntireSpaceLoss(schema).term_matrices
    assert m is not None
    stream = ParquetStream(schema, str(synthetic_small / "train"), batch_size=512, shuffle_buffer_rows=2500, seed=1,
                           prefetch_batches=0, num_workers=0)
    assert next(iter(stream)).term_labels is None
    stream.set_loss_terms(m.host_inputs())
    batches = list(stream)
    assert (batches[-1].row_id < 0).any()  # a padded last batch is among them
    for b in batches:
        y, rows = m.inputs(b.labels, b.label_mask, b.weight)
        assert b.term_labels.shape == b.term_rows.shape == (512, len(m.src))
        assert torch.equal(b.term_labels, y) and torch.equal(b.term_rows, rows)
        assert (b.term_rows[b.row_id < 0] == 0).all()


def test_the_log_window_adds_host_counts_and_device_counts():
    """Batches cut by the reader count their real rows on the host (Batch.real_rows: no
    operator per step); others give a device tensor. The window's rows are the sum of both."""
    from dlrm_mtl.train import LogWindow

    w = LogWindow(torch.device("cpu"))
    w.add(1000, 1024)
    w.add(torch.tensor(24), 1024)
    w.add(0, 1024)
    assert w.real_rows() == 1024 and w.batch_rows == 3072 and w.steps == 3
    w.reset()
    assert w.real_rows() == 0


def test_closing_early_with_the_prefetch_queue_full_ends_the_reader(synthetic_small):
    """An evaluation of the first batches only (``train.eval_rows``) stops iterating early. When
    the batches left exactly fill the prefetch queue, the reader thread is then waiting to put
    its end-of-stream mark; closing must end it at once (it used to block there until the
    consumer's 60 s join gave up, once per evaluation)."""
    import itertools
    import threading
    import time

    schema = Schema.load(str(synthetic_small / "schema.yaml"))
    probe = ParquetStream(schema, str(synthetic_small / "eval"), 500, shuffle_buffer_rows=0, prefetch_batches=0)
    total = sum(1 for _ in probe)
    prefetch = 3
    stream = ParquetStream(schema, str(synthetic_small / "eval"), 500, shuffle_buffer_rows=0, prefetch_batches=prefetch)
    batches = iter(stream)
    taken = list(itertools.islice(batches, total - prefetch))  # the rest fits the queue exactly
    assert len(taken) == total - prefetch
    time.sleep(1.0)  # the reader puts the last batches, then waits to put the end mark
    t0 = time.perf_counter()
    batches.close()
    closed_s = time.perf_counter() - t0
    alive = [t.name for t in threading.enumerate() if t.name.startswith("dlrm_mtl-reader") and t.is_alive()]
    assert not alive and closed_s < 20, (alive, closed_s)
