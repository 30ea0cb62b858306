"""Feature interaction over pooled embeddings and the dense projection."""

from __future__ import annotations

import torch
from torch import nn


class DotInteraction(nn.Module):
    """DLRM interaction (Naumov et al. 2019, §2): pairwise dot products of the F+1 vectors
    (dense projection and F pooled embeddings), concatenated with the dense projection and
    the flattened embeddings (kept so the expert arch also sees first-order features).

    Example::

        inter = DotInteraction(num_features=6, dim=16)
        inter(torch.randn(8, 16), torch.randn(8, 6, 16)).shape   # [8, inter.out_dim] = [8, 16 + 96 + 21]
    """

    def __init__(self, num_features: int, dim: int) -> None:
        super().__init__()
        n = num_features + 1
        rows, cols = torch.triu_indices(n, n, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.out_dim = dim + num_features * dim + n * (n - 1) // 2

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """dense: ``[B, D]``, sparse: ``[B, F, D]`` -> ``[B, out_dim]``."""
        z = torch.cat([dense.unsqueeze(1), sparse], dim=1)  # [B, F+1, D]
        dots = torch.bmm(z, z.transpose(1, 2))[:, self.rows, self.cols]  # [B, (F+1)F/2]
        return torch.cat([dense, sparse.flatten(1), dots], dim=1)


class ConcatInteraction(nn.Module):
    """First-order interaction: the dense vector and the pooled embeddings side by side, as
    the MMoE (Ma et al. 2018, §5.3) and PLE (Tang et al. 2020, §5.2) experiments feed their
    experts; pairwise products are left to the expert layers. Embedding dims may differ.

    ``out_dim = dense_dim + Σ_f D_f``.

    Example::

        inter = ConcatInteraction(dense_dim=7, sparse_dim=40 * 8)
        inter(torch.randn(8, 7), torch.randn(8, 40, 8)).shape   # [8, 7 + 320]
    """

    def __init__(self, dense_dim: int, sparse_dim: int) -> None:
        super().__init__()
        self.out_dim = dense_dim + sparse_dim

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """dense: ``[B, Dd]``, sparse: ``[B, F, D]`` or ``[B, Σ D_f]`` -> ``[B, out_dim]``."""
        return torch.cat([dense, sparse.flatten(1)], dim=1)
