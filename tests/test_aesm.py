"""AESM² (Zou et al., SIGIR 2022): expert selection by KL distance, scenario and task layers,
against references written with Python loops and math.log."""

from __future__ import annotations

import dataclasses
import math
from typing import List, Tuple

import pytest
import torch

from dlrm_mtl.config import ConfigError, LayerConfig
from dlrm_mtl.models.arch import build_scenario_layer, build_task_layer
from dlrm_mtl.modules import AESMScenarioLayer, AESMTaskLayer, select_experts

from test_modules import ATOL, reference_expert


def reference_selection(logits: torch.Tensor, target: torch.Tensor, k_sp: int, k_sh: int) -> Tuple[List[List[int]], List[List[int]], torch.Tensor, float, float]:
    """Row by row with floats: P over the G axis, KL to one-hot / uniform, rank (ties: lower
    index), specific first then shared among the rest, masked softmax of the row's own gate."""
    N, G, E = logits.shape
    specific, shared, kls_sp, kls_sh = [], [], [], []
    gates = torch.zeros(N, E, dtype=logits.dtype)
    for n in range(N):
        L = logits[n].tolist()
        P = [[0.0] * E for _ in range(G)]
        for e in range(E):
            z = sum(math.exp(L[g][e]) for g in range(G))
            for g in range(G):
                P[g][e] = math.exp(L[g][e]) / z
        s = int(target[n])
        kl_sp = [sum((1.0 if g == s else 0.0) * math.log(1.0 / P[g][e]) for g in range(G) if g == s) for e in range(E)]
        kl_sh = [sum((1.0 / G) * math.log((1.0 / G) / P[g][e]) for g in range(G)) for e in range(E)]
        sp = sorted(range(E), key=lambda e: (kl_sp[e], e))[:k_sp]
        sh = sorted((e for e in range(E) if e not in sp), key=lambda e: (kl_sh[e], e))[:k_sh]
        specific.append(sp), shared.append(sh)
        kls_sp += [kl_sp[e] for e in sp]
        kls_sh += [kl_sh[e] for e in sh]
        chosen = sp + sh
        m = max(L[s][e] for e in chosen)
        z = sum(math.exp(L[s][e] - m) for e in chosen)
        for e in chosen:
            gates[n, e] = math.exp(L[s][e] - m) / z
    mean = lambda v: sum(v) / len(v) if v else 0.0
    return specific, shared, gates, mean(kls_sp), mean(kls_sh)


def test_selection_on_a_hand_made_case():
    # G = 2 scenarios, E = 4 experts. Column e is expert e's logits over the scenarios:
    # expert 0 leans to scenario 0, expert 1 is exactly uniform, expert 2 leans hard to
    # scenario 1, expert 3 leans slightly to scenario 1.
    logits = torch.tensor([[[2.0, 0.0, -3.0, 0.0], [0.0, 0.0, 3.0, 0.5]]] * 2, dtype=torch.float64)
    sel = select_experts(logits, torch.tensor([0, 1]), k_specific=1, k_shared=1)
    # row 0 (scenario 0): P[0, e] = sigmoid(2), .5, sigmoid(-6), sigmoid(-.5) -> specific expert 0;
    # closest to uniform: expert 1 (KL 0)
    assert sel.specific.tolist() == [[0], [2]] and sel.shared.tolist() == [[1], [1]]
    # row 0's gate: scenario 0's logits 2.0 (expert 0) and 0.0 (expert 1), softmaxed
    p = 1 / (1 + math.exp(-2.0))
    torch.testing.assert_close(sel.gates[0], torch.tensor([p, 1 - p, 0, 0], dtype=torch.float64))
    kl_sp_row0 = -math.log(1 / (1 + math.exp(-2.0)))
    kl_sp_row1 = -math.log(1 / (1 + math.exp(-6.0)))
    assert sel.kl_specific.item() == pytest.approx((kl_sp_row0 + kl_sp_row1) / 2, abs=1e-12)
    assert sel.kl_shared.item() == pytest.approx(0.0, abs=1e-12)
    # with two shared experts the second closest to uniform among the rest is expert 3 in both
    # rows (logit gap 0.5, against 2 for expert 0 and 6 for expert 2)
    sel2 = select_experts(logits, torch.tensor([0, 1]), k_specific=1, k_shared=2)
    assert sel2.shared.tolist() == [[1, 3], [1, 3]]


