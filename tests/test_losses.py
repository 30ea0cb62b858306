"""Tests for dlrm_mtl.losses (EntireSpaceLoss, log1mexp) and dlrm_mtl.task_graph (TaskGraph)."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np
import pytest
import torch

from dlrm_mtl.losses import EntireSpaceLoss, bce_from_log_prob, log1mexp
from dlrm_mtl.schema import DenseFeature, ScenarioLevel, Schema, SparseFeature, Task
from dlrm_mtl.task_graph import TaskGraph

# ---------------------------------------------------------------------------- schemas


def make_schema(tasks: List[Task]) -> Schema:
    return Schema(
        name="t",
        sparse=[SparseFeature(name="user_id", table="t_user", num_embeddings=10, dim=4)],
        dense=[DenseFeature(name="price")],
        scenarios=[ScenarioLevel(name="channel", num_values=2)],
        tasks=tasks,
    )


def esmm_schema(ctr_weight: float = 1.0, cvr_weight: float = 1.0) -> Schema:
    return make_schema(
        [
            Task(name="ctr", label="click", weight=ctr_weight),
            Task(name="cvr", label="conversion", parent="ctr", loss_space="entire", entire_name="ctcvr", weight=cvr_weight),
        ]
    )


def chain3_schema() -> Schema:
    return make_schema(
        [
            Task(name="click", label="click"),
            Task(name="cart", label="cart", parent="click", loss_space="entire", entire_name="ctcart"),
            Task(name="buy", label="buy", parent="cart", loss_space="entire", entire_name="ctbuy"),
        ]
    )


def parent_positive_schema() -> Schema:
    return make_schema(
        [
            Task(name="ctr", label="click"),
            Task(name="cvr", label="conversion", parent="ctr", loss_space="parent_positive"),
        ]
    )


# ---------------------------------------------------------------------------- plain-math references


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def bce(p: float, y: float) -> float:
    return -(y * math.log(p) + (1.0 - y) * math.log(1.0 - p))


def wmean(values: Sequence[float], weights: Sequence[float]) -> float:
    den = sum(weights)
    return sum(v * w for v, w in zip(values, weights)) / den if den > 0 else 0.0


def run(schema: Schema, logits, labels, mask=None, weight=None):
    logits_t = torch.tensor(logits, dtype=torch.float32)
    labels_t = torch.tensor(labels, dtype=torch.float32)
    mask_t = torch.ones_like(labels_t, dtype=torch.bool) if mask is None else torch.tensor(mask, dtype=torch.bool)
    weight_t = torch.ones(len(logits)) if weight is None else torch.tensor(weight, dtype=torch.float32)
    return EntireSpaceLoss(schema)(logits_t, labels_t, mask_t, weight_t)


# Small hand-chosen batch: [ctr logit, cvr logit] and [click, conversion].
LOGITS = [[0.5, -1.0], [-0.3, 0.8], [1.2, 0.1], [-2.0, -0.5], [0.0, 1.5]]
LABELS = [[1, 0], [0, 0], [1, 1], [0, 0], [1, 1]]


# ---------------------------------------------------------------------------- EntireSpaceLoss


def test_esmm_two_level_matches_hand_computation():
    total, terms = run(esmm_schema(), LOGITS, LABELS)
    ctr = sum(bce(sig(a), y) for (a, _), (y, _) in zip(LOGITS, LABELS)) / 5
    ctcvr = sum(bce(sig(a) * sig(b), y1 * y2) for (a, b), (y1, y2) in zip(LOGITS, LABELS)) / 5
    assert {k for k in terms if k.startswith("loss/")} == {"loss/ctr", "loss/ctcvr", "loss/total"}
    assert terms["loss/ctr"].item() == pytest.approx(ctr, rel=1e-5)
    assert terms["loss/ctcvr"].item() == pytest.approx(ctcvr, rel=1e-5)
    assert total.item() == pytest.approx(ctr + ctcvr, rel=1e-5)
    assert terms["loss/total"].item() == pytest.approx(ctr + ctcvr, rel=1e-5)
    # the ctcvr term is NOT the conditional cvr BCE
    cvr_cond = sum(bce(sig(b), y2) for (_, b), (_, y2) in zip(LOGITS, LABELS)) / 5
    assert abs(ctcvr - cvr_cond) > 1e-2


def test_esmm_total_is_differentiable_and_terms_detached():
    logits = torch.tensor(LOGITS, requires_grad=True)
    total, terms = EntireSpaceLoss(esmm_schema())(
        logits, torch.tensor(LABELS, dtype=torch.float32), torch.ones(5, 2, dtype=torch.bool), torch.ones(5)
    )
    total.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert all(not v.requires_grad for v in terms.values())
    # d/d(cvr logit) of ctcvr BCE for a row is (p_ctcvr - y)/(1 - p_ctcvr) * (1 - p_cvr) ... check sign only:
    # row 2 has conversion 1 -> increasing its cvr logit must lower the loss
    assert logits.grad[2, 1] < 0


def test_three_level_chain():
    logits = [[0.5, -1.0, 0.3], [-0.3, 0.8, -0.7], [1.2, 0.1, 2.0], [-2.0, -0.5, 0.4], [0.0, 1.5, -1.1], [0.9, 0.9, 0.9]]
    labels = [[1, 0, 0], [0, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0], [1, 1, 1]]
    total, terms = run(chain3_schema(), logits, labels)
    n = len(logits)
    t_click = sum(bce(sig(a), y0) for (a, _, _), (y0, _, _) in zip(logits, labels)) / n
    t_cart = sum(bce(sig(a) * sig(b), y0 * y1) for (a, b, _), (y0, y1, _) in zip(logits, labels)) / n
    t_buy = sum(bce(sig(a) * sig(b) * sig(c), y0 * y1 * y2) for (a, b, c), (y0, y1, y2) in zip(logits, labels)) / n
    assert {k for k in terms if k.startswith("loss/")} == {"loss/click", "loss/ctcart", "loss/ctbuy", "loss/total"}
    assert terms["loss/click"].item() == pytest.approx(t_click, rel=1e-5)
    assert terms["loss/ctcart"].item() == pytest.approx(t_cart, rel=1e-5)
    assert terms["loss/ctbuy"].item() == pytest.approx(t_buy, rel=1e-5)
    assert total.item() == pytest.approx(t_click + t_cart + t_buy, rel=1e-5)


def test_parent_positive_only_clicked_rows_count():
    total, terms = run(parent_positive_schema(), LOGITS, LABELS)
    ctr = sum(bce(sig(a), y) for (a, _), (y, _) in zip(LOGITS, LABELS)) / 5
    clicked = [i for i, (c, _) in enumerate(LABELS) if c == 1]
    assert clicked == [0, 2, 4]
    cvr = sum(bce(sig(LOGITS[i][1]), LABELS[i][1]) for i in clicked) / len(clicked)
    assert {k for k in terms if k.startswith("loss/")} == {"loss/ctr", "loss/cvr", "loss/total"}
    assert terms["loss/ctr"].item() == pytest.approx(ctr, rel=1e-5)
    assert terms["loss/cvr"].item() == pytest.approx(cvr, rel=1e-5)
    assert total.item() == pytest.approx(ctr + cvr, rel=1e-5)


def test_parent_positive_unclicked_rows_have_no_gradient():
    logits = torch.tensor(LOGITS, requires_grad=True)
    total, _ = EntireSpaceLoss(parent_positive_schema())(
        logits, torch.tensor(LABELS, dtype=torch.float32), torch.ones(5, 2, dtype=torch.bool), torch.ones(5)
    )
    total.backward()
    for i, (c, _) in enumerate(LABELS):
        if c == 0:
            assert logits.grad[i, 1] == 0
        else:
            assert logits.grad[i, 1] != 0


def test_parent_positive_masked_parent_excludes_row():
    """A row whose click label is null is not in cvr's conditional space even if the stored label is 1."""
    labels = [[1, 0], [1, 1], [1, 1], [0, 0]]
    logits = [[0.1, 0.2], [0.3, -0.4], [-0.5, 0.6], [0.7, 0.8]]
    mask = [[True, True], [False, True], [True, True], [True, True]]
    _, terms = run(parent_positive_schema(), logits, labels, mask)
    cvr = (bce(sig(0.2), 0) + bce(sig(0.6), 1)) / 2  # rows 0 and 2
    ctr = (bce(sig(0.1), 1) + bce(sig(-0.5), 1) + bce(sig(0.7), 0)) / 3
    assert terms["loss/cvr"].item() == pytest.approx(cvr, rel=1e-5)
    assert terms["loss/ctr"].item() == pytest.approx(ctr, rel=1e-5)


