"""The dense passes around the GEMMs (``dlrm_mtl/modules/fused_affine.py``; C ``bias_act``,
``bias_act_backward``, ``tower_logits``, ``tower_logits_backward``) against ATen's path."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import pytest
import torch

from dlrm_mtl import native
from dlrm_mtl.modules.folded_affine import block_gradient
from dlrm_mtl.modules.fused_affine import AffineAct, TowerHead, affine_act
from dlrm_mtl.modules.towers import TaskTowers

pytestmark = pytest.mark.skipif(not native.available(), reason="the C kernels were not built")
ROOT = Path(__file__).resolve().parents[1]


def _grads(fn, inputs: Sequence[torch.Tensor], seed: int = 1) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
    """``fn(*inputs)`` and the inputs' gradients of a random weighting of its output."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * w).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("rows", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("cols", [7, 16, 64, 128, 200])
@pytest.mark.parametrize("relu", [True, False])
def test_affine_act_matches_addmm_and_relu(rows, cols, relu):
    """Every column chunk (128, 64, 16 and the single columns) and partial row blocks: output
    and the gradients of x, weight and bias as ``addmm`` + ``relu``."""
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    x, w, b = torch.randn(rows, 24, generator=g), torch.randn(24, cols, generator=g), torch.randn(cols, generator=g)

    def aten(x, w, b):
        y = torch.addmm(b, x, w)
        return y.relu() if relu else y

    y1, g1 = _grads(lambda x, w, b: AffineAct.apply(x, w, b, relu), [x, w, b])
    y0, g0 = _grads(aten, [x, w, b])
    assert _close(y1, y0) and all(_close(a, c) for a, c in zip(g1, g0))  # type: ignore[arg-type]
    if relu:
        assert (y1 >= 0).all() and (y1 == 0).any()


def test_affine_act_per_group_on_a_strided_input():
    """``x [G, B, d]`` as a transposed view (a bank's experts on their own inputs), the bias
    per group: as ``baddbmm`` + ``relu``."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(100, 3, 20, generator=g).transpose(0, 1)  # [3, 100, 20], not contiguous
    w, b = torch.randn(3, 20, 72, generator=g), torch.randn(3, 72, generator=g)
    y1, g1 = _grads(lambda x, w, b: AffineAct.apply(x, w, b, True), [x, w, b])
    y0, g0 = _grads(lambda x, w, b: torch.baddbmm(b.unsqueeze(1), x, w).relu(), [x, w, b])
    assert _close(y1, y0) and all(_close(a, c) for a, c in zip(g1, g0))  # type: ignore[arg-type]


def test_relu_backward_masks_where_aten_does():
    """ReLU's gradient is 0 where the output is 0 (or below) and passes where it is NaN, as
    ATen's ``threshold_backward``."""
    y = torch.tensor([[0.0, -0.0, 1e-30, 2.0, float("nan"), -1.0] * 3])
    g = torch.arange(1.0, 19.0).view(1, 18)
    gp, gb = native.bias_act_backward(g, y, True)
    ref = torch.ops.aten.threshold_backward(g, y, 0.0)
    assert torch.equal(gp, ref) and torch.equal(gb, ref.sum(0))


def test_the_passes_are_the_same_on_one_thread_and_two():
    """The column sums run per block of 64 rows, the blocks in order: bit for bit whatever the
    thread count."""
    g = torch.Generator().manual_seed(5)
    y, grad = torch.randn(2048, 128, generator=g).relu_(), torch.randn(2048, 128, generator=g)
    h, gz, v = torch.randn(2048, 3 * 64, generator=g).relu_(), torch.randn(2048, 3, generator=g), torch.randn(3, 64, generator=g)
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append((*native.bias_act_backward(grad, y, True), *native.tower_logits_backward(gz, h, 3, v),
                        native.tower_logits(h, 3, v, torch.zeros(3))))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*out))


