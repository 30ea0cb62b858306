"""Masked mean of a behaviour sequence's events: the baseline sequence encoder."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class MeanPooling(nn.Module):
    """The mean of the real events, ``Σ_j m_j e_j / max(1, Σ_j m_j)``: what pooling the
    sequence as a multi-hot feature with ``pooling: mean`` gives, for comparison with the
    attention encoders. A row without events gives zeros. ``target`` is ignored.

    Shapes: ``events [B, L, D]``, ``mask [B, L]`` bool -> ``[B, D]``.

    Example::

        enc = MeanPooling(16)
        v = enc(torch.randn(4, 10, 16), torch.rand(4, 10) > 0.5)   # [4, 16]
    """

    def __init__(self, event_dim: int) -> None:
        super().__init__()
        self.out_dim = event_dim

    def forward(self, events: torch.Tensor, mask: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        m = mask.to(events.dtype).unsqueeze(2)  # [B, L, 1]
        return (events * m).sum(1) / m.sum(1).clamp(min=1.0)  # [B, D]
