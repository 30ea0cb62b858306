"""HiNet's scenario extraction layer: shared SEI, scenario-specific SEIs and scenario-aware attention."""

from __future__ import annotations

from typing import ClassVar, List, Self, Tuple

import torch
from torch import nn

from dlrm_mtl.config import LayerConfig
from dlrm_mtl.modules.layer_output import LayerOutput
from dlrm_mtl.modules.layer_config import LayerDims
from dlrm_mtl.modules.sub_expert_integration import SubExpertIntegration
from dlrm_mtl.modules.softmax import softmax_last
from dlrm_mtl.modules.mixture import mix_experts
from dlrm_mtl.modules.scenario_routing import own_scenario


class ScenarioAwareAttention(nn.Module):
    """HiNet's scenario-aware attentive network, SAN (Zhou et al., ICDE 2023, §III-B-2): for a
    row of scenario s, attention weights computed from the scenario indicator embedding ``e_s``
    over the *other* scenarios' specific-expert outputs::

        a = softmax_{j≠s}(W e_s + b),   SAN(x) = Σ_{j≠s} a_j · E_j(x)

    The row's own scenario is masked to −∞ before the softmax, so its weight is exactly 0 and
    the other weights sum to 1.

    Deviation: the authors' public TensorFlow code applies the softmax over all S scenarios
    and zeroes the own one afterwards (weights then sum to less than 1) and uses an MLP on the
    embedding; here the own scenario is excluded before the softmax (the weights are a
    distribution over the other scenarios, as the paper describes) and the scorer is one
    linear layer.

    With S = 2 there is one other scenario, its weight is always 1 and the scorer would get no
    gradient, so it is not built.

    ``scenario_emb [B, e]``, ``scenario [B]``, ``specific [B, S, d]`` -> ``[B, d]``, weights ``[B, S]``.

    Example::

        san = ScenarioAwareAttention(8, num_scenarios=3)
        y, a = san(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]), torch.randn(4, 3, 16))
        y.shape, a.shape   # [4, 16], [4, 3] with a[i, scenario[i]] == 0
    """

    def __init__(self, emb_dim: int, num_scenarios: int) -> None:
        super().__init__()
        if num_scenarios < 2:
            raise ValueError(f"HiNet's scenario-aware attention needs at least 2 scenarios (other scenarios to attend to), got {num_scenarios}")
        self.num_scenarios = num_scenarios
        self.score = nn.Linear(emb_dim, num_scenarios) if num_scenarios > 2 else None

    def forward(self, scenario_emb: torch.Tensor, scenario: torch.Tensor, specific: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        own = own_scenario(scenario, self.num_scenarios)  # [B, S]
        if self.score is None:
            weights = (~own).to(specific.dtype)  # [B, 2]: the one other scenario
        else:
            logits = self.score(scenario_emb)  # [B, S]
            weights = softmax_last(logits.masked_fill(own, float("-inf")))  # [B, S], own = 0
        return mix_experts(weights.unsqueeze(1), specific).squeeze(1), weights  # [B, d], [B, S]


class HiNetScenarioLayer(nn.Module):
    """HiNet's scenario extraction layer (Zhou et al., ICDE 2023, "HiNet: Novel Multi-Scenario &
    Multi-Task Learning with Hierarchical Information Extraction", §III-B): for a row
    of scenario s::

        E_sh = SEI_shared(x)                    scenario-shared expert (an SEI module)
        E_j  = SEI_j(x),  j = 1..S              scenario-specific experts (SEI modules)
        E_san = Σ_{j≠s} a_j(e_s) · E_j          scenario-aware attentive network (SAN)
        y = [E_sh ⊕ E_s ⊕ E_san]                concatenated: 3 · out_dim features

    HiNet's task extraction layer is CGC over tasks (the ``cgc`` task layer type) and its
    per-scenario loss weights λ belong to the loss, not to this layer.

    Every SEI has ``sub_experts`` sub-experts (the paper's authors' code: 5). The layer's output
    is the concatenation, as in the paper, so ``out_dim`` of the layer is ``3 · out_dim`` of
    its experts (no projection).

    Cost: the SAN needs every scenario's specific expert for every row, so the S specific SEI
    modules run on all rows (one batched bank call): S× the specific-expert compute is
    inherent in HiNet, not an implementation choice.

    ``x [B, d]``, ``scenario [B]``, ``scenario_emb [B, e]`` -> ``y [B, 3·out_dim]``, gates
    ``{"shared": [B, K], "specific": [B, K]`` (the row's own scenario's SEI gate)``,
    "san": [B, S]}`` (own scenario 0).

    Example::

        hinet = HiNetScenarioLayer(32, num_scenarios=3, emb_dim=8, sub_experts=2, hidden=[64], out_dim=16)
        out = hinet(torch.randn(8, 32), torch.randint(0, 3, (8,)), torch.randn(8, 8))
        out.y.shape, out.gates["san"].shape   # [8, 48], [8, 3]
    """

    # the LayerConfig fields from_config reads (``level``: read by the dense arch for every scenario layer)
    CONFIG_FIELDS: ClassVar[Tuple[str, ...]] = ("sub_experts", "hidden", "out_dim")

    @classmethod
    def from_config(cls, cfg: LayerConfig, dims: LayerDims, where: str = "layer") -> Self:
        """The ``hinet`` scenario layer of ``cfg`` over the scenarios of ``dims``."""
        return cls(dims.in_dim, dims.num_scenarios, dims.emb_dim, cfg.sub_experts, cfg.hidden, cfg.out_dim)

    def __init__(self, in_dim: int, num_scenarios: int, emb_dim: int, sub_experts: int, hidden: List[int], out_dim: int) -> None:
        super().__init__()
        self.num_scenarios = num_scenarios
        self.shared = SubExpertIntegration(in_dim, 1, sub_experts, hidden, out_dim)
        self.specific = SubExpertIntegration(in_dim, num_scenarios, sub_experts, hidden, out_dim)
        self.san = ScenarioAwareAttention(emb_dim, num_scenarios)
        self.out_dim = 3 * out_dim

    def forward(self, x: torch.Tensor, scenario: torch.Tensor, scenario_emb: torch.Tensor) -> LayerOutput:
        rows = torch.arange(x.shape[0], device=x.device)
        shared, shared_gate = self.shared(x)  # [B, 1, d'], [B, 1, K]
        specific, specific_gates = self.specific(x)  # [B, S, d'], [B, S, K]
        san, san_weights = self.san(scenario_emb, scenario, specific)  # [B, d'], [B, S]
        y = torch.cat([shared[:, 0], specific[rows, scenario], san], dim=1)  # [B, 3·d']
        gates = {"shared": shared_gate[:, 0], "specific": specific_gates[rows, scenario], "san": san_weights}
        return LayerOutput(y, gates)
