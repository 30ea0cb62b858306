"""Cross-stitch networks: one network per task, linearly mixed after every level."""

from __future__ import annotations

from typing import ClassVar, List, Optional, Self, Tuple

import torch
from torch import nn

from dlrm_mtl.config import LayerConfig
from dlrm_mtl.modules.expert_bank import ExpertBank
from dlrm_mtl.modules.layer_output import LayerOutput
from dlrm_mtl.modules.layer_config import LayerDims
from dlrm_mtl.modules.task_input import task_major_input


def cross_stitch_init(num_tasks: int, self_weight: float = 0.9) -> torch.Tensor:
    """``[T, T]`` α near the identity: ``self_weight`` on the diagonal, the rest spread evenly
    over the other tasks (rows sum to 1; Misra et al. §3.2 start from such a convex mix). T = 1
    gives ``[[1]]``."""
    if num_tasks == 1:
        return torch.ones(1, 1)
    off = (1.0 - self_weight) / (num_tasks - 1)
    return torch.full((num_tasks, num_tasks), off) + (self_weight - off) * torch.eye(num_tasks)


class CrossStitchLayer(nn.Module):
    """Cross-stitch networks (Misra et al., CVPR 2016, §3, eq. 1) for T tasks: at every level
    each task has its own ReLU MLP (the T networks as one :class:`ExpertBank`, task t's network
    on task t's input), and after every level a learnable cross-stitch matrix α ``[T, T]``
    mixes the task representations::

        x̃_t = Σ_s α_ts x_s            (eq. 1, written for T tasks)

    α is one matrix per level (the paper's per-layer units; it also discusses per-channel α,
    not done here), initialised to 0.9 on the diagonal and 0.1/(T−1) elsewhere, and learned
    with the rest of the model (the paper scales the α learning rate; here they share the dense
    optimiser). With α = I the layer is T separate networks.

    ``x [B, d]`` (every task starts from it) or ``[T, B, d]`` -> ``y [T, B, d']``; no gates.

    Example::

        layer = CrossStitchLayer(32, num_tasks=2, hidden=[], out_dim=16, levels=2)
        layer(torch.randn(8, 32)).y.shape   # [2, 8, 16]
    """

    CONFIG_FIELDS: ClassVar[Tuple[str, ...]] = ("levels", "hidden", "out_dim")
    reads_context: ClassVar[bool] = False  # ``context`` (the scenario embeddings) is not read

    @classmethod
    def from_config(cls, cfg: LayerConfig, dims: LayerDims, where: str = "layer") -> Self:
        """The ``cross_stitch`` task layer of ``cfg`` for ``dims.num_tasks`` tasks."""
        return cls(dims.in_dim, dims.num_tasks, cfg.hidden, cfg.out_dim, levels=cfg.levels)

    def __init__(self, in_dim: int, num_tasks: int, hidden: List[int], out_dim: int, levels: int = 2) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"cross-stitch needs levels >= 1, got {levels}")
        self.num_tasks, self.out_dim = num_tasks, out_dim
        self.nets = nn.ModuleList(ExpertBank(num_tasks, in_dim if l == 0 else out_dim, hidden, out_dim) for l in range(levels))
        self.alpha = nn.ParameterList(nn.Parameter(cross_stitch_init(num_tasks)) for _ in range(levels))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> LayerOutput:
        T = self.num_tasks
        h = task_major_input(x, T)  # [B, d] (shared) or [B, T, d]
        for net, alpha in zip(self.nets, self.alpha):
            h = torch.einsum("ts,bsd->btd", alpha, net(h))  # task t's network on task t's input, then eq. 1: [B, T, d']
        return LayerOutput(h.transpose(0, 1))  # [T, B, d']