@pytest.mark.parametrize("hidden", [[64], [24], [7], [32, 16], [8, 8, 8]])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("tasks", [1, 3])
def test_task_towers_fused_match_aten(hidden, shared, tasks, monkeypatch):
    """:class:`TaskTowers` on the fused passes (``TowerHead``, ``affine_act``) and on ATen's
    (kernels off): the same logits and gradients for the input and every weight."""
    torch.manual_seed(0)
    towers = TaskTowers(tasks, 20, hidden)
    x = torch.randn(130, 20) if shared else torch.randn(tasks, 130, 20)
    heads: List[bool] = []
    real = TowerHead.apply
    monkeypatch.setattr(TowerHead, "apply", lambda *a: heads.append(True) or real(*a))
    results = []
    for on in (True, False):
        monkeypatch.setattr(native, "dense_applies", (lambda *ts: True) if on else (lambda *ts: False))
        towers.zero_grad()
        z, (gx,) = _grads(towers, [x])
        results.append((z, gx, [p.grad.clone() for p in towers.parameters()]))
    (z1, gx1, p1), (z0, gx0, p0) = results
    assert heads == [True]  # the fused run took TowerHead, ATen's run did not
    assert _close(z1, z0) and _close(gx1, gx0) and all(_close(a, b) for a, b in zip(p1, p0))


def test_block_gradient_sums_the_bias_in_its_pass():
    """``block_gradient``'s bias gradient is ``G``'s column sums for ReLU blocks, plain blocks
    and a block without a gradient, on the fused pass and on ATen's."""
    torch.manual_seed(2)
    out = torch.randn(70, 40)
    out[:, :16].relu_()
    grads = [torch.randn(70, 16), None, torch.randn(70, 9)]
    for fused in (True, False):
        with torch.no_grad():
            if not fused:
                native.set_enabled(False)
            try:
                g, gb = block_gradient(grads, out, (16, 15, 9), (True, False, False))
            finally:
                native.set_enabled(True)
        assert gb is not None and torch.allclose(gb, g.sum(0), atol=1e-5)
        assert torch.equal(g[:, :16], torch.ops.aten.threshold_backward(grads[0], out[:, :16], 0.0))
        assert torch.equal(g[:, 16:31], torch.zeros(70, 15)) and torch.equal(g[:, 31:], grads[2])


def test_the_fused_passes_stay_off_where_they_cannot_run():
    """float64, CPU autocast (its GEMMs return bfloat16) and a tracer keep ATen's path."""
    x, w, b = torch.randn(8, 4), torch.randn(4, 6), torch.randn(6)
    assert native.dense_applies(x, w, b)
    assert not native.dense_applies(x.double(), w.double(), b.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not native.dense_applies(x, w, b)
        assert affine_act(x, w, b, True).dtype == torch.bfloat16  # ATen's addmm under autocast
    traced = torch.jit.trace(lambda x: affine_act(x, w, b, True), (x,))
    assert "addmm" in str(traced.graph)


@pytest.mark.parametrize("arch", ["shared_bottom", "mmoe", "ple"])
def test_training_on_the_fused_passes_matches_aten(synthetic_small, tmp_path, monkeypatch, arch):
    """Six steps on the same batches from the same initialisation with the dense passes fused
    and not: the fused Functions ran every step, and the logits, dense weights and table rows
    agree to float rounding."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from dlrm_mtl.distributed import shutdown_distributed
    from dlrm_mtl.models.recorded_lookup import RecordedLookup
    from dlrm_mtl.train import train_step
    from tests.test_input_frame import _setup_arch

    calls: List[str] = []
    for fn in (AffineAct, TowerHead):
        real = fn.apply
        monkeypatch.setattr(fn, "apply", (lambda real, name: lambda *a: calls.append(name) or real(*a))(real, fn.__name__))
    real_applies = native.dense_applies
    results = []
    try:
        for on in (True, False):
            calls.clear()
            monkeypatch.setattr(native, "dense_applies", real_applies if on else (lambda *ts: False))
            run = _setup_arch(synthetic_small, tmp_path / f"run{on}", str(ROOT / f"configs/arch/{arch}.yaml"))
            lookup = [c for c in run.dmp.module.model.local_lookup.calls if isinstance(c, RecordedLookup)][0]
            run.train_stream.set_epoch(0)
            it = iter(run.train_stream)
            logits = [train_step(run.dmp, run.optimizer, next(it))[0].clone() for _ in range(6)]
            it.close()
            assert calls.count("TowerHead") == (6 if on else 0)
            state = {k: v.detach().clone() for k, v in run.dmp.state_dict().items()
                     if isinstance(v, torch.Tensor) and not isinstance(v, ShardedTensor)}
            results.append((logits, state, lookup.tbe.weights_host.detach().clone()))
    finally:
        shutdown_distributed()
    (l1, s1, w1), (l2, s2, w2) = results
    pairs = list(zip(l1, l2)) + [(s1[k], s2[k]) for k in s1] + [(w1, w2)]
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in pairs)
    assert not all(torch.equal(a, b) for a, b in pairs)  # a different order of float operations ran
