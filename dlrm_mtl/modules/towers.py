"""The task towers: one MLP per task, evaluated together."""

from __future__ import annotations

import math
from typing import List

import torch
from torch import nn


class TaskTowers(nn.Module):
    """T independent towers ``d -> hidden... -> 1`` (ReLU between layers, none after the last),
    one per task, with stacked weights: each layer is one ``baddbmm`` over the task axis
    instead of T ``addmm`` calls, so the operator count does not grow with T.

    Initialised like ``nn.Linear`` (weights and biases uniform in ±1/√in).

    ``x [T, B, d]`` (tower t reads ``x[t]``) -> logits ``[B, T]``.

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
        h = x  # [T, B, d]
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)  # [T, B, k]
            if i < last:
                h = h.relu_()
        return h.squeeze(-1).t()  # [B, T]
