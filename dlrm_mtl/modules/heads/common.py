"""What the task-relation heads share: the task graph as they read it, per-task tower MLPs, and
the map from entire-space logits to the conditional logits the loss expects."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dlrm_mtl.modules.expert_bank import ExpertBank
from dlrm_mtl.schema import Schema

# a conditional probability is capped at 1 − ε (its logit at ≈ 13.8) where an entire-space
# child would exceed its parent; see :func:`conditional_logits`
EPS = 1e-6
_LOG_1M_EPS = math.log1p(-EPS)


@dataclass(frozen=True)
class TaskChain:
    """The schema's task graph as the heads read it.

    Attributes:
        parents: per task, the index of its parent task (negation ignored), or -1 for a root.
        order: every task index, parents before children (depth, then schema order).
        links: ``(parent, child)`` pairs a chain head builds on, in ``order``: for ``dbmtl``
            every parent link; for ``aitm`` / ``nmtr`` the links between binary head tasks
            (see :func:`task_chain`).

    Example::

        c = task_chain(synthetic_schema(), chain=True)   # ctr -> cvr
        c.parents, c.order, c.links                      # (-1, 0), (0, 1), ((0, 1),)
    """

    parents: Tuple[int, ...]
    order: Tuple[int, ...]
    links: Tuple[Tuple[int, int], ...]

    def link_parent(self, t: int) -> int:
        """The parent of task ``t`` through a link, or -1."""
        for p, c in self.links:
            if c == t:
                return p
        return -1


def task_chain(schema: Schema, chain: bool) -> TaskChain:
    """The :class:`TaskChain` of ``schema``.

    ``chain=False`` (DBMTL's Bayesian network): every ``parent`` is a link, whatever its kind.
    ``chain=True`` (AITM's and NMTR's ordered steps): a link is a binary head task whose parent
    is positive (``parent: ctr``); regression tasks stay independent towers. Raises ValueError
    when the schema has no such link, or has a negated parent or a ``sum_of`` task (ESM²'s
    branches are not one ordered list of steps, so "the previous step" is undefined)."""
    tasks = schema.tasks
    parents = [-1 if t.parent is None else schema.task_index(t.parent_name) for t in tasks]  # type: ignore[arg-type]
    depth = [len(schema.chain(t.name)) for t in tasks]
    order = sorted(range(len(tasks)), key=lambda i: (depth[i], i))
    if not chain:
        return TaskChain(tuple(parents), tuple(order), tuple((parents[i], i) for i in order if parents[i] >= 0))
    for t in tasks:
        if t.derived:
            raise ValueError(f"needs the tasks as ordered steps (click -> conversion), but task {t.name!r} is a sum_of "
                             f"task (ESM² branches); use type dbmtl or towers")
    for t in tasks:
        if t.parent_negated:
            raise ValueError(f"needs the tasks as ordered steps (click -> conversion), but task {t.name!r} has the "
                             f"negated parent {t.parent!r}; use type dbmtl or towers")
    links = tuple((parents[i], i) for i in order if parents[i] >= 0 and tasks[i].type == "binary")
    if not links:
        raise ValueError(f"needs a chain of binary tasks (a task whose parent is another task, e.g. cvr with parent "
                         f"ctr), but the schema {schema.name!r} has none: tasks "
                         f"{[(t.name, t.parent) for t in tasks]}; use type towers or dbmtl")
    return TaskChain(tuple(parents), tuple(order), links)


class TowerBank(nn.Module):
    """The hidden part of T per-task towers (``model.tower``'s sizes, ReLU after every layer),
    as one :class:`ExpertBank` with per-task inputs; no layers (``tower: []``) passes each
    task's input through.

    ``x [T, B, d]`` (task t reads ``x[t]``) or ``[B, d]`` (shared) -> ``[B, T, out_dim]``.

    Example::

        bank = TowerBank(2, in_dim=16, hidden=[8])
        bank(torch.randn(2, 32, 16)).shape   # [32, 2, 8]
    """

    def __init__(self, num_tasks: int, in_dim: int, hidden: List[int]) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.bank = ExpertBank(num_tasks, in_dim, list(hidden[:-1]), hidden[-1]) if hidden else None
        self.out_dim = hidden[-1] if hidden else in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bank is None:
            return x.unsqueeze(1).expand(-1, self.num_tasks, -1) if x.dim() == 2 else x.transpose(0, 1)  # [B, T, d]
        return self.bank(x if x.dim() == 2 else x.transpose(0, 1))  # [B, T, H]


class TaskLogits(nn.Module):
    """T linear read-outs ``[B, T, H] -> [B, T]`` (task t's own weights on ``h[:, t]``),
    initialised like ``nn.Linear(H, 1)``."""

    def __init__(self, num_tasks: int, in_dim: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(num_tasks, in_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_tasks).uniform_(-bound, bound))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h * self.weight).sum(-1) + self.bias  # [B, T]


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate at both ends (Mächler 2012)."""
    near0 = x > -math.log(2.0)
    a = torch.log(-torch.expm1(torch.where(near0, x, torch.full_like(x, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(near0, torch.full_like(x, -1.0), x)))
    return torch.where(near0, a, b)


def conditional_logits(entire: torch.Tensor, links: Tuple[Tuple[int, int], ...]) -> torch.Tensor:
    """Entire-space logits ``a [B, T]`` (σ(a_t) = P(every step up to t | x)) -> the logits the
    loss and the task graph read (σ(z_t) = P(t | parent, x)): a root keeps its logit; a child
    c of parent p gets the logit of its conditional probability

        log P(c | p) = log σ(a_c) − log σ(a_p),   z_c = log P(c | p) − log(1 − P(c | p)),

    so that σ(z_p) · σ(z_c) = σ(a_c): the task graph's chained product gives back the head's
    entire-space probability. Where σ(a_c) > σ(a_p) (a child more likely than its parent,
    which AITM's calibrator penalises) log P(c | p) is capped at log(1 − ε) in value only
    (straight-through): the gradient is that of the uncapped difference, so the loss still
    moves a_c towards its label. Columns not in ``links`` are returned unchanged.

    Example::

        a = torch.tensor([[0.0, -1.0]])            # P(click) = 0.5, P(click, buy) = 0.27
        z = conditional_logits(a, ((0, 1),))
        torch.sigmoid(z).prod(1)                   # 0.27 = σ(-1)
    """
    if not links:
        return entire
    if entire.dtype in (torch.float16, torch.bfloat16):  # the cap at 1 − 10⁻⁶ needs fp32 resolution
        entire = entire.float()
    lp = F.logsigmoid(entire)  # [B, T]
    cols = list(entire.unbind(1))
    for p, c in links:
        d = lp[:, c] - lp[:, p]  # [B] log P(c | p)
        d = d - (d - _LOG_1M_EPS).clamp(min=0).detach()  # value min(d, log(1 − ε)), gradient of d
        cols[c] = d - log1mexp(d)  # logit of exp(d)
    return torch.stack(cols, dim=1)  # [B, T]
