"""STAR as a scenario layer: partitioned normalisation, star-topology FCN, auxiliary network."""

from __future__ import annotations

from typing import ClassVar, List, Self, Tuple

import torch
from torch import nn

from dlrm_mtl.config import LayerConfig
from dlrm_mtl.modules.layer_output import LayerOutput
from dlrm_mtl.modules.layer_config import LayerDims
from dlrm_mtl.modules.mlp import MLP
from dlrm_mtl.modules.partitioned_norm import PartitionedNorm
from dlrm_mtl.modules.star_fcn import StarTopologyFCN
from dlrm_mtl.modules.scenario_routing import checked_routing


class STARLayer(nn.Module):
    """STAR (Sheng et al., CIKM 2021, "One Model to Serve All: Star Topology Adaptive
    Recommender for Multi-Domain CTR Prediction", §4) as a scenario layer::

        z  = PN(x, s)                       partitioned normalisation (§4.1, eq. 2), if ``norm``
        y  = StarFCN(z, s)                  W*_s = W_s ⊙ W, b*_s = b_s + b (§4.2, eq. 3-4)
        s_a = AuxNet(e_s)                   auxiliary network on the scenario indicator (§4.3)

    and ``s_a`` is returned as ``logit_offset [B, T]``, which :class:`DenseArch` adds to every
    task's logit (§4.3: ``ŷ = sigmoid(s_m + s_a)``, s_m the main network's logit).

    Deviations, and why:

    * The paper's auxiliary network reads the domain indicator and other domain-describing
      features and adds one scalar to the single CTR logit; here it reads the scenario
      embedding of the layer's level (``scenario_emb``, or all levels' embeddings for
      ``level: leaf``) and outputs one offset per task, since the model has T logits. It is a
      2-layer MLP (``aux_hidden`` units, ReLU, then ``T`` outputs) as in the paper.
    * PN is applied to the layer's input (the paper: to the pooled-and-concatenated
      embeddings, which is what the first scenario layer's input is); stacked STAR layers
      each normalise their own input.
    * Per-scenario batch statistics: see :class:`PartitionedNorm`.

    STAR has no gates, so ``gates`` is empty.

    ``x [B, d]``, ``scenario [B]``, ``scenario_emb [B, e]`` -> ``y [B, out_dim]``,
    ``logit_offset [B, T]``.

    Example::

        star = STARLayer(32, num_scenarios=3, emb_dim=8, num_tasks=2, hidden=[64], out_dim=16)
        out = star(torch.randn(8, 32), torch.randint(0, 3, (8,)), torch.randn(8, 8))
        out.y.shape, out.logit_offset.shape   # [8, 16], [8, 2]
    """

    # the LayerConfig fields from_config reads (``level``: read by the dense arch for every scenario layer)
    CONFIG_FIELDS: ClassVar[Tuple[str, ...]] = ("routing", "norm", "hidden", "out_dim")

    @classmethod
    def from_config(cls, cfg: LayerConfig, dims: LayerDims, where: str = "layer") -> Self:
        """The ``star`` scenario layer of ``cfg`` (its auxiliary network has ``dims.num_tasks``
        outputs); a ``routing`` it does not know is a ConfigError naming ``where``."""
        routing = checked_routing(cfg, where)
        return cls(dims.in_dim, dims.num_scenarios, dims.emb_dim, dims.num_tasks, cfg.hidden, cfg.out_dim, norm=cfg.norm,
                   routing=routing)

    def __init__(
        self,
        in_dim: int,
        num_scenarios: int,
        emb_dim: int,
        num_tasks: int,
        hidden: List[int],
        out_dim: int,
        norm: bool = True,
        aux_hidden: int = 32,
        routing: str = "auto",
    ) -> None:
        super().__init__()
        self.norm = PartitionedNorm(in_dim, num_scenarios) if norm else None
        self.fcn = StarTopologyFCN(in_dim, num_scenarios, hidden, out_dim, routing=routing)
        self.aux_net = nn.Sequential(MLP(emb_dim, [aux_hidden]), nn.Linear(aux_hidden, num_tasks))
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor, scenario: torch.Tensor, scenario_emb: torch.Tensor) -> LayerOutput:
        z = self.norm(x, scenario) if self.norm is not None else x  # [B, d]
        y = self.fcn(z, scenario)  # [B, out_dim]
        offset = self.aux_net(scenario_emb)  # [B, T]
        return LayerOutput(y, {}, {}, offset)
