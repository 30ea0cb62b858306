"""Share of rows per leaf scenario, read from the scenario columns only (for HiNet's λ)."""

from __future__ import annotations

from typing import List

import numpy as np

from dlrm_mtl.data.source import Source, open_source
from dlrm_mtl.schema import Schema


def scenario_shares(schema: Schema, paths: Source) -> List[float]:
    """Fraction of the rows of ``paths`` in each leaf scenario (leaf-id order, mixed radix
    over the levels as :func:`dlrm_mtl.metrics.leaf_ids`). Reads only the scenario columns,
    one batch at a time (memory bounded by pyarrow's batch size).

    Example::

        scenario_shares(schema, "data/synthetic/train")   # [0.55, 0.27, 0.11, 0.07]
    """
    dset = open_source(paths)
    cols = [lvl.column for lvl in schema.scenarios]
    counts = np.zeros(schema.num_leaf_scenarios, dtype=np.int64)
    for rb in dset.to_batches(columns=cols):
        leaf = np.zeros(rb.num_rows, dtype=np.int64)
        for lvl, c in zip(schema.scenarios, cols):
            x = rb.column(c).to_numpy(zero_copy_only=False).astype(np.int64)
            leaf = leaf * lvl.num_values + np.clip(x, 0, lvl.num_values - 1)
        counts += np.bincount(leaf, minlength=counts.size)
    total = counts.sum()
    if total == 0:
        raise ValueError(f"{paths}: no rows to count scenario shares from")
    return (counts / total).tolist()
