"""Share of rows per leaf scenario, read from the scenario columns only (for HiNet's λ)."""

from __future__ import annotations

from typing import List

import numpy as np

from dlrm_mtl.data.source import Source, open_source
from dlrm_mtl.data.errors import DataError
from dlrm_mtl.schema import Schema, leaf_ids


def scenario_shares(schema: Schema, paths: Source) -> List[float]:
    """Fraction of the rows of ``paths`` in each leaf scenario (leaf-id order: mixed radix
    over the levels, :func:`dlrm_mtl.schema.leaf_ids`). Reads only the scenario columns, one
    batch at a time (memory bounded by pyarrow's batch size). An id outside its level's range
    is an error naming the file, column and row, as where the rows are read for training.

    Example::

        scenario_shares(schema, "data/synthetic/train")   # [0.55, 0.27, 0.11, 0.07]
    """
    dset = open_source(paths)
    cols = [lvl.column for lvl in schema.scenarios]
    counts = np.zeros(schema.num_leaf_scenarios, dtype=np.int64)
    for frag in sorted(dset.get_fragments(), key=lambda f: f.path):
        first = 0
        for rb in frag.to_batches(columns=cols):
            ids = np.stack([rb.column(c).to_numpy(zero_copy_only=False) for c in cols], axis=1)  # [n, L]
            for j, (lvl, c) in enumerate(zip(schema.scenarios, cols)):
                bad = (ids[:, j] < 0) | (ids[:, j] >= lvl.num_values)
                if bad.any():
                    r = int(np.argmax(bad))
                    raise DataError(f"{frag.path}: column {c!r}, row {first + r}: scenario id {ids[r, j]} outside [0, {lvl.num_values})")
            counts += np.bincount(leaf_ids(ids.astype(np.int64), schema), minlength=counts.size)
            first += rb.num_rows
    total = counts.sum()
    if total == 0:
        raise ValueError(f"{paths}: no rows to count scenario shares from")
    return (counts / total).tolist()
