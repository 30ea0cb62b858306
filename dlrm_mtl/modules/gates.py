"""Gates: softmax weights over experts."""

from __future__ import annotations

import math

import torch
from torch import nn


class SoftmaxGate(nn.Module):
    """G independent softmax gates over E experts: ``w_g(x) = softmax(W_g x + b_g)`` (MMoE, Ma et
    al. KDD 2018, eq. 5; PLE, Tang et al. RecSys 2020, eq. 3).

    The input is either shared by all gates, ``x [B, in]``, or one per gate, ``x [G, B, in]``
    (PLE: task k's gate reads task k's representation). Initialised like ``nn.Linear``.

    Example::

        gate = SoftmaxGate(32, num_gates=3, num_experts=4)
        gate(torch.randn(8, 32)).shape      # [8, 3, 4], sums to 1 over the last axis
        gate(torch.randn(3, 8, 32)).shape   # per-gate inputs: [8, 3, 4]
    """

    def __init__(self, in_dim: int, num_gates: int, num_experts: int) -> None:
        super().__init__()
        self.num_gates, self.num_experts = num_gates, num_experts
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(num_gates, in_dim, num_experts).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_gates, num_experts).uniform_(-bound, bound))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in]`` or ``[G, B, in]`` -> gate logits ``[B, G, E]``."""
        if x.dim() == 2:
            return torch.einsum("bi,gie->bge", x, self.weight) + self.bias
        return torch.einsum("gbi,gie->bge", x, self.weight) + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=-1)  # [B, G, E]
