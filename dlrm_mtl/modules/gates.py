"""Gates: softmax weights over experts."""

from __future__ import annotations

import torch
from torch import nn


class SoftmaxGate(nn.Module):
    """G independent softmax gates over E experts: ``w_g(x) = softmax(x W_g)`` (MMoE eq. 5).

    Example::

        gate = SoftmaxGate(32, num_gates=3, num_experts=4)
        gate(torch.randn(8, 32)).shape   # [8, 3, 4], rows sum to 1 over the last axis
    """

    def __init__(self, in_dim: int, num_gates: int, num_experts: int) -> None:
        super().__init__()
        self.num_gates, self.num_experts = num_gates, num_experts
        self.proj = nn.Linear(in_dim, num_gates * num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.proj(x).view(x.shape[0], self.num_gates, self.num_experts), dim=-1)
