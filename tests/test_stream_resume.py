"""Stream positions for checkpoints: a resume with the same world size continues at the exact
next batch (shuffle included); a resume with another world size trains the epoch's remaining
rows exactly once, also across several interruptions."""

from collections import Counter
from typing import List

import numpy as np
import pyarrow.parquet as pq
import pytest

from dlrm_mtl.data import ParquetStream, Segment
from dlrm_mtl.schema import Schema

B, SHUFFLE, SEED = 256, 1500, 7


def _stream(data, rank: int, world: int, batch_size: int = B, shuffle: int = SHUFFLE) -> ParquetStream:
    schema = Schema.load(data / "schema.yaml")
    return ParquetStream(schema, data / "train", batch_size, rank, world, shuffle_buffer_rows=shuffle, seed=SEED,
                         prefetch_batches=2, num_workers=2)


def _ids(batches) -> List[np.ndarray]:
    return [b.row_id.numpy().copy() for b in batches]


def _real(ids: List[np.ndarray]) -> List[int]:
    return [int(x) for a in ids for x in a if x >= 0]


def test_same_world_size_resume_continues_at_the_exact_next_batch(synthetic_small):
    for rank in range(2):
        full = _stream(synthetic_small, rank, 2)
        full.set_epoch(3)
        ref = list(full)
        resumed = _stream(synthetic_small, rank, 2)
        resumed.set_epoch(3, skip_batches=5)
        got = list(resumed)
        assert len(got) == len(ref) - 5
        for a, b in zip(ref[5:], got):
            assert np.array_equal(a.row_id.numpy(), b.row_id.numpy())
            assert np.array_equal(a.dense.numpy(), b.dense.numpy())
            assert np.array_equal(a.sparse.values().numpy(), b.sparse.values().numpy())


def _epoch_rows(data, segments: List[Segment], final_world: int) -> Counter:
    """Rows trained in one epoch interrupted after each of ``segments`` and finished by
    ``final_world`` ranks: each segment's rows are taken from the *real* streams."""
    trained: Counter = Counter()
    for i, seg in enumerate(segments):
        for r in range(seg.world_size):
            s = _stream(data, r, seg.world_size, seg.batch_size, seg.shuffle_buffer_rows)
            s.set_epoch(2, history=segments[:i])
            trained.update(_real(_ids(b for _, b in zip(range(seg.batches), s))))
    steps = set()
    for r in range(final_world):
        s = _stream(data, r, final_world)
        s.set_epoch(2, history=segments)
        steps.add(len(s))
        trained.update(_real(_ids(s)))
    assert len(steps) == 1  # every rank takes the same number of steps
    return trained


@pytest.mark.parametrize("plan", [
    ([Segment(2, B, SHUFFLE, SEED, 6)], 1),
    ([Segment(1, B, SHUFFLE, SEED, 9)], 2),
    ([Segment(2, B, SHUFFLE, SEED, 4), Segment(3, 128, 0, SEED, 3)], 1),
])
def test_world_size_change_trains_the_remaining_rows_exactly_once(synthetic_small, plan):
    segments, final_world = plan
    trained = _epoch_rows(synthetic_small, segments, final_world)
    all_ids = pq.ParquetDataset(synthetic_small / "train").read(columns=["row_id"])["row_id"].to_pylist()
    assert max(trained.values()) == 1, "a row was trained twice"
    assert sorted(trained) == sorted(all_ids), "a row was skipped"
    # the interrupted segments really trained something (the replay had work to do)
    assert sum(s.batches for s in segments) > 0


def test_remaining_steps_shrink_after_a_reshard(synthetic_small):
    total = pq.ParquetDataset(synthetic_small / "train").read(columns=["row_id"]).num_rows
    seg = Segment(2, B, SHUFFLE, SEED, 6)
    s = _stream(synthetic_small, 0, 1)
    s.set_epoch(0, history=[seg])
    assert sum(s.rows_per_rank) == total - 2 * 6 * B
    assert len(s) == -(-(total - 2 * 6 * B) // B)
