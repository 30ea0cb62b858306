"""ParquetStream.prepare: an epoch's first shuffle buffer is read and converted on a background
thread before the epoch is iterated; adopted only when the iteration is that epoch from its
start with the same batch format, so batches, order, policy counters and errors stay exactly
those of reading it then."""

import shutil
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from dlrm_mtl.checkpoint import Segment
from dlrm_mtl.data import ParquetStream
from dlrm_mtl.data.errors import DataError
from dlrm_mtl.schema import Schema
from stream_epochs import assert_same_epochs


def _schema(data):
    schema = Schema.load(data / "schema.yaml")
    schema.dense[0].clip_max = 0.5  # a counted input policy, so that the counters are not empty
    return schema


def _stream(schema, data, workers=0, **kw):
    return ParquetStream(schema, str(data / "train"), 256, shuffle_buffer_rows=2500, seed=9,
                         prefetch_batches=2 if workers else 0, num_workers=workers, **kw)


def _rows(stream):
    return [(b.row_id.numpy().copy(), b.dense.numpy().copy(), b.sparse.values().numpy().copy()) for b in stream]


def _reads_on_threads(stream):
    threads = []
    real_read = stream.converter.read
    stream.converter.read = lambda g: threads.append(threading.current_thread().name) or real_read(g)
    return threads


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cache_bytes", [0, 1 << 40])
def test_prepared_epochs_stream_the_same_batches_and_counts(synthetic_small, workers, cache_bytes):
    schema = _schema(synthetic_small)
    plain, ahead = _stream(schema, synthetic_small, workers, cache_bytes=cache_bytes), \
        _stream(schema, synthetic_small, workers, cache_bytes=cache_bytes)
    threads = _reads_on_threads(ahead)
    want, got = [], []
    counted: dict = {}
    for e in range(3):
        plain.set_epoch(e)
        want.append(_rows(plain))
        before = len(threads)
        ahead.prepare(e)
        ahead._prepared.first.result()  # the first buffer is read before the epoch is iterated ...
        # (from the cache after the first epoch when it holds the groups)
        assert (len(threads) > before) == (cache_bytes == 0 or e == 0)
        assert ahead.counters() == counted  # ... and not counted before the epoch is
        ahead.set_epoch(e)
        got.append(_rows(ahead))
        counted = ahead.counters()
        assert ahead._prepared is None
    assert_same_epochs(want, got)
    assert plain.counters() and plain.counters() == ahead.counters()
    if workers == 0:  # the first buffer's groups on the preparing thread, the rest on the consumer's
        assert any(n.startswith("dlrm_mtl-prepare") for n in threads)


def test_prepare_during_an_epoch_leaves_it_and_the_next_unchanged(synthetic_small):
    """As the training loop does: the next epoch prepared after the current one's first batch."""
    schema = _schema(synthetic_small)
    plain, ahead = _stream(schema, synthetic_small), _stream(schema, synthetic_small)
    want, got = [], []
    for e in range(3):
        plain.set_epoch(e)
        want.append(_rows(plain))
        ahead.set_epoch(e)
        it = iter(ahead)
        rows = _rows([next(it)])
        ahead.prepare(e + 1)
        rows += _rows(it)
        got.append(rows)
    assert_same_epochs(want, got)
    assert ahead._prepared is not None and ahead._prepared.key[0] == 3  # prepared, never iterated:
    assert plain.counters() == ahead.counters()  # its counts are held back
    ahead.discard_prepared()
    assert ahead._prepared is None and plain.counters() == ahead.counters()


def test_the_cache_counts_a_group_read_by_two_epochs_at_once_once(synthetic_small):
    """The next epoch, prepared while the current one still reads, may convert the same row
    group at the same time: the cache keeps it once and counts its bytes once."""
    schema = _schema(synthetic_small)
    s = ParquetStream(schema, str(synthetic_small / "train"), 256, shuffle_buffer_rows=6000, seed=9,
                      prefetch_batches=0, num_workers=0, cache_bytes=1 << 40)
    for _ in range(5):
        s._cache.clear()
        s._cache_used = 0
        s.set_epoch(0)
        it = iter(s)
        next(it)
        s.prepare(1)  # reads epoch 1's first buffer while epoch 0 reads its second
        for _ in it:
            pass
        s.discard_prepared()
        assert s._cache_used == sum(c.columns.nbytes for c in s._cache.values())


@pytest.mark.parametrize("prepared", [False, True])
def test_a_rank_without_rows_counts_no_policies(synthetic_small, prepared):
    """A rank with no row group yields padding batches only; the group it reads for the
    columns' layout trains no row, so it counts no input policy (prepared or not)."""
    schema = _schema(synthetic_small)
    s = ParquetStream(schema, str(synthetic_small / "train"), 256, rank=12, world_size=13, shuffle_buffer_rows=2500,
                      prefetch_batches=0, num_workers=0)
    assert s.groups == [] and len(s) > 0
    if prepared:
        s.prepare(0)
    s.set_epoch(0)
    batches = list(s)
    assert len(batches) == len(s) and all(b.real_rows == 0 for b in batches)
    assert s.counters() == {}


