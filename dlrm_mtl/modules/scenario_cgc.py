"""Scenario layer: shared and scenario-specific experts, gated per row by the row's scenario."""

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
from dlrm_mtl.modules.scenario_routing import ROUTINGS, checked_routing, group_by_scenario, static_routing


class ScenarioCGCLayer(nn.Module):
    """Maps ``x [B, d]`` routed by a scenario id ``[B]`` to ``[B, d']``.

    For a row of scenario s (one level of the hierarchy) the layer mixes the ``num_shared``
    shared experts and scenario s's own ``num_specific`` experts with scenario s's gate,
    whose input is ``x ⊕ e_s`` (the scenario embedding)::

        y = Σ_k g_{s,k}(x ⊕ e_s) · expert_k(x),   k ∈ shared ∪ specific(s)

    This is CGC (Tang et al. 2020, eq. 1-4) applied over scenarios instead of tasks, as in
    HiNet's scenario extraction layer (Zhou et al. 2023, §III-B) without its sub-expert
    ensembles and scenario-aware attention (see :class:`HiNetScenarioLayer` for those). With
    ``num_shared=0, num_specific=1`` it is the per-scenario separate network baseline
    ("Parallel DNN": every scenario has its own layer, nothing shared above the embeddings).

    ``routing`` picks how a row reaches its scenario's experts (equal results either way):

    * ``gather``: rows grouped by scenario (:func:`group_by_scenario`; one batched bank call per
      scenario), so the expert cost does not grow with S; the group sizes are read on the
      host (one synchronisation) and the shapes depend on the data;
    * ``static``: every scenario's specific experts run on every row (one bank call) and each
      row takes its own scenario's outputs with a gather: S × the specific experts' FLOPs, but
      static shapes, no host synchronisation, a dozen fewer operators (CUDA-graph capturable);
    * ``auto`` (default): ``static`` on GPU or when S ≤ 4, else ``gather``.

    Example::

        layer = ScenarioCGCLayer(32, num_scenarios=2, emb_dim=8, num_shared=2, num_specific=1,
                              hidden=[64], out_dim=16)
        out = layer(torch.randn(8, 32), torch.randint(0, 2, (8,)), torch.randn(8, 8))
        out.y.shape, out.gates[""].shape   # [8, 16], [8, 3] (shared experts first, then the row's own)
    """

    # the LayerConfig fields from_config reads (``level``: read by the dense arch for every scenario layer)
    CONFIG_FIELDS: ClassVar[Tuple[str, ...]] = ("routing", "num_shared", "num_specific", "hidden", "out_dim")

    @classmethod
    def from_config(cls, cfg: LayerConfig, dims: LayerDims, where: str = "layer") -> Self:
        """The ``cgc`` scenario layer of ``cfg`` over ``dims.num_scenarios`` scenarios; a
        ``routing`` it does not know is a ConfigError naming ``where`` (the layer's key)."""
        routing = checked_routing(cfg, where)
        return cls(dims.in_dim, dims.num_scenarios, dims.emb_dim, cfg.num_shared, cfg.num_specific, cfg.hidden, cfg.out_dim,
                   routing=routing)

    def __init__(
        self,
        in_dim: int,
        num_scenarios: int,
        emb_dim: int,
        num_shared: int,
        num_specific: int,
        hidden: List[int],
        out_dim: int,
        routing: str = "auto",
    ) -> None:
        super().__init__()
        if num_shared + num_specific <= 0:
            raise ValueError("a scenario layer needs at least one expert")
        if routing not in ROUTINGS:
            raise ValueError(f"routing {routing!r}: expected one of {ROUTINGS}")
        self.routing = routing
        self.num_scenarios = num_scenarios
        self.num_shared, self.num_specific = num_shared, num_specific
        self.shared = ExpertBank(num_shared, in_dim, hidden, out_dim) if num_shared else None
        self.specific = ExpertBank(num_scenarios * num_specific, in_dim, hidden, out_dim) if num_specific else None
        # one expert per row (the separate-network baseline): nothing to gate
        self.gate = SoftmaxGate(in_dim + emb_dim, num_scenarios, num_shared + num_specific) if num_shared + num_specific > 1 else None
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor, scenario: torch.Tensor, scenario_emb: torch.Tensor) -> LayerOutput:
        """x ``[B, d]``, scenario ``[B]`` int, scenario_emb ``[B, e]`` -> ``y [B, d']``, gates ``{"": [B, E_sh + E_sp]}``."""
        B = x.shape[0]
        parts = []
        if self.shared is not None:
            parts.append(self.shared(x))  # [B, E_sh, d']
        if self.specific is not None:
            k = self.num_specific
            if static_routing(self.routing, x, self.num_scenarios):
                every = self.specific(x).view(B, self.num_scenarios, k, -1)  # [B, S, E_sp, d']
                own = scenario.view(B, 1, 1, 1).expand(B, 1, k, every.shape[-1])
                parts.append(every.gather(1, own).squeeze(1))  # [B, E_sp, d']
            else:
                groups = group_by_scenario(scenario, self.num_scenarios)
                spec = [self.specific(x_s, s * k, k) for s, x_s in enumerate(groups.split(x))]  # [B_s, E_sp, d'] each
                parts.append(groups.merge(spec))  # [B, E_sp, d']
        experts = torch.cat(parts, dim=1)  # [B, E, d']
        if self.gate is None:
            gates = x.new_ones(B, 1)  # [B, 1]
        else:
            all_gates = self.gate(torch.cat([x, scenario_emb], dim=1))  # [B, S, E]
            gates = all_gates[torch.arange(B, device=x.device), scenario]  # [B, E]
        return LayerOutput(mix_experts(gates.unsqueeze(1), experts).squeeze(1), {"": gates})
