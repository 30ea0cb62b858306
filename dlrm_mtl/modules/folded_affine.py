"""An affine map of the one-table lookup's input whose backward runs by table row."""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from dlrm_mtl import native


class InputFold:
    """What the backward of a map of ``x = [front | pooled | scenario rows]`` needs instead of
    ``x``'s gradient: the world-of-one lookup's arguments
    (:class:`~dlrm_mtl.models.one_table_lookup.OneTableInputRows`, which attaches one to the
    ``x`` it returns as ``x.input_fold``): the one table ``weights [R, D]``, its row-wise
    Adagrad state ``momentum [R]``, ``ids``/``offsets`` of its ``F`` features over ``B`` rows,
    ``lr`` (float32 tensor), ``eps``, the update's int32 ``[R]`` scratch (all -1), ``single``,
    ``mean`` (uint8 ``[F]`` or None), and the frame's ``front [B, a]``, ``scenario [B, ≥ L]``
    and level tables ``[V_l, e_l]``. ``folded`` is set once a map has taken it
    (:class:`FoldedInputAffine`): the lookup's own backward then must not see a gradient."""

    __slots__ = ("weights", "momentum", "ids", "offsets", "F", "B", "lr", "eps", "slot", "single", "mean",
                 "front", "scenario", "tables", "plan", "folded")

    def __init__(self, weights: torch.Tensor, momentum: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,
                 F: int, B: int, lr: torch.Tensor, eps: float, slot: torch.Tensor, single: bool,
                 mean: Optional[torch.Tensor], front: torch.Tensor, scenario: torch.Tensor,
                 tables: Sequence[torch.Tensor], plan: "FoldPlan") -> None:
        self.weights, self.momentum, self.ids, self.offsets = weights, momentum, ids, offsets
        self.F, self.B, self.lr, self.eps, self.slot = F, B, lr, eps, slot
        self.single, self.mean, self.front, self.scenario, self.tables = single, mean, front, scenario, list(tables)
        self.plan = plan
        self.folded = False

    def width(self) -> int:
        """``d``: ``x``'s columns."""
        return self.front.shape[1] + self.F * self.weights.shape[1] + sum(t.shape[1] for t in self.tables)


_enabled = True  # train.fold_first_layer (set_enabled)


def set_enabled(flag: bool) -> None:
    """Let first layers fold the lookup's backward (``train.fold_first_layer``) or not."""
    global _enabled
    _enabled = bool(flag)


# a feature is folded where its table has at most B / FOLD_IDS_PER_ROW rows (B: the batch's
# rows): its backward then takes at most a quarter of the products by row that it would by id.
# A wider table (users, items) has about as many touched rows as ids, and the GEMM takes
# those products faster than the C pass by row (MovieLens shape, docs/performance.md).
FOLD_IDS_PER_ROW = 4


class FoldPlan(NamedTuple):
    """Which of a lookup's ``F`` features :class:`FoldedInputAffine` folds: ``direct`` (uint8
    ``[F]``, 1 = not folded; None where every one is) and the runs ``(f0, f1)`` of consecutive
    direct features, whose columns of ``x``'s gradient and rows of ``∂L/∂W`` are computed as
    GEMMs (one pair per run)."""

    direct: Optional[torch.Tensor]
    runs: List[Tuple[int, int]]


def fold_plan(table_rows: Sequence[int], batch: int) -> FoldPlan:
    """The :class:`FoldPlan` for features whose tables have ``table_rows`` rows, at ``batch``
    rows per batch (:data:`FOLD_IDS_PER_ROW`).

    Example::

        fold_plan([6040, 3706, 18, 2], 2048)   # direct [1, 1, 0, 0], runs [(0, 2)]
    """
    flags = [rows * FOLD_IDS_PER_ROW > batch for rows in table_rows]
    runs: List[Tuple[int, int]] = []
    for f, d in enumerate(flags):
        if d and runs and runs[-1][1] == f:
            runs[-1] = (runs[-1][0], f + 1)
        elif d:
            runs.append((f, f + 1))
    return FoldPlan(torch.tensor(flags, dtype=torch.uint8) if runs else None, runs)


def foldable(x: torch.Tensor) -> Optional[InputFold]:
    """``x``'s :class:`InputFold` where a map may still take it: ``x`` is the lookup's own
    output (not a view of it), autograd records, the C kernels run and the fold is on, no other
    map took it (what :func:`input_fold` checks before the weight)."""
    fold: Optional[InputFold] = getattr(x, "input_fold", None)
    if fold is None or fold.folded or not _enabled or not torch.is_grad_enabled() or not native.available():
        return None
    return fold


