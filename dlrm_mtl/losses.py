"""Entire-space multi-task loss (ESMM, ESM²) with sample-space masks, task and scenario weights."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dlrm_mtl import native
from dlrm_mtl.config import LossConfig
from dlrm_mtl.loss_balancing import SharedLayerWeighting, make_balancer
from dlrm_mtl.modules.bias_tower import BiasTower
from dlrm_mtl.ranking_loss import RANKING_TYPES, pair_rows_fraction, ranking_loss
from dlrm_mtl.schema import Schema, leaf_ids, scenario_names
from dlrm_mtl.task_graph import TaskGraph, TaskView, log1mexp


def bce_from_log_prob(logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy given log p (not p): no log(0) for products of small probabilities."""
    return -(y * logp + (1 - y) * log1mexp(logp))


class EntireSpaceLoss(nn.Module):
    """Masked, weighted multi-task loss built from the schema's task graph (docs/tasks.md).

    Per task k (one *term* each, named after what it trains; the term is the task's view in
    ``TaskGraph.loss_terms``, :class:`dlrm_mtl.task_graph.TaskView`):

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
    ``aux/...`` (the model's names), ``loss_weight/<term>`` (w·γ^t, times DWA's λ, GradNorm's
    w or PE-LTR's ω), ``loss_log_var/<term>`` (uncertainty), ``gradnorm/l_grad`` and
    ``pareto/grad_norm`` (those weightings), ``loss/total``.

    Ranking term (``loss.ranking``, :mod:`dlrm_mtl.ranking_loss`): λ · L_rank of the task's
    logits within request groups (``group [B]``, the batch's ``group_id`` column) is added to
    the total, outside the per-task weighting (no decay, DWA, GradNorm or PE-LTR weight);
    logged as ``loss/ranking``, ``loss_weight/ranking`` (λ) and ``ranking/pair_rows`` (the
    share of the task's rows whose group has both labels in the batch).

    ``weighting: gradnorm | pareto`` take their weights from the per-term gradients on the
    dense arch's last shared layer (:mod:`dlrm_mtl.loss_balancing`): :meth:`bind_shared` gives
    the loss that arch (``DenseStep`` does), and such a step runs eagerly (``needs_eager``).

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
        # one term per task with a loss space: its view (prediction, rows, label) from the graph
        self.terms: List[TaskView] = self.graph.loss_terms
        self.term_tasks: List[int] = [v.task for v in self.terms]
        self.term_names: List[str] = [v.name for v in self.terms]
        # sum_of tasks have no head of their own: their logit column is unused
        self.unused_logits: List[int] = [i for i, t in enumerate(tasks) if t.derived]
        names = schema.task_names
        for what, m in (("task_weights", cfg.task_weights), ("decay", cfg.decay)):
            unknown = sorted(set(m) - set(names))
            if unknown:
                raise ValueError(f"loss.{what}: unknown task(s) {unknown}; tasks are {names}")
        for k, g in cfg.decay.items():
            if not 0 < g <= 1:
                raise ValueError(f"loss.decay.{k}: γ must lie in (0, 1], got {g}")
        if cfg.weighting not in ("static", "uncertainty", "dwa", "gradnorm", "pareto"):
            raise ValueError(f"loss.weighting {cfg.weighting!r}: expected static, uncertainty, dwa, gradnorm or pareto")
        w = [cfg.task_weights.get(tasks[i].name, tasks[i].weight) for i in self.term_tasks]
        g = [cfg.decay.get(tasks[i].name, 1.0) for i in self.term_tasks]
        self.register_buffer("base_weights", torch.tensor(w, dtype=torch.float32), persistent=False)
        self.register_buffer("decay", torch.tensor(g, dtype=torch.float32), persistent=False)
        self.decays = any(v != 1.0 for v in g)  # γ^t is 1 for every term otherwise
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))  # persistent: checkpoints carry t
        K = len(self.term_tasks)
        # DWA: λ (1 until two epochs are known), the last two epoch-mean losses, this epoch's sums
        dwa = cfg.weighting == "dwa"  # in checkpoints only then (older checkpoints stay loadable)
        self.register_buffer("dwa_lambda", torch.ones(K), persistent=dwa)
        self.register_buffer("dwa_history", torch.full((2, K), float("nan")), persistent=dwa)  # [L(t-2), L(t-1)]
        self.register_buffer("dwa_sum", torch.zeros(K), persistent=dwa)
        self.register_buffer("dwa_count", torch.zeros(()), persistent=dwa)
        # gradnorm / pareto: weights from per-task gradients on the last shared layer
        # (dlrm_mtl/loss_balancing.py); a submodule only then (older checkpoints stay loadable)
        self.balancer: Optional[SharedLayerWeighting] = make_balancer(cfg, [tasks[i].name for i in self.term_tasks], names)
        self.log_var: Optional[nn.Parameter] = None
        if cfg.weighting == "uncertainty":
            self.log_var = nn.Parameter(torch.full((len(self.term_tasks),), float(cfg.uncertainty_init)))
        regression = [v.regression for v in self.terms]
        # Kendall et al. 2018: eq. 5 (regression: 1/(2σ²) L + log σ), eq. 10 (classification: 1/σ² L + log σ)
        self.register_buffer("uncertainty_scale", torch.tensor([0.5 if r else 1.0 for r in regression]), persistent=False)
        self.register_buffer("term_regression", torch.tensor(regression, dtype=torch.bool), persistent=False)
        self.leaf_names = scenario_names(schema)
        self.register_buffer("scenario_lambda", self._scenario_lambda(cfg, scenario_share))  # persistent
        self.term_matrices: Optional[TermMatrices] = None
        if all(t.type == "binary" and not t.derived for t in tasks):
            self.term_matrices = TermMatrices(self.graph, self.terms)
        self.bias_tower: Optional[BiasTower] = None
        self.bias_tasks: List[int] = []
        if schema.position_bias is not None:
            self.bias_tower = BiasTower(len(schema.position_bias.features), cfg.bias_tower, schema.position_bias.reference)
            self.bias_tasks = [schema.task_index(n) for n in schema.position_bias.tasks]
        self.ranking_task: Optional[int] = self._ranking_task(cfg)
        # λ as a buffer: logged without a host-to-device copy inside a recorded step
        self.register_buffer("ranking_weight", torch.tensor(float(cfg.ranking.weight)), persistent=False)

    def _ranking_task(self, cfg: LossConfig) -> Optional[int]:
        """Column of ``loss.ranking.task`` in the logits, None when the term is off."""
        r = cfg.ranking
        if r.type == "none":
            return None
        if r.type not in RANKING_TYPES:
            raise ValueError(f"loss.ranking.type {r.type!r}: expected none, pairwise or listwise")
        names = self.schema.task_names
        if r.task not in names:
            raise ValueError(f"loss.ranking.task {r.task!r}: not a task of the schema; tasks are {names}")
        i = self.schema.task_index(r.task)
        if self.schema.tasks[i].type != "binary" or self.schema.tasks[i].derived:
            raise ValueError(f"loss.ranking.task {r.task!r}: must be a binary task with its own head")
        if r.weight < 0:
            raise ValueError(f"loss.ranking.weight: must be >= 0, got {r.weight}")
        return i

    def ranking_term(self, logits: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor, weight: torch.Tensor,
                     group: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``logits, labels, label_mask [B, T]``, ``weight [B]``, ``group [B]`` -> (L_rank [],
        pair_rows []) over the rows where the ranking task's label is known and the row
        weight is positive (padding rows never count)."""
        k = self.ranking_task
        assert k is not None
        if group is None:
            raise ValueError(f"loss.ranking needs the batch's request groups, but it carries none: declare "
                             f"`group_id: {self.cfg.ranking.group}` in the data set's schema.yaml")
        valid = label_mask[:, k] & (weight > 0)  # [B]
        y = labels[:, k]  # [B]
        loss = ranking_loss(self.cfg.ranking.type, logits[:, k], y, group, valid)
        with torch.no_grad():
            share = pair_rows_fraction(y, group, valid)
        return loss, share

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

    def term_weights(self, balance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[K]`` current w_k · γ_k^t (PLE eq. 10), times DWA's λ_k under ``weighting: dwa``,
        times the gradnorm / pareto weight (``balance [K]``: this training step's; else the
        weighting's current one)."""
        w = self.base_weights * self.decay.pow(self.step.to(self.decay.dtype)) if self.decays else self.base_weights
        if self.balancer is not None:
            w = w * (self.balancer.weight if balance is None else balance)
        return w * self.dwa_lambda if self.cfg.weighting == "dwa" else w

    def bind_shared(self, dense_arch: nn.Module) -> None:
        """Under ``weighting: gradnorm | pareto``: the dense arch whose last shared layer
        (``loss.shared_layer``) the per-task gradients are taken on (ConfigError when that
        names no module with weights); a no-op otherwise. :class:`DenseStep` calls it."""
        if self.balancer is not None:
            self.balancer.bind(dense_arch)

    @property
    def needs_eager(self) -> bool:
        """True when the step cannot be recorded as a CUDA graph (gradnorm / pareto take
        per-task gradients and all-reduce them inside the forward)."""
        return self.balancer is not None

    @torch.no_grad()
    def end_epoch(self, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        """DWA (Liu et al., CVPR 2019, eq. 1), called after every training epoch:

            r_k = L_k(t−1) / L_k(t−2),   λ_k(t) = K · exp(r_k / T) / Σ_i exp(r_i / T)

        with L_k the epoch-mean of task k's loss term (summed over the steps of this epoch,
        and over the ranks by ``reduce``, so every rank gets the same λ). λ = 1 until two
        epochs are known, as in the paper. A no-op under other weightings."""
        if self.cfg.weighting != "dwa":
            return
        sums = torch.cat([self.dwa_sum, self.dwa_count.reshape(1)])
        if reduce is not None:
            sums = reduce(sums.cpu()).to(self.dwa_sum.device)
        if float(sums[-1]) == 0:
            return
        self.dwa_history[0] = self.dwa_history[1]
        self.dwa_history[1] = sums[:-1] / sums[-1]
        if not torch.isnan(self.dwa_history[0]).any():
            r = self.dwa_history[1] / self.dwa_history[0]
            self.dwa_lambda.copy_(len(r) * torch.softmax(r / self.cfg.dwa_temperature, dim=0))
        self.dwa_sum.zero_()
        self.dwa_count.zero_()

    def per_task(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        label_mask: torch.Tensor,
        weight: torch.Tensor,
        scenario: Optional[torch.Tensor] = None,
        term_inputs: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """``[K]`` per-term mean losses (K = tasks with a loss space).

        Binary task graphs without ``sum_of`` tasks (ESMM chains, PLE masks, negated parents)
        take :meth:`_per_task_matrix`: every term at once, a few dozen operators whatever the
        number of tasks. Regression and ``sum_of`` tasks take the per-view path
        (:meth:`_per_task_loop`, :meth:`TaskGraph.view_tensors`); both give the same values
        (tests/test_losses.py). ``term_inputs``: the batch's ``(term_labels, term_rows)``
        where the reader computed them (:class:`TermInputs`), else None."""
        lam: Optional[torch.Tensor] = None
        if scenario is not None and self.cfg.scenario_weighting != "none":
            lam = self.scenario_lambda[leaf_ids(scenario, self.schema)]  # [B]
        if self.term_matrices is not None:
            return self._per_task_matrix(logits, labels, label_mask, weight, lam, term_inputs)
        return self._per_task_loop(logits, labels, label_mask, weight, lam)

    def _per_task_matrix(
        self, logits: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor, weight: torch.Tensor,
        lam: Optional[torch.Tensor], term_inputs: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        m = self.term_matrices
        assert m is not None
        y, r = term_inputs if term_inputs is not None else m.inputs(labels, label_mask, weight)  # [B, K] each
        if self.balancer is None:  # the closed-form gradient (GradNorm / Pareto differentiate twice)
            if native.term_means_applies(logits, y, r, lam) and m.log_prob.dtype == torch.float32:
                return FusedTermMeans.apply(logits, y, r, lam, m)  # one C pass (dlrm_mtl/native.py)
            rl = r if lam is None else r * lam.unsqueeze(1)  # [B, K]
            return TermMeans.apply(logits, y, rl / r.sum(0).clamp(min=1e-12), m)
        lp, ln = m.log_probs(logits)  # [B, K] x 2: log p and log(1 - p) of each term's prediction
        return _mean_over_rows(-(y * lp + (1 - y) * ln), r, lam)

    def _per_task_loop(
        self, logits: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor, weight: torch.Tensor,
        lam: Optional[torch.Tensor],
    ) -> torch.Tensor:
        if not self.terms:
            return logits.new_zeros(0)
        v = self.graph.view_tensors(self.terms, logits, labels, label_mask)  # [B, K] each
        bce = -(v.label * v.pred + (1 - v.label) * v.neg)  # [B, K]
        loss = torch.where(self.term_regression, (v.pred - v.label) ** 2, bce)  # [B, K]
        return _mean_over_rows(loss, weight.unsqueeze(1) * v.rows, lam)

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        label_mask: torch.Tensor,
        weight: torch.Tensor,
        scenario: Optional[torch.Tensor] = None,
        aux: Optional[Dict[str, torch.Tensor]] = None,
        bias: Optional[torch.Tensor] = None,
        group: Optional[torch.Tensor] = None,
        term_labels: Optional[torch.Tensor] = None,
        term_rows: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``logits [B, T]``, ``labels [B, T]``, ``label_mask [B, T]``, ``weight [B]``,
        ``scenario [B, L]``, ``aux`` {name: scalar}, ``bias [B, Fb]``, ``group [B]`` (request
        ids, read only under ``loss.ranking``), ``term_labels, term_rows [B, K]`` (the batch's,
        where the reader computed them: :class:`TermInputs`) -> (total, terms)."""
        if self.bias_tower is not None and self.training:
            if bias is None:
                raise ValueError("the schema declares position_bias but the batch carries no bias features")
            b = self.bias_tower(bias.to(logits.dtype))  # [B, 1]
            add = torch.zeros_like(logits)
            add[:, self.bias_tasks] = b.expand(-1, len(self.bias_tasks))
            logits = logits + add
        term_inputs = None if term_labels is None or term_rows is None else (term_labels, term_rows)
        per_task = self.per_task(logits, labels, label_mask, weight, scenario, term_inputs)  # [K]
        balance = None  # gradnorm / pareto: this step's weights from the per-task gradients
        if self.balancer is not None and self.training and torch.is_grad_enabled():
            balance = self.balancer(per_task)  # [K]
        w = self.term_weights(balance)  # [K]
        if self.log_var is not None:
            s = self.log_var
            weighted = w * (self.uncertainty_scale * torch.exp(-s) * per_task + 0.5 * s)
            total = weighted.sum()
        else:
            total = per_task @ w.to(per_task.dtype)
        if self.unused_logits:  # 0 · the unused columns keeps DDP from seeing unused parameters
            total = total + 0.0 * logits[:, self.unused_logits].sum()
        terms: Dict[str, torch.Tensor] = {}
        per_k, w_k = per_task.detach().unbind(0), w.detach().unbind(0)  # one operator each, not one per term
        for k, name in enumerate(self.term_names):
            terms[f"loss/{name}"] = per_k[k]
            terms[f"loss_weight/{name}"] = w_k[k]
            if self.log_var is not None:
                terms[f"loss_log_var/{name}"] = self.log_var[k].detach()
        if balance is not None:
            assert self.balancer is not None
            terms.update(self.balancer.last_terms)  # gradnorm/l_grad, pareto/grad_norm
        for name, v in (aux or {}).items():
            total = total + self.cfg.aux_weight * v
            terms[name if name.startswith("aux/") else f"aux/{name}"] = v.detach()  # as the model names it
        if self.ranking_task is not None:
            rank, share = self.ranking_term(logits, labels, label_mask, weight, group)
            total = total + self.ranking_weight * rank
            terms["loss/ranking"] = rank.detach()
            terms["loss_weight/ranking"] = self.ranking_weight.clone()
            terms["ranking/pair_rows"] = share
        terms["loss/total"] = total.detach()
        if self.training:
            with torch.no_grad():
                self.step += 1
                if self.cfg.weighting == "dwa":
                    self.dwa_sum += per_task.detach()
                    self.dwa_count += 1
        return total, terms


def _mean_over_rows(loss: torch.Tensor, r: torch.Tensor, lam: Optional[torch.Tensor]) -> torch.Tensor:
    """``loss [B, K]``, row weights ``r [B, K]`` (the row's weight on the term's rows, else 0),
    ``lam [B]`` -> ``[K]`` Σ_i r_ik λ_i ℓ_ik / Σ_i r_ik (0 for a term without rows)."""
    num = loss * r if lam is None else loss * (r * lam.unsqueeze(1))
    return num.sum(0) / r.sum(0).clamp(min=1e-12)


class TermMatrices(nn.Module):
    """The loss terms of a binary task graph (no ``sum_of`` tasks) as constant matrices, so
    that every term's prediction, label and row mask come out of a few matrix operations.

    Built from the terms' :class:`TaskView` fields, for head tasks only: ``prediction`` is
    ``logit`` (σ(z_i)) or ``entire`` (the chained product); ``label`` is ``own`` (y_i) or
    ``event`` (every chain step holds); ``rows`` is ``label`` (y_i known), ``context`` (every
    ancestor known and positive, or negative for a negated parent, and y_i known) or ``chain``
    (every label on the chain known). ESMM's term (eq. 3) is (entire, chain, event); PLE's
    masked term (eq. 9) is (logit, context, own). In log space::

        log P_entire = [log σ(z), log σ(−z)] @ P            (P: [2T, T], one 1 per chain step)
        count_k      = [pos, neg, known, y] @ H[:, k]        (pos = known ∧ y = 1, neg = known ∧ y = 0)

    a term's chained event / space holds where its count equals the number of conditions.
    Matrices are buffers (not persistent): they move with the module and never reach a
    checkpoint.
    """

    def __init__(self, graph: TaskGraph, terms: List[TaskView]) -> None:
        super().__init__()
        T, K = len(graph.schema.tasks), len(terms)
        P = torch.zeros(2 * T, T)
        for i, steps in enumerate(graph.steps):
            for j, positive in steps:
                P[j if positive else T + j, i] = 1.0
        src = []  # column of [log σ(z) | log P_entire] (and of its complement) per term
        hy, hm = torch.zeros(4 * T, K), torch.zeros(4 * T, K)
        y_is_event = torch.zeros(K, dtype=torch.bool)

        def conditions(h: torch.Tensor, k: int, steps: List[Tuple[int, bool]]) -> None:
            for j, positive in steps:
                h[j if positive else T + j, k] = 1.0

        for k, v in enumerate(terms):
            i = v.task
            if v.prediction not in ("logit", "entire"):
                raise ValueError(f"term {v.name!r}: TermMatrices takes logit or entire predictions, not {v.prediction!r}")
            src.append(i if v.prediction == "logit" else T + i)
            if v.label == "event":  # every step of the chain holds
                conditions(hy, k, graph.steps[i])
                y_is_event[k] = True
            else:
                hy[3 * T + i, k] = 1.0
            if v.rows == "chain":  # every label on the chain known
                for j, _ in graph.steps[i]:
                    hm[2 * T + j, k] = 1.0
            else:  # own label known, inside the conditional space for "context"
                conditions(hm, k, graph.context[i] if v.rows == "context" else [])
                hm[2 * T + i, k] = 1.0
        self.T = T
        self.any_entire = any(s >= T for s in src)
        self.register_buffer("chain", P, persistent=False)
        self.register_buffer("src", torch.tensor(src, dtype=torch.int64), persistent=False)
        self.register_buffer("h_label", hy, persistent=False)
        self.register_buffer("h_known", hm, persistent=False)
        self.register_buffer("n_label", hy.sum(0), persistent=False)
        self.register_buffer("n_known", hm.sum(0), persistent=False)
        self.register_buffer("y_is_event", y_is_event, persistent=False)
        # TermMeans' backward: [S | P₊ | P₋] ([K, 3T]) from each term to the logits
        grad_map = torch.zeros(K, 3 * T)
        for k, v in enumerate(terms):
            i = v.task
            if v.prediction == "logit":
                grad_map[k, i] = 1.0
            else:
                for j, positive in graph.steps[i]:
                    grad_map[k, (T if positive else 2 * T) + j] += 1.0
        self.register_buffer("grad_map", grad_map, persistent=False)
        # TermMeans' forward: each term's log-probability straight from [log σ(z) | log σ(−z)]
        # ([2T, K]: a logit term is its own column, an entire-space term the sum of its chain)
        log_prob = torch.zeros(2 * T, K)
        for k, s in enumerate(src):
            if s >= T:
                log_prob[:, k] = P[:, s - T]  # the chain's steps
            else:
                log_prob[s, k] = 1.0
        self.negated = bool(log_prob[T:].any())  # some chain steps through a negated parent: log σ(−z) needed
        # TermMeans' backward of a chained graph: [S | P₊ | P₋], without the all-zero P₋ when no step is negated
        self.register_buffer("entire_grad_map", grad_map if self.negated else grad_map[:, : 2 * T].contiguous(), persistent=False)
        self.register_buffer("log_prob", log_prob if self.negated else log_prob[:T].contiguous(), persistent=False)
        entire = torch.tensor([s >= T for s in src])
        self.register_buffer("is_entire", entire, persistent=False)
        self.register_buffer("src_task", torch.tensor([s % T for s in src], dtype=torch.int64), persistent=False)
        self.identity_src = [s % T for s in src] == list(range(T)) and not entire.any()  # logit k = task k: no select

    def log_probs(self, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``logits [B, T]`` -> (log p, log(1 − p)) of each term's prediction, ``[B, K]`` each."""
        pos, neg = F.logsigmoid(logits), F.logsigmoid(-logits)  # [B, T]
        if self.any_entire:
            entire = torch.cat([pos, neg], dim=1) @ self.chain  # [B, T] log P_entire
            pos = torch.cat([pos, entire], dim=1)  # [B, 2T]
            neg = torch.cat([neg, log1mexp(entire)], dim=1)
        return pos.index_select(1, self.src), neg.index_select(1, self.src)

    def labels(self, labels: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``labels, mask [B, T]`` -> (label, in-space) of each term, ``[B, K]`` each."""
        known = mask.to(labels.dtype)
        a = torch.cat([known * (labels == 1), known * (labels == 0), known, labels], dim=1)  # [B, 4T]
        y = a @ self.h_label  # [B, K]
        y = torch.where(self.y_is_event, (y == self.n_label).to(y.dtype), y)
        return y, (a @ self.h_known) == self.n_known

    def inputs(self, labels: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``labels, mask [B, T]``, ``weight [B]`` -> (each term's label, each term's row
        weight: ``weight`` where the row is in the term's space, else 0), ``[B, K]`` each."""
        y, known = self.labels(labels, mask)
        return y, weight.unsqueeze(1) * known

    def host_inputs(self) -> "TermInputs":
        """:meth:`inputs` on host numpy arrays, for a reader to compute once per row group."""
        return TermInputs(self.h_label.cpu().numpy(), self.h_known.cpu().numpy(), self.n_label.cpu().numpy(),
                          self.n_known.cpu().numpy(), self.y_is_event.cpu().numpy())


class TermInputs:
    """:meth:`TermMatrices.inputs` in numpy: ``(labels [n, T] float32, mask [n, T] bool,
    weight [n] float32) -> (term labels, term rows)``, ``[n, K]`` float32 each, with the same
    values (sums of 0/1 products and a row weight: exact in float32; tests/test_losses.py).
    The reader applies it to a whole row group at once (``ParquetStream.set_loss_terms``),
    so that the loss reads two ``[B, K]`` tensors of the batch instead of deriving them with
    ~15 operators every step.

    Example::

        terms = loss.term_matrices.host_inputs()
        y, rows = terms(labels, mask, weight)   # numpy [n, K] x 2
    """

    def __init__(self, h_label: np.ndarray, h_known: np.ndarray, n_label: np.ndarray, n_known: np.ndarray,
                 y_is_event: np.ndarray) -> None:
        self.h_label, self.h_known, self.n_label, self.n_known = h_label, h_known, n_label, n_known
        self.y_is_event = y_is_event

    def __call__(self, labels: np.ndarray, mask: np.ndarray, weight: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        known = mask.astype(labels.dtype)
        a = np.concatenate([known * (labels == 1), known * (labels == 0), known, labels], axis=1)  # [n, 4T]
        y = a @ self.h_label  # [n, K]
        y = np.where(self.y_is_event, (y == self.n_label).astype(y.dtype), y)
        rows = weight[:, None] * ((a @ self.h_known) == self.n_known)
        return y.astype(np.float32, copy=False), rows.astype(np.float32, copy=False)


class TermMeans(torch.autograd.Function):
    """``TermMeans.apply(logits [B, T], y [B, K], c [B, K], m: TermMatrices) -> [K]``: every
    term's weighted mean BCE, ``L_k = Σ_b c_bk ℓ_bk`` with ``ℓ = -(y log p + (1 - y) log(1 - p))``
    and ``p`` the term's prediction (:meth:`TermMatrices.log_probs`), differentiated in closed
    form instead of through autograd's ~45 backward operators over ``[B, T]`` and ``[B, K]``.

    Forward: each term's BCE is ``BCE-with-logits(u, y)`` with ``u`` the logit of its
    probability: ``z_i`` for a logit term, ``log P − log(1 − P)`` for an entire-space term
    (ESMM, eq. 2-3: ``log P = [log σ(z), log σ(−z)] @ log_prob``, the chain's steps summed), so
    that ``log σ(u) = log P`` and ``log σ(−u) = log(1 − P)``. One fused BCE operator and a
    handful of ``[B, K]`` operators instead of a log-probability and its complement per term.
    ``log(1 − P)`` is ``log(-expm1(log P))`` with ``log P`` clamped to ``≤ -1e-30`` (a chained
    probability that rounds to 1 costs at most ~69 nats, as :func:`log1mexp`).

    Backward, with ``σ = σ(z)`` and ``W = c · ∂L`` (``∂L [K]`` the incoming gradient), per term k:

    * a logit term on task i: ``∂ℓ/∂z_i = p - y`` (p = σ(z_i));
    * an entire-space term on task i with log P = Σ_steps log σ(±z_j) (ESMM, eq. 2-3):
      ``∂ℓ/∂log P = -y + (1 - y) P / (1 - P)`` and ``∂log P/∂z_j = 1 - σ_j`` for a positive
      step, ``-σ_j`` for a negated one;

    so ``∂/∂z = W S + (W P₊) ⊙ σ(-z) - (W P₋) ⊙ σ(z)`` with the constant ``[K, T]`` selections S
    (logit terms), P₊ and P₋ (entire terms' positive and negated steps): one product and one
    ``mm`` in backward. ``σ(-z)``, not ``1 - σ(z)``, which is 0 in float32 from z ≈ 17.
    ``P / (1 - P)`` is ``exp(u)``; where log P is above the clamp the autograd path's gradient
    through the clamp is 0, and so is this one (``∂ℓ/∂log P = -y``). Equal to the autograd path
    to float64 rounding (tests/test_losses.py); ``y`` and ``c`` get no gradient.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, y: torch.Tensor, c: torch.Tensor, m: "TermMatrices") -> torch.Tensor:
        T = m.T
        ctx.T, ctx.entire, ctx.negated = T, m.any_entire, m.negated
        if not m.any_entire:  # logit terms only (e.g. two root tasks): ∂ℓ/∂z = σ(z) - y
            u = logits if m.identity_src else logits.index_select(1, m.src_task)  # [B, K]
            per = F.binary_cross_entropy_with_logits(u, y, weight=c, reduction="none").sum(0)  # [K]
            ctx.save_for_backward((torch.sigmoid(u) - y) * c, m.grad_map[:, :T].to(logits.dtype))
            return per
        pos = F.logsigmoid(logits)  # [B, T]
        lp = (torch.cat([pos, F.logsigmoid(-logits)], dim=1) if m.negated else pos) @ m.log_prob  # [B, K] log P
        lpc = lp.clamp(max=-1e-30)
        u = torch.where(m.is_entire, lpc - torch.log(-torch.expm1(lpc)), logits.index_select(1, m.src_task))  # [B, K]
        per = F.binary_cross_entropy_with_logits(u, y, weight=c, reduction="none").sum(0)  # [K]
        ratio = torch.exp(u).masked_fill_(lp > -1e-30, 0.0)  # P / (1 - P); 0 above the clamp
        d = torch.where(m.is_entire, ratio * (1 - y) - y, torch.sigmoid(u) - y) * c  # [B, K] ∂L_k/∂(its source)
        ctx.save_for_backward(d, logits, m.entire_grad_map.to(logits.dtype))
        return per

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.entire:
            d, select = ctx.saved_tensors
            return (d * grad) @ select, None, None, None  # [B, T]
        d, logits, grad_map = ctx.saved_tensors
        T = ctx.T
        g = (d * grad) @ grad_map  # [B, 3T] (2T without negated steps): W S | W P₊ | W P₋
        out = g[:, :T] + g[:, T : 2 * T] * torch.sigmoid(-logits)
        if ctx.negated:
            out = out - g[:, 2 * T :] * torch.sigmoid(logits)
        return out, None, None, None


class FusedTermMeans(torch.autograd.Function):
    """``FusedTermMeans.apply(logits [B, T], y [B, K], r [B, K], lam [B] or None, m) -> [K]``:
    :class:`TermMeans` with its weights ``c = r λ / Σ_b r`` (as
    :meth:`EntireSpaceLoss._per_task_matrix` forms them) in one C pass over the rows forward
    and one backward (:func:`dlrm_mtl.native.term_means_forward`), instead of ~25 ATen operators
    on ``[B, T]`` and ``[B, K]`` tensors (the MovieLens shared-bottom step, docs/performance.md).
    The same formulas as :class:`TermMeans` (ESMM, eq. 2-3, in log space with the same clamp);
    each term's loss is ``-(y log P + (1 - y) log(1 - P))`` directly rather than a BCE of its
    logit ``u``, and row sums accumulate in double, so values agree with :class:`TermMeans` to
    float32 rounding, not bit for bit (tests/test_native.py). float32 CPU tensors only, the
    logits with any strides and the others contiguous (:func:`dlrm_mtl.native.term_means_applies`);
    ``y``, ``r`` and ``lam`` get no gradient.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, y: torch.Tensor, r: torch.Tensor, lam: Optional[torch.Tensor],
                m: "TermMatrices") -> torch.Tensor:
        per, d, sig_pos, sig_neg = native.term_means_forward(logits, y, r, lam, m.src_task, m.is_entire,
                                                             m.log_prob, m.negated)
        ctx.save_for_backward(d, sig_pos, sig_neg, m.grad_map)
        return per

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        d, sig_pos, sig_neg, grad_map = ctx.saved_tensors
        return native.term_means_backward(d, grad, grad_map, sig_pos, sig_neg), None, None, None, None


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
