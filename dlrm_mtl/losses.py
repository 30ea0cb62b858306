"""Entire-space multi-task loss (ESMM) with per-task sample-space masks."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dlrm_mtl.schema import Schema
from dlrm_mtl.task_graph import TaskGraph


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Mächler 2012).

    x is clamped to <= -1e-30 so that a probability of exactly 1 (float underflow of the
    chained log-probability) costs at most ~69 nats instead of inf; the gradient stays exact
    for every x that float32 can distinguish from 0 above that.
    """
    x = x.clamp(max=-1e-30)
    near0 = x > -0.6931471805599453
    # each branch only sees inputs where it is finite, so torch.where passes no NaN gradient
    a = torch.log(-torch.expm1(torch.where(near0, x, torch.full_like(x, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(near0, torch.full_like(x, -1.0), x)))
    return torch.where(near0, a, b)


def bce_from_log_prob(logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy given log p (not p): no log(0) for products of small probabilities."""
    return -(y * logp + (1 - y) * log1mexp(logp))


class EntireSpaceLoss(nn.Module):
    """Masked, weighted multi-task loss built from the schema's task graph.

    Per task t with weight w_t (schema ``weight``):

    * root task (no parent): BCE(logit_t, y_t) over every row whose label is not null;
    * ``loss_space: entire`` (ESMM, Ma et al. 2018, eq. 3): BCE(Π_chain p, Π_chain y) over
      every impression, computed from Σ log σ(logit) so products of small probabilities
      stay finite;
    * ``loss_space: parent_positive`` (PLE, Tang et al. 2020, eq. 9, the σ_k mask):
      BCE(logit_t, y_t) averaged over rows whose ancestors' labels are all 1.

    Each term is a weighted mean over the rows in its space: Σ_i r_i ℓ_i / Σ_i r_i with r_i
    the row weight (0 for padding and null labels); an empty space contributes 0.
    Returns the total and every term (detached) for logging.

    Example::

        loss_fn = EntireSpaceLoss(schema)
        total, terms = loss_fn(logits, labels, label_mask, weight)   # terms: {"loss/ctr": ..., "loss/ctcvr": ...}
    """

    def __init__(self, schema: Schema) -> None:
        super().__init__()
        self.schema = schema
        self.graph = TaskGraph(schema)
        self.register_buffer("task_weights", torch.tensor([t.weight for t in schema.tasks]), persistent=False)

    def per_task(
        self, logits: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        """``[T]`` per-task mean losses."""
        chained_mask = self.graph.chained(label_mask, "all")  # [B, T]
        chained_y = self.graph.chained(labels)  # [B, T]
        entire = bce_from_log_prob(self.graph.entire_log_prob(logits), chained_y)  # [B, T]
        cond = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # [B, T]
        in_parent = self.graph.parent_positive(labels, label_mask) & label_mask  # [B, T]
        losses = []
        for i, t in enumerate(self.schema.tasks):
            if t.parent is None:
                l, m = cond[:, i], label_mask[:, i]
            elif t.loss_space == "entire":
                l, m = entire[:, i], chained_mask[:, i]
            else:
                l, m = cond[:, i], in_parent[:, i]
            r = weight * m
            losses.append((l * r).sum() / r.sum().clamp(min=1e-12))
        return torch.stack(losses)

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor, weight: torch.Tensor
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        per_task = self.per_task(logits, labels, label_mask, weight)
        total = (per_task * self.task_weights).sum()
        terms = {}
        for i, t in enumerate(self.schema.tasks):
            name = t.name if t.parent is None or t.loss_space != "entire" else self.graph.entire_names[i]
            terms[f"loss/{name}"] = per_task[i].detach()
        terms["loss/total"] = total.detach()
        return total, terms
