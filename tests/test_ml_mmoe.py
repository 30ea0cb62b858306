"""ML-MMoE (multi-level MMoE, the PLE paper's baseline) against a loop over levels, gates and experts."""

from __future__ import annotations

import pytest
import torch

from dlrm_mtl.modules import MMoELayer, MultiLevelMMoELayer

from test_modules import ATOL, reference_expert, reference_gate_logits


def reference_ml_mmoe(layer: MultiLevelMMoELayer, x: torch.Tensor):
    """Level by level: expert j of level l reads Σ_i g_j(x)_i h_i of level l-1 (loops over j, i)."""
    T, E = layer.num_tasks, layer.num_experts
    task_in = x.unsqueeze(0).expand(T, *x.shape) if x.dim() == 2 else x
    shared_in = x if x.dim() == 2 else x.mean(0)
    h = [reference_expert(layer.banks[0], e, shared_in) for e in range(E)]
    for l, gate in enumerate(layer.inner_gates):
        g = torch.softmax(reference_gate_logits(gate, shared_in), dim=-1)  # [B, E_next, E]
        inputs = [sum(g[:, j, i : i + 1] * h[i] for i in range(E)) for j in range(E)]
        h = [reference_expert(layer.banks[l + 1], j, inputs[j]) for j in range(E)]
    g = torch.softmax(reference_gate_logits(layer.task_gate, task_in), dim=-1)  # [B, T, E]
    return torch.stack([sum(g[:, t, i : i + 1] * h[i] for i in range(E)) for t in range(T)])


@pytest.mark.parametrize("levels,hidden,stacked", [(1, [], False), (2, [5], False), (3, [], True)])
def test_ml_mmoe_equals_loop_reference(levels, hidden, stacked):
    torch.manual_seed(20 + levels)
    T, E = 2, 3
    layer = MultiLevelMMoELayer(6, T, E, hidden, 4, levels=levels).double()
    x = torch.randn(T, 7, 6, dtype=torch.float64) if stacked else torch.randn(7, 6, dtype=torch.float64)
    out = layer(x)
    assert out.y.shape == (T, 7, 4)
    assert set(out.gates) == {f"level{l}" for l in range(levels - 1)} | {"task"}
    for name, g in out.gates.items():
        assert g.shape == ((7, T, E) if name == "task" else (7, E, E))
        torch.testing.assert_close(g.sum(-1), torch.ones(g.shape[:-1], dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(out.y, reference_ml_mmoe(layer, x), atol=ATOL, rtol=0)


def test_one_level_ml_mmoe_is_mmoe_with_the_same_weights():
    torch.manual_seed(23)
    ml = MultiLevelMMoELayer(6, 3, 4, [5], 4, levels=1).double()
    mmoe = MMoELayer(6, 3, 4, [5], 4).double()
    mmoe.experts.load_state_dict(ml.banks[0].state_dict())
    mmoe.gate.load_state_dict(ml.task_gate.state_dict())
    x = torch.randn(9, 6, dtype=torch.float64)
    torch.testing.assert_close(ml(x).y, mmoe(x).y, atol=ATOL, rtol=0)


def test_ml_mmoe_gradients_reach_every_parameter():
    torch.manual_seed(24)
    layer = MultiLevelMMoELayer(6, 2, 3, [4], 4, levels=3)
    y = layer(torch.randn(16, 6)).y
    (y * torch.randn_like(y)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_ml_mmoe_rejects_zero_levels():
    with pytest.raises(ValueError, match="levels >= 1"):
        MultiLevelMMoELayer(6, 2, 3, [], 4, levels=0)
