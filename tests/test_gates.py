"""Noisy and top-K gates (Shazeer et al. 2017) and their use in MMoE/OMoE, against hand-written references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dlrm_mtl.config import ConfigError, LayerConfig
from dlrm_mtl.models.arch import build_task_layer
from dlrm_mtl.modules import MMoELayer, NoisyGate, SoftmaxGate, TopKGate, keep_top_k, make_gate
from dlrm_mtl.modules.softmax import SMALL_AXIS, softmax_last

from test_modules import ATOL, reference_expert, reference_gate_logits


def reference_top_k_softmax(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Row by row: sort, keep the k largest, softmax over them by hand, zeros elsewhere."""
    out = torch.zeros_like(logits)
    flat_in, flat_out = logits.reshape(-1, logits.shape[-1]), out.view(-1, logits.shape[-1])
    for r in range(flat_in.shape[0]):
        row = flat_in[r].tolist()
        kept = sorted(range(len(row)), key=lambda i: -row[i])[:k]
        m = max(row[i] for i in kept)
        z = sum(math.exp(row[i] - m) for i in kept)
        for i in kept:
            flat_out[r, i] = math.exp(row[i] - m) / z
    return out


@pytest.mark.parametrize("k", [1, 2, 4])
def test_keep_top_k_softmax_keeps_exactly_k_and_renormalises(k):
    torch.manual_seed(0)
    logits = torch.randn(6, 3, 4, dtype=torch.float64)
    w = torch.softmax(keep_top_k(logits, k), dim=-1)
    assert ((w > 0).sum(-1) == k).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(6, 3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(w, reference_top_k_softmax(logits, k), atol=1e-12, rtol=0)


def test_keep_top_k_keeps_exactly_k_under_ties():
    w = torch.softmax(keep_top_k(torch.zeros(5, 6), 2), dim=-1)
    assert ((w > 0).sum(-1) == 2).all()
    torch.testing.assert_close(w.max(-1).values, torch.full((5,), 0.5))


def test_keep_top_k_rejects_bad_k():
    with pytest.raises(ValueError, match="top_k"):
        keep_top_k(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="top_k"):
        TopKGate(4, 1, 3, top_k=0)


@pytest.mark.parametrize("per_gate_input", [False, True])
def test_top_k_gate_equals_reference(per_gate_input):
    torch.manual_seed(1)
    gate = TopKGate(5, num_gates=3, num_experts=5, top_k=2).double()
    x = torch.randn(3, 7, 5, dtype=torch.float64) if per_gate_input else torch.randn(7, 5, dtype=torch.float64)
    w = gate(x)
    assert w.shape == (7, 3, 5)
    torch.testing.assert_close(w, reference_top_k_softmax(reference_gate_logits(gate, x), 2), atol=ATOL, rtol=0)


def reference_noisy_logits(gate: NoisyGate, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Shazeer eq. 4 with given standard-normal draws eps [B, G, E], one matmul per gate."""
    cols = []
    for g in range(gate.num_gates):
        xg = x if x.dim() == 2 else x[g]
        clean = xg @ gate.weight[g] + gate.bias[g]
        std = F.softplus(xg @ gate.noise_weight[g] + gate.noise_bias[g])
        cols.append(clean + gate.noise * eps[:, g] * std)
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("top_k", [0, 2])
def test_noisy_gate_training_equals_eq_4_and_5_with_the_same_draws(top_k):
    torch.manual_seed(2)
    gate = NoisyGate(5, num_gates=2, num_experts=4, top_k=top_k, noise=0.7).double()
    with torch.no_grad():  # non-trivial noise weights
        gate.noise_weight.normal_()
        gate.noise_bias.normal_()
    x = torch.randn(9, 5, dtype=torch.float64)
    gate.train()
    torch.manual_seed(5)
    w = gate(x)
    torch.manual_seed(5)
    eps = torch.randn(9, 2, 4, dtype=torch.float64)  # the draws randn_like made
    h = reference_noisy_logits(gate, x, eps)
    ref = reference_top_k_softmax(h, top_k) if top_k else torch.softmax(h, dim=-1)
    torch.testing.assert_close(w, ref, atol=ATOL, rtol=0)
    if top_k:
        assert ((w > 0).sum(-1) == top_k).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(9, 2, dtype=torch.float64), atol=1e-12, rtol=0)
    # noise is really there: two training calls differ
    assert not torch.allclose(gate(x), gate(x))


@pytest.mark.parametrize("top_k", [0, 3])
def test_noisy_gate_eval_is_deterministic_and_noiseless(top_k):
    torch.manual_seed(3)
    gate = NoisyGate(5, num_gates=2, num_experts=4, top_k=top_k).double().eval()
    with torch.no_grad():
        gate.noise_weight.normal_()
    x = torch.randn(9, 5, dtype=torch.float64)
    w1, w2 = gate(x), gate(x)
    torch.testing.assert_close(w1, w2, atol=0, rtol=0)
    clean = reference_gate_logits(gate, x)
    ref = reference_top_k_softmax(clean, top_k) if top_k else torch.softmax(clean, dim=-1)
    torch.testing.assert_close(w1, ref, atol=ATOL, rtol=0)


def test_noisy_gate_gradients_reach_gate_and_noise_weights():
    torch.manual_seed(4)
    gate = NoisyGate(5, num_gates=2, num_experts=4, top_k=2).train()
    w = gate(torch.randn(16, 5))
    (w * torch.randn_like(w)).sum().backward()
    for name, p in gate.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_make_gate_kinds():
    assert type(make_gate("softmax", 4, 2, 3)) is SoftmaxGate
    assert isinstance(make_gate("noisy", 4, 2, 3, top_k=1), NoisyGate)
    assert isinstance(make_gate("topk", 4, 2, 3, top_k=1), TopKGate)
    with pytest.raises(ValueError, match="unknown gate 'sparse'"):
        make_gate("sparse", 4, 2, 3)


@pytest.mark.parametrize("one_gate", [False, True])
def test_mmoe_with_top_k_gate_equals_manual_formula(one_gate):
    torch.manual_seed(6)
    T, E, k = 3, 5, 2
    mmoe = MMoELayer(6, num_tasks=T, num_experts=E, hidden=[4], out_dim=3, one_gate=one_gate, gate="topk", top_k=k).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    out = mmoe(x)
    g = out.gates[""]
    assert g.shape == (8, 1 if one_gate else T, E) and ((g > 0).sum(-1) == k).all()
    g_ref = reference_top_k_softmax(reference_gate_logits(mmoe.gate, x), k)
    torch.testing.assert_close(g, g_ref, atol=ATOL, rtol=0)
    experts = [reference_expert(mmoe.experts, e, x) for e in range(E)]
    for t in range(T):
        gt = g_ref[:, 0 if one_gate else t]
        torch.testing.assert_close(out.y[t], sum(gt[:, e : e + 1] * experts[e] for e in range(E)), atol=ATOL, rtol=0)


def test_mmoe_with_noisy_gate_in_eval_equals_softmax_mmoe_with_the_same_weights():
    torch.manual_seed(7)
    noisy = MMoELayer(6, num_tasks=2, num_experts=4, hidden=[], out_dim=3, gate="noisy").double()
    plain = MMoELayer(6, num_tasks=2, num_experts=4, hidden=[], out_dim=3).double()
    plain.load_state_dict({k: v for k, v in noisy.state_dict().items() if "noise" not in k})
    x = torch.randn(8, 6, dtype=torch.float64)
    noisy.eval()
    torch.testing.assert_close(noisy(x).y, plain(x).y, atol=ATOL, rtol=0)
    noisy.train()
    assert not torch.allclose(noisy(x).y, plain(x).y)


@pytest.mark.parametrize("kw,match", [
    (dict(gate="sparse"), "gate 'sparse' is not one of"),
    (dict(gate="topk", top_k=0), "topk needs 1 <= top_k <= num_experts"),
    (dict(gate="topk", top_k=9), "topk needs 1 <= top_k <= num_experts"),
])
def test_bad_gate_config_names_the_key(kw, match):
    with pytest.raises(ConfigError, match=match):
        build_task_layer(LayerConfig(type="mmoe", num_experts=4, **kw), 8, 2, 4)


def test_gate_config_reaches_the_layer():
    layer = build_task_layer(LayerConfig(type="omoe", num_experts=4, gate="noisy", top_k=2, noise=0.5), 8, 2, 4)
    assert isinstance(layer.gate, NoisyGate) and layer.gate.top_k == 2 and layer.gate.noise == 0.5


@pytest.mark.parametrize("gates,per_gate_input", [(1, False), (3, False), (3, True)])
def test_gate_product_reads_column_major_weights_and_matches_the_formula(gates, per_gate_input):
    """The gate's product reads its weights column-major (``[G·E, in]`` in memory, as
    nn.Linear): MKL's product and autograd's weight gradient are 2-8x slower for a row-major
    ``[in, E]`` operand with a handful of columns. Values and gradients are the formula's, and
    each gradient has its parameter's strides (DDP's bucket views need them)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    B, d, E = 16, 12, 4
    gate = SoftmaxGate(d, num_gates=gates, num_experts=E)
    x = torch.randn(gates, B, d) if per_gate_input else torch.randn(B, d)
    seen = []

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default):
                w = args[2]
                seen.append(w.stride(-2) == 1 and w.stride(-1) == w.shape[-2])  # column-major
            return func(*args, **(kwargs or {}))

    with Products():
        logits = gate.logits(x)  # [B, G, E]
    assert seen == [True]
    xs = x if per_gate_input else x.expand(gates, B, d)
    expect = torch.einsum("gbi,gie->bge", xs, gate.weight) + gate.bias
    torch.testing.assert_close(logits, expect)
    logits.square().sum().backward()
    w_ref, b_ref = gate.weight.detach().clone().requires_grad_(), gate.bias.detach().clone().requires_grad_()
    (torch.einsum("gbi,gie->bge", xs, w_ref) + b_ref).square().sum().backward()
    torch.testing.assert_close(gate.weight.grad, w_ref.grad)
    torch.testing.assert_close(gate.bias.grad, b_ref.grad)
    assert gate.weight.grad.stride() == gate.weight.stride() and gate.bias.grad.stride() == gate.bias.stride()


