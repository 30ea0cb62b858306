"""STAR (scenario layer type ``star``): star-topology FCN, partitioned normalisation, auxiliary
network — each against a straightforward reference written here."""

from __future__ import annotations

import pytest
import torch

from dlrm_mtl.config import LayerConfig, ModelConfig
from dlrm_mtl.models.ranking_model import DenseArch
from dlrm_mtl.modules import PartitionedNorm, StarTopologyFCN, STARLayer
from dlrm_mtl.synthetic import synthetic_schema


def randomise_(module: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter off its (ones / zeros) initialisation so that a wrong formula shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p + 0.5 * torch.randn(p.shape, generator=g))


def ref_fcn_row(fcn: StarTopologyFCN, x: torch.Tensor, s: int) -> torch.Tensor:
    """One row through scenario s's network, layer by layer, with W*_s = W_s ⊙ W built by hand."""
    h = x
    for l in range(len(fcn.shared_weights)):
        w = fcn.shared_weights[l] * fcn.scenario_weights[l][s]
        b = fcn.shared_biases[l] + fcn.scenario_biases[l][s]
        out = torch.zeros(w.shape[1])
        for j in range(w.shape[1]):
            out[j] = sum(h[i] * w[i, j] for i in range(w.shape[0])) + b[j]
        h = torch.relu(out)
    return h


def test_star_fcn_uses_the_elementwise_product_of_shared_and_scenario_weights():
    torch.manual_seed(0)
    fcn = StarTopologyFCN(6, num_scenarios=3, hidden=[5], out_dim=4)
    randomise_(fcn)
    x = torch.randn(10, 6)
    scenario = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1, 1])
    y = fcn(x, scenario)
    assert y.shape == (10, 4)
    for i in range(10):
        torch.testing.assert_close(y[i], ref_fcn_row(fcn, x[i], int(scenario[i])), atol=1e-5, rtol=1e-5)
    for s in range(3):
        for l, w in enumerate(fcn.effective_weights(s)):
            torch.testing.assert_close(w, fcn.shared_weights[l] * fcn.scenario_weights[l][s])


def test_star_fcn_row_depends_only_on_its_own_scenario_weights():
    torch.manual_seed(1)
    fcn = StarTopologyFCN(6, num_scenarios=3, hidden=[], out_dim=4)
    randomise_(fcn)
    x = torch.randn(12, 6)
    scenario = torch.arange(12) % 3
    fcn(x[scenario == 0], scenario[scenario == 0]).sum().backward()  # a loss on scenario 0's rows
    for l in range(len(fcn.shared_weights)):
        assert fcn.shared_weights[l].grad.abs().sum() > 0
        assert fcn.scenario_weights[l].grad[0].abs().sum() > 0
        assert fcn.scenario_weights[l].grad[1:].abs().sum() == 0
        assert fcn.scenario_biases[l].grad[1:].abs().sum() == 0
    # and a batch's rows do not interact: one row alone gives the same output as in the batch
    y = fcn(x, scenario)
    torch.testing.assert_close(fcn(x[4:5], scenario[4:5]), y[4:5])


def ref_pn(pn: PartitionedNorm, x, scenario, mean, var):
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        s = int(scenario[i])
        out[i] = (pn.gamma * pn.scenario_gamma[s]) * (x[i] - mean[s]) / torch.sqrt(var[s] + pn.eps) + pn.beta + pn.scenario_beta[s]
    return out


def test_partitioned_norm_train_uses_each_scenarios_batch_statistics_and_updates_its_moving_ones():
    torch.manual_seed(2)
    pn = PartitionedNorm(5, num_scenarios=3, momentum=0.25)
    randomise_(pn)
    x = torch.randn(11, 5) * 3 + 1
    scenario = torch.tensor([0, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0])  # scenario 2 absent
    mean = {s: x[scenario == s].mean(0) for s in (0, 1)}
    var = {s: x[scenario == s].var(0, unbiased=False) for s in (0, 1)}
    pn.train()
    y = pn(x, scenario)
    torch.testing.assert_close(y, ref_pn(pn, x, scenario, mean, var), atol=1e-5, rtol=1e-5)
    for s in (0, 1):
        torch.testing.assert_close(pn.running_mean[s], 0.25 * mean[s])
        torch.testing.assert_close(pn.running_var[s], 0.75 * 1 + 0.25 * x[scenario == s].var(0, unbiased=True))
    # the absent scenario's moving statistics are untouched
    assert torch.equal(pn.running_mean[2], torch.zeros(5)) and torch.equal(pn.running_var[2], torch.ones(5))


def test_partitioned_norm_eval_uses_each_scenarios_moving_statistics():
    torch.manual_seed(3)
    pn = PartitionedNorm(5, num_scenarios=3)
    randomise_(pn)
    with torch.no_grad():
        pn.running_mean.copy_(torch.randn(3, 5))
        pn.running_var.copy_(torch.rand(3, 5) + 0.5)
    before = pn.running_mean.clone(), pn.running_var.clone()
    x = torch.randn(9, 5)
    scenario = torch.tensor([2, 0, 1, 2, 2, 0, 1, 1, 0])
    pn.eval()
    y = pn(x, scenario)
    torch.testing.assert_close(y, ref_pn(pn, x, scenario, pn.running_mean, pn.running_var), atol=1e-5, rtol=1e-5)
    # no update in eval, and a row's output does not depend on the rest of the batch
    assert torch.equal(pn.running_mean, before[0]) and torch.equal(pn.running_var, before[1])
    torch.testing.assert_close(pn(x[3:4], scenario[3:4]), y[3:4])


