"""Several affine maps of one shared input (ReLU after some), computed as one matrix product."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from dlrm_mtl.modules.folded_affine import affine_blocks, block_gradient, joined_maps


class SharedInputAffine(torch.autograd.Function):
    """``SharedInputAffine.apply(x [B, d], weight [d, N], bias [N], sizes, relu) -> ([B, n_1], ...)``:
    ``x @ weight + bias`` split into column blocks of ``sizes`` (``Σ n_i = N``), ReLU applied to
    the blocks whose ``relu`` flag is set; each output is a view of the one ``addmm`` output.

    Where a layer's experts and gate read one input (MMoE), autograd would otherwise run one
    ``addmm`` per reader and add their input gradients: every extra reader costs a pass over
    ``x`` in the forward, and a ``[B, d]`` product and a ``[B, d]`` addition in the backward.
    Here the forward is one ``addmm`` (ReLU in place on its blocks); the backward writes every
    block's gradient into one ``G [B, N]`` (a ReLU block's straight from its
    ``threshold_backward``, so the experts' gradient is not copied again) and computes
    ``G @ weightᵀ``, ``xᵀ @ G`` and ``G.sum(0)``: the same sums as the separate products, to
    float rounding. On float32 host tensors the forward is ``mm`` and one bias-and-ReLU pass per
    block, and each block's ReLU backward and bias sums one pass
    (:func:`~dlrm_mtl.modules.folded_affine.affine_blocks`, ``block_gradient``). MMoE's step, alternating in one process: census shape +3-6 %, MovieLens
    shape +1-3 % (``docs/performance.md``, "Tenth round"). Summing ``G_i @ W_iᵀ`` block by block
    instead measured slower on the census shape (each block's weight gradient reads ``x``
    again); PLE's first level with its two gates gained nothing (−2 to +5 % between runs) and
    keeps its separate products.

    The outputs are views of one tensor made inside the forward: they must not be modified in
    place (autograd forbids it for a custom function's views).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, sizes: Tuple[int, ...],
                relu: Tuple[bool, ...]) -> Tuple[torch.Tensor, ...]:
        out, blocks = affine_blocks(x, weight, bias, sizes, relu)
        ctx.save_for_backward(x, weight)
        ctx.out, ctx.sizes, ctx.relu = out, sizes, relu  # the ReLU blocks' outputs: their masks
        return blocks

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        x, weight = ctx.saved_tensors
        g, grad_b = block_gradient(grads, ctx.out, ctx.sizes, ctx.relu, ctx.needs_input_grad[2])  # [B, N], [N]
        grad_x = g @ weight.t() if ctx.needs_input_grad[0] else None  # [B, d]
        grad_w = x.t() @ g if ctx.needs_input_grad[1] else None  # [d, N]
        return grad_x, grad_w, grad_b, None, None


def shared_input_affine(x: torch.Tensor, maps: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                        relu: Sequence[bool] = ()) -> List[torch.Tensor]:
    """``x [B, d]`` and affine maps ``(weight [d, n_i], bias [n_i])`` -> ``[x @ weight_i + bias_i]``
    (``[B, n_i]`` each; ReLU after map i where ``relu[i]``, default none), as one product over
    the concatenated weights (:class:`SharedInputAffine`). The outputs must not be modified in
    place.

    Example::

        x = torch.randn(8, 32)
        experts, gates = shared_input_affine(x, [(torch.randn(32, 64), torch.zeros(64)),
                                                 (torch.randn(32, 6), torch.zeros(6))], relu=[True, False])
        experts.shape, gates.shape   # [8, 64] (>= 0), [8, 6]
    """
    return list(SharedInputAffine.apply(x, *joined_maps(maps, relu)))
