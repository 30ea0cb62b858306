"""A one-table embedding-bag lookup with fbgemm's exact row-wise Adagrad, in C on the host."""

from __future__ import annotations

from typing import Optional

import torch

from dlrm_mtl import native
from dlrm_mtl.modules.folded_affine import InputFold


class OneTableLookup(torch.autograd.Function):
    """``OneTableLookup.apply(placeholder, weights [R, D], momentum [R], ids [N], offsets [F·B + 1],
    F, B, lr, eps, slot, single, mean) -> [B, F·D]``: the lookup :class:`~dlrm_mtl.models.recorded_lookup.RecordedLookup`
    makes as one table (ids shifted by their table's first row, feature after feature), with
    fbgemm's kernels replaced by :func:`dlrm_mtl.native.pooled_sum` forward and
    :func:`dlrm_mtl.native.rowwise_adagrad_update` backward, each one C pass:

    * forward: each bag's rows summed in float, in the ids' order (fbgemm's pooled sum);
    * backward: each touched row's gradient summed over its bags in the ids' order, then exact
      row-wise Adagrad (Duchi et al. 2011, with one accumulator per row as fbgemm's
      ``EXACT_ROWWISE_ADAGRAD``): ``m_r += Σ_d g_rd² / D``, ``w_r -= lr · g_r / (√m_r + eps)``,
      in float, in place on the module's own weights and state — fbgemm 1.8's CPU code for a
      table read by several features, operation for operation, so the tables train bit for bit
      as they do through fbgemm (tests/test_native.py).

    fbgemm gets there by sorting the batch's ids into a sparse column per row (a radix sort of
    all N ids) and runs one row after another; here each row's first id gives it a slot in a
    dense accumulator (``slot``: ``[R]`` int32, all -1 between calls). The MovieLens shape
    (7 tables, 9,894 rows, ~15,700 ids per batch of 2,048): docs/performance.md.

    ``single``: every bag holds one id (the reader's single-hot batches; ``offsets`` are then not
    read). ``mean``: uint8 ``[F]`` or None, the features whose bags the schema averages: their
    sums divided by the bag lengths in the same pass, and their ids' gradients divided alike —
    the divisions :func:`~dlrm_mtl.models.bag_means.mean_of_bags` and its backward make, bit for
    bit, without its five operators forward and three backward. ``placeholder`` is fbgemm's autograd anchor (no gradient); ``weights`` get none either.

    Example::

        out = OneTableLookup.apply(ph, tbe.weights_host.view(-1, 16), tbe.momentum1_host, ids,
                                   offsets, 7, 2048, tbe.learning_rate_tensor, 1e-8, slot, False, None)
    """

    @staticmethod
    def forward(ctx, placeholder: torch.Tensor, weights: torch.Tensor, momentum: torch.Tensor, ids: torch.Tensor,
                offsets: torch.Tensor, F: int, B: int, lr: torch.Tensor, eps: float, slot: torch.Tensor,
                single: bool, mean: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.args = (weights, momentum, ids, offsets, F, B, lr, eps, slot, single, mean)
        return native.pooled_sum(weights, ids, offsets, F, B, single, mean)  # [B, F·D]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weights, momentum, ids, offsets, F, B, lr, eps, slot, single, mean = ctx.args
        native.rowwise_adagrad_update(grad, weights, momentum, ids, offsets, F, B, lr, eps, slot, single, mean)
        return (None,) * 12


class OneTableInputRows(torch.autograd.Function):
    """:class:`OneTableLookup` writing the dense arch's whole input ``x [B, a + F·D + Σ e_l]``
    (:class:`~dlrm_mtl.models.input_frame.InputFrame`): ``OneTableInputRows.apply(placeholder,
    weights, momentum, ids, offsets, F, B, lr, eps, slot, single, mean, fold, front, scenario,
    *tables)``. The pooled sums go straight into their columns of ``x`` (:func:`dlrm_mtl.native.pooled_sum`
    with a row stride), ``front`` is copied into the first ``a`` columns and each scenario
    level's rows into its own (:func:`dlrm_mtl.native.table_rows`) — the tensor the dense arch's
    ``cat`` of ``[front, pooled, scenario rows]`` makes, without writing the pooled rows twice.

    Backward: the same exact row-wise Adagrad update as :class:`OneTableLookup`, reading the
    pooled columns of the incoming gradient where they lie (any row stride), and each level's
    table gradient as :class:`~dlrm_mtl.models.scenario_rows.TableRows` sums it (``index_add``'s
    sums, bit for bit). ``front`` gets no gradient (raw dense features).

    ``fold``: None, or the :class:`~dlrm_mtl.modules.folded_affine.InputFold` of these
    arguments that the caller attaches to ``x`` (``x.input_fold``). Where ``x``'s one reader
    folds it (:class:`~dlrm_mtl.modules.folded_affine.FoldedInputAffine`: the tables' update
    and the levels' gradients by table row), this backward gets no gradient and does nothing;
    a gradient from another reader after a fold raises (the tables would be updated twice).
    """

    @staticmethod
    def forward(ctx, placeholder: torch.Tensor, weights: torch.Tensor, momentum: torch.Tensor, ids: torch.Tensor,
                offsets: torch.Tensor, F: int, B: int, lr: torch.Tensor, eps: float, slot: torch.Tensor,
                single: bool, mean: Optional[torch.Tensor], fold: Optional[InputFold], front: torch.Tensor,
                scenario: torch.Tensor, *tables: torch.Tensor) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        ctx.fold = fold
        a, P = front.shape[1], F * weights.shape[1]
        x = weights.new_empty(B, a + P + sum(t.shape[1] for t in tables))  # [B, d]
        if a:
            x[:, :a].copy_(front)
        native.pooled_sum(weights, ids, offsets, F, B, single, mean, out=x[:, a:a + P])
        c = a + P
        for i, t in enumerate(tables):
            native.table_rows(t, scenario[:, i], out=x[:, c:c + t.shape[1]])
            c += t.shape[1]
        ctx.args = (weights, momentum, ids, offsets, F, B, lr, eps, slot, single, mean)
        ctx.frame = (a, P, scenario, [t.shape for t in tables])
        return x

    @staticmethod
    def backward(ctx, grad: Optional[torch.Tensor]):
        weights, momentum, ids, offsets, F, B, lr, eps, slot, single, mean = ctx.args
        a, P, scenario, shapes = ctx.frame
        none = (None,) * (15 + len(shapes))
        if ctx.fold is not None and ctx.fold.folded:
            if grad is None:  # the folded map updated the tables (and gave the levels' gradients)
                return none
            raise RuntimeError("the dense arch's input x was read beside the folded map that took its lookup's "
                               "backward (FoldedInputAffine): only the input's one reader may fold it")
        if grad is None:
            return none
        native.rowwise_adagrad_update(grad[:, a:a + P], weights, momentum, ids, offsets, F, B, lr, eps, slot, single, mean)
        grads = []
        c = a + P
        for i, (V, e) in enumerate(shapes):
            grads.append(native.rows_by_id(grad[:, c:c + e], scenario[:, i], V) if ctx.needs_input_grad[15 + i] else None)
            c += e
        return (None,) * 15 + tuple(grads)
