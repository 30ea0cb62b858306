"""Unit tests for dlrm_mtl.modules: ExpertBank, SoftmaxGate, ScenarioCGCLayer, DotInteraction, MLP (task layers: test_task_layers.py)."""

from __future__ import annotations

import itertools
from typing import List

import pytest
import torch
from torch import nn

from dlrm_mtl.modules import DotInteraction, ExpertBank, MLP, ScenarioCGCLayer, SoftmaxGate

ATOL = 1e-6


# ---------------------------------------------------------------------------- references


def reference_experts(bank: ExpertBank) -> List[nn.Sequential]:
    """E independent nn.Linear+ReLU MLPs holding copies of the bank's weights."""
    experts = []
    for e in range(bank.num_experts):
        layers: List[nn.Module] = []
        for w, b in zip(bank.weights, bank.biases):
            a, k = w.shape[1], w.shape[2]
            lin = nn.Linear(a, k).to(w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w[e].detach().T)  # bank computes x @ W[e], Linear computes x @ weight.T
                lin.bias.copy_(b[e].detach())
            layers += [lin, nn.ReLU()]
        experts.append(nn.Sequential(*layers))
    return experts


def reference_bank_output(bank: ExpertBank, x: torch.Tensor) -> torch.Tensor:
    """[B, E, out] from a Python loop over the reference experts."""
    return torch.stack([m(x) for m in reference_experts(bank)], dim=1)