def test_parent_positive_null_own_label_excluded():
    labels = [[1, 0], [1, 1], [1, 1]]
    logits = [[0.1, 0.2], [0.3, -0.4], [-0.5, 0.6]]
    mask = [[True, True], [True, False], [True, True]]
    _, terms = run(parent_positive_schema(), logits, labels, mask)
    cvr = (bce(sig(0.2), 0) + bce(sig(0.6), 1)) / 2
    assert terms["loss/cvr"].item() == pytest.approx(cvr, rel=1e-5)


def test_null_labels_esmm():
    # row 1: ctr null (excluded from ctr, and from ctcvr because its chain has a null);
    # row 3: cvr null (in ctr, excluded from ctcvr).
    mask = [[True, True], [False, True], [True, True], [True, False], [True, True]]
    _, terms = run(esmm_schema(), LOGITS, LABELS, mask)
    ctr_rows = [0, 2, 3, 4]
    ctcvr_rows = [0, 2, 4]
    ctr = sum(bce(sig(LOGITS[i][0]), LABELS[i][0]) for i in ctr_rows) / len(ctr_rows)
    ctcvr = sum(bce(sig(LOGITS[i][0]) * sig(LOGITS[i][1]), LABELS[i][0] * LABELS[i][1]) for i in ctcvr_rows) / len(ctcvr_rows)
    assert terms["loss/ctr"].item() == pytest.approx(ctr, rel=1e-5)
    assert terms["loss/ctcvr"].item() == pytest.approx(ctcvr, rel=1e-5)


