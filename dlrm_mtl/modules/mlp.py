"""Multi-layer perceptron."""

from __future__ import annotations

from typing import List

import torch
from torch import nn


class MLP(nn.Module):
    """Linear layers with ReLU between them (and after the last one unless ``last_activation=False``).

    Args:
        in_dim: input features.
        layer_sizes: output size of each layer.

    Example::

        mlp = MLP(13, [64, 16])
        mlp(torch.randn(8, 13)).shape  # [8, 16]
    """

    def __init__(self, in_dim: int, layer_sizes: List[int], last_activation: bool = True) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        for i, out in enumerate(layer_sizes):
            layers.append(nn.Linear(in_dim, out))
            if last_activation or i < len(layer_sizes) - 1:
                layers.append(nn.ReLU())
            in_dim = out
        self.net = nn.Sequential(*layers)
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
