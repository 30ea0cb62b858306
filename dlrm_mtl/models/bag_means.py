"""The schema's mean pooling after summed lookups: which columns, and the division by bag lengths."""

from __future__ import annotations

from typing import List, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_mtl.schema import Schema


def mean_spans(schema: Schema) -> List[Tuple[str, int, int]]:
    """``(feature, first column, end column)`` in the schema-order pooled embeddings
    ``[B, Σ D_f]`` of every multi-hot feature the schema mean-pools.

    Every table's lookup kernel sums its bags (:func:`embedding_configs`); :func:`mean_of_bags`
    divides these columns by their bag lengths. A single-hot feature's bag holds one id or
    none, where sum and mean are the same, so it has no span whatever its pooling says.

    Example::

        # user_id (16, single-hot), genres (16, multi-hot, mean), zip (8)
        mean_spans(schema)   # [("genres", 16, 32)]
    """
    spans: List[Tuple[str, int, int]] = []
    at = 0
    for f in schema.sparse:
        if f.multi_hot and f.pooling == "mean":
            spans.append((f.name, at, at + f.dim))
        at += f.dim
    return spans


def mean_of_bags(pooled: torch.Tensor, sparse: KeyedJaggedTensor, spans: List[Tuple[str, int, int]]) -> torch.Tensor:
    """``pooled [B, Σ D_f]`` (the tables' summed bags, schema order) with the columns of each
    ``(feature, start, end)`` span (:func:`mean_spans`) divided by that feature's bag lengths in
    ``sparse`` (an empty bag stays zeros: it is divided by 1), in place; its backward divides
    the gradient alike. The mean of a bag, as fbgemm's mean-pooling kernel computes it to float
    rounding (a division where it multiplies by ``1 / L``).

    Why not that kernel: fbgemm-gpu-cpu 1.8's JIT-compiled mean pooling converts each bag's
    length with a legacy-SSE instruction amid AVX-512 code, and on Intel CPUs every such
    switch costs a state transition (measured here: ~114 ns; the MovieLens lookup's forward
    2.5 ms mean against 0.3 ms sum, docs/performance.md, "Ninth round"); and one pooling for
    all tables keeps them in one kernel group. The model's call is fx-wrapped (TorchRec's
    pipelines trace the model and see it as one call); a world of one's
    :class:`~dlrm_mtl.models.local_lookup.LocalPooledLookup` applies it group by group itself,
    where the C lookup has not already divided in its own pass
    (:class:`~dlrm_mtl.models.one_table_lookup.OneTableLookup`)."""
    if not spans:
        return pooled
    keys = sparse.keys()
    lengths = sparse.lengths().view(len(keys), -1)  # [F, B]
    for name, start, end in spans:
        n = lengths[keys.index(name)].clamp(min=1).unsqueeze(1).to(pooled.dtype)  # [B, 1]
        pooled[:, start:end].div_(n)
    return pooled
