"""Cross-Stitch (Misra et al. 2016, eq. 1) against separate networks and hand-computed mixing."""

from __future__ import annotations

import pytest
import torch

from dlrm_mtl.modules import CrossStitchLayer, cross_stitch_init

from test_modules import ATOL, reference_expert


def test_init_is_near_identity_and_rows_sum_to_one():
    a = cross_stitch_init(3)
    torch.testing.assert_close(a, torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]]))
    torch.testing.assert_close(cross_stitch_init(1), torch.ones(1, 1))
    layer = CrossStitchLayer(4, 2, [], 3, levels=2)
    for alpha in layer.alpha:
        torch.testing.assert_close(alpha.detach(), torch.tensor([[0.9, 0.1], [0.1, 0.9]]))


@pytest.mark.parametrize("stacked", [False, True])
def test_identity_alpha_equals_separate_networks(stacked):
    torch.manual_seed(30)
    T, levels = 3, 3
    layer = CrossStitchLayer(5, T, [6], 4, levels=levels).double()
    with torch.no_grad():
        for alpha in layer.alpha:
            alpha.copy_(torch.eye(T))
    x = torch.randn(T, 8, 5, dtype=torch.float64) if stacked else torch.randn(8, 5, dtype=torch.float64)
    y = layer(x).y
    for t in range(T):
        h = x[t] if stacked else x
        for net in layer.nets:
            h = reference_expert(net, t, h)  # task t's own network, level by level
        torch.testing.assert_close(y[t], h, atol=ATOL, rtol=0)


def test_hand_computed_mixing():
    torch.manual_seed(31)
    layer = CrossStitchLayer(5, 2, [], 4, levels=2).double()
    alphas = [torch.tensor([[0.7, 0.3], [0.2, 0.8]]), torch.tensor([[1.5, -0.5], [0.0, 1.0]])]
    with torch.no_grad():
        for p, a in zip(layer.alpha, alphas):
            p.copy_(a)
    x = torch.randn(6, 5, dtype=torch.float64)
    a0, b0 = reference_expert(layer.nets[0], 0, x), reference_expert(layer.nets[0], 1, x)
    a1, b1 = 0.7 * a0 + 0.3 * b0, 0.2 * a0 + 0.8 * b0  # eq. 1 after level 0
    a2, b2 = reference_expert(layer.nets[1], 0, a1), reference_expert(layer.nets[1], 1, b1)
    expected = torch.stack([1.5 * a2 - 0.5 * b2, 0.0 * a2 + 1.0 * b2])  # eq. 1 after level 1
    out = layer(x)
    assert out.y.shape == (2, 6, 4) and out.gates == {}
    torch.testing.assert_close(out.y, expected, atol=ATOL, rtol=0)


def test_gradients_reach_alpha_and_every_network():
    torch.manual_seed(32)
    layer = CrossStitchLayer(5, 2, [8], 8, levels=2)
    y = layer(torch.randn(32, 5)).y
    (y * torch.randn_like(y)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for alpha in layer.alpha:
        assert (alpha.grad != 0).all()  # every entry, off-diagonal mixing included, learns


def test_rejects_wrong_task_rows():
    layer = CrossStitchLayer(5, 2, [], 3, levels=1)
    with pytest.raises(ValueError, match="expected 2"):
        layer(torch.randn(3, 4, 5))