def test_null_labels_three_level_chain():
    logits = [[0.5, -1.0, 0.3], [-0.3, 0.8, -0.7], [1.2, 0.1, 2.0], [-2.0, -0.5, 0.4], [0.0, 1.5, -1.1]]
    labels = [[1, 0, 0], [0, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0]]
    # row 0: click null -> out of all three; row 2: cart null -> in click only; row 4: buy null -> click, cart
    mask = [[False, True, True], [True, True, True], [True, False, True], [True, True, True], [True, True, False]]
    _, terms = run(chain3_schema(), logits, labels, mask)
    rows = {"click": [1, 2, 3, 4], "cart": [1, 3, 4], "buy": [1, 3]}

    def prod_p(i, k):
        return math.prod(sig(logits[i][j]) for j in range(k + 1))

    def prod_y(i, k):
        return math.prod(labels[i][j] for j in range(k + 1))

    t_click = sum(bce(prod_p(i, 0), prod_y(i, 0)) for i in rows["click"]) / 4
    t_cart = sum(bce(prod_p(i, 1), prod_y(i, 1)) for i in rows["cart"]) / 3
    t_buy = sum(bce(prod_p(i, 2), prod_y(i, 2)) for i in rows["buy"]) / 2
    assert terms["loss/click"].item() == pytest.approx(t_click, rel=1e-5)
    assert terms["loss/ctcart"].item() == pytest.approx(t_cart, rel=1e-5)
    assert terms["loss/ctbuy"].item() == pytest.approx(t_buy, rel=1e-5)


def test_padding_rows_excluded():
    # append a padding row (weight 0) with wild values and labels still "valid" in the mask
    logits = LOGITS + [[7.0, -9.0]]
    labels = LABELS + [[0, 1]]
    weight = [1.0] * 5 + [0.0]
    total_pad, terms_pad = run(esmm_schema(), logits, labels, weight=weight)
    total, terms = run(esmm_schema(), LOGITS, LABELS)
    assert terms_pad["loss/ctr"].item() == pytest.approx(terms["loss/ctr"].item(), rel=1e-6)
    assert terms_pad["loss/ctcvr"].item() == pytest.approx(terms["loss/ctcvr"].item(), rel=1e-6)
    assert total_pad.item() == pytest.approx(total.item(), rel=1e-6)
    # and with the padding row masked too (as the reader produces it)
    mask = [[True, True]] * 5 + [[False, False]]
    total_pad2, _ = run(esmm_schema(), logits, labels, mask=mask, weight=weight)
    assert total_pad2.item() == pytest.approx(total.item(), rel=1e-6)


