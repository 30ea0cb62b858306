"""Affine maps whose bias, ReLU and their gradients run in one pass beside the GEMM (CPU)."""

from __future__ import annotations

from typing import Optional

import torch

from dlrm_mtl import native


class AffineAct(torch.autograd.Function):
    """``AffineAct.apply(x, weight, bias, relu) -> act(x @ weight + bias)``: ``x [B, d]``,
    ``weight [d, N]``, ``bias [N]`` -> ``[B, N]``, or per group ``x [G, B, d]``,
    ``weight [G, d, N]``, ``bias [G, N]`` -> ``[G, B, N]`` (a bank of experts, the towers).

    ATen's CPU ``addmm`` copies the bias into every output row before its GEMM (beta = 1), the
    ReLU is a pass of its own, and the backward adds ReLU's ``threshold_backward`` and the
    bias gradient's column sum: four passes over the ``[B, N]`` activation beside the three
    GEMMs. Here the forward is ``mm`` and one pass (bias and ReLU, in place:
    :func:`dlrm_mtl.native.bias_act`), the backward one pass (ReLU's mask and the bias
    gradient: :func:`dlrm_mtl.native.bias_act_backward`) and the two GEMMs. The same values
    to float rounding (the bias is added after the product instead of before the GEMM's
    accumulation; the column sums run in blocks of 64 rows). Host float32 only
    (:func:`affine_act` keeps ATen's path elsewhere).

    Example::

        h = AffineAct.apply(torch.randn(8, 32), torch.randn(32, 16), torch.zeros(16), True)  # [8, 16], >= 0
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool) -> torch.Tensor:
        y = torch.mm(x, weight) if x.dim() == 2 else torch.bmm(x, weight)  # [B, N] / [G, B, N]
        native.bias_act(y, bias, relu)
        ctx.save_for_backward(x, weight, y)
        ctx.relu = relu
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, y = ctx.saved_tensors
        gp, gb = native.bias_act_backward(grad, y, ctx.relu, ctx.needs_input_grad[2])
        gx = gw = None
        if x.dim() == 2:
            gx = torch.mm(gp, weight.t()) if ctx.needs_input_grad[0] else None  # [B, d]
            gw = torch.mm(x.t(), gp) if ctx.needs_input_grad[1] else None  # [d, N]
        else:
            gx = torch.bmm(gp, weight.transpose(1, 2)) if ctx.needs_input_grad[0] else None  # [G, B, d]
            gw = torch.bmm(x.transpose(1, 2), gp) if ctx.needs_input_grad[1] else None  # [G, d, N]
        return gx, gw, gb, None


def affine_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool) -> torch.Tensor:
    """``act(x @ weight + bias)`` (``[B, d] x [d, N]``, bias ``[N]``; or per group
    ``[G, B, d] x [G, d, N]``, bias ``[G, N]``): :class:`AffineAct` on float32 host tensors,
    else ATen's ``addmm``/``baddbmm`` and an in-place ReLU."""
    if native.dense_applies(x, weight, bias):
        return AffineAct.apply(x, weight, bias, relu)
    y = torch.addmm(bias, x, weight) if x.dim() == 2 else torch.baddbmm(bias.unsqueeze(1), x, weight)
    return y.relu_() if relu else y


class TowerHead(torch.autograd.Function):
    """``TowerHead.apply(x, weight, bias, out_weight, out_bias) -> z [B, T]``: the last hidden
    layer and the logit layer of T task towers, ``z[b, t] = <ReLU(x_t W_t + b_t)[b], v_t> + c_t``.

    ``x [B, d]`` (every tower reads it) with ``weight [d, T·K]`` (the towers' weights side by
    side) and ``bias [T·K]``, or ``x [T, B, d]`` (tower t reads ``x[t]``) with
    ``weight [T, d, K]`` and ``bias [T, K]``; ``out_weight [T, K]``, ``out_bias [T]``.

    The forward is one GEMM (``mm``/``bmm``) and one pass that adds the bias, applies the ReLU
    and takes the logits' dot products (:func:`dlrm_mtl.native.tower_logits`); the backward is
    one pass over the hidden
    activations that takes the logit layer's gradients, the ReLU's backward and the hidden
    bias's gradient together (:func:`dlrm_mtl.native.tower_logits_backward`), then the hidden
    layer's two GEMMs. ATen's path (:class:`~dlrm_mtl.modules.towers.TaskTowers` elsewhere)
    takes the logits as a skinny product ``[B·T, K] x [K, T]`` and its backward as two more,
    with the bias copy, the ReLU, its backward and the bias sums as passes of their own.
    Host float32 only.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out_weight: torch.Tensor,
                out_bias: torch.Tensor) -> torch.Tensor:
        T = out_weight.shape[0]
        h = torch.mm(x, weight) if x.dim() == 2 else torch.bmm(x, weight)  # [B, T·K] / [T, B, K]
        z = native.tower_logits(h, T, out_weight, out_bias, hidden_bias=bias)  # [B, T]; h = ReLU(h + bias) in place
        ctx.save_for_backward(x, weight, h, out_weight)
        return z

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, h, v = ctx.saved_tensors
        gp, gv, gc, gb = native.tower_logits_backward(grad, h, v.shape[0], v)
        need = ctx.needs_input_grad
        gx: Optional[torch.Tensor] = None
        gw: Optional[torch.Tensor] = None
        if x.dim() == 2:
            gx = torch.mm(gp, weight.t()) if need[0] else None  # [B, d]
            gw = torch.mm(x.t(), gp) if need[1] else None  # [d, T·K]
            gb = gb.view(-1)  # [T·K]
        else:
            gx = torch.bmm(gp, weight.transpose(1, 2)) if need[0] else None  # [T, B, d]
            gw = torch.bmm(x.transpose(1, 2), gp) if need[1] else None  # [T, d, K]
        return gx, gw, gb, gv, gc
