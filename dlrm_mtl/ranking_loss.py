"""Ranking losses within request groups: pairwise (BPR) and listwise (ListNet top-one).

A *group* is the set of rows of one batch that share the group column's value (one request:
the items shown together). Both losses use the task's logits as scores and see only the rows
of the batch: a group split across batches loses its cross-batch pairs (the reader does not
keep groups whole); :func:`pair_rows_fraction` measures how many rows still have a partner.

Both are vectorised with one ``[B, B]`` same-group mask (no loop over groups, no
data-dependent shapes, so a CUDA-graphed step can record them): cost O(B²) memory and time,
4 MB of float32 per 1024² — fine for per-rank batches up to a few thousand rows; there is no
cap, so a batch of 32k rows needs ~4 GB.

Example::

    s = torch.tensor([2.0, 0.5, 1.0, -1.0])   # logits
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])    # labels
    g = torch.tensor([7, 7, 9, 9])            # request ids
    ok = torch.ones(4, dtype=torch.bool)      # rows with a known label
    pairwise_loss(s, y, g, ok)   # mean of softplus(-(2.0-0.5)), softplus(-(1.0+1.0))
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

RANKING_TYPES = ("pairwise", "listwise")


def _group_masks(labels: torch.Tensor, group: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``labels, group, valid [B]`` -> (same [B, B] bool: both rows valid and in one group,
    pos [B] bool, neg [B] bool) for the valid rows."""
    pos = valid & (labels > 0.5)  # [B]
    neg = valid & (labels <= 0.5)  # [B]
    same = (group.unsqueeze(1) == group.unsqueeze(0)) & valid.unsqueeze(1) & valid.unsqueeze(0)  # [B, B]
    return same, pos, neg


def eligible_rows(labels: torch.Tensor, group: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: valid rows whose group (within the batch) has a positive and a negative."""
    same, pos, neg = _group_masks(labels, group, valid)
    has_pos = (same & pos.unsqueeze(0)).any(1)  # [B]
    has_neg = (same & neg.unsqueeze(0)).any(1)  # [B]
    return valid & has_pos & has_neg


def pair_rows_fraction(labels: torch.Tensor, group: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[]`` the share of valid rows whose group has both labels in this batch (0 when the
    batch has no valid row): the rows the ranking loss can use (logged ``ranking/pair_rows``)."""
    n = valid.sum().clamp(min=1)
    return eligible_rows(labels, group, valid).sum().to(torch.float32) / n


def pairwise_loss(scores: torch.Tensor, labels: torch.Tensor, group: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """BPR / pairwise logistic loss (Rendle et al. 2009, eq. 4 without the prior; Burges et
    al. 2005's RankNet cross-entropy with a hard target), a mean over pairs::

        L = Σ_{(i, j) ∈ P} log(1 + exp(−(s_i − s_j))) / |P|,
        P = {(i, j): g_i = g_j, y_i = 1, y_j = 0, both valid}

    ``scores, labels [B]`` float (labels 0/1), ``group [B]`` int64, ``valid [B]`` bool -> ``[]``;
    0 (with a zero gradient) when the batch has no pair. Groups with no positive or no
    negative have no pair, so they contribute nothing. Memory: ``[B, B]``.
    """
    same, pos, neg = _group_masks(labels, group, valid)
    pair = same & pos.unsqueeze(1) & neg.unsqueeze(0)  # [B, B]: i positive, j negative
    diff = scores.unsqueeze(1) - scores.unsqueeze(0)  # [B, B] s_i − s_j
    per_pair = F.softplus(-diff) * pair  # [B, B]; −log σ(x) = softplus(−x)
    return per_pair.sum() / pair.sum().clamp(min=1)


def listwise_loss(scores: torch.Tensor, labels: torch.Tensor, group: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """ListNet top-one softmax cross-entropy (Cao et al., ICML 2007, eq. 3 and 6), a mean over
    the groups with a positive and a negative::

        P_s(i) = exp(s_i) / Σ_{j ∈ g(i)} exp(s_j),   P_y(i) = y_i / Σ_{j ∈ g(i)} y_j
        L_g   = −Σ_{i ∈ g} P_y(i) log P_s(i),        L = Σ_{g eligible} L_g / #eligible

    (the target is the labels normalised per group — ListNet's top-one probability with
    φ = identity on 0/1 labels, i.e. the softmax cross-entropy of the positives averaged
    per group). ``scores, labels [B]``, ``group [B]`` int64, ``valid [B]`` bool -> ``[]``; 0
    when no group is eligible. Memory: ``[B, B]`` (a masked logsumexp per row's group).
    """
    same, pos, neg = _group_masks(labels, group, valid)
    has_pos = (same & pos.unsqueeze(0)).any(1)  # [B]
    has_neg = (same & neg.unsqueeze(0)).any(1)  # [B]
    ok = valid & has_pos & has_neg  # [B] rows of eligible groups
    masked = scores.unsqueeze(0).masked_fill(~same, float("-inf"))  # [B, B] row i: scores of g(i)
    masked = torch.where(ok.unsqueeze(1), masked, torch.zeros_like(masked))  # no all −inf rows
    lse = torch.logsumexp(masked, dim=1)  # [B] log Σ_{j ∈ g(i)} exp(s_j)
    y = (labels * pos).to(scores.dtype)  # [B]
    n_pos = (same.to(scores.dtype) @ y).clamp(min=1)  # [B] positives of g(i)
    size = same.sum(1).clamp(min=1).to(scores.dtype)  # [B] rows of g(i)
    per_row = torch.where(ok, (y / n_pos) * (lse - scores), torch.zeros_like(scores))  # [B]
    n_groups = torch.where(ok, 1.0 / size, torch.zeros_like(size)).sum()  # Σ over rows of 1/|g|
    return per_row.sum() / n_groups.clamp(min=1e-12).round().clamp(min=1)


def ranking_loss(kind: str, scores: torch.Tensor, labels: torch.Tensor, group: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``kind``: ``pairwise`` (:func:`pairwise_loss`) or ``listwise`` (:func:`listwise_loss`)."""
    if kind == "pairwise":
        return pairwise_loss(scores, labels, group, valid)
    if kind == "listwise":
        return listwise_loss(scores, labels, group, valid)
    raise ValueError(f"loss.ranking.type {kind!r}: expected one of {list(RANKING_TYPES)}")
