"""TaskGraph's task views (dlrm_mtl/task_graph.py): the one list of which prediction is scored on
which rows against which label, consumed by the loss and the metrics. Fields checked per schema
(ESMM, ESM² with sum_of and a negated parent, a sum_of root, PLE masks, a regression child), and
``view_tensors`` / the loss terms against a row-by-row Python reference on a random batch."""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import pytest
import torch

from dlrm_mtl.losses import EntireSpaceLoss
from dlrm_mtl.metrics import MetricAccumulator
from dlrm_mtl.schema import ScenarioLevel, Schema, SparseFeature, Task
from dlrm_mtl.task_graph import TaskGraph

SCHEMAS: Dict[str, List[Task]] = {
    "esmm": [Task("ctr", "click"), Task("cvr", "conv", parent="ctr", loss_space="entire", entire_name="ctcvr")],
    "esm2": [
        Task("ctr", "click"),
        Task("dact", "d", parent="ctr", entire_name="ctavr"),
        Task("buy_d", "buy", parent="dact", loss_space="none"),
        Task("buy_o", "buy", parent="!dact", loss_space="none"),
        Task("cvr", "buy", parent="ctr", entire_name="ctcvr", sum_of=["buy_d", "buy_o"]),
    ],
    "esm2_cond": [
        Task("ctr", "click"),
        Task("dact", "d", parent="ctr", loss_space="parent_positive"),
        Task("buy_d", "buy", parent="dact", loss_space="none"),
        Task("buy_o", "buy", parent="!dact", loss_space="parent_positive"),
        Task("cvr", "buy", parent="ctr", loss_space="parent_positive", sum_of=["buy_d", "buy_o"]),
    ],
    "sum_root": [
        Task("dact", "d"),
        Task("buy_d", "buy", parent="dact", loss_space="none"),
        Task("buy_o", "buy", parent="!dact", loss_space="none"),
        Task("buy", "buy", sum_of=["buy_d", "buy_o"]),
    ],
    "ple_mask": [Task("ctr", "click"), Task("cvr", "conv", parent="ctr", loss_space="parent_positive")],
    "regression": [
        Task("ctr", "click"),
        Task("cvr", "conv", parent="ctr", entire_name="ctcvr"),
        Task("vcr", "ratio", type="regression", parent="ctr", loss_space="parent_positive"),
    ],
}

# (name, task, prediction, rows, label, regression) of every metric view, and the loss terms' names
EXPECTED_VIEWS = {
    "esmm": [("ctr", 0, "logit", "label", "own", False), ("cvr", 1, "logit", "context", "own", False),
             ("ctcvr", 1, "entire", "chain", "event", False)],
    "esm2": [("ctr", 0, "logit", "label", "own", False),
             ("dact", 1, "logit", "context", "own", False), ("ctavr", 1, "entire", "chain", "event", False),
             ("buy_d", 2, "logit", "context", "own", False), ("ctr_dact_buy_d", 2, "entire", "chain", "event", False),
             ("buy_o", 3, "logit", "context", "own", False), ("ctr_not_dact_buy_o", 3, "entire", "chain", "event", False),
             ("cvr", 4, "cond", "context", "own", False), ("ctcvr", 4, "entire", "chain", "event", False)],
    "sum_root": [("dact", 0, "logit", "label", "own", False),
                 ("buy_d", 1, "logit", "context", "own", False), ("dact_buy_d", 1, "entire", "chain", "event", False),
                 ("buy_o", 2, "logit", "context", "own", False), ("not_dact_buy_o", 2, "entire", "chain", "event", False),
                 ("buy", 3, "entire", "chain", "event", False)],
    "ple_mask": [("ctr", 0, "logit", "label", "own", False), ("cvr", 1, "logit", "context", "own", False),
                 ("ctr_cvr", 1, "entire", "chain", "event", False)],
    "regression": [("ctr", 0, "logit", "label", "own", False), ("cvr", 1, "logit", "context", "own", False),
                   ("ctcvr", 1, "entire", "chain", "event", False), ("vcr", 2, "value", "context", "own", True)],
}
EXPECTED_TERMS = {
    "esmm": ["ctr", "ctcvr"],
    "esm2": ["ctr", "ctavr", "ctcvr"],
    "esm2_cond": ["ctr", "dact", "buy_o", "cvr"],
    "sum_root": ["dact", "buy"],
    "ple_mask": ["ctr", "cvr"],
    "regression": ["ctr", "ctcvr", "vcr"],
}