@pytest.mark.parametrize("G,E,k_sp,k_sh", [(3, 6, 1, 2), (2, 4, 2, 1), (4, 5, 1, 0), (3, 4, 0, 2), (2, 3, 2, 1)])
def test_selection_equals_the_loop_reference(G, E, k_sp, k_sh):
    torch.manual_seed(G * 10 + E)
    logits = torch.randn(11, G, E, dtype=torch.float64) * 2
    target = torch.randint(0, G, (11,))
    sel = select_experts(logits, target, k_sp, k_sh)
    sp, sh, gates, kl_sp, kl_sh = reference_selection(logits, target, k_sp, k_sh)
    assert sel.specific.tolist() == sp and sel.shared.tolist() == sh
    torch.testing.assert_close(sel.gates, gates, atol=1e-12, rtol=0)
    assert sel.kl_specific.item() == pytest.approx(kl_sp, abs=1e-10)
    assert sel.kl_shared.item() == pytest.approx(kl_sh, abs=1e-10)
    # exactly k_sp + k_sh non-zeros, rows sum to 1, no expert both specific and shared
    assert ((sel.gates > 0).sum(-1) == k_sp + k_sh).all()
    torch.testing.assert_close(sel.gates.sum(-1), torch.ones(11, dtype=torch.float64), atol=1e-12, rtol=0)
    for a, b in zip(sp, sh):
        assert not set(a) & set(b)


def test_ties_go_to_the_lower_expert_index():
    sel = select_experts(torch.zeros(3, 2, 5), torch.tensor([0, 1, 0]), k_specific=2, k_shared=2)
    assert sel.specific.tolist() == [[0, 1]] * 3 and sel.shared.tolist() == [[2, 3]] * 3
    torch.testing.assert_close(sel.gates, torch.tensor([[0.25] * 4 + [0.0]] * 3))


def test_selection_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="k_specific \\+ k_shared"):
        select_experts(torch.zeros(2, 2, 3), torch.tensor([0, 1]), 2, 2)
    with pytest.raises(ConfigError, match="model.scenario_layers: type aesm"):
        build_scenario_layer(LayerConfig(type="aesm", num_experts=3, k_specific=2, k_shared=2), 8, 2, 4, 2)
    with pytest.raises(ConfigError, match="model.task_layers: type aesm"):
        build_task_layer(LayerConfig(type="aesm", num_experts=3, k_specific=0, k_shared=0), 8, 2, 4)


def scenario_layer(E=5, S=3, k_sp=1, k_sh=2, noise=0.5, hidden=(4,)) -> AESMScenarioLayer:
    torch.manual_seed(11)
    return AESMScenarioLayer(6, S, 3, E, k_sp, k_sh, list(hidden), 4, noise=noise).double()


def scenario_inputs(B=10, S=3):
    g = torch.Generator().manual_seed(12)
    return (torch.randn(B, 6, generator=g, dtype=torch.float64), torch.arange(B) % S,
            torch.randn(B, 3, generator=g, dtype=torch.float64))


def test_scenario_layer_equals_reference_in_eval():
    layer = scenario_layer().eval()
    x, s, emb = scenario_inputs()
    out = layer(x, s, emb)
    assert out.y.shape == (10, 4) and out.gates[""].shape == (10, 5) and set(out.aux) == {"kl_specific", "kl_shared"}
    gin = torch.cat([x, emb], dim=1)
    logits = torch.stack([gin @ layer.gate.weight[g] + layer.gate.bias[g] for g in range(3)], dim=1)  # [B, S, E]
    _, _, gates, kl_sp, kl_sh = reference_selection(logits, s, 1, 2)
    torch.testing.assert_close(out.gates[""], gates, atol=ATOL, rtol=0)
    y_ref = sum(gates[:, e : e + 1] * reference_expert(layer.experts, e, x) for e in range(5))
    torch.testing.assert_close(out.y, y_ref, atol=ATOL, rtol=0)
    assert out.aux["kl_specific"].item() == pytest.approx(kl_sp, abs=1e-9)
    assert out.aux["kl_shared"].item() == pytest.approx(kl_sh, abs=1e-9)


def test_noise_only_in_training():
    layer = scenario_layer(noise=2.0)
    x, s, emb = scenario_inputs(B=64)
    layer.eval()
    y1, y2 = layer(x, s, emb).y, layer(x, s, emb).y
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)
    layer.train()
    torch.manual_seed(0)
    train_sel = [layer(x, s, emb).gates[""] for _ in range(3)]
    # strong noise changes the selection of some rows between training calls and against eval
    assert any(not torch.equal(g > 0, train_sel[0] > 0) for g in train_sel[1:])
    eval_gates = layer.eval()(x, s, emb).gates[""]
    assert not torch.equal(train_sel[0] > 0, eval_gates > 0)
    # the selection noise has std noise * E: reproduce one training call with the same draws
    layer.train()
    torch.manual_seed(7)
    got = layer(x, s, emb).gates[""]
    logits = layer.gate.logits(torch.cat([x, emb], dim=1))
    torch.manual_seed(7)
    eps = torch.randn_like(logits)
    log_p = torch.log_softmax(logits + 2.0 * 5 * eps, dim=1)
    kl_sp = -log_p[torch.arange(64), s]
    sp = kl_sp.argmin(dim=1)
    kl_sh = (-math.log(3) - log_p.mean(dim=1)).scatter(1, sp[:, None], float("inf"))
    sh = kl_sh.topk(2, largest=False).indices
    chosen = torch.zeros(64, 5, dtype=torch.bool).scatter(1, sp[:, None], True).scatter(1, sh, True)
    assert torch.equal(got > 0, chosen)
    # rows always keep exactly k_sp + k_sh experts and sum to 1, noise or not
    for g in train_sel + [eval_gates]:
        assert ((g > 0).sum(-1) == 3).all()
        torch.testing.assert_close(g.sum(-1), torch.ones(64, dtype=torch.float64), atol=1e-12, rtol=0)