# ------------------------------------------------------------------ softmax_last


@pytest.mark.parametrize("shape", [(300, 2, 3), (300, 4), (300, 1, 8), (300, 3, 5), (300, 2, SMALL_AXIS)])
def test_softmax_last_equals_torch_softmax_and_its_gradient(shape):
    torch.manual_seed(0)
    x = (torch.randn(*shape) * 4).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out, ref = softmax_last(x), torch.softmax(x_ref, dim=-1)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    g = torch.randn(*shape)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(300, 2, 3), (300, 4), (300, 1, 8), (300, 3, 5)])
def test_softmax_last_gives_a_row_the_same_bits_in_every_batch(shape):
    """Each row's weights, bit for bit, whatever batch (size and position) it comes in, also for
    a transposed (non-contiguous) input and with −∞ entries (top-K, HiNet's own scenario):
    without the padding to full vector lanes, rows in the vectorised exp's tail differ."""
    torch.manual_seed(1)
    x = torch.randn(*shape) * 5
    x[::7, ..., 0] = float("-inf")
    full = softmax_last(x)
    assert torch.isfinite(full).all() and torch.allclose(full.sum(-1), torch.ones(()), atol=1e-6)
    for size in list(range(1, 140)) + [255, 256, 257, 299]:
        for start in sorted({0, 7, shape[0] - size}):
            if 0 <= start and start + size <= shape[0]:
                assert torch.equal(softmax_last(x[start:start + size]), full[start:start + size]), (size, start)
    strided = x.movedim(-1, 0).contiguous().movedim(0, -1)  # the same values, the last axis outermost
    assert not strided.is_contiguous()
    assert torch.equal(softmax_last(strided), full)


def test_softmax_last_leaves_a_long_axis_to_torch_softmax():
    x = torch.randn(64, SMALL_AXIS + 1)
    assert torch.equal(softmax_last(x), torch.softmax(x, dim=-1))


def test_a_gate_exports_with_a_dynamic_batch_axis():
    """``torch.export`` with a symbolic batch: softmax_last must not pad by ``-N % 64`` there,
    which would guard the program on the batch size (``dlrm-mtl export`` failed so)."""
    torch.manual_seed(2)
    gate = SoftmaxGate(8, 2, 3).eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(gate, (torch.randn(5, 8),), dynamic_shapes=({0: batch},))
    for n in (1, 64, 100):
        x = torch.randn(n, 8)
        torch.testing.assert_close(program.module()(x), gate(x), rtol=0, atol=1e-6)