def test_per_row_weights():
    weight = [2.0, 0.5, 1.0, 3.0, 0.25]
    _, terms = run(esmm_schema(), LOGITS, LABELS, weight=weight)
    ctr = wmean([bce(sig(a), y) for (a, _), (y, _) in zip(LOGITS, LABELS)], weight)
    ctcvr = wmean([bce(sig(a) * sig(b), y1 * y2) for (a, b), (y1, y2) in zip(LOGITS, LABELS)], weight)
    assert terms["loss/ctr"].item() == pytest.approx(ctr, rel=1e-5)
    assert terms["loss/ctcvr"].item() == pytest.approx(ctcvr, rel=1e-5)
    # differs from the unweighted mean (the weights matter)
    assert abs(ctr - sum(bce(sig(a), y) for (a, _), (y, _) in zip(LOGITS, LABELS)) / 5) > 1e-3


def test_per_row_weights_with_mask_and_parent_positive():
    weight = [2.0, 0.5, 1.0, 3.0, 0.25]
    mask = [[True, True], [True, True], [True, True], [True, True], [True, False]]
    _, terms = run(parent_positive_schema(), LOGITS, LABELS, mask=mask, weight=weight)
    # clicked rows 0, 2, 4; row 4 cvr label null -> rows 0, 2
    cvr = wmean([bce(sig(LOGITS[0][1]), 0), bce(sig(LOGITS[2][1]), 1)], [2.0, 1.0])
    assert terms["loss/cvr"].item() == pytest.approx(cvr, rel=1e-5)


def test_task_weights():
    total, terms = run(esmm_schema(ctr_weight=2.0, cvr_weight=0.5), LOGITS, LABELS)
    ctr = sum(bce(sig(a), y) for (a, _), (y, _) in zip(LOGITS, LABELS)) / 5
    ctcvr = sum(bce(sig(a) * sig(b), y1 * y2) for (a, b), (y1, y2) in zip(LOGITS, LABELS)) / 5
    # the per-task terms are unweighted; the total applies Task.weight
    assert terms["loss/ctr"].item() == pytest.approx(ctr, rel=1e-5)
    assert terms["loss/ctcvr"].item() == pytest.approx(ctcvr, rel=1e-5)
    assert total.item() == pytest.approx(2.0 * ctr + 0.5 * ctcvr, rel=1e-5)
    assert terms["loss/total"].item() == pytest.approx(2.0 * ctr + 0.5 * ctcvr, rel=1e-5)


@pytest.mark.parametrize("schema_fn", [esmm_schema, parent_positive_schema])
def test_all_masked_task_is_zero_not_nan(schema_fn):
    mask = [[True, False]] * 5
    logits = torch.tensor(LOGITS, requires_grad=True)
    loss = EntireSpaceLoss(schema_fn())
    total, terms = loss(logits, torch.tensor(LABELS, dtype=torch.float32), torch.tensor(mask), torch.ones(5))
    name = "loss/ctcvr" if "loss/ctcvr" in terms else "loss/cvr"
    assert terms[name].item() == 0.0
    ctr = sum(bce(sig(a), y) for (a, _), (y, _) in zip(LOGITS, LABELS)) / 5
    assert total.item() == pytest.approx(ctr, rel=1e-5)
    total.backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[:, 1] == 0)


def test_all_rows_padding_gives_zero():
    logits = torch.tensor(LOGITS, requires_grad=True)
    total, terms = EntireSpaceLoss(esmm_schema())(
        logits, torch.tensor(LABELS, dtype=torch.float32), torch.zeros(5, 2, dtype=torch.bool), torch.zeros(5)
    )
    assert total.item() == 0.0 and not math.isnan(total.item())
    total.backward()
    assert torch.all(logits.grad == 0)


def test_no_clicks_in_parent_positive_gives_zero():
    labels = [[0, 0]] * 4
    _, terms = run(parent_positive_schema(), LOGITS[:4], labels)
    assert terms["loss/cvr"].item() == 0.0


