"""DBMTL: Deep Bayesian Multi-Target Learning (Wang, Ji, Liu, Zhao, arXiv 1902.09154, 2019)."""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from dlrm_mtl.modules.heads.common import TaskChain, TaskLogits, TowerBank
from dlrm_mtl.modules.layer_output import LayerOutput


class DBMTLHead(nn.Module):
    """Task heads wired as the schema's Bayesian network of targets (DBMTL).

    DBMTL factorises the targets' joint distribution along a directed graph,

        p(y_1, …, y_T | x) = Π_t p(y_t | y_pa(t), x),

    and parameterises each link by hidden layers: the network of target t reads x *and the
    hidden representation of its parents' networks*. Here the graph is the schema's task
    graph (``parent``; a forest, so |pa(t)| ≤ 1) and, per task t, in parents-first order::

        h_t = tower_t(x_t)                              # model.tower sizes, ReLU   [B, H]
        r_t = ReLU(W_t [h_t ⊕ r_pa(t)] + b_t)           # relation layer            [B, R]
        z_t = v_t · r_t + c_t                           # logit                     [B]

    (``r_pa(t)`` is left out for a root), so a child's logit is a function of x and of its
    parent's representation r_pa(t) — the one its parent's own logit is read from — and its
    gradient trains that representation too.

    Output convention: ``z_t`` is task t's **conditional** logit, σ(z_t) = P(y_t = 1 | its
    context holds, x) — exactly what a tower emits, so :class:`EntireSpaceLoss` and the task
    graph read it unchanged (pCTCVR = σ(z_ctr)·σ(z_cvr)). With ``loss_space:
    parent_positive`` the child's term, BCE of σ(z_c) on rows where the parent is positive, is
    DBMTL's −log p(y_c | y_p = 1, x); the y_p = 0 factor is deterministic (conversion ⇒ click)
    and costs nothing. With ``loss_space: entire`` (ESMM) the child trains through the chained
    product instead. Regression tasks get a linear read-out of r_t; a ``sum_of`` task's column
    is computed and ignored, as with towers. No auxiliary loss, no gates.

    ``x [T, B, d]`` (task t reads ``x[t]``) or ``[B, d]`` -> :class:`LayerOutput` with
    ``y = logits [B, T]``.

    Example::

        head = DBMTLHead(task_chain(schema, chain=False), in_dim=64, tower=[32], relation_dim=16)
        head(torch.randn(2, 8, 64)).y.shape   # [8, 2]
    """

    def __init__(self, chain: TaskChain, in_dim: int, tower: List[int], relation_dim: int) -> None:
        super().__init__()
        T = len(chain.parents)
        self.chain = chain
        self.towers = TowerBank(T, in_dim, tower)
        H = self.towers.out_dim
        self.relations = nn.ModuleList(
            nn.Linear(H + (relation_dim if chain.parents[t] >= 0 else 0), relation_dim) for t in range(T)
        )
        self.logits = TaskLogits(T, relation_dim)
        self.aux_weight = 1.0  # no auxiliary loss

    def forward(self, x: torch.Tensor) -> LayerOutput:
        h = self.towers(x)  # [B, T, H]
        r: List[Optional[torch.Tensor]] = [None] * h.shape[1]
        for t in self.chain.order:
            p = self.chain.parents[t]
            inp = h[:, t] if p < 0 else torch.cat([h[:, t], r[p]], dim=1)  # type: ignore[list-item]  # [B, H (+ R)]
            r[t] = torch.relu(self.relations[t](inp))  # [B, R]
        return LayerOutput(self.logits(torch.stack(r, dim=1)))  # type: ignore[arg-type]  # [B, T]
