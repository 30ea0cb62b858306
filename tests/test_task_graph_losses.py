"""Issue 4 losses: ESM² (negated parents, sum_of), regression, loss spaces, weighting schemes
(static, PLE γ^t decay, uncertainty, scenario λ), auxiliary terms and the position-bias tower,
each against values computed by hand in plain Python."""

from __future__ import annotations

import math
from typing import List

import pytest
import torch

from dlrm_mtl.config import LossConfig
from dlrm_mtl.losses import EntireSpaceLoss
from dlrm_mtl.schema import DenseFeature, PositionBias, ScenarioLevel, Schema, SchemaError, SparseFeature, Task
from dlrm_mtl.task_graph import TaskGraph


def make_schema(tasks: List[Task], levels=(2,), **kw) -> Schema:
    return Schema(
        name="t",
        sparse=[SparseFeature(name="u", table="t_u", num_embeddings=10, dim=4)],
        dense=[DenseFeature(name="price")],
        scenarios=[ScenarioLevel(name=f"l{i}", num_values=n) for i, n in enumerate(levels)],
        tasks=tasks,
        **kw,
    )


def esm2_tasks(space: str = "entire") -> List[Task]:
    return [
        Task("ctr", "click"),
        Task("dact", "d", parent="ctr", entire_name="ctavr"),
        Task("buy_d", "buy", parent="dact", loss_space="none"),
        Task("buy_o", "buy", parent="!dact", loss_space="none"),
        Task("cvr", "buy", parent="ctr", loss_space=space, entire_name="ctcvr", sum_of=["buy_d", "buy_o"]),
    ]


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def bce(p: float, y: float) -> float:
    return -(y * math.log(p) + (1.0 - y) * math.log(1.0 - p))


# rows: logits [ctr, dact, buy_d, buy_o, cvr(unused)], labels [click, D, buy, buy, buy]
E_LOGITS = [[0.5, -1.0, 0.3, -0.2, 9.0], [-0.3, 0.8, 1.1, 0.4, -9.0], [1.2, 0.1, -0.6, 0.9, 0.0],
            [-2.0, -0.5, 0.2, -1.3, 3.0], [0.0, 1.5, 0.7, 0.1, 1.0], [0.9, -0.4, -1.0, 1.4, 2.0]]
