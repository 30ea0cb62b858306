"""mix_experts: the gated sum over experts — on the CPU with the C kernels one pass per row
(tests/test_native.py), otherwise by a broadcast sum for small mixtures and a batched matmul
for larger ones; all must equal the einsum definition, values and gradients."""

from __future__ import annotations

import pytest
import torch

from dlrm_mtl.modules import mixture
from dlrm_mtl.modules.mixture import SMALL_MIXTURE, mix_experts


@pytest.mark.parametrize("G,E,D", [(1, 3, 128), (2, 3, 64), (1, 2, 8), (2, 8, 64), (1, 16, 128), (3, 4, 33)])
def test_equals_the_einsum_definition_with_gradients(G, E, D):
    torch.manual_seed(0)
    g = torch.softmax(torch.randn(5, 7, G, E, dtype=torch.double), -1).requires_grad_()
    e = torch.randn(5, 7, E, D, dtype=torch.double, requires_grad=True)
    out = mix_experts(g, e)
    ref = torch.einsum("abge,abed->abgd", g, e)
    torch.testing.assert_close(out, ref)
    up = torch.randn_like(ref)
    gg, ge = torch.autograd.grad((out * up).sum(), (g, e))
    rg, re = torch.autograd.grad((ref * up).sum(), (g, e))
    torch.testing.assert_close(gg, rg)
    torch.testing.assert_close(ge, re)


@pytest.mark.parametrize("native_on", [True, False])
def test_float32_batches_equal_the_einsum_definition_with_gradients(monkeypatch, native_on):
    """The layers' case, float32 ``[B, G, E] x [B, E, D]``: the C mixture where the kernels are
    built (else the ATen forms) and the ATen forms, each against float64 einsum."""
    if not native_on:
        monkeypatch.setattr(mixture.native, "mixture_applies", lambda gates, experts: False)
    torch.manual_seed(1)
    g = torch.softmax(torch.randn(33, 3, 4), -1).requires_grad_()
    e = torch.randn(4, 33, 40).transpose(0, 1).detach().requires_grad_()
    out = mix_experts(g, e)
    ref = torch.einsum("bge,bed->bgd", g.double(), e.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    up = torch.randn(33, 3, 40)
    gg, ge = torch.autograd.grad((out * up).sum(), (g, e))
    rg, re = torch.autograd.grad((ref * up.double()).sum(), (g, e))
    torch.testing.assert_close(gg, rg, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ge, re, rtol=1e-5, atol=1e-5)


def test_leading_dimensions_broadcast():
    """AESM²'s task layer mixes T tasks' gates over experts computed once: [T, B, 1, E] x [1, B, E, D]."""
    g = torch.rand(2, 6, 1, 3)
    e = torch.randn(1, 6, 3, 5)
    torch.testing.assert_close(mix_experts(g, e), torch.einsum("tbge,bed->tbgd", g, e[0]))


def test_small_mixtures_avoid_the_batched_matmul(monkeypatch):
    """Below G*E*D = 400 PyTorch's CPU bmm takes a scalar fallback kernel (6x slower here): the
    small path must not call matmul, and the large path must (the ATen forms, with the C
    mixture off as without the kernels)."""
    monkeypatch.setattr(mixture.native, "mixture_applies", lambda gates, experts: False)
    calls = []
    real = torch.matmul
    monkeypatch.setattr(mixture.torch, "matmul", lambda a, b: calls.append(a.shape) or real(a, b))
    mix_experts(torch.rand(4, 1, 3), torch.randn(4, 3, 128))  # 384 < 400
    assert calls == []
    mix_experts(torch.rand(4, 1, 4), torch.randn(4, 4, 128))  # 512
    assert len(calls) == 1 and 1 * 4 * 128 >= SMALL_MIXTURE > 1 * 3 * 128


def test_mismatched_expert_count_is_refused():
    with pytest.raises(ValueError, match="3 gate weights per row for 4 experts"):
        mix_experts(torch.rand(2, 1, 3), torch.randn(2, 4, 8))
