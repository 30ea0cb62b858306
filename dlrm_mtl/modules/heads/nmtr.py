"""NMTR: Neural Multi-Task Recommendation (Gao et al., ICDE 2019, "Neural Multi-Task
Recommendation from Multi-Behavior Data")."""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from dlrm_mtl.modules.heads.common import TaskChain, TaskLogits, TowerBank, conditional_logits
from dlrm_mtl.modules.layer_output import LayerOutput


class NMTRHead(nn.Module):
    """NMTR's cascaded prediction over the ordered behaviours of the task chain.

    Each behaviour r has its own interaction function f_r on the shared representation (here a
    tower: ``model.tower`` sizes, ReLU, then a linear score), and a behaviour's prediction is
    built on the previous behaviour's: the score accumulates along the cascade,

        s_1 = f_1(x),   s_r = s_{r−1} + f̃_r(x),   ŷ_r = σ(s_r),

    with ŷ_r, as in NMTR, the probability of behaviour r over all impressions (P(click ∧
    conversion | x) for cvr). Deviation: the increment is kept non-positive,
    f̃_r = −softplus(f_r), so ŷ_r ≤ ŷ_{r−1} by construction — the cascade's premise (a
    behaviour implies the one before it) — where NMTR leaves it unconstrained. This makes
    ŷ_r / ŷ_{r−1} a probability, which is what the project's loss reads (below).

    Output convention: :class:`EntireSpaceLoss` reads conditional logits; the head returns
    ``conditional_logits(s)``: a root keeps s_1, behaviour r's column is the logit of
    ŷ_r / ŷ_{r−1} = P(r | r−1, x), and the task graph's product gives back ŷ_r. A child with
    ``loss_space: entire`` is then trained on ŷ_r against its chained label over every
    impression — NMTR's per-behaviour log loss on the whole space; with ``parent_positive``
    on ŷ_r / ŷ_{r−1} over the parent's positives. The cascade's prior: for a fixed f_r, the
    conditional P(r | r−1) = σ(s_{r−1} − f̃)/σ(s_{r−1}) grows with s_{r−1} — a row more likely
    to take step r−1 is more likely to take step r after it.

    A task off the chain (a root without a chained child, a regression task) is its tower's
    score s_t = f_t(x). No auxiliary loss, no gates.

    ``x [T, B, d]`` or ``[B, d]`` -> :class:`LayerOutput` (``y = logits [B, T]``).

    Example::

        head = NMTRHead(task_chain(schema, chain=True), in_dim=64, tower=[32])
        torch.sigmoid(head(torch.randn(2, 8, 64)).y).prod(1)   # ŷ of the last behaviour, [8]
    """

    def __init__(self, chain: TaskChain, in_dim: int, tower: List[int]) -> None:
        super().__init__()
        T = len(chain.parents)
        self.chain = chain
        self.towers = TowerBank(T, in_dim, tower)
        self.scores = TaskLogits(T, self.towers.out_dim)
        self.aux_weight = 1.0  # no auxiliary loss

    def entire_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``s [B, T]``: the cascaded entire-space logits before the conversion."""
        f = self.scores(self.towers(x))  # [B, T] behaviour scores f_t
        s: List[torch.Tensor] = list(f.unbind(1))
        for t in self.chain.order:
            p = self.chain.link_parent(t)
            if p >= 0:
                s[t] = s[p] - F.softplus(f[:, t])  # [B]
        return torch.stack(s, dim=1)  # [B, T]

    def forward(self, x: torch.Tensor) -> LayerOutput:
        return LayerOutput(conditional_logits(self.entire_logits(x), self.chain.links))