@pytest.mark.parametrize("schema_fn", [esmm_schema, parent_positive_schema])
def test_extreme_logits_finite_loss_and_grad(schema_fn):
    logits = torch.tensor([[40.0, 40.0], [-40.0, -40.0], [40.0, -40.0], [-40.0, 40.0], [40.0, 40.0], [-40.0, -40.0]], requires_grad=True)
    # mix of right and confidently wrong labels
    labels = torch.tensor([[1, 1], [0, 0], [1, 0], [1, 1], [0, 0], [1, 1]], dtype=torch.float32)
    total, terms = EntireSpaceLoss(schema_fn())(logits, labels, torch.ones(6, 2, dtype=torch.bool), torch.ones(6))
    assert torch.isfinite(total)
    assert all(torch.isfinite(v) for v in terms.values())
    total.backward()
    assert torch.isfinite(logits.grad).all()
    # the loss is large (confident mistakes), not clamped to 0
    assert total.item() > 10.0


def test_extreme_logits_entire_space_values():
    """ctcvr with a tiny product probability: -log(σ(-40)σ(-30)) = 70 + tiny; no log(0)."""
    logits = torch.tensor([[-40.0, -30.0], [-40.0, -30.0], [40.0, 40.0]], requires_grad=True)
    labels = torch.tensor([[1, 1], [0, 0], [1, 1]], dtype=torch.float32)
    _, terms = EntireSpaceLoss(esmm_schema())(logits, labels, torch.ones(3, 2, dtype=torch.bool), torch.ones(3))
    # row 0: -log σ(-40) - log σ(-30) = 40 + 30 (+ ~1e-13); row 1: -log(1 - ~e^-70) ~ 0; row 2: ~0
    expected = (math.log1p(math.exp(40)) + math.log1p(math.exp(30))) / 3
    assert terms["loss/ctcvr"].item() == pytest.approx(expected, rel=1e-5)
    terms_total = terms["loss/total"]
    assert torch.isfinite(terms_total)


