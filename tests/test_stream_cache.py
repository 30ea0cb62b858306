"""The converted-row-group cache: later epochs skip decoding yet stream the same batches."""

import pytest

from dlrm_mtl.data import ParquetStream
from dlrm_mtl.schema import Schema
from stream_epochs import assert_same_epochs, epoch_rows


@pytest.mark.parametrize("cache_bytes", [1 << 40, 200_000])  # everything; only part of it
@pytest.mark.parametrize("workers", [0, 2])
def test_cached_epochs_stream_the_same_batches_and_count_the_same(synthetic_small, cache_bytes, workers):
    schema = Schema.load(synthetic_small / "schema.yaml")
    schema.dense[0].clip_max = 0.5  # a counted input policy (clipped_dense/...) to count again from the cache

    def stream(cache):
        return ParquetStream(schema, str(synthetic_small / "train"), 256, shuffle_buffer_rows=2000, seed=5,
                             prefetch_batches=2 if workers else 0, num_workers=workers, cache_bytes=cache)

    plain, cached = stream(0), stream(cache_bytes)
    reads = []
    real_read = cached.converter.read
    cached.converter.read = lambda g: reads.append(g) or real_read(g)
    want, got = epoch_rows(plain, 3), epoch_rows(cached, 3)
    assert_same_epochs(want, got)
    groups = len(cached.groups)
    if cache_bytes > 1 << 30:
        assert len(reads) == groups  # each row group decoded once, in the first epoch
        # epochs of several shuffle buffers keep them apart (no concatenation of the whole cache)
        assert all(c.columns.base is None for c in cached._cache.values())
    else:
        assert groups < len(reads) < 3 * groups  # the groups that fit are decoded once, the rest every epoch
        assert 0 < cached._cache_used <= cache_bytes
    counted = plain.counters()
    assert counted and counted == cached.counters()  # a cached row group's policies count again


def test_an_epoch_of_one_buffer_reads_its_cached_groups_as_one_concatenation(synthetic_small):
    """When one shuffle buffer holds the epoch and every group is cached, the groups become
    slices of one concatenation (each epoch's buffer one take from it); the batches are those
    of a stream without the cache."""
    schema = Schema.load(synthetic_small / "schema.yaml")

    def stream(cache):
        return ParquetStream(schema, str(synthetic_small / "train"), 256, shuffle_buffer_rows=1 << 20, seed=3,
                             prefetch_batches=0, num_workers=0, cache_bytes=cache)

    plain, cached = stream(0), stream(1 << 40)
    assert_same_epochs(epoch_rows(plain, 3), epoch_rows(cached, 3))
    bases = [c.columns.base for c in cached._cache.values()]
    assert len(bases) == len(cached.groups) > 1 and bases[0] is not None and all(b is bases[0] for b in bases)
