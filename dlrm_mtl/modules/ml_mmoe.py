"""Multi-level MMoE: stacked expert levels, each mixed into the next by gates."""

from __future__ import annotations

from typing import ClassVar, Dict, List, Optional, Self, Tuple

import torch
from torch import nn

from dlrm_mtl.config import LayerConfig
from dlrm_mtl.modules.expert_bank import ExpertBank
from dlrm_mtl.modules.gates import SoftmaxGate
from dlrm_mtl.modules.layer_output import LayerOutput
from dlrm_mtl.modules.layer_config import LayerDims
from dlrm_mtl.modules.task_input import split_task_input
from dlrm_mtl.modules.mixture import mix_experts


class MultiLevelMMoELayer(nn.Module):
    """ML-MMoE, the multi-level MMoE baseline of the PLE paper (Tang et al., RecSys 2020, §5.1
    and Fig. 1; MMoE gates of Ma et al. KDD 2018, eq. 5-6, stacked)::

        h^0_j = expert^0_j(x)                                    j = 1..E
        h^l_j = expert^l_j( Σ_i g^{l-1}_j(x)_i h^{l-1}_i )       one gate per next-level expert
        y_k   = Σ_i g^task_k(x_k)_i h^{L-1}_i                     one gate per task on the last level

    Every level has ``num_experts`` experts; level l > 0 experts get their own inputs (one
    batched :class:`ExpertBank` call with per-expert input ``[B, E, d']``). ``levels=1`` is MMoE.

    Deviation / choice: the paper does not say what the inner gates read; here every inner gate
    reads the layer's (shared) input x, as MMoE's gates read the input features, and the task
    gates read task k's input ``x_k`` exactly like :class:`MMoELayer` (so ``levels=1`` equals it
    with the same weights).

    ``x [B, d]`` or ``[T, B, d]`` (see :func:`split_task_input`) -> ``y [T, B, d']``; gates
    ``level{l}`` ``[B, E, E]`` (row j: the gate of next-level expert j) and ``task`` ``[B, T, E]``.

    Example::

        layer = MultiLevelMMoELayer(32, num_tasks=2, num_experts=4, hidden=[], out_dim=16, levels=2)
        out = layer(torch.randn(8, 32))
        out.y.shape, out.gates["level0"].shape, out.gates["task"].shape   # [2, 8, 16], [8, 4, 4], [8, 2, 4]
    """

    CONFIG_FIELDS: ClassVar[Tuple[str, ...]] = ("num_experts", "levels", "hidden", "out_dim")
    reads_context: ClassVar[bool] = False  # ``context`` (the scenario embeddings) is not read

    @classmethod
    def from_config(cls, cfg: LayerConfig, dims: LayerDims, where: str = "layer") -> Self:
        """The ``ml_mmoe`` task layer of ``cfg`` for ``dims.num_tasks`` tasks."""
        return cls(dims.in_dim, dims.num_tasks, cfg.num_experts, cfg.hidden, cfg.out_dim, levels=cfg.levels)

    def __init__(self, in_dim: int, num_tasks: int, num_experts: int, hidden: List[int], out_dim: int, levels: int = 2) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"ML-MMoE needs levels >= 1, got {levels}")
        self.num_tasks, self.num_experts, self.out_dim = num_tasks, num_experts, out_dim
        self.banks = nn.ModuleList(ExpertBank(num_experts, in_dim if l == 0 else out_dim, hidden, out_dim) for l in range(levels))
        # gates between levels: level l -> l+1, one gate per next-level expert, over level l's experts
        self.inner_gates = nn.ModuleList(SoftmaxGate(in_dim, num_experts, num_experts) for _ in range(levels - 1))
        self.task_gate = SoftmaxGate(in_dim, num_tasks, num_experts)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> LayerOutput:
        task_in, shared_in = split_task_input(x, self.num_tasks)
        h = self.banks[0](shared_in)  # [B, E, d']
        gates: Dict[str, torch.Tensor] = {}
        for l, (gate, bank) in enumerate(zip(self.inner_gates, list(self.banks)[1:])):
            g = gate(shared_in)  # [B, E_next, E]
            gates[f"level{l}"] = g
            h = bank(mix_experts(g, h))  # next level's expert j on its own input: [B, E, d']
        g = self.task_gate(task_in)  # [B, T, E]
        gates["task"] = g
        return LayerOutput(mix_experts(g, h).transpose(0, 1), gates)  # [T, B, d']