def test_log1mexp_matches_float64_reference():
    x = torch.cat([-torch.logspace(-6, math.log10(30), 2000, dtype=torch.float64), torch.tensor([-30.0, -1e-6, -0.6931471805599453, -0.69, -0.7], dtype=torch.float64)])
    got = log1mexp(x)
    ref = torch.tensor([math.log(1 - math.exp(v)) if v < -1e-3 else math.log(-math.expm1(v)) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    # plain formula agrees too where it is accurate
    mid = (x < -1e-3)
    torch.testing.assert_close(got[mid], torch.log(1 - torch.exp(x[mid])), rtol=1e-9, atol=1e-12)


def test_log1mexp_float32_close():
    x = -torch.logspace(-6, math.log10(30), 500, dtype=torch.float64)
    got = log1mexp(x.float()).double()
    ref = torch.log(-torch.expm1(x))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_bce_from_log_prob_matches_bce():
    p = torch.tensor([0.1, 0.5, 0.9, 0.999, 1e-6], dtype=torch.float64)
    for y in (0.0, 1.0):
        yt = torch.full_like(p, y)
        expected = torch.tensor([bce(v, y) for v in p.tolist()], dtype=torch.float64)
        torch.testing.assert_close(bce_from_log_prob(p.log(), yt), expected, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------- TaskGraph


def test_task_graph_chains_and_names():
    g = TaskGraph(esmm_schema())
    assert g.chains == [[0], [0, 1]]
    assert g.entire_names == ["ctr", "ctcvr"]
    g3 = TaskGraph(chain3_schema())
    assert g3.chains == [[0], [0, 1], [0, 1, 2]]
    assert g3.entire_names == ["click", "ctcart", "ctbuy"]


def test_task_graph_default_entire_name():
    schema = make_schema([Task(name="ctr", label="click"), Task(name="cvr", label="conv", parent="ctr")])
    assert TaskGraph(schema).entire_names == ["ctr", "ctr_cvr"]


def test_task_graph_probabilities():
    g = TaskGraph(esmm_schema())
    logits = torch.tensor(LOGITS, dtype=torch.float64)
    probs = g.probabilities(logits)
    assert set(probs) == {"ctr", "cvr", "ctcvr"}
    for i, (a, b) in enumerate(LOGITS):
        assert probs["ctr"][i].item() == pytest.approx(sig(a), rel=1e-12)
        assert probs["cvr"][i].item() == pytest.approx(sig(b), rel=1e-12)
        assert probs["ctcvr"][i].item() == pytest.approx(sig(a) * sig(b), rel=1e-12)
    torch.testing.assert_close(probs["ctcvr"], probs["ctr"] * probs["cvr"])


def test_task_graph_probabilities_three_levels():
    g = TaskGraph(chain3_schema())
    logits = torch.tensor([[0.5, -1.0, 0.3], [2.0, 0.0, -3.0]], dtype=torch.float64)
    probs = g.probabilities(logits)
    assert set(probs) == {"click", "cart", "buy", "ctcart", "ctbuy"}
    p = torch.sigmoid(logits)
    torch.testing.assert_close(probs["ctcart"], p[:, 0] * p[:, 1])
    torch.testing.assert_close(probs["ctbuy"], p[:, 0] * p[:, 1] * p[:, 2])


def test_task_graph_parent_positive():
    g = TaskGraph(chain3_schema())
    labels = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=torch.float32)
    mask = torch.tensor([[True, True, True], [True, True, True], [True, True, True], [True, False, True]])
    pp = g.parent_positive(labels, mask)
    assert pp.tolist() == [
        [True, True, True],
        [True, True, False],
        [True, False, False],
        [True, True, False],  # cart label masked -> buy not in its conditional space
    ]


def test_confidently_wrong_negative_entire_space_row_has_gradient():
    logits = torch.tensor([[20.0, 20.0]], requires_grad=True)
    labels = torch.zeros(1, 2)
    total, terms = EntireSpaceLoss(esmm_schema(ctr_weight=0.0))(logits, labels, torch.ones(1, 2, dtype=torch.bool), torch.ones(1))
    # -log(1 - σ(20)²) = 20 - log(2) + O(e^-20) ≈ 19.31; d/dz of it ≈ 0.5 for each logit
    assert terms["loss/ctcvr"].item() == pytest.approx(20 - math.log(2), rel=1e-3)
    total.backward()
    assert (logits.grad > 0.4).all()


# ------------------------------------------------------------- the matrix path vs the loop
_GRAPHS = {
    "esmm": [Task("ctr", "c"), Task("cvr", "v", parent="ctr", loss_space="entire")],
    "ple_mask": [Task("ctr", "c"), Task("cvr", "v", parent="ctr", loss_space="parent_positive")],
    "deep_negated": [Task("ctr", "c"), Task("cart", "k", parent="ctr", loss_space="entire"),
                     Task("buy", "b", parent="cart", loss_space="parent_positive"),
                     Task("other", "o", parent="!cart", loss_space="entire")],
    "two_roots": [Task("income", "i"), Task("marital", "m")],
}


@pytest.mark.parametrize("graph", sorted(_GRAPHS))
@pytest.mark.parametrize("scenario_weighting", ["none", "static"])
@pytest.mark.parametrize("scale", [3.0, 30.0])
def test_matrix_terms_equal_the_per_term_loop(graph, scenario_weighting, scale):
    """Binary graphs take TermMatrices (:class:`TermMeans`' closed-form gradient); every term's
    value and gradient equal the per-term loop's autograd (float64, random labels with nulls,
    row weights, scenario λ; logits of scale 30 reach probabilities within 1e-13 of 0 and 1)."""
    from dlrm_mtl.config import LossConfig

    tasks = _GRAPHS[graph]
    schema = Schema("m", [SparseFeature("a", "ta", 10, 4)], [], [ScenarioLevel("s", 3)], tasks)
    cfg = LossConfig(scenario_weighting=scenario_weighting, scenario_weights={"s1": 3.0, "s2": 0.5} if scenario_weighting == "static" else {})
    loss = EntireSpaceLoss(schema, cfg).double()
    assert loss.term_matrices is not None
    g = torch.Generator().manual_seed(7)
    B, T = 301, len(tasks)
    z = (scale * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    mask = torch.rand(B, T, generator=g) < 0.8
    y = (torch.rand(B, T, generator=g) < 0.4).double() * mask
    w = torch.rand(B, generator=g, dtype=torch.float64)
    lam = loss.scenario_lambda[torch.randint(0, 3, (B,), generator=g)] if scenario_weighting != "none" else None
    a = loss._per_task_matrix(z, y, mask, w, lam)
    b = loss._per_task_loop(z, y, mask, w, lam)
    assert a.shape == b.shape == (len(loss.term_names),)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    ga, gb = (torch.autograd.grad(v @ torch.arange(1.0, len(v) + 1, dtype=v.dtype), z)[0] for v in (a, b))
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("graph", sorted(_GRAPHS))
def test_host_term_inputs_equal_the_losss_own(graph):
    """TermInputs (the reader's numpy, once per shuffle buffer) gives the terms' labels and row
    weights bit for bit as TermMatrices.inputs does on the batch; the loss fed them returns the
    same total, terms and gradient as the loss deriving them itself."""
    from dlrm_mtl.config import LossConfig

    tasks = _GRAPHS[graph]
    schema = Schema("m", [SparseFeature("a", "ta", 10, 4)], [], [ScenarioLevel("s", 3)], tasks)
    loss = EntireSpaceLoss(schema, LossConfig(scenario_weighting="static", scenario_weights={"s1": 3.0}))
    m = loss.term_matrices
    g = torch.Generator().manual_seed(3)
    B, T = 257, len(tasks)
    mask = torch.rand(B, T, generator=g) < 0.8
    y = (torch.rand(B, T, generator=g) < 0.4).float() * mask
    w = torch.rand(B, generator=g)
    w[-5:] = 0  # padding rows
    mask[-5:] = False
    ty, tr = m.host_inputs()(y.numpy(), mask.numpy(), w.numpy())
    ey, er = m.inputs(y, mask, w)
    assert ty.dtype == tr.dtype == np.float32
    assert torch.equal(torch.from_numpy(ty), ey) and torch.equal(torch.from_numpy(tr), er)
    assert (tr[-5:] == 0).all()
    scen = torch.randint(0, 3, (B, 1), generator=g)
    z = 3 * torch.randn(B, T, generator=g)
    outs = []
    for kw in ({}, {"term_labels": torch.from_numpy(ty), "term_rows": torch.from_numpy(tr)}):
        zz = z.clone().requires_grad_()
        total, terms = loss(zz, y, mask, w, scen, **kw)
        total.backward()
        outs.append((total.detach(), zz.grad, {k: v.clone() for k, v in terms.items() if not k.startswith("loss/total")}))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert outs[0][2].keys() == outs[1][2].keys() and all(torch.equal(outs[0][2][k], outs[1][2][k]) for k in outs[0][2])


def test_regression_and_sum_of_graphs_take_the_loop():
    reg = Schema("r", [SparseFeature("a", "ta", 10, 4)], [], [ScenarioLevel("s", 2)],
                 [Task("ctr", "c"), Task("vcr", "v", type="regression")])
    assert EntireSpaceLoss(reg).term_matrices is None


def test_dwa_weights_follow_the_papers_equation_and_are_logged():
    """DWA (Liu et al. 2019, eq. 1): λ = 1 for the first two epochs, then K·softmax(r/T) with r
    the ratio of the last two epoch-mean losses; the weights are the logged loss_weight terms."""
    from dlrm_mtl.config import LossConfig
    from dlrm_mtl.losses import EntireSpaceLoss
    from dlrm_mtl.synthetic import synthetic_schema

    schema = synthetic_schema()
    loss = EntireSpaceLoss(schema, LossConfig(weighting="dwa", dwa_temperature=2.0))
    K = len(loss.term_names)
    assert "dwa_lambda" in loss.state_dict()  # resumable
    assert "dwa_lambda" not in EntireSpaceLoss(schema, LossConfig()).state_dict()  # old checkpoints still load
    g = torch.Generator().manual_seed(0)
    means = []
    for epoch in range(4):
        seen = []
        for _ in range(3):
            logits = torch.randn(32, len(schema.tasks), generator=g) * (1 + epoch)
            labels = (torch.rand(32, len(schema.tasks), generator=g) < 0.3).float()
            labels[:, 1] *= labels[:, 0]  # conversion implies click
            total, terms = loss(logits, labels, torch.ones_like(labels, dtype=torch.bool), torch.ones(32), torch.zeros(32, 2, dtype=torch.long))
            seen.append(torch.stack([terms[f"loss/{n}"] for n in loss.term_names]))
            weights = torch.stack([terms[f"loss_weight/{n}"] for n in loss.term_names])
            if epoch < 2:
                assert torch.equal(weights, torch.ones(K))
            else:
                r = means[-1] / means[-2]
                torch.testing.assert_close(weights, K * torch.softmax(r / 2.0, dim=0))
        means.append(torch.stack(seen).mean(0))
        loss.end_epoch()
    assert abs(float(loss.dwa_lambda.sum()) - K) < 1e-5 and not torch.equal(loss.dwa_lambda, torch.ones(K))
