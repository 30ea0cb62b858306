"""STAR's star-topology fully-connected network: shared weights ⊙ scenario-specific weights."""

from __future__ import annotations

import math
from typing import List

import torch
from torch import nn

from dlrm_mtl.modules.scenario_routing import ROUTINGS, group_by_scenario, static_routing


class StarTopologyFCN(nn.Module):
    """Star Topology FCN (Sheng et al., CIKM 2021, "One Model to Serve All: Star Topology
    Adaptive Recommender for Multi-Domain CTR Prediction", §4.2, eq. 3-4).

    Every layer has centred (shared) parameters ``W, b`` and per-scenario parameters
    ``W_s, b_s``; a row of scenario s goes through the layer with (eq. 3)::

        W*_s = W_s ⊙ W,    b*_s = b_s + b

    and ``out = φ(W*_s^T in + b*_s)`` (eq. 4), φ = ReLU after every layer (the last one too:
    the output is a representation for the task layers / towers, not a logit).

    Sizes ``in_dim -> hidden... -> out_dim``. ``W`` is He-uniform initialised (as in
    :class:`ExpertBank`), ``W_s`` to ones and both biases to zero, so every scenario starts
    from the shared network and learns its multiplicative deviation.

    ``routing`` as in :class:`ScenarioCGCLayer`: ``gather`` groups rows by scenario
    (:func:`group_by_scenario`), so a row is computed with its own scenario's weights only and
    the cost is that of one FCN, not S of them; ``static`` runs every scenario's FCN on every
    row (one ``baddbmm`` per layer, S × the FLOPs, static shapes, no host synchronisation) and
    keeps each row's own; ``auto``: static on GPU or for S ≤ 4. Building ``W*_s`` for all S costs S times the
    parameter count per step, independent of the batch size.

    ``x [B, in]``, ``scenario [B]`` -> ``[B, out]``.

    Example::

        fcn = StarTopologyFCN(32, num_scenarios=3, hidden=[64], out_dim=16)
        fcn(torch.randn(8, 32), torch.randint(0, 3, (8,))).shape   # [8, 16]
        fcn.effective_weights(1)[0].shape                          # W*_1 of layer 0: [32, 64]
    """

    def __init__(self, in_dim: int, num_scenarios: int, hidden: List[int], out_dim: int, routing: str = "auto") -> None:
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"routing {routing!r}: expected one of {ROUTINGS}")
        self.num_scenarios, self.out_dim, self.routing = num_scenarios, out_dim, routing
        sizes = [in_dim] + list(hidden) + [out_dim]
        self.shared_weights = nn.ParameterList()  # W: [in, out] per layer
        self.shared_biases = nn.ParameterList()  # b: [out]
        self.scenario_weights = nn.ParameterList()  # W_s: [S, in, out]
        self.scenario_biases = nn.ParameterList()  # b_s: [S, out]
        for a, b in zip(sizes[:-1], sizes[1:]):
            bound = math.sqrt(6.0 / a)
            self.shared_weights.append(nn.Parameter(torch.empty(a, b).uniform_(-bound, bound)))
            self.shared_biases.append(nn.Parameter(torch.zeros(b)))
            self.scenario_weights.append(nn.Parameter(torch.ones(num_scenarios, a, b)))
            self.scenario_biases.append(nn.Parameter(torch.zeros(num_scenarios, b)))

    def effective_weights(self, s: int) -> List[torch.Tensor]:
        """``W*_s = W_s ⊙ W`` of every layer (eq. 3), ``[in, out]`` each."""
        return [w_s[s] * w for w, w_s in zip(self.shared_weights, self.scenario_weights)]

    def forward(self, x: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        weights = [w_s * w for w, w_s in zip(self.shared_weights, self.scenario_weights)]  # [S, in, out] per layer
        biases = [b_s + b for b, b_s in zip(self.shared_biases, self.scenario_biases)]  # [S, out] per layer
        if static_routing(self.routing, x, self.num_scenarios):
            h = x.expand(self.num_scenarios, *x.shape)  # [S, B, in], a stride-0 view
            for w, b in zip(weights, biases):
                h = torch.relu(torch.baddbmm(b.unsqueeze(1), h, w))  # eq. 4 for every scenario: [S, B, out]
            own = scenario.view(1, -1, 1).expand(1, x.shape[0], h.shape[-1])
            return h.gather(0, own).squeeze(0)  # [B, out]
        groups = group_by_scenario(scenario, self.num_scenarios)
        outs = []
        for s, h in enumerate(groups.split(x)):  # h: [B_s, in], scenario s's rows
            for w, b in zip(weights, biases):
                h = torch.relu(torch.addmm(b[s], h, w[s]))  # eq. 4: [B_s, out]
            outs.append(h)
        return groups.merge(outs)  # [B, out]
