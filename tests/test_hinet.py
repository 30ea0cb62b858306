"""HiNet (scenario layer type ``hinet``): sub-expert integration modules and the scenario-aware
attention over the *other* scenarios — against straightforward references written here."""

from __future__ import annotations

import pytest
import torch

from dlrm_mtl.modules import HiNetScenarioLayer, ScenarioAwareAttention, SubExpertIntegration


def ref_sub_expert(bank, e: int, x: torch.Tensor) -> torch.Tensor:
    h = x
    for w, b in zip(bank.weights, bank.biases):
        h = torch.relu(h @ w[e] + b[e])
    return h


def test_sei_is_a_gated_sum_of_its_sub_experts():
    torch.manual_seed(0)
    M, K = 3, 2
    sei = SubExpertIntegration(6, num_modules=M, sub_experts=K, hidden=[5], out_dim=4)
    x = torch.randn(7, 6)
    y, gates = sei(x)
    assert y.shape == (7, M, 4) and gates.shape == (7, M, K)
    for m in range(M):
        g = torch.softmax(x @ sei.gate.weight[m] + sei.gate.bias[m], dim=-1)  # [B, K]
        ref = sum(g[:, k : k + 1] * ref_sub_expert(sei.experts, m * K + k, x) for k in range(K))
        torch.testing.assert_close(y[:, m], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gates[:, m], g)


def test_san_weights_exclude_the_own_scenario_and_sum_to_one():
    torch.manual_seed(1)
    S = 4
    san = ScenarioAwareAttention(3, num_scenarios=S)
    emb = torch.randn(8, 3)
    scenario = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    specific = torch.randn(8, S, 5)
    y, w = san(emb, scenario, specific)
    for i in range(8):
        s = int(scenario[i])
        others = [j for j in range(S) if j != s]
        logits = emb[i] @ san.score.weight.T + san.score.bias
        a = torch.softmax(logits[others], dim=0)
        torch.testing.assert_close(w[i, others], a)
        assert w[i, s] == 0
        torch.testing.assert_close(y[i], sum(a[n] * specific[i, j] for n, j in enumerate(others)))
    torch.testing.assert_close(w.sum(-1), torch.ones(8))


def test_san_with_two_scenarios_attends_to_the_other_one():
    san = ScenarioAwareAttention(3, num_scenarios=2)
    specific = torch.randn(4, 2, 5)
    y, w = san(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]), specific)
    assert w.tolist() == [[0, 1], [1, 0], [1, 0], [0, 1]]
    torch.testing.assert_close(y, specific[torch.arange(4), torch.tensor([1, 0, 0, 1])])
    with pytest.raises(ValueError, match="at least 2 scenarios"):
        ScenarioAwareAttention(3, num_scenarios=1)


def make(seed=2, S=3, K=2):
    torch.manual_seed(seed)
    layer = HiNetScenarioLayer(6, num_scenarios=S, emb_dim=4, sub_experts=K, hidden=[5], out_dim=4)
    scenario = torch.arange(12) % S
    return layer, torch.randn(12, 6), scenario, torch.randn(S, 4)[scenario]


def test_hinet_output_is_shared_own_and_san_parts():
    layer, x, scenario, emb = make()
    out = layer(x, scenario, emb)
    assert layer.out_dim == 12 and out.y.shape == (12, 12)
    shared, _ = layer.shared(x)
    specific, spec_gates = layer.specific(x)
    san, weights = layer.san(emb, scenario, specific)
    rows = torch.arange(12)
    torch.testing.assert_close(out.y[:, :4], shared[:, 0])
    torch.testing.assert_close(out.y[:, 4:8], specific[rows, scenario])
    torch.testing.assert_close(out.y[:, 8:], san)
    assert set(out.gates) == {"shared", "specific", "san"}
    torch.testing.assert_close(out.gates["specific"], spec_gates[rows, scenario])
    for name, g in out.gates.items():
        torch.testing.assert_close(g.sum(-1), torch.ones(12), msg=name)
    assert (out.gates["san"][rows, scenario] == 0).all()


def test_perturbing_the_own_scenarios_expert_changes_the_own_part_not_the_san_part():
    S, K = 3, 2
    layer, x, scenario, emb = make(S=S, K=K)
    before = layer(x, scenario, emb).y.detach()
    with torch.no_grad():  # scenario 1's specific SEI: sub-experts 2, 3 of the bank
        for w in layer.specific.experts.weights:
            w[1 * K : 2 * K].add_(0.7)
    after = layer(x, scenario, emb).y.detach()
    own, other = scenario == 1, scenario != 1
    torch.testing.assert_close(after[:, :4], before[:, :4])  # shared part: untouched
    assert not torch.allclose(after[own, 4:8], before[own, 4:8])  # own part of scenario 1's rows changes
    torch.testing.assert_close(after[own, 8:], before[own, 8:])  # ... their SAN part does not
    torch.testing.assert_close(after[other, 4:8], before[other, 4:8])  # other rows' own part: untouched
    assert not torch.allclose(after[other, 8:], before[other, 8:])  # ... their SAN reads scenario 1


def test_hinet_gradients_reach_every_parameter():
    layer, x, scenario, emb = make(S=4)
    emb = emb.clone().requires_grad_(True)
    out = layer(x, scenario, emb)
    (out.y * torch.randn_like(out.y)).sum().backward()
    dead = [n for n, p in layer.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead and emb.grad.abs().sum() > 0
