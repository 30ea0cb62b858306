"""Shallow position-bias tower (YouTube MMoE, Zhao et al. RecSys 2019, §4.4)."""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from dlrm_mtl.modules.mlp import MLP


class BiasTower(nn.Module):
    """A small MLP on bias features (e.g. the display position) whose scalar output is added to
    the logits of selected tasks *during training only*: the main model then learns the
    position-free preference, and serving drops the tower (the paper feeds position at
    training time and a missing/default value at serving; dropping the tower is the same as
    serving every item at one reference position).

    Deviation: the paper also applies a 10 % drop-out to the position feature; it is left
    out here (the tower is simply not used at evaluation and serving).

    ``bias [B, Fb]`` -> ``[B, 1]``.

    Example::

        tower = BiasTower(1, [16])
        tower(torch.tensor([[1.0], [5.0]])).shape   # [2, 1]
    """

    def __init__(self, num_features: int, hidden: List[int]) -> None:
        super().__init__()
        self.mlp = MLP(num_features, list(hidden))
        self.out = nn.Linear(self.mlp.out_dim, 1)

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(bias))  # [B, 1]
