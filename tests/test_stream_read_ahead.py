"""ParquetStream.read_ahead: the first row groups are converted on a thread of their own while a
run is set up; the stream's batches, its policy counters and its errors stay the same."""

import shutil
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from dlrm_mtl.data import ParquetStream
from dlrm_mtl.data.errors import DataError
from dlrm_mtl.schema import Schema
from stream_epochs import assert_same_epochs, epoch_rows


def _wait(stream):
    """ParquetStream.wait_read_ahead: every read started is done (or failed: not raised here)."""
    assert stream.wait_read_ahead() >= 0
    assert stream._ahead and all(f.done() for f in stream._ahead.values())
    assert stream.wait_read_ahead() < 0.01  # waited for once


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cache_bytes", [0, 1 << 40])
def test_read_ahead_streams_the_same_batches_and_counts(synthetic_small, workers, cache_bytes):
    schema = Schema.load(synthetic_small / "schema.yaml")
    schema.dense[0].clip_max = 0.5  # a counted input policy, so that the counters are not empty

    def stream():
        return ParquetStream(schema, str(synthetic_small / "train"), 256, shuffle_buffer_rows=2500, seed=9,
                             prefetch_batches=2 if workers else 0, num_workers=workers, cache_bytes=cache_bytes)

    plain, ahead = stream(), stream()
    ahead.read_ahead()
    _wait(ahead)
    n_ahead = len(ahead._ahead)
    assert 0 < n_ahead < len(ahead.groups)
    sizes = [f.result()[0].num_rows for f in ahead._ahead.values()]  # one shuffle buffer's worth, no more
    assert sum(sizes) >= 2500 and sum(sizes) - sizes[-1] < 2500  # (in the order they were submitted)
    assert ahead.counters() == {}  # nothing counted before the rows are used
    reads = []
    real_read = ahead.converter.read
    ahead.converter.read = lambda g: reads.append((g.file_index, g.index)) or real_read(g)
    want, got = epoch_rows(plain, 2), epoch_rows(ahead, 2)
    assert_same_epochs(want, got)
    assert ahead._ahead == {}  # every group read ahead was used, once
    groups = len(ahead.groups)
    # the first epoch decoded only the groups not read ahead; later ones all (no cache) or none
    assert len(reads) == (groups - n_ahead) + (groups if cache_bytes == 0 else 0)
    counted = plain.counters()
    assert counted and counted == ahead.counters()


def test_read_ahead_follows_the_epoch_order(synthetic_small):
    """The groups read ahead are the first ones the epoch reads (its shuffled group order)."""
    schema = Schema.load(synthetic_small / "schema.yaml")
    s = ParquetStream(schema, str(synthetic_small / "train"), 256, shuffle_buffer_rows=1500, seed=4,
                      prefetch_batches=0, num_workers=0)
    s.read_ahead()
    _wait(s)
    ahead = set(s._ahead)
    order = []
    real_read = s._read_group
    s._read_group = lambda g, *rest: order.append((g.file_index, g.index)) or real_read(g, *rest)
    s.set_epoch(0)
    for _ in s:
        pass
    assert ahead == set(order[:len(ahead)]) and 2 <= len(ahead) < len(set(order))


@pytest.mark.parametrize("converted", [False, True])
def test_a_bad_group_read_ahead_fails_where_the_stream_reads_it(synthetic_small, tmp_path, converted):
    """The error of a row group read ahead is raised by the iteration that reaches it (the
    same DataError naming the file), not by read_ahead (nor by convert_ahead's job, which keeps
    it for that group), and nothing is counted for it."""
    data = tmp_path / "data"
    shutil.copytree(synthetic_small / "train", data)
    schema = Schema.load(synthetic_small / "schema.yaml")
    victim = sorted(data.glob("*.parquet"))[0]
    t = pq.read_table(victim)
    pq.write_table(t.drop_columns([schema.dense[0].name]), victim, row_group_size=1000)
    s = ParquetStream(schema, str(data), 256, shuffle_buffer_rows=100_000, seed=1, prefetch_batches=0, num_workers=0)
    s.read_ahead()  # every group: the bad file's among them
    if converted:
        s.convert_ahead()
    _wait(s)
    assert any(f.exception() is not None for f in s._ahead.values())
    s.set_epoch(0)
    with pytest.raises(DataError, match=victim.name):
        for _ in s:
            pass


def test_read_ahead_runs_on_its_own_thread(synthetic_small):
    schema = Schema.load(synthetic_small / "schema.yaml")
    s = ParquetStream(schema, str(synthetic_small / "train"), 256, shuffle_buffer_rows=2000, prefetch_batches=0, num_workers=0)
    threads = set()
    real_read = s.converter.read
    s.converter.read = lambda g: threads.add(threading.current_thread().name) or real_read(g)
    s.read_ahead()
    _wait(s)
    assert threads and all(n.startswith("dlrm_mtl-ahead") for n in threads)


@pytest.mark.parametrize("cache_bytes", [0, 1 << 40])
def test_converted_ahead_groups_stream_the_same_batches_and_counts(synthetic_small, cache_bytes):
    """convert_ahead turns the groups read ahead into numpy columns (as slices of one
    concatenation) before the first epoch: the stream's batches over three epochs, its loss-term
    columns and its counters are those of a stream that converts nothing ahead; a format change
    after it (another key order) converts those groups again."""
    from dlrm_mtl.losses import TermInputs

    schema = Schema.load(synthetic_small / "schema.yaml")
    schema.dense[0].clip_max = 0.5  # a counted input policy
    T = len(schema.tasks)
    terms = TermInputs(np.eye(4 * T, 3, dtype=np.float32), np.eye(4 * T, 3, dtype=np.float32), np.ones(3, np.float32),
                       np.ones(3, np.float32), np.array([True, False, False]))
    order = [f.name for f in schema.sparse][::-1]

    def stream():
        s = ParquetStream(schema, str(synthetic_small / "train"), 256, shuffle_buffer_rows=2500, seed=9,
                          prefetch_batches=0, num_workers=0, cache_bytes=cache_bytes)
        s.set_loss_terms(terms)
        return s

    def epochs(s, n):
        out = []
        for e in range(n):
            s.set_epoch(e)
            out.append([(b.row_id.numpy().copy(), b.sparse.values().numpy().copy(), b.term_labels.numpy().copy()) for b in s])
        return out

    plain, ahead = stream(), stream()
    ahead.read_ahead()
    ahead.convert_ahead()
    _wait(ahead)
    converted = [ahead._converting[k].result()[k][2] for k in ahead._ahead]
    assert len(converted) >= 2 and all(c.base is converted[0].base for c in converted)  # one concatenation
    want, got = epochs(plain, 3), epochs(ahead, 3)
    for w, g in zip(want, got):
        assert len(w) == len(g)
        for a, b in zip(w, g):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
    assert plain.counters() and plain.counters() == ahead.counters()

    plain, ahead = stream(), stream()
    ahead.read_ahead()
    ahead.convert_ahead()
    _wait(ahead)
    for s in (plain, ahead):
        s.set_sparse_order(order)  # after the conversion: those groups are converted again
    want, got = epochs(plain, 1), epochs(ahead, 1)
    for a, b in zip(want[0], got[0]):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert plain.counters() == ahead.counters()
