"""A scenario level's embedding rows for a batch's ids."""

from __future__ import annotations

import torch

from dlrm_mtl import native


class TableRows(torch.autograd.Function):
    """``TableRows.apply(weight [V, e], ids [B]) -> [B, e]``: ``weight.index_select(0, ids)``
    as one C pass each way (:func:`dlrm_mtl.native.table_rows` forward, :func:`dlrm_mtl.native.rows_by_id`
    backward). The backward sums the rows' gradients by id in float, rows in order — the sums
    ``index_add`` makes into a zeroed table, bit for bit — in one pass over the gradient (any
    row stride: ``cat``'s backward hands a column slice of its input's gradient), where ATen
    takes a zeroed ``[V, e]`` and ``index_add`` (~120 µs together for B = 2,048 on the
    development machine, against ~10; docs/performance.md, "Seventeenth round").
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.num_rows = weight.shape[0]
        return native.table_rows(weight, ids)  # [B, e]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        return native.rows_by_id(grad, ids, ctx.num_rows), None  # [V, e]


def scenario_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A scenario level's embedding rows ``[B, e]`` for its ids ``[B]`` from its table
    ``weight [V, e]``, not through ``nn.Embedding``'s forward (the same rows; on the CPU its
    backward, ``embedding_dense_backward``, is ~2.5x slower than ``index_add``):

    * a level of one value (``V = 1``: every valid id is 0, and the reader rejects any other
      with its file, column and row) reads its one row expanded, whose backward is one sum over
      the batch (the census shape: 60-70 µs per step less than a gather's);
    * on float32 host tensors with the C kernels available, :class:`TableRows` (one C pass each
      way);
    * elsewhere (GPU, traced, other dtypes) ``index_select``, whose backward is ``index_add``.

    The same values every way (``tests/test_arch.py``).

    Example::

        scenario_rows(torch.randn(3, 8), torch.tensor([2, 0, 2]))   # [3, 8]: rows 2, 0, 2
    """
    if weight.shape[0] == 1:
        return weight.expand(ids.shape[0], weight.shape[1])  # [B, e]
    if native.table_rows_applies(weight, ids):
        return TableRows.apply(weight, ids)  # [B, e]
    return weight.index_select(0, ids)  # [B, e]