def make_schema(name: str) -> Schema:
    return Schema(name, [SparseFeature("a", "ta", 10, 4)], [], [ScenarioLevel("s", 2)], SCHEMAS[name])


def random_batch(schema: Schema, seed: int = 3, B: int = 200) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 logits, labels (0/1; a ratio in [0, 1] for regression tasks) and a mask with nulls."""
    g = torch.Generator().manual_seed(seed)
    T = len(schema.tasks)
    z = 2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.85
    y = (torch.rand(B, T, generator=g) < 0.5).double()
    for i, t in enumerate(schema.tasks):
        if t.type == "regression":
            y[:, i] = torch.rand(B, generator=g, dtype=torch.float64)
    return z, y * mask, mask


# ---------------------------------------------------------------------------- a per-row reference


class RowReference:
    """The task graph's definitions written out for one row, in plain Python floats."""

    def __init__(self, schema: Schema, z: List[float], y: List[float], m: List[bool]) -> None:
        self.tasks = {t.name: t for t in schema.tasks}
        self.index = {t.name: i for i, t in enumerate(schema.tasks)}
        self.z, self.y, self.m = z, y, m

    def event(self, name: str) -> List[Tuple[int, bool]]:
        """(task, positive) conditions of a head task's entire-space event, root first."""
        t, out = self.tasks[name], [(self.index[name], True)]
        while t.parent is not None:
            out.insert(0, (self.index[t.parent.lstrip("!")], not t.parent.startswith("!")))
            t = self.tasks[t.parent.lstrip("!")]
        return out

    def context(self, name: str) -> List[Tuple[int, bool]]:
        t = self.tasks[name]
        if t.sum_of:
            return self.event(t.parent) if t.parent is not None else []
        return self.event(name)[:-1]

    def p(self, j: int, positive: bool) -> float:
        s = 1.0 / (1.0 + math.exp(-self.z[j]))
        return s if positive else 1.0 - s

    def holds(self, conds: List[Tuple[int, bool]]) -> bool:
        return all(self.m[j] and self.y[j] == (1.0 if pos else 0.0) for j, pos in conds)

    def known(self, conds: List[Tuple[int, bool]]) -> bool:
        return all(self.m[j] for j, _ in conds)

    def entire(self, name: str) -> float:
        t = self.tasks[name]
        if t.sum_of:
            return sum(self.entire(b) for b in t.sum_of)
        return math.prod(self.p(j, pos) for j, pos in self.event(name))

    def view(self, v) -> Tuple[float, float, bool]:
        """(prediction: a probability, or the value; label; in the view's rows)."""
        name = [n for n, i in self.index.items() if i == v.task][0]
        t, i = self.tasks[name], v.task
        ctx = self.context(name)
        pred = {
            "logit": lambda: self.p(i, True),
            "cond": lambda: self.entire(name) / math.prod(self.p(j, pos) for j, pos in ctx),
            "entire": lambda: self.entire(name),
            "value": lambda: self.z[i],
        }[v.prediction]()
        if v.label == "own":
            label = self.y[i]
        else:
            label = float(self.y[i] == 1.0 and self.holds(ctx)) if t.sum_of else float(self.holds(self.event(name)))
        rows = {
            "label": self.m[i],
            "context": self.m[i] and self.holds(ctx),
            "chain": (self.m[i] and self.known(ctx)) if t.sum_of else self.known(self.event(name)),
        }[v.rows]
        return pred, label, rows


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", sorted(EXPECTED_VIEWS))
def test_metric_views_fields(name):
    g = TaskGraph(make_schema(name))
    assert [(v.name, v.task, v.prediction, v.rows, v.label, v.regression) for v in g.metric_views] == EXPECTED_VIEWS[name]
    assert MetricAccumulator(make_schema(name)).views == g.metric_views


