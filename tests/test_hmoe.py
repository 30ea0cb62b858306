"""HMoE (scenario layer type ``hmoe``): per-scenario experts, the other scenarios' outputs with
gradients stopped, a scenario-conditioned gate — against a loop-over-experts reference."""

from __future__ import annotations

import torch

from dlrm_mtl.modules import HMoELayer


def ref_expert(layer: HMoELayer, j: int, x: torch.Tensor) -> torch.Tensor:
    """Scenario j's expert as a plain ReLU MLP over the bank's j-th weights."""
    h = x
    for w, b in zip(layer.experts.weights, layer.experts.biases):
        h = torch.relu(h @ w[j] + b[j])
    return h


def ref_hmoe(layer: HMoELayer, x, scenario, emb):
    S = layer.num_scenarios
    ys, gs = [], []
    for i in range(x.shape[0]):
        s = int(scenario[i])
        z = torch.cat([x[i], emb[i]])
        g = torch.softmax(z @ layer.gate.weight[s] + layer.gate.bias[s], dim=0)  # [S]
        ys.append(sum(g[j] * ref_expert(layer, j, x[i : i + 1])[0] for j in range(S)))
        gs.append(g)
    return torch.stack(ys), torch.stack(gs)


def make(seed=0, S=3):
    torch.manual_seed(seed)
    layer = HMoELayer(6, num_scenarios=S, emb_dim=4, hidden=[5], out_dim=4)
    x = torch.randn(12, 6)
    scenario = torch.arange(12) % S
    emb = torch.randn(S, 4)[scenario]
    return layer, x, scenario, emb


def test_hmoe_output_and_gate_match_a_loop_reference():
    layer, x, scenario, emb = make()
    out = layer(x, scenario, emb)
    y, g = ref_hmoe(layer, x, scenario, emb)
    assert out.y.shape == (12, 4) and out.gates[""].shape == (12, 3)
    torch.testing.assert_close(out.y, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.gates[""], g, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.gates[""].sum(-1), torch.ones(12))


def test_other_scenarios_experts_are_used_but_get_no_gradient():
    layer, x, scenario, emb = make(1)
    rows = scenario == 0
    out = layer(x, scenario, emb)
    out.y[rows].pow(2).sum().backward()  # a loss on scenario 0's rows only
    for w, b in zip(layer.experts.weights, layer.experts.biases):
        assert w.grad[0].abs().sum() > 0
        assert w.grad[1:].abs().sum() == 0 and b.grad[1:].abs().sum() == 0
    assert layer.gate.weight.grad[0].abs().sum() > 0  # the gate learns from every row ...
    assert layer.gate.weight.grad[1:].abs().sum() == 0  # ... through its own scenario's gate
    # scenario 1's expert does enter scenario 0's output (forward), only its gradient is stopped
    before = out.y[rows].detach()
    with torch.no_grad():
        layer.experts.weights[0][1].add_(1.0)
    assert not torch.allclose(layer(x, scenario, emb).y[rows], before)


def test_every_expert_learns_from_its_own_rows():
    layer, x, scenario, emb = make(2)
    layer(x, scenario, emb).y.sum().backward()
    dead = [n for n, p in layer.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead
    for w in layer.experts.weights:
        assert (w.grad.flatten(1).abs().sum(1) > 0).all()