def test_star_layer_is_pn_then_fcn_and_the_aux_offset_depends_only_on_the_scenario():
    torch.manual_seed(4)
    layer = STARLayer(6, num_scenarios=3, emb_dim=4, num_tasks=2, hidden=[5], out_dim=4)
    randomise_(layer)
    table = torch.randn(3, 4)
    scenario = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    x = torch.randn(8, 6)
    layer.eval()
    out = layer(x, scenario, table[scenario])
    assert out.y.shape == (8, 4) and out.logit_offset.shape == (8, 2) and out.gates == {}
    torch.testing.assert_close(out.y, layer.fcn(layer.norm(x, scenario), scenario))
    # the offset: same scenario -> same offset whatever x; it is the aux MLP on the embedding
    out2 = layer(torch.randn(8, 6) * 5, scenario, table[scenario])
    torch.testing.assert_close(out.logit_offset, out2.logit_offset)
    lin1, lin2 = layer.aux_net[0].net[0], layer.aux_net[1]
    ref = torch.relu(table @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias  # [S, T]
    torch.testing.assert_close(out.logit_offset, ref[scenario])
    assert not torch.allclose(ref[0], ref[1])


def test_star_without_norm_has_no_pn():
    layer = STARLayer(6, num_scenarios=3, emb_dim=4, num_tasks=2, hidden=[], out_dim=4, norm=False)
    assert layer.norm is None and not any("norm" in n for n, _ in layer.named_parameters())


def test_dense_arch_adds_star_offset_to_every_tasks_logit():
    schema = synthetic_schema()
    torch.manual_seed(5)
    cfg = ModelConfig(dense_arch=[8], scenario_emb_dim=4, tower=[8], task_layers=[],
                      scenario_layers=[LayerConfig(type="star", level="leaf", hidden=[8], out_dim=8)])
    model = DenseArch(schema, cfg).eval()
    B = 16
    pooled = torch.randn(B, len(schema.sparse), schema.sparse[0].dim)
    dense = torch.randn(B, len(schema.dense))
    scenario = torch.stack([torch.arange(B) % 2, (torch.arange(B) // 2) % 2], dim=1)
    logits, _, _ = model(pooled, dense, scenario)
    star = model.scenario_layers[0]
    context = torch.cat([model.scenario_emb[0](scenario[:, 0]), model.scenario_emb[1](scenario[:, 1])], dim=1)  # [B, 8]
    expected = star.aux_net(context).detach()  # [B, T]: the aux net on the leaf's embeddings only
    with torch.no_grad():
        star.aux_net[1].weight.zero_()
        star.aux_net[1].bias.zero_()
    without, _, _ = model(pooled, dense, scenario)
    torch.testing.assert_close((logits - without).detach(), expected, atol=1e-5, rtol=1e-5)
    leaf = scenario[:, 0] * 2 + scenario[:, 1]
    for s in range(4):  # one offset per leaf scenario and task
        rows = expected[leaf == s]
        torch.testing.assert_close(rows, rows[:1].expand_as(rows))
    assert expected.abs().sum() > 0


@pytest.mark.parametrize("norm", [True, False])
def test_star_gradients_reach_every_parameter(norm):
    torch.manual_seed(6)
    layer = STARLayer(6, num_scenarios=3, emb_dim=4, num_tasks=2, hidden=[5], out_dim=4, norm=norm)
    scenario = torch.arange(30) % 3
    emb = torch.nn.Embedding(3, 4)
    out = layer(torch.randn(30, 6), scenario, emb(scenario))
    (out.y.sum() * 0.1 + (out.logit_offset * torch.randn(30, 2)).sum()).backward()
    dead = [n for n, p in layer.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead and emb.weight.grad.abs().sum() > 0


def test_partitioned_norm_maps_a_feature_constant_within_a_scenario_to_its_shift_in_train_and_eval():
    # e.g. the scenario embedding DenseArch appends to x: constant within each scenario
    torch.manual_seed(7)
    pn = PartitionedNorm(3, num_scenarios=2)
    randomise_(pn)
    scenario = torch.arange(16) % 2
    table = torch.tensor([[0.3], [-1.2]])
    for step in range(5):  # the "embedding" drifts while training, as a trained one does
        x = torch.cat([torch.randn(16, 2), table[scenario] + 0.1 * step], dim=1)
        y_train = pn.train()(x, scenario)
    shift = (pn.beta + pn.scenario_beta)[scenario, 2]
    torch.testing.assert_close(y_train[:, 2], shift)
    assert pn.constant[:, 2].all() and not pn.constant[:, :2].any()
    y_eval = pn.eval()(x, scenario)
    torch.testing.assert_close(y_eval[:, 2], shift)  # not (x − lagging mean) / sqrt(≈0 + ε)
    # the varying features are normalised with the moving statistics as usual
    torch.testing.assert_close(y_eval[:, :2], ref_pn(pn, x, scenario, pn.running_mean, pn.running_var)[:, :2])


def test_star_static_routing_equals_gather_routing():
    """STAR's FCN with static routing (every scenario's FCN on every row, then a gather) gives
    the grouped computation's outputs and gradients (float64)."""
    from dlrm_mtl.modules import StarTopologyFCN

    torch.manual_seed(1)
    a = StarTopologyFCN(10, 3, [7], 5, routing="gather").double()
    b = StarTopologyFCN(10, 3, [7], 5, routing="static").double()
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.3 * torch.randn_like(p))  # scenario weights start at 1: make them differ
    b.load_state_dict(a.state_dict())
    x, s = torch.randn(29, 10, dtype=torch.float64), torch.randint(0, 3, (29,))
    ya, yb = a(x, s), b(x, s)
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    for ga, gb in zip(torch.autograd.grad(ya.square().sum(), list(a.parameters())), torch.autograd.grad(yb.square().sum(), list(b.parameters()))):
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