@pytest.mark.parametrize("how", ["skip", "history", "other_epoch", "sparse_order", "loss_terms"])
def test_a_prepared_epoch_that_does_not_match_is_discarded(synthetic_small, how):
    """A resume (skipped batches, earlier segments), another epoch or a new batch format: the
    prepared batches are dropped with their counts, and the stream reads what it was asked."""
    schema = _schema(synthetic_small)
    plain, ahead = _stream(schema, synthetic_small), _stream(schema, synthetic_small)
    ahead.prepare(1)
    ahead._prepared.first.result()

    def position(s):
        if how == "skip":
            s.set_epoch(1, skip_batches=3)
        elif how == "history":
            s.set_epoch(1, history=[Segment(2, 256, 2500, 9, 4)])
        elif how == "other_epoch":
            s.set_epoch(2)
        elif how == "sparse_order":
            s.set_sparse_order(list(reversed([f.name for f in schema.sparse])))
            s.set_epoch(1)
        else:
            s.set_loss_terms(lambda labels, mask, weight: (labels.copy(), mask.astype(np.float32)))
            s.set_epoch(1)

    position(plain)
    position(ahead)
    want, got = _rows(plain), _rows(ahead)
    assert_same_epochs([want], [got])
    assert ahead._prepared is None
    assert plain.counters() == ahead.counters()  # the discarded reads counted nothing
    if how == "sparse_order":
        assert list(next(iter(ahead)).sparse.keys()) == list(reversed([f.name for f in schema.sparse]))


def test_a_bad_group_in_a_prepared_epoch_fails_where_the_epoch_reads_it(synthetic_small, tmp_path):
    """The DataError is raised by the iteration, naming the file, not by prepare; a prepared
    epoch that is never trained raises nothing."""
    data = tmp_path / "data"
    shutil.copytree(synthetic_small / "train", data / "train")
    schema = Schema.load(synthetic_small / "schema.yaml")
    victim = sorted((data / "train").glob("*.parquet"))[0]
    t = pq.read_table(victim)
    pq.write_table(t.drop_columns([schema.dense[0].name]), victim, row_group_size=1000)
    s = ParquetStream(schema, str(data / "train"), 256, shuffle_buffer_rows=100_000, seed=1, prefetch_batches=0, num_workers=0)
    s.prepare(0)
    assert isinstance(s._prepared.first.exception(), DataError)
    s.set_epoch(0)
    with pytest.raises(DataError, match=victim.name):
        for _ in s:
            pass
    s.prepare(1)
    s.discard_prepared()  # not trained: nothing raised
    assert s._prepared is None


def test_the_training_loop_prepares_each_next_epoch_where_the_reader_has_a_core(synthetic_small, tmp_path):
    """setup_run prepares the first epoch; run_epoch the next one when the reader reads in the
    background (data.prefetch_batches > 0); the run trains the same rows either way."""
    from dlrm_mtl.config import Config
    from dlrm_mtl.distributed import init_distributed, shutdown_distributed
    from dlrm_mtl.train import Totals, dense_fingerprint, run_epoch, setup_run

    env = init_distributed("gloo", 60, 1)
    sets = [f"data.train={synthetic_small}/train", f"data.eval={synthetic_small}/eval", f"data.schema={synthetic_small}/schema.yaml",
            "data.batch_size=512", "train.epochs=2", "train.progress=false", "checkpoint.at_end=false",
            "checkpoint.keep_best=false"]
    try:
        seen = {}
        for prefetch in (0, 2):
            cfg = Config.load([], sets + [f"train.run_dir={tmp_path}/run{prefetch}", f"data.prefetch_batches={prefetch}",
                                          f"data.num_workers={1 if prefetch else 0}"])
            run = setup_run(cfg, env)
            assert run.train_stream._prepared is not None and run.train_stream._prepared.key[0] == 0
            prepared = []
            real = run.train_stream.prepare
            run.train_stream.prepare = lambda epoch: prepared.append(epoch) or real(epoch)
            totals = Totals()
            try:
                for epoch in range(2):
                    run_epoch(run, epoch, totals)
            finally:
                run.train_stream.discard_prepared()
            assert prepared == ([1] if prefetch else [])
            assert totals.trained_rows == 2 * run.train_stream.total_rows
            seen[prefetch] = dense_fingerprint(run.dmp)
        assert seen[0] == seen[2]  # the same rows in the same order: the same weights
    finally:
        shutdown_distributed()  # a child process must not inherit this one's rendezvous