E_LABELS = [[1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]


def run(schema, logits, labels, mask=None, weight=None, cfg=None, scenario=None, aux=None, bias=None, loss=None):
    lg = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
    y = torch.tensor(labels, dtype=torch.float32)
    m = torch.ones_like(y, dtype=torch.bool) if mask is None else torch.tensor(mask)
    w = torch.ones(len(logits)) if weight is None else torch.tensor(weight, dtype=torch.float32)
    sc = None if scenario is None else torch.tensor(scenario, dtype=torch.int64)
    loss = loss or EntireSpaceLoss(schema, cfg)
    total, terms = loss(lg, y, m, w, sc, aux, bias)
    return total, terms, lg


def test_esm2_entire_space_matches_hand_computation():
    total, terms, lg = run(make_schema(esm2_tasks()), E_LOGITS, E_LABELS)
    n = len(E_LOGITS)
    ctr = sum(bce(sig(r[0]), y[0]) for r, y in zip(E_LOGITS, E_LABELS)) / n
    # ESM² eq. (pCTAVR = pCTR·y2 against click∧D)
    ctavr = sum(bce(sig(r[0]) * sig(r[1]), y[0] * y[1]) for r, y in zip(E_LOGITS, E_LABELS)) / n
    # pCTCVR = pCTR·[y2·y3 + (1−y2)·y4] against click∧buy
    ctcvr = sum(
        bce(sig(r[0]) * (sig(r[1]) * sig(r[2]) + (1 - sig(r[1])) * sig(r[3])), y[0] * y[4]) for r, y in zip(E_LOGITS, E_LABELS)
    ) / n
    assert {k for k in terms if k.startswith("loss/")} == {"loss/ctr", "loss/ctavr", "loss/ctcvr", "loss/total"}
    assert terms["loss/ctr"].item() == pytest.approx(ctr, rel=1e-5)
    assert terms["loss/ctavr"].item() == pytest.approx(ctavr, rel=1e-5)
    assert terms["loss/ctcvr"].item() == pytest.approx(ctcvr, rel=1e-5)
    assert total.item() == pytest.approx(ctr + ctavr + ctcvr, rel=1e-5)
    total.backward()
    # the sum_of task's own logit column is ignored (zero gradient, but part of the graph for DDP)
    assert torch.equal(lg.grad[:, 4], torch.zeros(n))
    assert (lg.grad[:, 2].abs() > 0).all() and (lg.grad[:, 3].abs() > 0).all()


def test_esm2_probabilities_and_spaces():
    schema = make_schema(esm2_tasks())
    g = TaskGraph(schema)
    z = torch.tensor(E_LOGITS, dtype=torch.float64)
    probs = g.probabilities(z)
    for i, r in enumerate(E_LOGITS):
        y2, y3, y4 = sig(r[1]), sig(r[2]), sig(r[3])
        assert probs["cvr"][i].item() == pytest.approx(y2 * y3 + (1 - y2) * y4, rel=1e-12)
        assert probs["ctcvr"][i].item() == pytest.approx(sig(r[0]) * (y2 * y3 + (1 - y2) * y4), rel=1e-12)
        assert probs["ctr_not_dact_buy_o"][i].item() == pytest.approx(sig(r[0]) * (1 - y2) * y4, rel=1e-12)
    labels = torch.tensor(E_LABELS, dtype=torch.float32)
    space = g.parent_positive(labels, torch.ones_like(labels, dtype=torch.bool))
    click, d = labels[:, 0] == 1, labels[:, 1] == 1
    assert space[:, 2].tolist() == (click & d).tolist()  # buy_d: clicked with the action
    assert space[:, 3].tolist() == (click & ~d).tolist()  # buy_o: clicked without it
    assert space[:, 4].tolist() == click.tolist()  # cvr: clicked
    y, known = g.entire_labels(labels, torch.ones_like(labels, dtype=torch.bool))
    assert y[:, 3].tolist() == (click & ~d & (labels[:, 3] == 1)).float().tolist()
    assert y[:, 4].tolist() == (labels[:, 0] * labels[:, 4]).tolist()


def test_negated_parent_positive_space_loss():
    tasks = [Task("ctr", "click"), Task("dact", "d", parent="ctr", loss_space="parent_positive"),
             Task("buy_o", "buy", parent="!dact", loss_space="parent_positive")]
    logits = [r[:2] + [r[3]] for r in E_LOGITS]
    labels = [y[:2] + [y[3]] for y in E_LABELS]
    _, terms, _ = run(make_schema(tasks), logits, labels)
    rows = [i for i, y in enumerate(labels) if y[0] == 1 and y[1] == 0]
    assert rows == [2, 5]
    expect = sum(bce(sig(logits[i][2]), labels[i][2]) for i in rows) / len(rows)
    assert terms["loss/buy_o"].item() == pytest.approx(expect, rel=1e-5)


def test_sum_of_parent_positive_trains_conditional_mixture_on_clicked_rows():
    _, terms, _ = run(make_schema(esm2_tasks("parent_positive")), E_LOGITS, E_LABELS)
    rows = [i for i, y in enumerate(E_LABELS) if y[0] == 1]
    expect = sum(
        bce(sig(E_LOGITS[i][1]) * sig(E_LOGITS[i][2]) + (1 - sig(E_LOGITS[i][1])) * sig(E_LOGITS[i][3]), E_LABELS[i][4])
        for i in rows
    ) / len(rows)
    assert terms["loss/cvr"].item() == pytest.approx(expect, rel=1e-5)


def test_esm2_null_labels():
    mask = [[True] * 5 for _ in E_LOGITS]
    mask[0][1] = False  # D unknown: out of ctavr, and out of ctcvr (its branches need D)? no: ctcvr needs click & buy only
    mask[2][4] = False  # buy unknown: out of ctcvr
    _, terms, _ = run(make_schema(esm2_tasks()), E_LOGITS, E_LABELS, mask=mask)
    ctavr_rows = [1, 2, 3, 4, 5]
    ctcvr_rows = [0, 1, 3, 4, 5]
    ctavr = sum(bce(sig(E_LOGITS[i][0]) * sig(E_LOGITS[i][1]), E_LABELS[i][0] * E_LABELS[i][1]) for i in ctavr_rows) / 5
    ctcvr = sum(
        bce(sig(r[0]) * (sig(r[1]) * sig(r[2]) + (1 - sig(r[1])) * sig(r[3])), E_LABELS[i][0] * E_LABELS[i][4])
        for i, r in ((i, E_LOGITS[i]) for i in ctcvr_rows)
    ) / 5
    assert terms["loss/ctavr"].item() == pytest.approx(ctavr, rel=1e-5)
    assert terms["loss/ctcvr"].item() == pytest.approx(ctcvr, rel=1e-5)


def test_regression_mse_on_parent_positive_rows_with_nulls():
    tasks = [Task("ctr", "click"), Task("vcr", "ratio", type="regression", parent="ctr", loss_space="parent_positive")]
    logits = [[0.5, 0.7], [-0.3, 0.2], [1.2, 1.4], [0.1, -0.3], [2.0, 0.5]]
    labels = [[1, 0.9], [0, 0.0], [1, 0.25], [1, 0.0], [1, 0.6]]
    mask = [[True, True], [True, False], [True, True], [True, False], [True, True]]
    total, terms, lg = run(make_schema(tasks), logits, labels, mask=mask)
    rows = [0, 2, 4]  # clicked with a known ratio
    mse = sum((logits[i][1] - labels[i][1]) ** 2 for i in rows) / 3
    ctr = sum(bce(sig(r[0]), y[0]) for r, y in zip(logits, labels)) / 5
    assert terms["loss/vcr"].item() == pytest.approx(mse, rel=1e-5)
    assert total.item() == pytest.approx(ctr + mse, rel=1e-5)
    total.backward()
    # regression head is linear: d/dz of the mean squared error = 2 (z − y) / n on its rows
    for i in range(5):
        expect = 2 * (logits[i][1] - labels[i][1]) / 3 if i in rows else 0.0
        assert lg.grad[i, 1].item() == pytest.approx(expect, abs=1e-6)
    # and the prediction is the raw output, never sigmoid'ed
    cond, entire = TaskGraph(make_schema(tasks)).predictions(torch.tensor(logits))
    assert cond[:, 1].tolist() == pytest.approx([r[1] for r in logits])


def test_ple_decay_weight_follows_gamma_power_step():
    schema = make_schema([Task("ctr", "click", weight=2.0), Task("cvr", "conv", parent="ctr", entire_name="ctcvr")])
    loss = EntireSpaceLoss(schema, LossConfig(decay={"cvr": 0.9}, task_weights={"cvr": 0.5}))
    logits, labels = [[0.3, -0.2], [1.0, 0.4]], [[1, 0], [1, 1]]
    ctr = (bce(sig(0.3), 1) + bce(sig(1.0), 1)) / 2
    ctcvr = (bce(sig(0.3) * sig(-0.2), 0) + bce(sig(1.0) * sig(0.4), 1)) / 2
    for t in range(4):
        total, terms, _ = run(schema, logits, labels, loss=loss)
        assert terms["loss_weight/ctcvr"].item() == pytest.approx(0.5 * 0.9**t, rel=1e-6)
        assert terms["loss_weight/ctr"].item() == pytest.approx(2.0, rel=1e-6)
        assert total.item() == pytest.approx(2.0 * ctr + 0.5 * 0.9**t * ctcvr, rel=1e-5)
    assert int(loss.step) == 4
    # evaluation forwards do not advance t; the step is in the state dict (checkpoints carry it)
    loss.eval()
    run(schema, logits, labels, loss=loss)
    assert int(loss.step) == 4 and int(loss.state_dict()["step"]) == 4
    fresh = EntireSpaceLoss(schema, LossConfig(decay={"cvr": 0.9}, task_weights={"cvr": 0.5}))
    fresh.load_state_dict(loss.state_dict())
    assert fresh.term_weights()[1].item() == pytest.approx(0.5 * 0.9**4, rel=1e-6)


def test_uncertainty_weighting_hand_values_and_learning():
    tasks = [Task("ctr", "click"), Task("vcr", "ratio", type="regression")]
    schema = make_schema(tasks)
    loss = EntireSpaceLoss(schema, LossConfig(weighting="uncertainty"))
    with torch.no_grad():
        loss.log_var.copy_(torch.tensor([0.4, -0.7]))
    logits, labels = [[0.3, 0.2], [-1.0, 0.9], [0.5, 0.4]], [[1, 0.5], [0, 1.0], [0, 0.1]]
    total, terms, _ = run(schema, logits, labels, loss=loss)
    l_ctr = sum(bce(sig(r[0]), y[0]) for r, y in zip(logits, labels)) / 3
    l_vcr = sum((r[1] - y[1]) ** 2 for r, y in zip(logits, labels)) / 3
    # Kendall et al. 2018: classification exp(−s)·L + s/2, regression exp(−s)·L/2 + s/2
    expect = math.exp(-0.4) * l_ctr + 0.2 + 0.5 * math.exp(0.7) * l_vcr - 0.35
    assert total.item() == pytest.approx(expect, rel=1e-5)
    assert terms["loss_log_var/ctr"].item() == pytest.approx(0.4)
    assert terms["loss_log_var/vcr"].item() == pytest.approx(-0.7)
    # learnable: optimising the total moves s toward log L (the optimum of exp(−s)L + s/2 is s = log 2L)
    opt = torch.optim.SGD([loss.log_var], lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        total, _, _ = run(schema, logits, labels, loss=loss)
        total.backward()
        opt.step()
    assert loss.log_var[0].item() == pytest.approx(math.log(2 * l_ctr), abs=1e-3)
    assert loss.log_var[1].item() == pytest.approx(math.log(l_vcr), abs=1e-3)
    assert "log_var" in dict(loss.named_parameters())


def test_scenario_lambda_static_and_inverse_share():
    schema = make_schema([Task("ctr", "click")], levels=(2, 2))
    logits, labels = [[0.3], [-0.5], [1.0], [0.2], [-1.0]], [[1], [0], [0], [1], [1]]
    scen = [[0, 0], [0, 0], [0, 1], [1, 1], [0, 0]]  # leaves 0, 0, 1, 3, 0
    ell = [bce(sig(r[0]), y[0]) for r, y in zip(logits, labels)]
    leaves = [a * 2 + b for a, b in scen]
    cfg = LossConfig(scenario_weighting="static", scenario_weights={"l01/l11": 3.0, "l00/l10": 0.5})
    _, terms, _ = run(schema, logits, labels, scenario=scen, cfg=cfg)
    lam = {0: 0.5, 1: 1.0, 2: 1.0, 3: 3.0}
    assert terms["loss/ctr"].item() == pytest.approx(sum(lam[s] * l for s, l in zip(leaves, ell)) / 5, rel=1e-5)
    # inverse share: λ_s = 1 / (S · share_s); shares given in the config
    shares = {"l00/l10": 0.5, "l00/l11": 0.25, "l01/l10": 0.15, "l01/l11": 0.1}  # leaf order
    cfg = LossConfig(scenario_weighting="inverse_share", scenario_shares=shares)
    loss = EntireSpaceLoss(schema, cfg)
    expect_lam = [1 / (4 * v) for v in shares.values()]
    assert loss.scenario_lambda.tolist() == pytest.approx(expect_lam, rel=1e-6)
    _, terms, _ = run(schema, logits, labels, scenario=scen, loss=loss)
    assert terms["loss/ctr"].item() == pytest.approx(sum(expect_lam[s] * l for s, l in zip(leaves, ell)) / 5, rel=1e-5)
    # or set from counted shares (training data); the weights are in the state dict
    loss.set_scenario_share([2, 1, 0, 1])
    assert loss.scenario_lambda.tolist() == pytest.approx([0.5, 1.0, 0.0, 1.0])
    assert "scenario_lambda" in loss.state_dict()
    with pytest.raises(ValueError, match="unknown scenario"):
        EntireSpaceLoss(schema, LossConfig(scenario_weighting="static", scenario_weights={"nope": 1.0}))


def test_aux_losses_added_and_logged():
    schema = make_schema([Task("ctr", "click")])
    aux = {"aux/scenario/l0/kl_specific": torch.tensor(0.25, requires_grad=True), "aux/task/kl_shared": torch.tensor(0.1)}
    total, terms, _ = run(schema, [[0.3], [-0.2]], [[1], [0]], aux=aux, cfg=LossConfig(aux_weight=2.0))
    ctr = (bce(sig(0.3), 1) + bce(sig(-0.2), 0)) / 2
    assert total.item() == pytest.approx(ctr + 2.0 * 0.35, rel=1e-5)
    assert terms["aux/scenario/l0/kl_specific"].item() == pytest.approx(0.25)
    assert terms["aux/task/kl_shared"].item() == pytest.approx(0.1)
    total.backward()
    assert aux["aux/scenario/l0/kl_specific"].grad.item() == pytest.approx(2.0)


def test_position_bias_tower_in_training_only():
    schema = make_schema([Task("ctr", "click"), Task("cvr", "conv", parent="ctr", entire_name="ctcvr")],
                         position_bias=PositionBias(features=["position"], tasks=["ctr"]))
    loss = EntireSpaceLoss(schema, LossConfig(bias_tower=[]))  # a linear tower: a·pos + b − (a·0 + b)
    with torch.no_grad():
        loss.bias_tower.out.weight.fill_(-0.5)
        loss.bias_tower.out.bias.fill_(0.25)
    logits, labels = [[0.3, -0.2], [1.0, 0.4]], [[1, 0], [0, 0]]
    pos = torch.tensor([[1.0], [3.0]])
    _, terms, _ = run(schema, logits, labels, bias=pos, loss=loss)
    z = [0.3 - 0.5, 1.0 - 1.5]  # bias added to ctr only; 0 at the reference (0), so no intercept
    ctr = (bce(sig(z[0]), 1) + bce(sig(z[1]), 0)) / 2
    ctcvr = (bce(sig(z[0]) * sig(-0.2), 0) + bce(sig(z[1]) * sig(0.4), 0)) / 2
    assert terms["loss/ctr"].item() == pytest.approx(ctr, rel=1e-5)
    assert terms["loss/ctcvr"].item() == pytest.approx(ctcvr, rel=1e-5)
    loss.eval()  # dropped at evaluation
    _, terms, _ = run(schema, logits, labels, bias=pos, loss=loss)
    assert terms["loss/ctr"].item() == pytest.approx((bce(sig(0.3), 1) + bce(sig(1.0), 0)) / 2, rel=1e-5)
    loss.train()
    with pytest.raises(ValueError, match="bias"):
        run(schema, logits, labels, loss=loss)


@pytest.mark.parametrize(
    "tasks, fragment",
    [
        ([Task("a", "a"), Task("b", "b", parent="a"), Task("c", "c", parent="a"), Task("s", "y", parent="a", sum_of=["b", "c"])],
         "not mutually exclusive"),
        ([Task("a", "a"), Task("b", "b", parent="a"), Task("s", "y", sum_of=["b", "zz"])], "'zz'"),
        ([Task("a", "a"), Task("b", "b", parent="a"), Task("s", "y", sum_of=["b"])], "two or more"),
        ([Task("a", "a"), Task("r", "r", type="regression", parent="a")], "parent_positive"),
        ([Task("a", "a"), Task("b", "b", parent="!zz")], "'!zz'"),
        ([Task("a", "a"), Task("b", "b", parent="a"), Task("c", "c", parent="!b"), Task("x", "x"),
          Task("s", "y", parent="x", sum_of=["b", "c"])], "does not pass through"),
    ],
)
def test_task_graph_validation(tasks, fragment):
    with pytest.raises(SchemaError, match=None) as ei:
        make_schema(tasks)
    assert fragment in str(ei.value)


def test_bias_tower_is_zero_at_reference():
    from dlrm_mtl.modules.bias_tower import BiasTower

    torch.manual_seed(0)
    tower = BiasTower(2, [8], reference=[1.0, 0.5])
    x = torch.tensor([[1.0, 0.5], [3.0, 0.5], [1.0, 2.0]])
    out = tower(x)
    assert out.shape == (3, 1)
    assert out[0, 0].item() == 0.0
    f = lambda v: tower.out(tower.mlp(v))  # noqa: E731
    torch.testing.assert_close(out, f(x) - f(torch.tensor([[1.0, 0.5]])))


def test_position_bias_feature_cannot_be_dense():
    with pytest.raises(SchemaError, match="also dense"):
        make_schema([Task("ctr", "click")], position_bias=PositionBias(features=["price"], tasks=["ctr"]))


def test_scenario_shares_count_leaves_and_refuse_ids_out_of_range(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dlrm_mtl.data.errors import DataError
    from dlrm_mtl.data.scenario_share import scenario_shares
    from dlrm_mtl.synthetic import synthetic_schema

    schema = synthetic_schema()
    cols = [lvl.column for lvl in schema.scenarios]
    sizes = [lvl.num_values for lvl in schema.scenarios]
    d = tmp_path / "d"
    d.mkdir()
    rows = [[0] * len(cols), [sizes[0] - 1] + [0] * (len(cols) - 1), [0] * len(cols)]
    pq.write_table(pa.table({c: [r[j] for r in rows] for j, c in enumerate(cols)}), d / "a.parquet")
    share = scenario_shares(schema, str(d))
    assert share[0] == pytest.approx(2 / 3) and sum(share) == pytest.approx(1.0)
    bad = [list(r) for r in rows]
    bad[2][-1] = sizes[-1]  # one past the last id of the last level: clipped silently before
    pq.write_table(pa.table({c: [r[j] for r in bad] for j, c in enumerate(cols)}), d / "b.parquet")
    with pytest.raises(DataError, match=rf"b.parquet: column '{cols[-1]}', row 2: scenario id {sizes[-1]} outside"):
        scenario_shares(schema, str(d))