@pytest.mark.parametrize("name", sorted(EXPECTED_TERMS))
def test_loss_terms_are_metric_views_named_as_the_loss_logs_them(name):
    schema = make_schema(name)
    g = TaskGraph(schema)
    assert [v.name for v in g.loss_terms] == EXPECTED_TERMS[name]
    assert all(v in g.metric_views for v in g.loss_terms)
    assert [v.task for v in g.loss_terms] == [i for i, t in enumerate(schema.tasks) if t.loss_space != "none"]
    loss = EntireSpaceLoss(schema)
    assert loss.term_names == EXPECTED_TERMS[name]
    assert loss.term_tasks == [v.task for v in g.loss_terms]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_view_tensors_match_row_loop(name):
    schema = make_schema(name)
    g = TaskGraph(schema)
    z, y, mask = random_batch(schema)
    views = g.metric_views
    out = g.view_tensors(views, z, y, mask)
    assert out.pred.shape == out.neg.shape == out.label.shape == out.rows.shape == (z.shape[0], len(views))
    assert out.rows.dtype == torch.bool
    for b in range(z.shape[0]):
        ref = RowReference(schema, z[b].tolist(), y[b].tolist(), mask[b].tolist())
        for k, v in enumerate(views):
            pred, label, rows = ref.view(v)
            assert bool(out.rows[b, k]) == rows, (b, v.name)
            assert out.label[b, k].item() == label, (b, v.name)
            if v.regression:
                assert out.pred[b, k].item() == pred and out.neg[b, k].item() == 0.0
            else:
                assert out.pred[b, k].item() == pytest.approx(math.log(pred), rel=1e-9, abs=1e-12), (b, v.name)
                assert out.neg[b, k].item() == pytest.approx(math.log1p(-pred), rel=1e-9, abs=1e-12), (b, v.name)
    # any subset, in any order, gives the same columns
    sub = g.view_tensors(views[::-2], z, y, mask)
    for got, want in zip(sub, out):
        torch.testing.assert_close(got, want[:, list(range(len(views)))[::-2]], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_loss_terms_match_row_loop(name):
    """Each term = the weighted mean of BCE (MSE) of its view over its rows, whichever path
    (TermMatrices or the per-view one) the graph takes."""
    schema = make_schema(name)
    loss = EntireSpaceLoss(schema).double()
    z, y, mask = random_batch(schema, seed=11)
    w = torch.rand(z.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = loss.per_task(z, y, mask, w)
    for k, v in enumerate(loss.graph.loss_terms):
        num = den = 0.0
        for b in range(z.shape[0]):
            pred, label, rows = RowReference(schema, z[b].tolist(), y[b].tolist(), mask[b].tolist()).view(v)
            if not rows:
                continue
            l = (pred - label) ** 2 if v.regression else -(label * math.log(pred) + (1 - label) * math.log1p(-pred))
            num += w[b].item() * l
            den += w[b].item()
        assert got[k].item() == pytest.approx(num / den, rel=1e-9), v.name


def test_only_head_logit_and_entire_terms_take_the_matrices():
    """The fast path is taken exactly for graphs of binary head tasks; its matrices come from
    the views, so a term view it cannot express is refused."""
    from dlrm_mtl.losses import TermMatrices

    assert EntireSpaceLoss(make_schema("ple_mask")).term_matrices is not None
    assert EntireSpaceLoss(make_schema("esm2")).term_matrices is None
    g = TaskGraph(make_schema("esm2_cond"))
    with pytest.raises(ValueError, match="cond"):
        TermMatrices(g, g.loss_terms)