def input_fold(x: torch.Tensor, weight: torch.Tensor) -> Optional[InputFold]:
    """``x``'s :class:`InputFold` where :class:`FoldedInputAffine` can take ``x @ weight``:
    ``x`` is the lookup's own output (not a view of it), autograd records, the C kernels
    run, no other map took it, and ``weight`` is a float32 contiguous host ``[d, N]``."""
    fold = foldable(x)
    if fold is None:
        return None
    if not (weight.dim() == 2 and weight.dtype == torch.float32 and weight.is_cpu
            and weight.is_contiguous() and weight.shape[0] == x.shape[1] == fold.width()):
        return None
    return fold


def joined_maps(maps: Sequence[Tuple[torch.Tensor, torch.Tensor]], relu: Sequence[bool] = ()
                ) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, ...], Tuple[bool, ...]]:
    """Affine maps ``(weight [d, n_i], bias [n_i])`` of one input as one: ``(weight [d, N],
    bias [N], sizes (n_i), relu flags)`` (the weights concatenated column-wise; ``relu[i]``
    for map i, default False)."""
    flags = tuple(bool(r) for r in relu) + (False,) * (len(maps) - len(relu))
    weight = torch.cat([w for w, _ in maps], dim=1) if len(maps) > 1 else maps[0][0]  # [d, N]
    bias = torch.cat([b for _, b in maps]) if len(maps) > 1 else maps[0][1]  # [N]
    return weight, bias, tuple(w.shape[1] for w, _ in maps), flags


def affine_blocks(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, sizes: Sequence[int],
                  relu: Sequence[bool]) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """``(out [B, N], blocks)``: ``x @ weight + bias`` as one product and its column blocks of
    ``sizes`` (views), ReLU in place on those ``relu`` flags. On float32 host tensors the
    product is ``mm`` and each block's bias and ReLU one pass (:func:`dlrm_mtl.native.bias_act`:
    no copy of the bias into every row before the GEMM, as ATen's ``addmm`` makes); else one
    ``addmm`` and in-place ReLUs."""
    fused = native.dense_applies(x, weight, bias)
    out = torch.mm(x, weight) if fused else torch.addmm(bias, x, weight)  # [B, N]
    blocks = out.split(list(sizes), dim=1)  # [B, n_i] views
    for block, b, r in zip(blocks, bias.split(list(sizes)), relu):
        if fused:
            native.bias_act(block, b, r)
        elif r:
            block.relu_()
    return out, tuple(blocks)


