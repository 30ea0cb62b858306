"""HiNet's sub-expert integration module (SEI): sub-experts mixed by a softmax gate, M modules batched."""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from dlrm_mtl.modules.expert_bank import ExpertBank
from dlrm_mtl.modules.gates import SoftmaxGate
from dlrm_mtl.modules.mixture import mix_experts


class SubExpertIntegration(nn.Module):
    """M independent SEI modules of HiNet (Zhou et al., ICDE 2023, "HiNet: Novel Multi-Scenario
    & Multi-Task Learning with Hierarchical Information Extraction", §III-B): module m
    is K sub-experts (ReLU MLPs) and a softmax gate on the same input mixing them::

        SEI_m(x) = Σ_k g_{m,k}(x) · f_{m,k}(x),    g_m(x) = softmax(W_m x + b_m)

    All M·K sub-experts are one :class:`ExpertBank` and the M gates one :class:`SoftmaxGate`, so
    there is no Python loop over modules or sub-experts. HiNet uses M = 1 for the
    scenario-shared expert and M = S (one per scenario) for the scenario-specific experts.

    ``x [B, in]`` -> ``y [B, M, out]``, gates ``[B, M, K]`` (rows sum to 1).

    Example::

        sei = SubExpertIntegration(32, num_modules=3, sub_experts=2, hidden=[64], out_dim=16)
        y, g = sei(torch.randn(8, 32))
        y.shape, g.shape   # [8, 3, 16], [8, 3, 2]
    """

    def __init__(self, in_dim: int, num_modules: int, sub_experts: int, hidden: List[int], out_dim: int) -> None:
        super().__init__()
        if sub_experts < 1:
            raise ValueError(f"an SEI module needs sub_experts >= 1, got {sub_experts}")
        self.num_modules, self.sub_experts, self.out_dim = num_modules, sub_experts, out_dim
        self.experts = ExpertBank(num_modules * sub_experts, in_dim, hidden, out_dim)  # f_{m,k}, module-major
        self.gate = SoftmaxGate(in_dim, num_modules, sub_experts)  # g_m

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        B = x.shape[0]
        experts = self.experts(x).view(B, self.num_modules, self.sub_experts, self.out_dim)  # [B, M, K, out]
        gates = self.gate(x)  # [B, M, K]
        return mix_experts(gates.unsqueeze(-2), experts).squeeze(-2), gates  # [B, M, out], [B, M, K]