def test_aux_losses_are_differentiable_and_reach_the_gate_only():
    layer = scenario_layer().train()
    out = layer(*scenario_inputs())
    (out.aux["kl_specific"] + out.aux["kl_shared"]).backward()
    assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0
    assert layer.gate.bias.grad.abs().sum() > 0
    assert all(p.grad is None for p in layer.experts.parameters())
    # each term on its own also has a gradient
    for name in ("kl_specific", "kl_shared"):
        layer.zero_grad()
        layer(*scenario_inputs()).aux[name].backward()
        assert layer.gate.weight.grad.abs().sum() > 0, name


def test_minimising_the_aux_losses_separates_specific_and_shared_experts():
    """A few steps on kl_specific + kl_shared alone: the selected specific experts' distributions
    move towards the one-hot vector and the shared ones towards uniform."""
    layer = scenario_layer(E=4, S=2, k_sp=1, k_sh=1, noise=0.0, hidden=()).train()
    x, s, emb = scenario_inputs(B=32, S=2)
    opt = torch.optim.SGD(layer.gate.parameters(), lr=0.5)
    first = None
    for _ in range(30):
        out = layer(x, s, emb)
        loss = out.aux["kl_specific"] + out.aux["kl_shared"]
        first = loss.item() if first is None else first
        opt.zero_grad(), loss.backward(), opt.step()
    assert loss.item() < 0.5 * first


def task_layer(T=3, E=5, k_sp=1, k_sh=1) -> AESMTaskLayer:
    torch.manual_seed(13)
    return AESMTaskLayer(6, T, 4, E, k_sp, k_sh, [4], 3, noise=0.3, task_emb_dim=2).double()


@pytest.mark.parametrize("stacked", [False, True])
def test_task_layer_equals_reference_in_eval(stacked):
    T, E, B = 3, 5, 7
    layer = task_layer(T, E).eval()
    g = torch.Generator().manual_seed(14)
    x = torch.randn(T, B, 6, generator=g, dtype=torch.float64) if stacked else torch.randn(B, 6, generator=g, dtype=torch.float64)
    ctx = torch.randn(B, 4, generator=g, dtype=torch.float64)
    out = layer(x, ctx)
    assert out.y.shape == (T, B, 3) and out.gates[""].shape == (B, T, E)
    kl_sp_all, kl_sh_all = [], []
    for t in range(T):
        xt = x[t] if stacked else x
        gin = torch.cat([xt, ctx, layer.task_emb[t].expand(B, 2)], dim=1)
        logits = torch.stack([gin @ layer.gate.weight[j] + layer.gate.bias[j] for j in range(T)], dim=1)  # [B, G=T, E]
        _, _, gates, kl_sp, kl_sh = reference_selection(logits, torch.full((B,), t), 1, 1)
        kl_sp_all.append(kl_sp), kl_sh_all.append(kl_sh)
        torch.testing.assert_close(out.gates[""][:, t], gates, atol=ATOL, rtol=0)
        y_ref = sum(gates[:, e : e + 1] * reference_expert(layer.experts, e, xt) for e in range(E))
        torch.testing.assert_close(out.y[t], y_ref, atol=ATOL, rtol=0)
    assert out.aux["kl_specific"].item() == pytest.approx(sum(kl_sp_all) / T, abs=1e-9)
    assert out.aux["kl_shared"].item() == pytest.approx(sum(kl_sh_all) / T, abs=1e-9)
    assert ((out.gates[""] > 0).sum(-1) == 2).all()


def test_task_layer_noise_only_in_training_and_gradients():
    layer = task_layer()
    layer.noise = 3.0
    x, ctx = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 4, dtype=torch.float64)
    layer.eval()
    torch.testing.assert_close(layer(x, ctx).y, layer(x, ctx).y, atol=0, rtol=0)
    layer.train()
    a, b = layer(x, ctx), layer(x, ctx)
    assert not torch.equal(a.gates[""] > 0, b.gates[""] > 0)
    loss = (a.y * torch.randn_like(a.y)).sum() + a.aux["kl_specific"] + a.aux["kl_shared"]
    loss.backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_builders_pass_the_config():
    lc = LayerConfig(type="aesm", num_experts=6, k_specific=2, k_shared=1, noise=0.05, hidden=[8], out_dim=5, task_emb_dim=3)
    s = build_scenario_layer(dataclasses.replace(lc, task_emb_dim=LayerConfig().task_emb_dim), 10, 4, 2, 2)  # a task-layer field
    assert (s.num_scenarios, s.num_experts, s.k_specific, s.k_shared, s.noise, s.out_dim) == (4, 6, 2, 1, 0.05, 5)
    t = build_task_layer(lc, 10, 2, 6)
    assert t.task_emb.shape == (2, 3) and t.gate.weight.shape == (2, 10 + 6 + 3, 6)
