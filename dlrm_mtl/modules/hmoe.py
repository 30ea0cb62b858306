"""HMoE as a scenario layer: one expert per scenario, other scenarios' experts with gradients stopped."""

from __future__ import annotations

from typing import ClassVar, List, Self, Tuple

import torch
from torch import nn

from dlrm_mtl.config import LayerConfig
from dlrm_mtl.modules.expert_bank import ExpertBank
from dlrm_mtl.modules.gates import SoftmaxGate
from dlrm_mtl.modules.layer_output import LayerOutput
from dlrm_mtl.modules.layer_config import LayerDims
from dlrm_mtl.modules.mixture import mix_experts
from dlrm_mtl.modules.scenario_routing import own_scenario


class HMoELayer(nn.Module):
    """HMoE (Li et al., CIKM 2020, "Improving Multi-Scenario Learning to Rank in E-commerce by
    Exploiting Task Relationships in the Label Space"; the multi-scenario baseline of
    AESM², Zou et al. SIGIR 2022) as a scenario layer.

    One expert network f_j per scenario j. Every row is passed through every scenario's expert;
    for a row of scenario s the experts are mixed by scenario s's gate, and only f_s receives
    gradient from the row — the other scenarios' outputs enter with gradients stopped, so a
    scenario's expert is trained by its own rows only while still being *used* by the others::

        y = g_{s,s}(x ⊕ e_s) · f_s(x) + Σ_{j≠s} g_{s,j}(x ⊕ e_s) · sg(f_j(x))

    (sg = stop-gradient). The gate itself learns from every row.

    Deviation: the paper combines the scenarios' *predictions* (its experts are complete
    scenario models and the gate mixes their scores: the "label space"); here HMoE is a
    representation layer, so the experts output ``out_dim`` features that the task layers and
    towers turn into logits. This lets HMoE compose with any task layer (and stack) like every
    other scenario layer; the stop-gradient structure and the scenario-conditioned gate are
    kept as in the paper.

    Every row needs every scenario's output, so the layer costs S experts per row; that is
    inherent in HMoE (all S experts run as one batched :class:`ExpertBank` call).

    ``x [B, d]``, ``scenario [B]``, ``scenario_emb [B, e]`` -> ``y [B, out_dim]``, gates
    ``{"": [B, S]}`` (the row's scenario's gate over the S scenario experts).

    Example::

        hmoe = HMoELayer(32, num_scenarios=3, emb_dim=8, hidden=[64], out_dim=16)
        out = hmoe(torch.randn(8, 32), torch.randint(0, 3, (8,)), torch.randn(8, 8))
        out.y.shape, out.gates[""].shape   # [8, 16], [8, 3]
    """

    # the LayerConfig fields from_config reads (``level``: read by the dense arch for every scenario layer)
    CONFIG_FIELDS: ClassVar[Tuple[str, ...]] = ("hidden", "out_dim")

    @classmethod
    def from_config(cls, cfg: LayerConfig, dims: LayerDims, where: str = "layer") -> Self:
        """The ``hmoe`` scenario layer of ``cfg``: one expert per scenario of ``dims``."""
        return cls(dims.in_dim, dims.num_scenarios, dims.emb_dim, cfg.hidden, cfg.out_dim)

    def __init__(self, in_dim: int, num_scenarios: int, emb_dim: int, hidden: List[int], out_dim: int) -> None:
        super().__init__()
        self.num_scenarios, self.out_dim = num_scenarios, out_dim
        self.experts = ExpertBank(num_scenarios, in_dim, hidden, out_dim)  # f_1 .. f_S
        self.gate = SoftmaxGate(in_dim + emb_dim, num_scenarios, num_scenarios)  # one gate per scenario

    def forward(self, x: torch.Tensor, scenario: torch.Tensor, scenario_emb: torch.Tensor) -> LayerOutput:
        B = x.shape[0]
        experts = self.experts(x)  # [B, S, d']
        own = own_scenario(scenario, self.num_scenarios).unsqueeze(-1)  # [B, S, 1]
        experts = torch.where(own, experts, experts.detach())  # other scenarios' outputs: stop-gradient
        gates = self.gate(torch.cat([x, scenario_emb], dim=1))[torch.arange(B, device=x.device), scenario]  # [B, S]
        y = mix_experts(gates.unsqueeze(1), experts).squeeze(1)  # [B, d']
        return LayerOutput(y, {"": gates})
