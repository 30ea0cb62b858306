"""Entire-space multi-task loss (ESMM, ESM²) with sample-space masks, task and scenario weights."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dlrm_mtl.config import LossConfig
from dlrm_mtl.modules.bias_tower import BiasTower
from dlrm_mtl.schema import Schema, leaf_ids, scenario_names
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
    """Masked, weighted multi-task loss built from the schema's task graph (design §4).

    Per task k (one *term* each, named after what it trains):

    * root binary task: BCE(logit_k, y_k) over every row whose label is not null;
    * ``loss_space: entire`` (ESMM, Ma et al. 2018, eq. 3; ESM², Wen et al. 2020, eq. 7):
      BCE(P_entire, y_entire) over every impression whose chain labels are known; P_entire
      is the chained product (or, for a ``sum_of`` task, the sum of branch products),
      computed in log space so products of small probabilities stay finite; term name =
      the entire-space name (``ctcvr``);
    * ``loss_space: parent_positive`` (PLE, Tang et al. 2020, eq. 9, the σ_k mask): BCE of the
      conditional prediction over rows inside the task's conditional space;
    * ``type: regression``: MSE(head output, y) over its space (PLE's VCR);
    * ``loss_space: none``: no term (e.g. ESM²'s branch heads, trained through their sum).

    Each term is a mean over the rows in its space, Σ_i r_i λ_s(i) ℓ_i / Σ_i r_i, with r_i the
    row weight (0 for padding and null labels; the schema's weight column otherwise) and λ_s
    the scenario weight of the row's leaf scenario (HiNet; 1 unless ``loss.scenario_weighting``
    says otherwise); an empty space contributes 0. The total is
    ``Σ_k w_k γ_k^t u_k(L_k) + aux_weight · Σ aux`` (see :class:`dlrm_mtl.config.LossConfig`);
    t is the number of training forward passes so far, a persistent buffer ``step`` that the
    checkpoint carries. ``aux`` are the model's auxiliary losses (already weighted per layer).

    Position bias (schema ``position_bias``): in training, a :class:`BiasTower` on
    ``bias [B, Fb]`` is added to the chosen tasks' logits before the loss; evaluation and
    serving never see it (the metrics use the model's logits).

    Returns the total and every term (detached) for logging: ``loss/<term>``,
    ``aux/...`` (the model's names), ``loss_weight/<term>`` (w·γ^t), ``loss_log_var/<term>`` (uncertainty),
    ``loss/total``.

    Example::

        loss_fn = EntireSpaceLoss(schema, LossConfig(decay={"cvr": 0.999}))
        total, terms = loss_fn(logits, labels, label_mask, weight, scenario, aux={})
        terms["loss/ctcvr"], terms["loss_weight/ctcvr"]
    """

    def __init__(self, schema: Schema, cfg: Optional[LossConfig] = None, scenario_share: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        cfg = cfg or LossConfig()
        self.schema = schema
        self.cfg = cfg
        self.graph = TaskGraph(schema)
        tasks = schema.tasks
        # one term per task with a loss space
        self.term_tasks: List[int] = [i for i, t in enumerate(tasks) if t.loss_space != "none"]
        # sum_of tasks have no head of their own: their logit column is unused
        self.unused_logits: List[int] = [i for i, t in enumerate(tasks) if t.derived]
        self.term_names: List[str] = [
            self.graph.entire_names[i] if tasks[i].parent is not None and tasks[i].loss_space == "entire" and tasks[i].type == "binary" else tasks[i].name
            for i in self.term_tasks
        ]
        names = schema.task_names
        for what, m in (("task_weights", cfg.task_weights), ("decay", cfg.decay)):
            unknown = sorted(set(m) - set(names))
            if unknown:
                raise ValueError(f"loss.{what}: unknown task(s) {unknown}; tasks are {names}")
        for k, g in cfg.decay.items():
            if not 0 < g <= 1:
                raise ValueError(f"loss.decay.{k}: γ must lie in (0, 1], got {g}")
        if cfg.weighting not in ("static", "uncertainty"):
            raise ValueError(f"loss.weighting {cfg.weighting!r}: expected static or uncertainty")
        w = [cfg.task_weights.get(tasks[i].name, tasks[i].weight) for i in self.term_tasks]
        g = [cfg.decay.get(tasks[i].name, 1.0) for i in self.term_tasks]
        self.register_buffer("base_weights", torch.tensor(w, dtype=torch.float32), persistent=False)
        self.register_buffer("decay", torch.tensor(g, dtype=torch.float32), persistent=False)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))  # persistent: checkpoints carry t
        self.log_var: Optional[nn.Parameter] = None
        if cfg.weighting == "uncertainty":
            self.log_var = nn.Parameter(torch.full((len(self.term_tasks),), float(cfg.uncertainty_init)))
        regression = [tasks[i].type == "regression" for i in self.term_tasks]
        # Kendall et al. 2018: eq. 5 (regression: 1/(2σ²) L + log σ), eq. 10 (classification: 1/σ² L + log σ)
        self.register_buffer("uncertainty_scale", torch.tensor([0.5 if r else 1.0 for r in regression]), persistent=False)
        self.leaf_names = scenario_names(schema)
        self.register_buffer("scenario_lambda", self._scenario_lambda(cfg, scenario_share))  # persistent
        self.bias_tower: Optional[BiasTower] = None
        self.bias_tasks: List[int] = []
        if schema.position_bias is not None:
            self.bias_tower = BiasTower(len(schema.position_bias.features), cfg.bias_tower, schema.position_bias.reference)
            self.bias_tasks = [schema.task_index(n) for n in schema.position_bias.tasks]

    def _scenario_lambda(self, cfg: LossConfig, share: Optional[Sequence[float]]) -> torch.Tensor:
        S = len(self.leaf_names)
        mode = cfg.scenario_weighting
        for what, m in (("scenario_weights", cfg.scenario_weights), ("scenario_shares", cfg.scenario_shares)):
            unknown = sorted(set(m) - set(self.leaf_names))
            if unknown:
                raise ValueError(f"loss.{what}: unknown scenario(s) {unknown}; leaf scenarios are {self.leaf_names}")
        if mode == "none":
            return torch.ones(S)
        if mode == "static":
            return torch.tensor([float(cfg.scenario_weights.get(n, 1.0)) for n in self.leaf_names])
        if mode != "inverse_share":
            raise ValueError(f"loss.scenario_weighting {mode!r}: expected none, static or inverse_share")
        if cfg.scenario_shares:
            share = [float(cfg.scenario_shares.get(n, 0.0)) for n in self.leaf_names]
        if share is None:
            # filled from the training data by the caller (set_scenario_share) or from a checkpoint
            return torch.ones(S)
        return inverse_share_weights(share)

    def set_scenario_share(self, share: Sequence[float]) -> None:
        """λ_s = 1 / (S · share_s) from the share of training rows of each leaf scenario."""
        self.scenario_lambda.copy_(inverse_share_weights(share))

    def term_weights(self) -> torch.Tensor:
        """``[K]`` current w_k · γ_k^t (PLE eq. 10)."""
        return self.base_weights * self.decay.pow(self.step.to(self.decay.dtype))

    def per_task(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        label_mask: torch.Tensor,
        weight: torch.Tensor,
        scenario: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``[K]`` per-term mean losses (K = tasks with a loss space)."""
        g = self.graph
        entire_lp = g.entire_log_prob(logits)  # [B, T]
        cond_lp = g.cond_log_prob(logits, entire_lp)  # [B, T]
        y_entire, known_entire = g.entire_labels(labels, label_mask)  # [B, T] x 2
        in_space = g.parent_positive(labels, label_mask) & label_mask  # [B, T]
        lam = torch.ones_like(weight)
        if scenario is not None and self.cfg.scenario_weighting != "none":
            lam = self.scenario_lambda[leaf_ids(scenario, self.schema)]  # [B]
        losses = []
        for i in self.term_tasks:
            t = self.schema.tasks[i]
            if t.type == "regression":
                l, m = (logits[:, i] - labels[:, i]) ** 2, in_space[:, i]
            elif t.parent is None and not t.derived:
                l = F.binary_cross_entropy_with_logits(logits[:, i], labels[:, i], reduction="none")
                m = label_mask[:, i]
            elif t.parent is None or t.loss_space == "entire":
                l, m = bce_from_log_prob(entire_lp[:, i], y_entire[:, i]), known_entire[:, i]
            elif t.derived:
                l, m = bce_from_log_prob(cond_lp[:, i], labels[:, i]), in_space[:, i]
            else:
                l = F.binary_cross_entropy_with_logits(logits[:, i], labels[:, i], reduction="none")
                m = in_space[:, i]
            r = weight * m
            losses.append((l * r * lam).sum() / r.sum().clamp(min=1e-12))
        return torch.stack(losses) if losses else logits.new_zeros(0)

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        label_mask: torch.Tensor,
        weight: torch.Tensor,
        scenario: Optional[torch.Tensor] = None,
        aux: Optional[Dict[str, torch.Tensor]] = None,
        bias: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``logits [B, T]``, ``labels [B, T]``, ``label_mask [B, T]``, ``weight [B]``,
        ``scenario [B, L]``, ``aux`` {name: scalar}, ``bias [B, Fb]`` -> (total, terms)."""
        if self.bias_tower is not None and self.training:
            if bias is None:
                raise ValueError("the schema declares position_bias but the batch carries no bias features")
            b = self.bias_tower(bias.to(logits.dtype))  # [B, 1]
            add = torch.zeros_like(logits)
            add[:, self.bias_tasks] = b.expand(-1, len(self.bias_tasks))
            logits = logits + add
        per_task = self.per_task(logits, labels, label_mask, weight, scenario)  # [K]
        w = self.term_weights()  # [K]
        if self.log_var is not None:
            s = self.log_var
            weighted = w * (self.uncertainty_scale * torch.exp(-s) * per_task + 0.5 * s)
        else:
            weighted = w * per_task
        total = weighted.sum()
        if self.unused_logits:  # 0 · the unused columns keeps DDP from seeing unused parameters
            total = total + 0.0 * logits[:, self.unused_logits].sum()
        terms: Dict[str, torch.Tensor] = {}
        for k, name in enumerate(self.term_names):
            terms[f"loss/{name}"] = per_task[k].detach()
            terms[f"loss_weight/{name}"] = w[k].detach()
            if self.log_var is not None:
                terms[f"loss_log_var/{name}"] = self.log_var[k].detach()
        for name, v in (aux or {}).items():
            total = total + self.cfg.aux_weight * v
            terms[name if name.startswith("aux/") else f"aux/{name}"] = v.detach()  # as the model names it
        terms["loss/total"] = total.detach()
        if self.training:
            with torch.no_grad():
                self.step += 1
        return total, terms


def inverse_share_weights(share: Sequence[float]) -> torch.Tensor:
    """λ_s = 1 / (S · share_s) (shares normalised to sum 1): each leaf scenario carries the same
    total weight 1/S. A scenario with no rows gets λ = 0 (it contributes nothing anyway)."""
    x = torch.tensor([float(v) for v in share], dtype=torch.float64)
    if (x < 0).any() or x.sum() <= 0:
        raise ValueError(f"scenario shares must be >= 0 with a positive sum, got {list(share)}")
    x = x / x.sum()
    S = x.numel()
    lam = torch.where(x > 0, 1.0 / (S * x.clamp(min=1e-300)), torch.zeros_like(x))
    return lam.float()
