"""Task-relation heads (model.heads: towers | dbmtl | aitm | nmtr): each head's equations
against a loop written here from the papers' definitions (float64), the entire-space ->
conditional logit map the loss reads, the calibrator as an aux loss through DenseArch and
EntireSpaceLoss, `towers` unchanged, and the config's refusals."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dlrm_mtl.config import Config, ConfigError, HeadsConfig, LossConfig, ModelConfig, check
from dlrm_mtl.losses import EntireSpaceLoss
from dlrm_mtl.models.ranking_model import DenseArch
from dlrm_mtl.modules.heads import (AITMHead, DBMTLHead, NMTRHead, build_heads, conditional_logits, task_chain)
from dlrm_mtl.modules.towers import TaskTowers
from dlrm_mtl.schema import Schema, Task
from dlrm_mtl.synthetic import SyntheticSpec, synthetic_schema

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = synthetic_schema()  # ctr -> cvr
ESM2 = synthetic_schema(SyntheticSpec(esm2=True))  # ctr -> dact -> {buy_d, !dact: buy_o}, cvr = sum_of


def chain3() -> Schema:
    """ctr -> cart -> buy, an independent root `stay`, and a regression root: a 3-step chain
    next to tasks off it."""
    s = dataclasses.replace(SCHEMA, tasks=[
        Task("stay", "stay"),
        Task("buy", "buy", parent="cart"),  # listed before its parent: the heads order by depth
        Task("ctr", "click"),
        Task("cart", "cart", parent="ctr"),
        Task("completion", "completion", type="regression"),
    ])
    s.validate()
    return s


CHAIN3 = chain3()
STAY, BUY, CTR, CART, COMPLETION = range(5)


def x_of(T: int, B: int = 7, d: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(T, B, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def tower_ref(head, t: int, x: torch.Tensor) -> torch.Tensor:
    """Task t's hidden tower by hand: ReLU(x_t W + b) per layer of the head's bank."""
    h = x[t]
    for w, b in zip(head.towers.bank.weights, head.towers.bank.biases):
        h = torch.relu(h @ w[t] + b[t])
    return h


# ---------------------------------------------------------------------------- the chain
def test_task_chain_orders_parents_first_and_links_binary_steps():
    c = task_chain(CHAIN3, chain=True)
    assert c.parents == (-1, CART, -1, CTR, -1)
    assert c.order.index(CTR) < c.order.index(CART) < c.order.index(BUY)
    assert c.links == ((CTR, CART), (CART, BUY))
    # DBMTL's Bayesian network: every parent link, negated ones too (ESM²)
    e = task_chain(ESM2, chain=False)
    names = ESM2.task_names
    assert {(names[p], names[t]) for p, t in e.links} == {("ctr", "dact"), ("dact", "buy_d"), ("dact", "buy_o"), ("ctr", "cvr")}


@pytest.mark.parametrize("head", ["aitm", "nmtr"])
def test_chain_heads_refuse_schemas_without_ordered_steps(head):
    with pytest.raises(ConfigError) as ei:
        build_heads(HeadsConfig(type=head), ESM2, 8, [4])
    assert ei.value.key == "model.heads.type"
    assert f"model.heads: type {head} needs the tasks as ordered steps" in str(ei.value) and "'cvr' is a sum_of" in str(ei.value)
    no_chain = dataclasses.replace(SCHEMA, tasks=[Task("income", "income"), Task("marital", "marital")])
    with pytest.raises(ConfigError, match=r"model.heads: type .* needs a chain of binary tasks .* has none"):
        build_heads(HeadsConfig(type=head), no_chain, 8, [4])
    build_heads(HeadsConfig(type="dbmtl"), ESM2, 8, [4])  # DBMTL takes any task graph
    build_heads(HeadsConfig(type="dbmtl"), no_chain, 8, [4])


def test_aitm_needs_entire_space_steps():
    """AITM's ŷ are entire-space: a chained task trained on its parent's positives only
    (BCE of ŷ_c / ŷ_p, unbounded gradient as ŷ_c -> ŷ_p) is refused; NMTR and DBMTL take it."""
    masked = synthetic_schema(SyntheticSpec(cvr_loss_space="parent_positive"))
    with pytest.raises(ConfigError, match=r"model.heads: type aitm trains every step's entire-space probability .* "
                                          r"task 'cvr' has loss_space 'parent_positive'"):
        build_heads(HeadsConfig(type="aitm"), masked, 8, [4])
    assert isinstance(build_heads(HeadsConfig(type="nmtr"), masked, 8, [4]), NMTRHead)
    assert isinstance(build_heads(HeadsConfig(type="aitm"), SCHEMA, 8, [4]), AITMHead)


# ---------------------------------------------------------------------------- entire -> conditional
def test_conditional_logits_give_back_the_entire_space_probability():
    a = torch.tensor([[0.3, -0.5, -2.0], [2.0, 1.0, -6.0], [-4.0, -4.5, -30.0]], dtype=torch.float64)
    z = conditional_logits(a, ((0, 1), (1, 2)))
    torch.testing.assert_close(z[:, 0], a[:, 0])  # a root keeps its logit
    p = torch.sigmoid(a)
    torch.testing.assert_close(torch.sigmoid(z[:, 1]), p[:, 1] / p[:, 0])  # P(cart | click)
    torch.testing.assert_close(torch.sigmoid(z[:, 2]), p[:, 2] / p[:, 1])
    torch.testing.assert_close(torch.sigmoid(z).prod(1), p[:, 2])  # the chained product = the head's ŷ
    torch.testing.assert_close(F.logsigmoid(z).sum(1), F.logsigmoid(a[:, 2]))  # also in log space


def test_conditional_logit_of_a_child_above_its_parent_is_capped_with_a_straight_through_gradient():
    a = torch.tensor([[-1.0, 0.5]], dtype=torch.float64, requires_grad=True)  # ŷ_c = 0.62 > ŷ_p = 0.27
    z = conditional_logits(a, ((0, 1),))
    assert torch.sigmoid(z[0, 1]).item() == pytest.approx(1 - 1e-6, abs=1e-9)
    entire = F.logsigmoid(z).sum()  # the task graph's log pCTCVR
    (g,) = torch.autograd.grad(entire, a)
    # value ŷ_p (1 − ε), gradient that of log ŷ_c: moves a_c, not a_p
    assert entire.item() == pytest.approx(-math.log1p(math.exp(1.0)) + math.log1p(-1e-6), rel=1e-9)
    torch.testing.assert_close(g, torch.tensor([[0.0, 1 - 1 / (1 + math.exp(-0.5))]], dtype=torch.float64))


# ---------------------------------------------------------------------------- DBMTL
def test_dbmtl_matches_its_bayesian_network_by_hand():
    torch.manual_seed(0)
    head = DBMTLHead(task_chain(CHAIN3, chain=False), in_dim=6, tower=[5, 4], relation_dim=3).double()
    x = x_of(5)
    out = head(x)
    assert out.aux == {} and out.gates == {}
    r = {}
    ref = torch.zeros(7, 5, dtype=torch.float64)
    for t in (CTR, STAY, COMPLETION, CART, BUY):  # parents first
        h = tower_ref(head, t, x)  # [B, 4]
        p = CHAIN3.tasks[t].parent
        inp = h if p is None else torch.cat([h, r[CHAIN3.task_index(p)]], dim=1)
        lin = head.relations[t]
        r[t] = torch.relu(inp @ lin.weight.T + lin.bias)
        ref[:, t] = r[t] @ head.logits.weight[t] + head.logits.bias[t]
    torch.testing.assert_close(out.y, ref)
    # a child reads its parent's representation: its logit moves when only the parent's tower does
    with torch.no_grad():
        head.towers.bank.weights[0][CTR].add_(0.5)
    moved = head(x).y
    assert (moved[:, CART] - out.y[:, CART]).abs().max() > 1e-3 and (moved[:, BUY] - out.y[:, BUY]).abs().max() > 1e-4
    torch.testing.assert_close(moved[:, STAY], out.y[:, STAY])  # off the chain: unchanged


def test_dbmtl_reads_a_shared_input_like_every_task_reading_it():
    torch.manual_seed(1)
    head = DBMTLHead(task_chain(SCHEMA, chain=False), in_dim=6, tower=[4], relation_dim=3).double()
    x = x_of(1)[0]  # [B, d]
    torch.testing.assert_close(head(x).y, head(x.unsqueeze(0).expand(2, -1, -1)).y)


# ---------------------------------------------------------------------------- AITM
def aitm_ref(head: AITMHead, x: torch.Tensor, schema: Schema):
    """AITM by hand: q_t, p_{t−1} = ReLU(G z_{t−1} + g), the AIT attention over {p, q}, a_t."""
    T = len(schema.tasks)
    z, a, att = {}, torch.zeros(x.shape[1], T, dtype=torch.float64), {}
    links = {c: (k, p) for k, (p, c) in enumerate(head.chain.links)}
    for t in head.chain.order:
        q = tower_ref(head, t, x)
        if t in links:
            k, p = links[t]
            G = head.transfer[k]
            info = torch.relu(z[p] @ G.weight.T + G.bias)
            ait = head.ait[k]
            scores = []
            for u in (info, q):
                scores.append((u @ ait.query.weight.T * (u @ ait.key.weight.T)).sum(1) / math.sqrt(q.shape[1]))
            w = torch.softmax(torch.stack(scores, 1), dim=1)
            z[t] = w[:, :1] * (info @ ait.value.weight.T) + w[:, 1:] * (q @ ait.value.weight.T)
            att[k] = w
        else:
            z[t] = q
        a[:, t] = z[t] @ head.logits.weight[t] + head.logits.bias[t]
    return a, att


def test_aitm_matches_the_ait_module_and_calibrator_by_hand():
    torch.manual_seed(2)
    head = AITMHead(task_chain(CHAIN3, chain=True), in_dim=6, tower=[5, 4], calibrator_weight=0.3).double()
    x = x_of(5, B=64)
    out = head(x)
    a, att = aitm_ref(head, x, CHAIN3)
    y = torch.sigmoid(a)
    # the entire-space probabilities come back through the task graph's product along each chain
    torch.testing.assert_close(torch.sigmoid(out.y[:, CTR]), y[:, CTR])
    feasible = (y[:, CART] < y[:, CTR]) & (y[:, BUY] < y[:, CART])
    assert 0 < feasible.sum() < 64  # both cases occur at this initialisation
    prod = torch.sigmoid(out.y[:, CTR]) * torch.sigmoid(out.y[:, CART]) * torch.sigmoid(out.y[:, BUY])
    torch.testing.assert_close(prod[feasible], y[feasible, BUY])
    torch.testing.assert_close(out.y[:, [STAY, COMPLETION]], a[:, [STAY, COMPLETION]])  # off the chain: a_t as is
    # calibrator: mean over rows of Σ_links max(ŷ_c − ŷ_p, 0), unweighted
    L_lc = (F.relu(y[:, CART] - y[:, CTR]) + F.relu(y[:, BUY] - y[:, CART])).mean()
    torch.testing.assert_close(out.aux["calibrator"], L_lc)
    assert L_lc > 0 and head.aux_weight == 0.3
    # gates: the attention of each link, rows sum to 1
    torch.testing.assert_close(out.gates["ait"], torch.stack([att[0], att[1]], dim=1))


def test_aitm_calibrator_reaches_the_loss_weighted_by_alpha():
    """Through DenseArch (aux/heads/calibrator = α · L_lc) and EntireSpaceLoss (total = terms +
    loss.aux_weight · aux); the ctcvr term is the paper's cross-entropy of ŷ_cvr on every row."""
    torch.manual_seed(3)
    cfg = ModelConfig(dense_arch=[8], scenario_emb_dim=4, task_layers=[], scenario_layers=[], tower=[8],
                      heads=HeadsConfig(type="aitm", calibrator_weight=0.7))
    arch = DenseArch(SCHEMA, cfg).double()
    B = 256
    g = torch.Generator().manual_seed(3)
    pooled = torch.randn(B, len(SCHEMA.sparse), 16, generator=g, dtype=torch.float64)
    dense = torch.randn(B, len(SCHEMA.dense), generator=g, dtype=torch.float64)
    scenario = torch.stack([torch.arange(B) % 2, (torch.arange(B) // 2) % 2], dim=1)
    logits, gates, aux = arch(pooled, dense, scenario)
    head = arch.towers
    assert isinstance(head, AITMHead)
    # the head's own entire-space logits, recomputed from the arch's input to the heads
    x = arch.interaction(arch.dense_mlp(dense), pooled.reshape(B, *arch.pooled_shape))
    x = torch.cat([x, torch.cat([e(scenario[:, i]) for i, e in enumerate(arch.scenario_emb)], 1)], 1)
    a, _ = head.entire_logits(x)
    y = torch.sigmoid(a)
    L_lc = F.relu(y[:, 1] - y[:, 0]).mean()
    assert L_lc > 0
    torch.testing.assert_close(aux["aux/heads/calibrator"], 0.7 * L_lc)
    assert gates["heads/ait"].shape == (B, 1, 2)
    labels = torch.stack([torch.bernoulli(y[:, 0].detach(), generator=g), torch.zeros(B, dtype=torch.float64)], 1)
    labels[:, 1] = labels[:, 0] * torch.bernoulli(torch.full((B,), 0.3, dtype=torch.float64), generator=g)
    loss = EntireSpaceLoss(SCHEMA, LossConfig(aux_weight=2.0)).double()
    total, terms = loss(logits, labels, torch.ones_like(labels, dtype=torch.bool), torch.ones(B, dtype=torch.float64), scenario, aux)
    ctr = F.binary_cross_entropy(y[:, 0], labels[:, 0])
    feasible = y[:, 1] < y[:, 0]
    ctcvr = F.binary_cross_entropy(torch.where(feasible, y[:, 1], y[:, 0] * (1 - 1e-6)), labels[:, 1])
    torch.testing.assert_close(terms["loss/ctr"], ctr)
    torch.testing.assert_close(terms["loss/ctcvr"], ctcvr)
    torch.testing.assert_close(total, ctr + ctcvr + 2.0 * 0.7 * L_lc)
    assert terms["aux/heads/calibrator"] == pytest.approx(0.7 * L_lc.item())


# ---------------------------------------------------------------------------- NMTR
def test_nmtr_cascades_the_scores_by_hand():
    torch.manual_seed(4)
    head = NMTRHead(task_chain(CHAIN3, chain=True), in_dim=6, tower=[5, 4]).double()
    x = x_of(5, B=64)
    out = head(x)
    assert out.aux == {} and out.gates == {}
    f = torch.stack([tower_ref(head, t, x) @ head.scores.weight[t] + head.scores.bias[t] for t in range(5)], 1)
    s_ctr = f[:, CTR]
    s_cart = s_ctr - F.softplus(f[:, CART])  # each behaviour's score starts from the previous one's
    s_buy = s_cart - F.softplus(f[:, BUY])
    torch.testing.assert_close(head.entire_logits(x), torch.stack([f[:, STAY], s_buy, s_ctr, s_cart, f[:, COMPLETION]], 1))
    # ŷ_r ≤ ŷ_{r−1} by construction, so every conditional is an exact probability
    torch.testing.assert_close(torch.sigmoid(out.y[:, CART]), torch.sigmoid(s_cart) / torch.sigmoid(s_ctr))
    torch.testing.assert_close(torch.sigmoid(out.y[:, [CTR, CART, BUY]]).prod(1), torch.sigmoid(s_buy))
    torch.testing.assert_close(out.y[:, [STAY, COMPLETION]], f[:, [STAY, COMPLETION]])
    # the cascade's prior: with f fixed, a higher parent score raises the child's conditional
    with torch.no_grad():
        head.scores.bias[CTR] += 1.0
    moved = head(x).y
    assert (moved[:, CART] > out.y[:, CART]).all() and (moved[:, BUY] > out.y[:, BUY]).all()
    torch.testing.assert_close(moved[:, [STAY, COMPLETION]], out.y[:, [STAY, COMPLETION]])


# ---------------------------------------------------------------------------- the synthetic truth
def test_child_on_parent_adds_the_click_latent_to_the_conversion_logit(tmp_path):
    """Same seed with and without the option: features and clicks byte-identical; the true
    conversion logit moves by w · (click logit − its leaf base rate + the position effect)."""
    import numpy as np
    import pyarrow.parquet as pq

    from dlrm_mtl.synthetic import generate

    base = SyntheticSpec(train_files=1, eval_files=1, row_group_rows=5000)
    generate(tmp_path / "a", rows=4000, seed=5, spec=base)
    generate(tmp_path / "b", rows=4000, seed=5, spec=dataclasses.replace(base, child_on_parent=1.5))
    a = pq.ParquetDataset(tmp_path / "a" / "train").read().to_pydict()
    b = pq.ParquetDataset(tmp_path / "b" / "train").read().to_pydict()
    for col in a:
        if col not in ("conversion", "true_pcvr", "true_pctcvr"):
            assert a[col] == b[col], col
    logit = lambda p: np.log(p) - np.log1p(-p)  # noqa: E731
    pctr = np.array(a["true_pctr"], dtype=np.float64)
    leaf = np.array(a["channel"]) * 2 + np.array(a["domain"])
    latent = logit(pctr) - logit(np.array(base.ctr_base))[leaf] + base.position_effect * (np.array(a["position"]) - 1)
    pa_, pb_ = np.array(a["true_pcvr"], dtype=np.float64), np.array(b["true_pcvr"], dtype=np.float64)
    exact = np.maximum(pa_, pb_) < 0.99  # float32 probabilities: logits near p = 1 are coarse
    assert exact.mean() > 0.9
    np.testing.assert_allclose((logit(pb_) - logit(pa_))[exact], 1.5 * latent[exact], atol=1e-3)
    assert np.all(np.array(b["click"])[np.array(b["conversion"]) == 1] == 1)  # conversion => click still
    assert np.corrcoef(latent, logit(np.array(b["true_pcvr"], dtype=np.float64)))[0, 1] > 0.7  # the click latent dominates


# ---------------------------------------------------------------------------- towers unchanged
def test_towers_head_is_todays_task_towers():
    torch.manual_seed(5)
    default = DenseArch(SCHEMA, ModelConfig())
    torch.manual_seed(5)
    named = DenseArch(SCHEMA, ModelConfig(heads=HeadsConfig(type="towers")))
    assert type(default.towers) is TaskTowers and type(named.towers) is TaskTowers
    assert not any(k.startswith("heads") for k in default.state_dict())
    for (k1, v1), (k2, v2) in zip(default.state_dict().items(), named.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    g = torch.Generator().manual_seed(5)
    B = 32
    pooled, dense = torch.randn(B, len(SCHEMA.sparse), 16, generator=g), torch.randn(B, len(SCHEMA.dense), generator=g)
    scenario = torch.stack([torch.arange(B) % 2, (torch.arange(B) // 2) % 2], dim=1)
    logits, gates, aux = default(pooled, dense, scenario)
    assert not any(k.startswith("heads") for k in gates) and aux == {}
    assert torch.equal(logits, named(pooled, dense, scenario)[0])


# ---------------------------------------------------------------------------- config
def _check(synthetic_small, paths=(), overrides=()):
    cfg = Config.load(list(paths), [f"data.train={synthetic_small / 'train'}"] + list(overrides))
    check(cfg, Schema.load(synthetic_small / "schema.yaml"))
    return cfg


@pytest.mark.parametrize("name", ["towers", "dbmtl", "aitm", "nmtr"])
def test_shipped_heads_configs_compose_with_the_demo_and_pass_the_check(name, synthetic_small):
    cfg = _check(synthetic_small, [ROOT / "configs" / "demo.yaml", ROOT / "configs" / "heads" / f"{name}.yaml"])
    assert cfg.model.heads.type == name
    assert cfg.data.batch_size == 1024  # the demo's own settings survive the composition


@pytest.mark.parametrize("overrides, key, words", [
    (["model.heads={type: nosuch}"], "model.heads.type", ["unknown type 'nosuch'", "'aitm'"]),
    (["model.heads={type: nmtr, relation_dim: 8}"], "model.heads.relation_dim", ["type nmtr does not read ['relation_dim']"]),
    (["model.heads={type: dbmtl, calibrator_weight: 1.0}"], "model.heads.calibrator_weight", ["type dbmtl does not read"]),
    (["model.heads={type: dbmtl, relation_dim: 0}"], "model.heads.relation_dim", [">= 1, got 0"]),
    (["model.heads={type: aitm, calibrator_weight: -1.0}"], "model.heads.calibrator_weight", [">= 0, got -1.0"]),
    (["model.heads={type: aitm, nosuch: 1}"], "model.heads.nosuch", ["unknown config key"]),
    (["model.heads.relation_dim=two"], "model.heads.relation_dim", ["expected int"]),
])
def test_heads_config_errors_name_the_key(overrides, key, words, synthetic_small):
    with pytest.raises(ConfigError) as ei:
        _check(synthetic_small, overrides=overrides)
    assert ei.value.key == key and "\n" not in str(ei.value)
    for w in words:
        assert w in str(ei.value), str(ei.value)


def test_chain_head_on_a_schema_without_a_chain_names_the_file(synthetic_small, tmp_path):
    esm2 = tmp_path / "esm2.yaml"
    ESM2.save(esm2)
    heads = tmp_path / "heads.yaml"
    heads.write_text("model:\n  heads: {type: aitm}\n")
    cfg = Config.load([str(heads)], [f"data.train={synthetic_small / 'train'}", f"data.schema={esm2}"])
    with pytest.raises(ConfigError) as ei:
        check(cfg, Schema.load(esm2))
    msg = str(ei.value)
    assert msg.startswith(f"{heads}: model.heads: type aitm needs the tasks as ordered steps"), msg
    assert "sum_of" in msg and "\n" not in msg
