"""AITM: Adaptive Information Transfer Multi-task (Xi et al., KDD 2021, "Modeling the Sequential
Dependence among Audience Multi-step Conversions with Multi-task Learning in Targeted Display
Advertising")."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dlrm_mtl.modules.heads.common import TaskChain, TaskLogits, TowerBank, conditional_logits
from dlrm_mtl.modules.layer_output import LayerOutput


class AdaptiveInformationTransfer(nn.Module):
    """The AIT module: attention over {transferred info p_{t−1}, own tower output q_t}.

    For u ∈ {p, q} (``[B, H]`` each)::

        ŵ_u = <h_2(u), h_3(u)> / √H,   w = softmax(ŵ_p, ŵ_q),   z = Σ_u w_u · h_1(u)

    with h_1, h_2, h_3 linear maps H -> H without bias (as in the authors' release).

    ``p, q [B, H]`` -> ``(z [B, H], w [B, 2])``, ``w[:, 0]`` the weight of the transferred info.

    Example::

        ait = AdaptiveInformationTransfer(8)
        z, w = ait(torch.randn(4, 8), torch.randn(4, 8))   # [4, 8], [4, 2]; w.sum(1) == 1
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.value = nn.Linear(dim, dim, bias=False)  # h_1
        self.query = nn.Linear(dim, dim, bias=False)  # h_2
        self.key = nn.Linear(dim, dim, bias=False)  # h_3
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, p: torch.Tensor, q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        u = torch.stack([p, q], dim=1)  # [B, 2, H]
        w = torch.softmax((self.query(u) * self.key(u)).sum(-1) * self.scale, dim=1)  # [B, 2]
        return (w.unsqueeze(-1) * self.value(u)).sum(1), w  # [B, H], [B, 2]


class AITMHead(nn.Module):
    """AITM's towers, AIT modules and behavioural expectation calibrator along the task chain.

    Per task t, parents first (the chain's "previous step" t−1 is the task's parent)::

        q_t = tower_t(x_t)                           # model.tower sizes, ReLU    [B, H]
        p_{t−1} = ReLU(G_t z_{t−1} + g_t)            # transferred info           [B, H]
        z_t = AIT(p_{t−1}, q_t)   (z_t = q_t for a first step or a task off the chain)
        a_t = v_t · z_t + c_t,   ŷ_t = σ(a_t)

    ŷ_t is, as in the paper, the **entire-space** probability of every step up to t
    (P(click ∧ conversion | x) for cvr). The calibrator is the mean over the batch of

        L_lc = Σ_{links p -> c} max(ŷ_c − ŷ_p, 0)

    returned as ``aux["calibrator"]``, unweighted; :class:`DenseArch` multiplies it by
    ``calibrator_weight`` (the paper's α) and the loss adds it (``aux/heads/calibrator``).

    Output convention: :class:`EntireSpaceLoss` reads conditional logits, so the head returns
    ``z = conditional_logits(a)``: a root keeps a_t, a child's column is the logit of
    ŷ_c / ŷ_p, and the task graph's product σ(z_p)·σ(z_c) gives back ŷ_c. A child's
    ``loss_space: entire`` term is then the paper's cross-entropy of ŷ_c against the chained
    label on every impression (AITM trains every step on all impressions, so the builder
    requires ``loss_space: entire`` on every chained task: BCE of ŷ_c / ŷ_p on the parent's
    positives has an unbounded gradient as ŷ_c -> ŷ_p). Where ŷ_c > ŷ_p the conditional is
    capped at 1 − 10⁻⁶ in value (the calibrator's job is to remove those rows; the gradient
    of the log-space product passes straight through, see :func:`conditional_logits`).
    Regression tasks get a_t as it is.

    Gates: ``ait [B, L, 2]``, one row per link (in chain order): the attention on
    (transferred info, own tower) — logged as expert utilisation like a layer's gates.

    ``x [T, B, d]`` or ``[B, d]`` -> :class:`LayerOutput` (``y = logits [B, T]``).

    Example::

        head = AITMHead(task_chain(schema, chain=True), in_dim=64, tower=[32], calibrator_weight=0.3)
        out = head(torch.randn(2, 8, 64))
        out.y.shape, out.aux["calibrator"].shape, out.gates["ait"].shape   # [8, 2], [], [8, 1, 2]
    """

    def __init__(self, chain: TaskChain, in_dim: int, tower: List[int], calibrator_weight: float) -> None:
        super().__init__()
        T = len(chain.parents)
        self.chain = chain
        self.towers = TowerBank(T, in_dim, tower)
        H = self.towers.out_dim
        L = len(chain.links)
        self.transfer = nn.ModuleList(nn.Linear(H, H) for _ in range(L))  # G_t, one per link
        self.ait = nn.ModuleList(AdaptiveInformationTransfer(H) for _ in range(L))
        self.logits = TaskLogits(T, H)
        self.aux_weight = calibrator_weight  # α: DenseArch multiplies aux["calibrator"] by it

    def entire_logits(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(a [B, T], attention [B, L, 2])``: the entire-space logits before the conversion."""
        q = self.towers(x)  # [B, T, H]
        z: List[Optional[torch.Tensor]] = [None] * q.shape[1]
        link_of: Dict[int, int] = {c: k for k, (_, c) in enumerate(self.chain.links)}
        weights: List[torch.Tensor] = [q.new_zeros(0)] * len(self.chain.links)
        for t in self.chain.order:
            k = link_of.get(t)
            if k is None:
                z[t] = q[:, t]
                continue
            p_info = torch.relu(self.transfer[k](z[self.chain.links[k][0]]))  # [B, H]
            z[t], weights[k] = self.ait[k](p_info, q[:, t])  # [B, H], [B, 2]
        return self.logits(torch.stack(z, dim=1)), torch.stack(weights, dim=1)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> LayerOutput:
        a, w = self.entire_logits(x)  # [B, T], [B, L, 2]
        y = torch.sigmoid(a)  # [B, T] entire-space probabilities
        calibrator = sum((F.relu(y[:, c] - y[:, p]) for p, c in self.chain.links), torch.zeros_like(y[:, 0])).mean()
        return LayerOutput(conditional_logits(a, self.chain.links), gates={"ait": w}, aux={"calibrator": calibrator})
