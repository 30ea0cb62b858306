"""Helpers for stream tests: a stream's batches over epochs, and their comparison."""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

Rows = Tuple[np.ndarray, np.ndarray, np.ndarray]  # row ids, dense features, sparse values of a batch


def epoch_rows(stream, epochs: int) -> List[List[Rows]]:
    """Each epoch's batches as (row ids, dense, sparse values), copied."""
    out = []
    for e in range(epochs):
        stream.set_epoch(e)
        out.append([(b.row_id.numpy().copy(), b.dense.numpy().copy(), b.sparse.values().numpy().copy()) for b in stream])
    return out


def assert_same_epochs(want: List[List[Rows]], got: List[List[Rows]]) -> None:
    """The same batches, in the same order, in every epoch."""
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert len(w) == len(g)
        for (r1, d1, v1), (r2, d2, v2) in zip(w, g):
            np.testing.assert_array_equal(r1, r2)
            np.testing.assert_array_equal(d1, d2)
            np.testing.assert_array_equal(v1, v2)