def reference_expert(bank: ExpertBank, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of the bank applied to x, by explicit matmuls (independent of the bank's einsum)."""
    h = x
    for w, b in zip(bank.weights, bank.biases):
        h = torch.relu(h @ w[e] + b[e])
    return h


def reference_gate_logits(gate: SoftmaxGate, x: torch.Tensor) -> torch.Tensor:
    """[B, G, E] by one matmul per gate (x [B, in] shared, or [G, B, in] per gate)."""
    return torch.stack([(x if x.dim() == 2 else x[g]) @ gate.weight[g] + gate.bias[g] for g in range(gate.num_gates)], dim=1)


# ---------------------------------------------------------------------------- ExpertBank


@pytest.mark.parametrize("hidden", [[], [8, 4]])
def test_expert_bank_equals_loop_of_independent_mlps(hidden):
    torch.manual_seed(0)
    bank = ExpertBank(5, in_dim=7, hidden=hidden, out_dim=3).double()
    x = torch.randn(11, 7, dtype=torch.float64)
    y = bank(x)
    assert y.shape == (11, 5, 3)
    ref = reference_bank_output(bank, x)
    torch.testing.assert_close(y, ref, atol=ATOL, rtol=0)
    # not trivially zero (ReLU everywhere): some output must be positive
    assert (y > 0).any()


@pytest.mark.parametrize("hidden", [[], [8, 4]])
def test_expert_bank_float32_close_to_loop(hidden):
    torch.manual_seed(1)
    bank = ExpertBank(4, in_dim=6, hidden=hidden, out_dim=5)
    x = torch.randn(9, 6)
    torch.testing.assert_close(bank(x), reference_bank_output(bank, x), atol=1e-5, rtol=1e-5)


def test_expert_bank_experts_are_distinct():
    """Each expert uses its own weights: the experts' outputs differ."""
    torch.manual_seed(2)
    bank = ExpertBank(3, in_dim=6, hidden=[8], out_dim=4).double()
    y = bank(torch.randn(10, 6, dtype=torch.float64))
    for a, b in itertools.combinations(range(3), 2):
        assert not torch.allclose(y[:, a], y[:, b])


@pytest.mark.parametrize("hidden", [[], [8, 4]])
@pytest.mark.parametrize("start,count", [(0, 1), (1, 2), (2, 3), (4, 1), (0, 5), (3, None)])
def test_expert_bank_subset_equals_slice(hidden, start, count):
    torch.manual_seed(3)
    bank = ExpertBank(5, in_dim=7, hidden=hidden, out_dim=3).double()
    x = torch.randn(6, 7, dtype=torch.float64)
    full = bank(x)
    sub = bank(x, start=start, count=count)
    end = 5 if count is None else start + count
    assert sub.shape == (6, end - start, 3)
    torch.testing.assert_close(sub, full[:, start:end], atol=ATOL, rtol=0)


@pytest.mark.parametrize("hidden", [[], [8, 4]])
def test_expert_bank_per_expert_inputs_equal_loop(hidden):
    """x [B, E, in]: expert e reads x[:, e] (PLE's task experts on their task's input)."""
    torch.manual_seed(12)
    bank = ExpertBank(4, in_dim=6, hidden=hidden, out_dim=3).double()
    x = torch.randn(9, 4, 6, dtype=torch.float64)
    y = bank(x)
    ref = torch.stack([reference_expert(bank, e, x[:, e]) for e in range(4)], dim=1)
    torch.testing.assert_close(y, ref, atol=ATOL, rtol=0)
    sub = bank(x[:, 1:3], start=1, count=2)
    torch.testing.assert_close(sub, ref[:, 1:3], atol=ATOL, rtol=0)


def test_expert_bank_gradients_reach_all_layers():
    torch.manual_seed(4)
    bank = ExpertBank(3, in_dim=5, hidden=[6], out_dim=2)
    bank(torch.randn(16, 5)).sum().backward()
    for p in list(bank.weights) + list(bank.biases):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_expert_bank_empty_batch():
    bank = ExpertBank(3, in_dim=5, hidden=[6], out_dim=2)
    y = bank(torch.randn(0, 5))
    assert y.shape == (0, 3, 2)


# ---------------------------------------------------------------------------- SoftmaxGate


def test_softmax_gate_shape_and_normalized():
    torch.manual_seed(5)
    gate = SoftmaxGate(10, num_gates=3, num_experts=4)
    g = gate(torch.randn(7, 10))
    assert g.shape == (7, 3, 4)
    torch.testing.assert_close(g.sum(-1), torch.ones(7, 3), atol=1e-6, rtol=0)
    assert (g > 0).all()


def test_softmax_gate_matches_manual_softmax():
    torch.manual_seed(6)
    gate = SoftmaxGate(4, num_gates=2, num_experts=3).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    logits = torch.stack([x @ gate.weight[g] + gate.bias[g] for g in range(2)], dim=1)  # [B, G, E]
    expected = torch.exp(logits)
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(gate(x), expected, atol=ATOL, rtol=0)
    # per-gate inputs: gate g reads xs[g]
    xs = torch.randn(2, 5, 4, dtype=torch.float64)
    per = torch.softmax(torch.stack([xs[g] @ gate.weight[g] + gate.bias[g] for g in range(2)], dim=1), dim=-1)
    torch.testing.assert_close(gate(xs), per, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------- ScenarioCGCLayer


def make_scenario_layer(num_shared=2, num_specific=2, hidden=(6,), S=3, in_dim=5, emb=3, out=4, seed=7):
    torch.manual_seed(seed)
    return ScenarioCGCLayer(in_dim, num_scenarios=S, emb_dim=emb, num_shared=num_shared,
                         num_specific=num_specific, hidden=list(hidden), out_dim=out).double()


def manual_scenario_output(layer: ScenarioCGCLayer, x, scenario, emb):
    """Per row: gate(x ⊕ emb) row of its scenario applied to [shared experts, own specific experts]."""
    B = x.shape[0]
    E = layer.num_shared + layer.num_specific
    if layer.gate is None:  # a single expert: weight 1
        gate_logits = x.new_zeros(B, layer.num_scenarios, 1)
    else:
        gate_logits = reference_gate_logits(layer.gate, torch.cat([x, emb], dim=1))  # [B, S, E]
    ys, gs = [], []
    for b in range(B):
        s = int(scenario[b])
        lg = gate_logits[b, s]
        g = torch.softmax(lg, dim=0)
        outs = []
        for k in range(layer.num_shared):
            outs.append(reference_expert(layer.shared, k, x[b : b + 1])[0])
        for j in range(layer.num_specific):
            outs.append(reference_expert(layer.specific, s * layer.num_specific + j, x[b : b + 1])[0])
        ys.append(sum(g[k] * outs[k] for k in range(E)))
        gs.append(g)
    return torch.stack(ys), torch.stack(gs)


@pytest.mark.parametrize("num_shared,num_specific", [(2, 2), (0, 1), (1, 0), (1, 3)])
def test_scenario_layer_shape_gates_and_manual_formula(num_shared, num_specific):
    layer = make_scenario_layer(num_shared, num_specific)
    B = 9
    x = torch.randn(B, 5, dtype=torch.float64)
    scenario = torch.tensor([0, 1, 2, 0, 2, 1, 1, 0, 2])
    emb = torch.randn(B, 3, dtype=torch.float64)
    y, gates = layer(x, scenario, emb)[:2]
    gates = gates[""]
    assert y.shape == (B, 4)
    assert gates.shape == (B, num_shared + num_specific)
    torch.testing.assert_close(gates.sum(-1), torch.ones(B, dtype=torch.float64), atol=1e-6, rtol=0)
    y_ref, g_ref = manual_scenario_output(layer, x, scenario, emb)
    torch.testing.assert_close(gates, g_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=0)


def test_scenario_layer_uses_own_scenario_gate_and_experts():
    """The same x gives different outputs under different scenario ids (own gate row / own experts)."""
    layer = make_scenario_layer()
    x = torch.randn(1, 5, dtype=torch.float64).repeat(3, 1)
    emb = torch.randn(1, 3, dtype=torch.float64).repeat(3, 1)
    y, gates = layer(x, torch.tensor([0, 1, 2]), emb)[:2]
    gates = gates[""]
    assert not torch.allclose(gates[0], gates[1]) and not torch.allclose(gates[1], gates[2])
    assert not torch.allclose(y[0], y[1]) and not torch.allclose(y[1], y[2])


def test_scenario_layer_routing_gradients():
    """Backprop only rows of scenario 0: only scenario 0's specific experts receive gradient."""
    layer = make_scenario_layer(num_shared=1, num_specific=2, S=3)
    B = 12
    x = torch.randn(B, 5, dtype=torch.float64)
    scenario = torch.tensor([0, 1, 2] * 4)
    emb = torch.randn(B, 3, dtype=torch.float64)
    y = layer(x, scenario, emb).y
    rows0 = scenario == 0
    y[rows0].pow(2).sum().backward()
    E_sp = layer.num_specific
    for w in list(layer.specific.weights) + list(layer.specific.biases):
        g = w.grad
        assert g is not None
        assert g[0:E_sp].abs().sum() > 0, "scenario 0's specific experts must get gradient"
        assert torch.all(g[E_sp : 2 * E_sp] == 0), "scenario 1's specific experts must get no gradient"
        assert torch.all(g[2 * E_sp : 3 * E_sp] == 0), "scenario 2's specific experts must get no gradient"
    # the shared experts are used by every row
    for w in layer.shared.weights:
        assert w.grad.abs().sum() > 0
    # gate: only the logits of scenario 0's gate receive gradient
    E = layer.num_shared + layer.num_specific
    gw = layer.gate.weight.grad  # [S, in, E]
    assert gw[0].abs().sum() > 0
    assert torch.all(gw[1:] == 0)


def test_scenario_layer_output_of_row_independent_of_other_scenarios_specific_weights():
    layer = make_scenario_layer(num_shared=1, num_specific=1, S=3)
    x = torch.randn(6, 5, dtype=torch.float64)
    scenario = torch.tensor([0, 1, 2, 0, 1, 2])
    emb = torch.randn(6, 3, dtype=torch.float64)
    y0 = layer(x, scenario, emb).y
    with torch.no_grad():
        for w in layer.specific.weights:
            w[1].add_(torch.randn_like(w[1]))  # perturb scenario 1's expert
    y1 = layer(x, scenario, emb).y
    keep = scenario != 1
    torch.testing.assert_close(y1[keep], y0[keep], atol=ATOL, rtol=0)
    assert not torch.allclose(y1[~keep], y0[~keep])


def test_scenario_layer_scenario_without_rows():
    layer = make_scenario_layer(num_shared=1, num_specific=2, S=3)
    x = torch.randn(4, 5, dtype=torch.float64)
    scenario = torch.tensor([0, 2, 2, 0])  # scenario 1 has no rows
    emb = torch.randn(4, 3, dtype=torch.float64)
    y, gates = layer(x, scenario, emb)[:2]
    gates = gates[""]
    y_ref, g_ref = manual_scenario_output(layer, x, scenario, emb)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(gates, g_ref, atol=ATOL, rtol=0)


def test_scenario_layer_scenario_without_rows_shared_only():
    """With no specific experts there is no per-scenario bank call: missing scenarios are fine."""
    layer = make_scenario_layer(num_shared=2, num_specific=0, S=3)
    x = torch.randn(4, 5, dtype=torch.float64)
    scenario = torch.tensor([0, 2, 2, 0])
    emb = torch.randn(4, 3, dtype=torch.float64)
    y, gates = layer(x, scenario, emb)[:2]
    gates = gates[""]
    y_ref, g_ref = manual_scenario_output(layer, x, scenario, emb)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=0)


def test_scenario_layer_rejects_no_experts():
    with pytest.raises(ValueError):
        ScenarioCGCLayer(4, 2, 2, num_shared=0, num_specific=0, hidden=[], out_dim=3)


# ---------------------------------------------------------------------------- DotInteraction


@pytest.mark.parametrize("F,D", [(1, 3), (4, 5), (6, 16)])
def test_dot_interaction_out_dim_and_values(F, D):
    torch.manual_seed(9)
    inter = DotInteraction(num_features=F, dim=D)
    B = 4
    dense = torch.randn(B, D, dtype=torch.float64)
    sparse = torch.randn(B, F, D, dtype=torch.float64)
    out = inter(dense, sparse)
    n = F + 1
    assert inter.out_dim == D + F * D + n * (n - 1) // 2
    assert out.shape == (B, inter.out_dim)
    torch.testing.assert_close(out[:, :D], dense, atol=0, rtol=0)
    torch.testing.assert_close(out[:, D : D + F * D], sparse.reshape(B, F * D), atol=0, rtol=0)
    dots = out[:, D + F * D :]
    for b in range(B):
        vecs = [dense[b]] + [sparse[b, f] for f in range(F)]
        expected = [float((vecs[i] * vecs[j]).sum()) for i in range(n) for j in range(i + 1, n)]
        torch.testing.assert_close(dots[b], torch.tensor(expected, dtype=torch.float64), atol=1e-9, rtol=0)


def test_dot_interaction_hand_values():
    inter = DotInteraction(num_features=2, dim=2)
    dense = torch.tensor([[1.0, 2.0]])
    sparse = torch.tensor([[[3.0, 4.0], [5.0, -1.0]]])
    out = inter(dense, sparse)
    # pairs (dense,s0)=11, (dense,s1)=3, (s0,s1)=11
    assert out.tolist() == [[1.0, 2.0, 3.0, 4.0, 5.0, -1.0, 11.0, 3.0, 11.0]]


# ---------------------------------------------------------------------------- MLP


def test_mlp_matches_manual_and_out_dim():
    torch.manual_seed(10)
    mlp = MLP(5, [7, 3]).double()
    assert mlp.out_dim == 3
    x = torch.randn(6, 5, dtype=torch.float64)
    lins = [m for m in mlp.net if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lins] == [(5, 7), (7, 3)]
    h = torch.relu(x @ lins[0].weight.T + lins[0].bias)
    h = torch.relu(h @ lins[1].weight.T + lins[1].bias)
    torch.testing.assert_close(mlp(x), h, atol=ATOL, rtol=0)


def test_mlp_last_activation_false():
    torch.manual_seed(11)
    mlp = MLP(4, [6, 5], last_activation=False).double()
    x = torch.randn(50, 4, dtype=torch.float64)
    lins = [m for m in mlp.net if isinstance(m, nn.Linear)]
    h = torch.relu(x @ lins[0].weight.T + lins[0].bias)
    expected = h @ lins[1].weight.T + lins[1].bias
    y = mlp(x)
    torch.testing.assert_close(y, expected, atol=ATOL, rtol=0)
    assert (y < 0).any()
    assert sum(isinstance(m, nn.ReLU) for m in mlp.net) == 1


def test_mlp_empty_layers_is_identity():
    mlp = MLP(4, [])
    assert mlp.out_dim == 4
    x = torch.randn(3, 4)
    assert torch.equal(mlp(x), x)


def test_concat_interaction_and_dense_arch_reads_pooled_in_schema_order():
    """model.interaction=concat: x = [raw dense (dense_arch []), pooled embeddings in schema
    order, scenario embeddings]; pooled_in_order gathers by key when the KeyedTensor's order
    differs from the schema's."""
    from torchrec.sparse.jagged_tensor import KeyedTensor

    from dlrm_mtl.config import ModelConfig
    from dlrm_mtl.models.ranking_model import DenseArch, pooled_in_order
    from dlrm_mtl.modules import ConcatInteraction
    from dlrm_mtl.schema import DenseFeature, ScenarioLevel, Schema, SparseFeature, Task

    inter = ConcatInteraction(3, 10)
    d, s = torch.randn(4, 3), torch.randn(4, 2, 5)
    assert torch.equal(inter(d, s), torch.cat([d, s[:, 0], s[:, 1]], 1)) and inter.out_dim == 13
    kt = KeyedTensor(keys=["b", "a"], length_per_key=[2, 3], values=torch.arange(20.0).view(4, 5))
    assert torch.equal(pooled_in_order(kt, ["a", "b"]), torch.cat([kt.values()[:, 2:], kt.values()[:, :2]], 1))
    assert pooled_in_order(kt, ["b", "a"]) is kt.values() or torch.equal(pooled_in_order(kt, ["b", "a"]), kt.values())
    schema = Schema("c", [SparseFeature("a", "ta", 10, 3), SparseFeature("b", "tb", 10, 2)], [DenseFeature("x"), DenseFeature("y")],
                    [ScenarioLevel("s", 2)], [Task("t", "t")])
    arch = DenseArch(schema, ModelConfig(interaction="concat", dense_arch=[], scenario_emb_dim=4, scenario_layers=[], task_layers=[], tower=[]))
    assert arch.interaction.out_dim == 2 + 5
    assert arch.towers.weights[0].shape == (1, 2 + 5 + 4, 1)  # dense, embeddings, scenario embedding
    logits, _, _ = arch(torch.randn(6, 5), torch.randn(6, 2), torch.zeros(6, 1, dtype=torch.long))
    assert logits.shape == (6, 1)
    with pytest.raises(ValueError, match="dot needs one embedding dim"):
        DenseArch(schema, ModelConfig(interaction="dot"))


@pytest.mark.parametrize("hidden,shared", [([5], False), ([5], True), ([5, 4], False), ([5, 4], True), ([], True),
                                           ([5], "2d"), ([], "2d")])
def test_task_towers_equal_one_mlp_per_task(hidden, shared):
    """TaskTowers (stacked weights: one baddbmm per hidden layer, one addmm for a shared
    input's first layer, product-and-sum logits) equals T separate Linear-ReLU-...-Linear
    towers with the same weights, outputs and gradients (also for the input's gradient when
    every tower reads the same ``[B, d]``, passed as a stride-0 ``expand`` or as it is)."""
    from dlrm_mtl.modules import TaskTowers

    torch.manual_seed(0)
    towers = TaskTowers(3, 6, hidden).double()
    base = torch.randn(11, 6, dtype=torch.float64, requires_grad=True) if shared else None
    x = base.expand(3, 11, 6) if shared else torch.randn(3, 11, 6, dtype=torch.float64, requires_grad=True)
    leaf = base if shared else x
    out = towers(base if shared == "2d" else x)  # "2d": the shared [B, d] itself
    assert out.shape == (11, 3)
    ref = []
    for t in range(3):
        h = x[t]
        for i, (w_, b_) in enumerate(zip(towers.weights, towers.biases)):
            h = h @ w_[t] + b_[t]
            if i < len(towers.weights) - 1:
                h = torch.relu(h)
        ref.append(h)
    ref = torch.cat(ref, dim=1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(out)
    ga = torch.autograd.grad((out * w).sum(), [leaf, *towers.parameters()])
    gb = torch.autograd.grad((ref * w).sum(), [leaf, *towers.parameters()])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    bound = 1 / 6 ** 0.5  # nn.Linear's init range
    assert towers.weights[0].abs().max() <= bound and towers.biases[0].abs().max() <= bound
