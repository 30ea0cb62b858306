"""DeepMCP's matching subnet: a user tower and an item tower whose inner product predicts the click."""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn


def tanh_tower(in_dim: int, sizes: List[int]) -> nn.Sequential:
    """Linear layers, each followed by tanh (DeepMCP's towers)."""
    layers: List[nn.Module] = []
    for out in sizes:
        layers += [nn.Linear(in_dim, out), nn.Tanh()]
        in_dim = out
    return nn.Sequential(*layers)


class MatchingSubnet(nn.Module):
    """The user–item relevance of DeepMCP (Ouyang et al. 2019, §3.2): a user tower over the
    user's features and an item (ad) tower over the candidate's, each a stack of tanh layers
    ending in the matching width d, score ``s(u, a) = v_u · v_a`` and the matching loss, the
    log loss of σ(s) against the click label (the paper's eq. for L_m)::

        v_u = tanh(... tanh(W_1 e_u + b_1) ...),   v_a likewise
        L_m = − Σ_i r_i [y_i log σ(s_i) + (1 − y_i) log(1 − σ(s_i))] / Σ_i r_i

    with ``r_i`` the row's weight where its label is known (0 elsewhere). The towers read the
    same embeddings as the prediction subnet: the matching loss shapes them (DeepMCP's point).

    ``user [B, Du]``, ``item [B, Da]``, ``label [B]``, ``rows [B]`` float weights -> ``(L_m [],
    s [B])``.

    Example::

        m = MatchingSubnet(32, 24, [64, 32])
        loss, score = m(torch.randn(8, 32), torch.randn(8, 24), torch.randint(0, 2, (8,)).float(), torch.ones(8))
    """

    def __init__(self, user_dim: int, item_dim: int, sizes: List[int]) -> None:
        super().__init__()
        if not sizes:
            raise ValueError("the matching towers need at least one layer (their last size is the matching width)")
        self.user_tower = tanh_tower(user_dim, sizes)
        self.item_tower = tanh_tower(item_dim, sizes)

    def forward(self, user: torch.Tensor, item: torch.Tensor, label: torch.Tensor,
                rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score = (self.user_tower(user) * self.item_tower(item)).sum(1)  # [B] v_u · v_a
        loss = F.binary_cross_entropy_with_logits(score, label, reduction="none")  # [B]
        return (loss * rows).sum() / rows.sum().clamp(min=1e-12), score