def block_gradient(grads: Sequence[Optional[torch.Tensor]], out: torch.Tensor, sizes: Sequence[int],
                   relu: Sequence[bool], want_bias: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(G [B, N], Σ_b G [N])``: the gradients of ``out``'s column blocks (``sizes``) written
    side by side, each ReLU block's through ReLU's backward (its mask: ``out``, after the
    ReLU), a block without a gradient as zeros; and the bias gradient, G's column sums (None
    where not ``want_bias``). On float32 host tensors a block's ReLU backward and column sums
    are one pass (:func:`dlrm_mtl.native.bias_act_backward`)."""
    g = torch.empty_like(out)  # [B, N]
    fused = native.dense_applies(out)
    gb = out.new_empty(out.shape[1]) if want_bias and fused else None  # [N]
    parts = gb.split(list(sizes)) if gb is not None else [None] * len(sizes)
    for grad, o, into, r, gb_i in zip(grads, out.split(list(sizes), dim=1), g.split(list(sizes), dim=1), relu, parts):
        if grad is None:
            into.zero_()
            if gb_i is not None:
                gb_i.zero_()
        elif fused and native.dense_applies(grad):
            native.bias_act_backward(grad, o, r, want_bias, out=into, bias_out=gb_i)
        elif r:  # ReLU's backward, written in place into G's block
            torch.ops.aten.threshold_backward.grad_input(grad, o, 0.0, grad_input=into)
            if gb_i is not None:
                torch.sum(into, 0, out=gb_i)
        else:
            into.copy_(grad)
            if gb_i is not None:
                torch.sum(into, 0, out=gb_i)
    if want_bias and gb is None:
        gb = g.sum(0)
    return g, gb


class FoldedInputAffine(torch.autograd.Function):
    """``FoldedInputAffine.apply(x [B, d], weight [d, N], bias [N], sizes, relu, fold, *tables)
    -> ([B, n_1], ...)``: ``x @ weight + bias`` split into column blocks of ``sizes`` (ReLU on
    those ``relu`` flags), as :class:`~dlrm_mtl.modules.shared_affine.SharedInputAffine` — for
    the ``x`` the world-of-one lookup writes, ``[front | pooled | scenario rows]``, with a
    backward that never forms ``x``'s gradient.

    The backward of a first layer ``h = x W + b`` is usually two GEMMs over the batch,
    ``Wᵀ``'s ``xᵀ G`` and ``x``'s ``G Wᵀ`` (``G = ∂L/∂h [B, N]``), after which the lookup sums
    ``x``'s pooled gradient by table row for the row-wise Adagrad update. Here the rows of
    ``G`` are summed by table row first (``gT_r = Σ G_b`` over the bags holding row ``r``) and
    the products are taken once per touched row: ``∂L/∂W_f = Σ_r E_rᵀ gT_r`` and
    ``∂L/∂E_r = Σ_f W_f gT_r`` (``W_f``: the ``D`` rows of ``W`` reading feature ``f``) — the
    same sums regrouped (equal to float rounding), ``D·N`` multiply-adds per touched row
    instead of per id (:func:`dlrm_mtl.native.folded_backward`). On the census shape's 32
    small tables (496 rows) a batch of 1,024 rows touches ~500 rows for 32,768 ids. The
    scenario levels' tables likewise (:func:`dlrm_mtl.native.folded_rows_backward`), the
    front's rows of ``∂L/∂W`` as ``frontᵀ G``. The tables' update is the lookup's exact
    row-wise Adagrad, in place, in this backward; the lookup's own backward then gets no
    gradient (``x``'s is None). ``x`` must have no other reader that needs its gradient: the
    lookup's backward raises if it gets one after a fold (callers pass ``fold=True`` only
    where the map is the input's one reader).

    Example::

        x = model.embed(batch.sparse, frame=frame)[0]       # [B, d], carries x.input_fold
        (h,) = FoldedInputAffine.apply(x, w, b, (w.shape[1],), (True,), x.input_fold, *x.input_fold.tables)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, sizes: Tuple[int, ...],
                relu: Tuple[bool, ...], fold: InputFold, *tables: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        out, blocks = affine_blocks(x, weight, bias, sizes, relu)
        fold.folded = True
        ctx.save_for_backward(weight, x if fold.plan.runs else None)
        ctx.out, ctx.sizes, ctx.relu, ctx.fold = out, sizes, relu, fold
        return blocks

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        weight, x = ctx.saved_tensors
        fold: InputFold = ctx.fold
        g, grad_b = block_gradient(grads, ctx.out, ctx.sizes, ctx.relu, ctx.needs_input_grad[2])  # [B, N], [N]
        grad_w = torch.empty_like(weight)  # [d, N]
        D = fold.weights.shape[1]
        a, P = fold.front.shape[1], fold.F * D
        if a:
            torch.mm(fold.front.t(), g, out=grad_w[:a])
        gx: Optional[torch.Tensor] = None  # [B, P]: the direct features' columns of x's gradient
        if fold.plan.runs:
            gx = g.new_empty(g.shape[0], P)
            for f0, f1 in fold.plan.runs:
                r0, r1 = a + f0 * D, a + f1 * D
                torch.mm(g, weight[r0:r1].t(), out=gx[:, f0 * D:f1 * D])
                torch.mm(x[:, r0:r1].t(), g, out=grad_w[r0:r1])
        native.folded_backward(g, fold, weight, grad_w, a, gx)  # grad_w's rows a .. a + P
        table_grads: List[Optional[torch.Tensor]] = []
        c = a + P
        for i, t in enumerate(fold.tables):  # grad_w's rows c .. c + e_i
            grad_t = native.folded_rows_backward(g, fold.scenario, i, t, weight, grad_w, c)
            table_grads.append(grad_t if ctx.needs_input_grad[6 + i] else None)
            c += t.shape[1]
        return (None, grad_w, grad_b, None, None, None, *table_grads)


def folded_affine(x: torch.Tensor, maps: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                  relu: Sequence[bool] = ()) -> Optional[List[torch.Tensor]]:
    """:func:`~dlrm_mtl.modules.shared_affine.shared_input_affine` through
    :class:`FoldedInputAffine` where ``x`` carries an :class:`InputFold` it can take, else None
    (the caller computes the maps itself). Only for a caller whose maps are ``x``'s one reader."""
    if foldable(x) is None:  # before the maps' concatenation
        return None
    weight, bias, sizes, flags = joined_maps(maps, relu)
    fold = input_fold(x, weight)
    if fold is None:
        return None
    return list(FoldedInputAffine.apply(x, weight, bias, sizes, flags, fold, *fold.tables))
