"""DeepMCP's correlation subnet: skip-gram over a behaviour sequence, with negative sampling."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn


def negative_positions(B: int, L: int, k: int, negatives: int, device: torch.device) -> torch.Tensor:
    """``[B, L - k, Q]`` positions in the flattened ``[B·L]`` events: anchor p's q-th negative
    is ``(p · 7919 + (q + 1) · 104729 + k · 15485863) mod B·L`` (primes: for a fixed q and k
    the map from anchors to negatives is a permutation whenever B·L is not a multiple of 7919)."""
    n = B * L
    anchor = (torch.arange(B, device=device).unsqueeze(1) * L + torch.arange(L - k, device=device)).unsqueeze(2)  # [B, L-k, 1]
    q = torch.arange(1, negatives + 1, device=device)  # [Q]
    return (anchor * 7919 + q * 104729 + k * 15485863) % n


class CorrelationSubnet(nn.Module):
    """The item–item correlation of DeepMCP (Ouyang et al. 2019, §3.3): items the user
    interacted with close in time should be close in the embedding space. Each event's
    embedding e_j (its item and side-info embeddings) becomes ``h_j = tanh(W e_j + b)``; every
    pair of real events at most ``window`` apart is a positive pair, and each positive pair
    gets ``negatives`` negative items (skip-gram with negative sampling, the paper's L_c)::

        L_c = (1/|P|) Σ_{(j, k) ∈ P} [ −log σ(h_j · h_k) − Σ_{q=1..Q} log σ(−h_j · h_q) ]

    Deviation: the negatives are events of the whole batch (in-batch sampling, i.e. by item
    frequency in the batch) instead of draws from the item vocabulary: the tables are sharded,
    and looking up rows outside the batch would need a second all-to-all per step. They are
    picked by a fixed scattering of positions (:func:`negative_positions`), not by the random
    generator: the batches' rows are shuffled, so an anchor meets other items every step, and
    training stays reproducible whatever else draws random numbers (TorchRec's pipeline, an
    exact resume). A pick that lands on padding is dropped (a fixed number keeps the shapes
    static: no host synchronisation). A row's own events may be picked.

    ``events [B, L, D]``, ``mask [B, L]`` bool -> ``(L_c [], number of positive pairs [])``.

    Example::

        c = CorrelationSubnet(32, 16, window=2, negatives=4)
        loss, pairs = c(torch.randn(8, 10, 32), torch.rand(8, 10) > 0.3)
    """

    def __init__(self, event_dim: int, dim: int, window: int = 2, negatives: int = 4) -> None:
        super().__init__()
        if window < 1 or negatives < 0:
            raise ValueError(f"window must be >= 1 and negatives >= 0, got {window}, {negatives}")
        self.proj = nn.Linear(event_dim, dim)
        self.window, self.negatives = window, negatives

    def forward(self, events: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        B, L, _ = events.shape
        h = torch.tanh(self.proj(events))  # [B, L, d]
        m = mask.to(h.dtype)  # [B, L]
        total = h.new_zeros(())
        pairs = h.new_zeros(())
        flat_h, flat_m = h.reshape(B * L, -1), m.reshape(B * L)  # [B·L, d], [B·L]
        for k in range(1, min(self.window, L - 1) + 1):
            a, c = h[:, :-k], h[:, k:]  # [B, L-k, d] anchors and their contexts k steps later
            w = m[:, :-k] * m[:, k:]  # [B, L-k] both real
            pos = -F.logsigmoid((a * c).sum(2))  # [B, L-k]
            if self.negatives:
                draw = negative_positions(B, L, k, self.negatives, h.device)  # [B, L-k, Q]
                neg_h = flat_h[draw]  # [B, L-k, Q, d]
                neg = -F.logsigmoid(-(a.unsqueeze(2) * neg_h).sum(3)) * flat_m[draw]  # [B, L-k, Q]
                pos = pos + neg.sum(2)
            total = total + (pos * w).sum()
            pairs = pairs + w.sum()
        return total / pairs.clamp(min=1.0), pairs
