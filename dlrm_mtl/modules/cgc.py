"""Customized Gate Control task layer (PLE's single extraction network)."""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from dlrm_mtl.modules.expert_bank import ExpertBank
from dlrm_mtl.modules.gates import SoftmaxGate


class CGCLayer(nn.Module):
    """CGC (Tang et al., RecSys 2020, §4.2, eq. 1-3): task k's output is its own gate over the
    shared experts and task k's specific experts only::

        y_k = Σ_j g_{k,j}(x) · E_j(x),   E ∈ shared ∪ specific(k)

    Maps ``x [B, d]`` to ``[T, B, d']`` and returns the gates ``[B, T, E_sh + E_sp]``.

    Example::

        cgc = CGCLayer(32, num_tasks=2, num_shared=2, num_specific=1, hidden=[64], out_dim=16)
        y, gates = cgc(torch.randn(8, 32))
        y.shape, gates.shape   # [2, 8, 16], [8, 2, 3]
    """

    def __init__(self, in_dim: int, num_tasks: int, num_shared: int, num_specific: int, hidden: List[int], out_dim: int) -> None:
        super().__init__()
        if num_shared + num_specific <= 0:
            raise ValueError("a CGC layer needs at least one expert per task")
        self.num_tasks, self.num_shared, self.num_specific = num_tasks, num_shared, num_specific
        # one bank for shared and all task-specific experts: a single batched call
        self.experts = ExpertBank(num_shared + num_tasks * num_specific, in_dim, hidden, out_dim)
        self.gate = SoftmaxGate(in_dim, num_tasks, num_shared + num_specific)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        e = self.experts(x)  # [B, E_sh + T*E_sp, d']
        B, _, D = e.shape
        shared = e[:, : self.num_shared]  # [B, E_sh, d']
        specific = e[:, self.num_shared :].reshape(B, self.num_tasks, self.num_specific, D)  # [B, T, E_sp, d']
        experts = torch.cat([shared.unsqueeze(1).expand(B, self.num_tasks, self.num_shared, D), specific], dim=2)  # [B, T, E, d']
        gates = self.gate(x)  # [B, T, E]
        y = torch.einsum("bte,bted->tbd", gates, experts)  # [T, B, d']
        return y, gates
