"""Task graph: chained (entire-space) probabilities built from the schema's ``parent`` links,
and the one list of task views (which prediction is scored on which rows against which label)
that the loss, the metrics and ``inspect-data`` consume."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Literal, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from dlrm_mtl.schema import Schema

Prediction = Literal["logit", "cond", "entire", "value"]
Rows = Literal["label", "context", "chain"]
Label = Literal["own", "event"]


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


@dataclass(frozen=True)
class TaskView:
    """One scored prediction of a task: what is predicted, on which rows, against which label.

    * ``name``: the metric and loss-term name (``ctr``, ``cvr``, ``ctcvr``);
    * ``task``: the task's index (its column in logits, labels and masks);
    * ``prediction``: ``logit`` = σ of the task's own head; ``cond`` = the conditional
      probability of a ``sum_of`` task (its entire-space probability over its context's);
      ``entire`` = the chained entire-space probability; ``value`` = the raw regression output;
    * ``rows``: the rows it is scored on: ``label`` = where the task's label is known;
      ``context`` = inside its conditional space (every ancestor known and positive, or
      negative for a negated parent) with its own label known; ``chain`` = where every label
      of its entire-space event is known (the chain's; a ``sum_of`` task's own and its context's);
    * ``label``: ``own`` = the task's label; ``event`` = the entire-space event (every step of
      the chain holds; a ``sum_of`` task's label and its context);
    * ``regression``: scored by squared / absolute error instead of log loss and AUC.
    """

    name: str
    task: int
    prediction: Prediction
    rows: Rows
    label: Label
    regression: bool = False


class ViewBatch(NamedTuple):
    """The tensors of a list of V views on a batch of B rows (:meth:`TaskGraph.view_tensors`)."""

    pred: torch.Tensor  # [B, V] log p of binary views, the value of regression views
    neg: torch.Tensor  # [B, V] log(1 − p) of binary views, 0 for regression views
    label: torch.Tensor  # [B, V] the label each view is scored against
    rows: torch.Tensor  # [B, V] bool: the row is in the view's rows


class TaskGraph:
    """The forest of tasks (docs/tasks.md).

    Head t predicts the conditional P(t | context(t)); the entire-space probability of t is
    the product along its chain (ESMM, Ma et al. 2018, eq. 1-2: pCTCVR = pCTR · pCVR).
    Deeper chains (click → cart → buy) work the same way. A negated parent (``parent:
    "!dact"``) contributes (1 − p_dact) instead of p_dact. A ``sum_of`` task adds up the
    entire-space probabilities of mutually exclusive branches; with ESM² (Wen et al. 2020,
    eq. 4-6; y2 = P(D | click), y3 = P(buy | D), y4 = P(buy | ¬D))::

        pCTCVR = pCTR · [y2 · y3 + (1 − y2) · y4]

    Everything is computed in log space (``log σ(z)``, ``log σ(−z) = log(1 − σ(z))``,
    logsumexp for sums), so products of small probabilities never underflow to log(0).
    Regression heads are passed through unchanged (never sigmoid'ed).

    Example::

        g = TaskGraph(schema)                 # ctr, cvr(parent=ctr)
        g.chains                              # [[0], [0, 1]]
        g.entire_log_prob(logits).shape       # [B, T]; column 1 = log pCTR + log pCVR
        [v.name for v in g.metric_views]      # ["ctr", "cvr", "ctcvr"]
        [v.name for v in g.loss_terms]        # ["ctr", "ctcvr"] (cvr: loss_space entire)

    Views (:class:`TaskView`, built once here): a root task has one, on the rows with its
    label (a ``sum_of`` root: its summed probability); a chained task has its conditional
    prediction on its conditional space (``cvr`` on clicked rows) and its entire-space
    prediction on every row whose chain labels are known (``ctcvr``); a regression task has its
    value on its conditional space. ``metric_views`` lists every view, task by task;
    ``loss_terms`` holds one view per task with a loss space: its entire-space view under
    ``loss_space: entire``, else its first one. :meth:`view_tensors` is the one implementation
    of what a view's prediction, label and rows are on a batch.
    """

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        tasks = schema.tasks
        self.chains: List[List[int]] = [schema.chain(t.name) for t in tasks]
        self.entire_names: List[str] = [schema.entire_name(t) for t in tasks]
        self.steps: List[List[Tuple[int, bool]]] = [schema.steps(t.name) if not t.derived else [] for t in tasks]
        self.binary = [t.type == "binary" for t in tasks]
        self.regression_idx = [i for i, t in enumerate(tasks) if t.type == "regression"]
        self.branches: List[List[int]] = [[schema.task_index(b) for b in t.sum_of] for t in tasks]
        # the context of a task: the event its head is conditioned on (steps before it)
        self.context: List[List[Tuple[int, bool]]] = []
        for i, t in enumerate(tasks):
            if t.derived:
                self.context.append(schema.steps(t.parent_name) if t.parent is not None else [])  # type: ignore[arg-type]
            else:
                self.context.append(self.steps[i][:-1])
        per_task = [self._task_views(i) for i in range(len(tasks))]
        self.metric_views: List[TaskView] = [v for views in per_task for v in views]
        self.loss_terms: List[TaskView] = [
            views[-1] if t.loss_space == "entire" else views[0] for t, views in zip(tasks, per_task) if t.loss_space != "none"
        ]

    def _task_views(self, i: int) -> List[TaskView]:
        """The views of task ``i``: conditional first, entire-space second (chained tasks)."""
        t = self.schema.tasks[i]
        own_rows: Rows = "label" if t.parent is None else "context"
        if t.type == "regression":
            return [TaskView(t.name, i, "value", own_rows, "own", regression=True)]
        entire = TaskView(self.entire_names[i], i, "entire", "chain", "event")
        if t.parent is None:
            return [entire] if t.derived else [TaskView(t.name, i, "logit", "label", "own")]
        return [TaskView(t.name, i, "cond" if t.derived else "logit", "context", "own"), entire]

    # ------------------------------------------------------------------ predictions
    def entire_log_prob(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` logits of the heads -> ``[B, T]`` log entire-space probabilities.

        Regression columns hold 0 (they have no probability); use :meth:`predictions`."""
        pos = F.logsigmoid(logits)  # [B, T] log p
        neg = F.logsigmoid(-logits)  # [B, T] log (1 - p)
        cols: List[Optional[torch.Tensor]] = [None] * logits.shape[1]
        for i in range(logits.shape[1]):
            if not self.binary[i] or self.branches[i]:
                continue
            cols[i] = sum((pos[:, j] if s else neg[:, j]) for j, s in self.steps[i])  # type: ignore[assignment]
        for i, br in enumerate(self.branches):
            if br:
                cols[i] = torch.logsumexp(torch.stack([cols[j] for j in br], dim=1), dim=1)  # type: ignore[misc]
        zero = torch.zeros_like(logits[:, 0])
        return torch.stack([c if c is not None else zero for c in cols], dim=1)

    def cond_log_prob(self, logits: torch.Tensor, entire: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, T]`` log of the conditional probability each task predicts (head tasks:
        log σ(z); sum_of tasks: entire − log P(context)). Regression columns hold 0."""
        entire = self.entire_log_prob(logits) if entire is None else entire
        pos, neg = F.logsigmoid(logits), F.logsigmoid(-logits)
        cols = []
        for i in range(logits.shape[1]):
            if not self.binary[i]:
                cols.append(torch.zeros_like(logits[:, i]))
            elif self.branches[i]:
                ctx = sum(((pos[:, j] if s else neg[:, j]) for j, s in self.context[i]), torch.zeros_like(logits[:, i]))
                cols.append((entire[:, i] - ctx).clamp(max=0.0))
            else:
                cols.append(pos[:, i])
        return torch.stack(cols, dim=1)

    def predictions(self, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(conditional, entire)`` predictions ``[B, T]`` each: probabilities for binary
        tasks, the raw head output for regression tasks (in both)."""
        entire_lp = self.entire_log_prob(logits)
        cond = self.cond_log_prob(logits, entire_lp).exp()
        entire = entire_lp.exp()
        if self.regression_idx:
            r = self.regression_idx
            cond = cond.clone()
            entire = entire.clone()
            cond[:, r] = logits[:, r]
            entire[:, r] = logits[:, r]
        return cond, entire

    def probabilities(self, logits: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Conditional and entire-space predictions by metric name (e.g. ctr, cvr, ctcvr)."""
        out: Dict[str, torch.Tensor] = {}
        cond, entire = self.predictions(logits)
        for i, t in enumerate(self.schema.tasks):
            out[t.name] = cond[:, i]
            if t.parent is not None and t.type == "binary":
                out[self.entire_names[i]] = entire[:, i]
        return out

    # ------------------------------------------------------------------ labels and spaces
    def _holds(self, labels: torch.Tensor, mask: torch.Tensor, steps: List[Tuple[int, bool]]) -> torch.Tensor:
        """``[B]`` bool: every condition in ``steps`` is known and true on the row."""
        ok = torch.ones_like(labels[:, 0], dtype=torch.bool)
        for j, s in steps:
            ok = ok & mask[:, j] & ((labels[:, j] == 1) if s else (labels[:, j] == 0))
        return ok

    def _known(self, mask: torch.Tensor, steps: List[Tuple[int, bool]]) -> torch.Tensor:
        ok = torch.ones_like(mask[:, 0], dtype=torch.bool)
        for j, _ in steps:
            ok = ok & mask[:, j]
        return ok

    def entire_labels(self, labels: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(y, known)`` of each task's entire-space event, ``[B, T]`` each.

        Head task: y = Π over its chain of (y_j or 1 − y_j for a negated step), known where every
        label on the chain is; sum_of task: y = its own label ∧ its context, known where its
        label and its context's labels are. Regression columns: the label itself."""
        ys, ks = [], []
        for i in range(labels.shape[1]):
            if not self.binary[i]:
                ys.append(labels[:, i])
                ks.append(mask[:, i])
            elif self.branches[i]:
                ctx = self.context[i]
                ys.append((labels[:, i] * self._holds(labels, mask, ctx)).to(labels.dtype))
                ks.append(mask[:, i] & self._known(mask, ctx))
            else:
                ys.append(self._holds(labels, mask, self.steps[i]).to(labels.dtype))
                ks.append(self._known(mask, self.steps[i]))
        return torch.stack(ys, dim=1), torch.stack(ks, dim=1)

    def parent_positive(self, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` bool: the row lies in task t's conditional sample space (its context
        holds: every ancestor label is known and 1, or 0 for a negated parent)."""
        return torch.stack([self._holds(labels, mask, ctx) for ctx in self.context], dim=1)

    # ------------------------------------------------------------------ views
    def view_tensors(self, views: Sequence[TaskView], logits: torch.Tensor, labels: torch.Tensor,
                     mask: torch.Tensor) -> ViewBatch:
        """``logits, labels, mask [B, T]`` -> each view's prediction, label and rows, ``[B, V]``.

        Binary predictions are log-probabilities, with log(1 − p) next to them (log σ(−z) for
        a head's own logit, log1mexp of the log-probability otherwise)."""
        pos, neg = F.logsigmoid(logits), F.logsigmoid(-logits)  # [B, T]
        entire = self.entire_log_prob(logits)  # [B, T]
        cond = self.cond_log_prob(logits, entire)  # [B, T]
        event, chain_known = self.entire_labels(labels, mask)  # [B, T] x 2
        log_p = {"logit": pos, "cond": cond, "entire": entire, "value": logits}
        log_q = {"logit": neg, "cond": log1mexp(cond), "entire": log1mexp(entire), "value": torch.zeros_like(logits)}
        label = {"own": labels, "event": event}
        rows = {"label": mask, "context": self.parent_positive(labels, mask) & mask, "chain": chain_known}

        def gather(src: Dict[str, torch.Tensor], field: str) -> torch.Tensor:
            return torch.stack([src[getattr(v, field)][:, v.task] for v in views], dim=1)  # [B, V]

        return ViewBatch(gather(log_p, "prediction"), gather(log_q, "prediction"), gather(label, "label"), gather(rows, "rows"))
