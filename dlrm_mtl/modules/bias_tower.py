"""Shallow position-bias tower (YouTube MMoE, Zhao et al. RecSys 2019, §4.4)."""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from dlrm_mtl.modules.mlp import MLP


class BiasTower(nn.Module):
    """A small MLP on bias features (e.g. the display position) whose scalar output is added to
    the logits of selected tasks *during training only*: the main model then learns the
    position-free preference, and serving drops the tower (the paper feeds position at
    training time and a missing/default value at serving; dropping the tower is the same as
    serving every item at one reference position).

    The output is f(bias) − f(reference): 0 at the reference values (e.g. position 1), so
    dropping the tower predicts as if every item were shown at the reference, and the tower
    cannot absorb the main model's intercept.

    Deviation: the paper also applies a 10 % drop-out to the position feature; it is left
    out here (the tower is simply not used at evaluation and serving).

    ``bias [B, Fb]`` -> ``[B, 1]``.

    Example::

        tower = BiasTower(1, [16], reference=[1.0])
        tower(torch.tensor([[1.0], [5.0]]))   # [2, 1]; row 0 is exactly 0
    """

    def __init__(self, num_features: int, hidden: List[int], reference: Optional[List[float]] = None) -> None:
        super().__init__()
        self.mlp = MLP(num_features, list(hidden))
        self.out = nn.Linear(self.mlp.out_dim, 1)
        ref = torch.tensor(list(reference) if reference else [0.0] * num_features, dtype=torch.float32)
        self.register_buffer("reference", ref[None, :], persistent=False)  # [1, Fb]

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        both = self.out(self.mlp(torch.cat([bias, self.reference.to(bias.dtype)], dim=0)))  # [B + 1, 1]
        return both[:-1] - both[-1:]  # [B, 1]
