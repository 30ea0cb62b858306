"""The task towers: one MLP per task, evaluated together."""

from __future__ import annotations

import math
from typing import List

import torch
from torch import nn

from dlrm_mtl import native
from dlrm_mtl.modules.expert_bank import first_layer_map, list_params
from dlrm_mtl.modules.fused_affine import TowerHead, affine_act


class TaskTowers(nn.Module):
    """T independent towers ``d -> hidden... -> 1`` (ReLU between layers, none after the last),
    one per task, with stacked weights: each hidden layer is one ``baddbmm`` over the task
    axis instead of T ``addmm`` calls, so the operator count does not grow with T; a shared
    input (stride 0 on T, e.g. Shared-Bottom) makes the first layer one ``addmm`` over the
    concatenated weights, and the logit layer is one skinny product over every tower's weights
    (docs/performance.md, "Eleventh round"). On float32 host tensors the last hidden layer and
    the logit layer are one :class:`~dlrm_mtl.modules.fused_affine.TowerHead` (its GEMM, then
    one pass for the bias, ReLU and logits; backward one pass for the logit layer's gradients,
    the ReLU's and the hidden bias's, then the GEMMs) and earlier layers
    :func:`~dlrm_mtl.modules.fused_affine.affine_act` (docs/performance.md,
    "Twenty-second round").

    Initialised like ``nn.Linear`` (weights and biases uniform in ±1/√in).

    ``x [T, B, d]`` (tower t reads ``x[t]``) or ``[B, d]`` (every tower reads it) -> logits ``[B, T]``.

    Example::

        towers = TaskTowers(num_tasks=2, in_dim=16, hidden=[8])
        towers(torch.randn(2, 32, 16)).shape   # [32, 2]
    """

    def __init__(self, num_tasks: int, in_dim: int, hidden: List[int]) -> None:
        super().__init__()
        sizes = [in_dim] + list(hidden) + [1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / math.sqrt(a)
            self.weights.append(nn.Parameter(torch.empty(num_tasks, a, b).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_tasks, 1, b).uniform_(-bound, bound)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, B, d]`` (tower t reads ``x[t]``) or ``[B, d]`` (every tower reads it) ->
        logits ``[B, T]``."""
        weights, biases = list_params(self.weights), list_params(self.biases)
        T = weights[0].shape[0]
        shared = x.dim() == 2 or x.stride(0) == 0  # a stride-0 expand is a shared input too
        base = x if x.dim() == 2 else (x[0] if shared else x)  # [B, d] when shared
        if len(weights) > 1 and native.dense_applies(base, *weights, *biases):
            return self._fused(base, shared, weights, biases)
        B = base.shape[-2]
        last = len(weights) - 1
        h = base.unsqueeze(0).expand(T, *base.shape) if shared else x  # [T, B, d]
        h_bt = None  # the same activations laid out [B, T, k], where they were computed so
        for i, (w, b) in enumerate(zip(weights, biases)):
            if i == last:
                # the logit layer (k -> 1 per tower): <h_t, w_t>. Contiguous activations, laid
                # out [B, T, k] (the shared first layer's addmm) or [T, B, k] (the towers'
                # baddbmm): every tower's weights against every row in one skinny product
                # [B·T, k] x [k, T], whose T diagonal entries per row are the logits — T-fold
                # FLOPs of a tiny product, but the activations are read once per pass, where a
                # product and a sum over k read and wrote them three times (standalone, T 2,
                # B 2048, k 64: 0.27 against 0.48-0.60 ms forward + backward). A bmm (T
                # matrix-vector products forward, outer products backward) is far slower on
                # the CPU. A strided input (a transposed view) keeps the product and sum,
                # which read it where it lies (docs/performance.md, "Eleventh round").
                if h_bt is not None:
                    full = torch.mm(h_bt.view(B * T, -1), w.view(T, -1).t())  # [B·T, T]
                    return full.view(B, T, T).diagonal(dim1=1, dim2=2) + b.view(1, T)  # [B, T]
                if h.is_contiguous():
                    full = torch.mm(h.view(T * B, -1), w.view(T, -1).t())  # [T·B, T]
                    return full.view(T, B, T).diagonal(dim1=0, dim2=2) + b.view(1, T)  # [B, T]
                return (h * w.view(T, 1, -1)).sum(-1).t() + b.view(1, T)  # [B, T]
            if i == 0 and shared:
                # a shared input: every tower's first layer as one addmm over the
                # concatenated weights [d, T·k] (bias fused), then a [T, B, k] view
                k = w.shape[-1]
                w_cat, b_cat = first_layer_map([w], [b])  # [d, T·k], [T·k]
                h = torch.addmm(b_cat, base, w_cat)  # [B, T·k]
                h_bt = h.relu_().view(B, T, k)  # [B, T, k]
                h = h_bt.transpose(0, 1)  # [T, B, k]
            else:
                h_bt = None
                h = torch.baddbmm(b, h, w).relu_()  # [T, B, k]
        raise AssertionError("unreachable: the last layer returns")

    def _fused(self, x: torch.Tensor, shared: bool, weights: List[nn.Parameter],
               biases: List[nn.Parameter]) -> torch.Tensor:
        """The forward on the CPU's fused passes: the hidden layers before the last as
        :func:`~dlrm_mtl.modules.fused_affine.affine_act`, the last hidden layer with the logit
        layer as one :class:`~dlrm_mtl.modules.fused_affine.TowerHead` (``x [B, d]`` shared,
        else ``[T, B, d]``)."""
        T = weights[0].shape[0]
        L = len(weights)
        h = x
        for i in range(L - 2):
            w, b = weights[i], biases[i]  # [T, a, k], [T, 1, k]
            if h.dim() == 2:  # the shared first layer: one product over the towers' weights side by side
                k = w.shape[-1]
                h = affine_act(h, *first_layer_map([w], [b]), True)  # [B, T·k]
                h = h.view(h.shape[0], T, k).transpose(0, 1)  # [T, B, k]
            else:
                h = affine_act(h, w, b.view(T, -1), True)  # [T, B, k]
        w, b = weights[L - 2], biases[L - 2]  # [T, a, K], [T, 1, K]
        v, c = weights[L - 1].view(T, -1), biases[L - 1].view(T)  # [T, K], [T]
        if h.dim() == 2:  # the towers' weights side by side, [a, T·K]
            return TowerHead.apply(h, *first_layer_map([w], [b]), v, c)  # [B, T]
        return TowerHead.apply(h, w, b.view(T, -1), v, c)  # [B, T]
