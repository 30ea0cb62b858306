"""The first layer's backward by table row (dlrm_mtl/modules/folded_affine.py): the same
gradients, table updates and training as x's gradient and two GEMMs, to float rounding."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import pytest
import torch

from dlrm_mtl import native
from dlrm_mtl.models.one_table_lookup import OneTableInputRows
from dlrm_mtl.modules import folded_affine
from dlrm_mtl.modules.folded_affine import FoldedInputAffine, InputFold, fold_plan

ROOT = Path(__file__).resolve().parents[1]

needs_kernels = pytest.mark.skipif(not native.available() or os.environ.get("DLRM_MTL_NATIVE") == "0",
                                   reason="the C kernels are not built or are off")


def test_fold_plan_leaves_tables_wider_than_a_quarter_batch_direct():
    plan = fold_plan([6040, 3706, 18, 2, 100], 2048)
    assert plan.direct is not None and plan.direct.tolist() == [1, 1, 0, 0, 0] and plan.runs == [(0, 2)]
    plan = fold_plan([9, 600, 3, 700, 800], 2048)  # 600·4 > 2048: direct, in two runs
    assert plan.direct.tolist() == [0, 1, 0, 1, 1] and plan.runs == [(1, 2), (3, 5)]
    assert fold_plan([52, 17, 2], 1024) == (None, [])  # the census shape: every feature folded
    assert fold_plan([256], 1024).runs == [] and fold_plan([257], 1024).runs == [(0, 1)]


def _problem(single: bool, seed: int = 0):
    """One table of four features' rows: features 0 and 1 read one table (rows 0-29, shared),
    feature 2 its own (30-39, mean-pooled, with empty bags unless single), feature 3 its own
    (40-239, wide); two scenario levels (3 values, 1 value); a dense front of 3 columns."""
    g = torch.Generator().manual_seed(seed)
    B, D, R = 64, 8, 240
    lo = [0, 0, 30, 40]
    hi = [30, 30, 40, 240]
    ids: List[torch.Tensor] = []
    lengths: List[torch.Tensor] = []
    for f in range(4):
        n = torch.ones(B, dtype=torch.int64) if single or f != 2 else torch.randint(0, 4, (B,), generator=g)
        lengths.append(n)
        ids.append(torch.randint(lo[f], hi[f], (int(n.sum()),), generator=g))
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(torch.cat(lengths), 0)])
    tables = [torch.randn(3, 4, generator=g), torch.randn(1, 4, generator=g)]
    scenario = torch.stack([torch.randint(0, 3, (B,), generator=g), torch.zeros(B, dtype=torch.int64)], dim=1)
    return dict(B=B, D=D, R=R, F=4, weights=torch.randn(R, D, generator=g), momentum=torch.rand(R, generator=g),
                ids=torch.cat(ids), offsets=offsets, single=single, front=torch.randn(B, 3, generator=g),
                scenario=scenario, tables=tables, mean=torch.tensor([0, 0, 1, 0], dtype=torch.uint8),
                table_rows=[30, 30, 10, 200], upstream=torch.randn(B, 24, generator=g))


def _step(p: dict, fold_it: bool, plan_batch: int, threads: int = 1) -> Tuple[torch.Tensor, ...]:
    """One forward and backward of relu(x W + b) split [16 | 8] (ReLU on the first block) on
    the lookup's x, folded or through x's gradient; returns the outputs and every gradient and
    updated state."""
    torch.manual_seed(1)
    d = 3 + p["F"] * p["D"] + 8
    weight = (torch.randn(d, 24) * 0.1).requires_grad_()
    bias = torch.randn(24).requires_grad_()
    weights, momentum = p["weights"].clone(), p["momentum"].clone()
    tables = [t.clone().requires_grad_() for t in p["tables"]]
    R = p["R"]
    slot = torch.full((R,), -1, dtype=torch.int32)
    lr = torch.tensor([0.05])
    single = p["single"]
    mean = None if single else p["mean"]
    fold = InputFold(weights, momentum, p["ids"], p["offsets"], p["F"], p["B"], lr, 1e-8, slot, single, mean,
                     p["front"], p["scenario"], tables, fold_plan(p["table_rows"], plan_batch)) if fold_it else None
    placeholder = torch.zeros(1, requires_grad=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = OneTableInputRows.apply(placeholder, weights, momentum, p["ids"], p["offsets"], p["F"], p["B"], lr, 1e-8,
                                    slot, single, mean, fold, p["front"], p["scenario"], *tables)
        if fold_it:
            h, logits = FoldedInputAffine.apply(x, weight, bias, (16, 8), (True, False), fold, *tables)
        else:
            out = torch.addmm(bias, x, weight)
            h, logits = out[:, :16].relu(), out[:, 16:]
        torch.cat([h, logits], dim=1).backward(p["upstream"])
    finally:
        torch.set_num_threads(before)
    assert (slot == -1).all()  # the scratch is left as found
    return (h.detach(), logits.detach(), weight.grad, bias.grad, *[t.grad for t in tables], weights, momentum)


@needs_kernels
@pytest.mark.parametrize("single", [True, False])
@pytest.mark.parametrize("plan_batch", [1 << 20, 64])  # every feature folded; the wide one direct
def test_folded_backward_gives_the_gradients_and_updates_of_x_s_gradient(single, plan_batch):
    """Shared table, mean bags (with empty and one-id bags), a direct wide feature, two
    scenario levels (one of a single row), a dense front: the layer's output bit for bit, every
    gradient and the tables' row-wise Adagrad update equal to float rounding."""
    p = _problem(single)
    ref = _step(p, fold_it=False, plan_batch=plan_batch)
    got = _step(p, fold_it=True, plan_batch=plan_batch)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    names = ["weight.grad", "bias.grad", "level 0 grad", "level 1 grad", "table", "momentum"]
    for name, a, b in zip(names, ref[2:], got[2:]):
        scale = max(a.abs().max().item(), 1e-30)  # near-zero entries: rounding of the row's scale
        assert torch.allclose(a, b, rtol=1e-5, atol=2e-6 * scale), (name, (a - b).abs().max() / scale)
    assert not torch.equal(ref[-2], p["weights"])  # the tables were updated, in both


@needs_kernels
def test_folded_backward_is_the_same_on_one_thread_and_two():
    """Each feature is summed by one thread in a fixed order: bit for bit on any team size."""
    p = _problem(single=False, seed=3)
    one = _step(p, fold_it=True, plan_batch=64, threads=1)
    two = _step(p, fold_it=True, plan_batch=64, threads=2)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@needs_kernels
def test_a_second_reader_of_a_folded_input_raises_instead_of_updating_twice():
    p = _problem(single=True)
    weight = torch.randn(3 + 32 + 8, 5, requires_grad=True)
    R = p["R"]
    fold = InputFold(p["weights"].clone(), p["momentum"].clone(), p["ids"], p["offsets"], 4, p["B"],
                     torch.tensor([0.1]), 1e-8, torch.full((R,), -1, dtype=torch.int32), True, None, p["front"],
                     p["scenario"], p["tables"],
                     fold_plan(p["table_rows"], 1 << 20))
    x = OneTableInputRows.apply(torch.zeros(1, requires_grad=True), fold.weights, fold.momentum, p["ids"], p["offsets"],
                                4, p["B"], fold.lr, 1e-8, fold.slot, True, None, fold, p["front"], p["scenario"],
                                *p["tables"])
    x.input_fold = fold
    (h,) = folded_affine.folded_affine(x, [(weight, torch.zeros(5))])
    assert fold.folded and folded_affine.input_fold(x, weight) is None  # taken once
    with pytest.raises(RuntimeError, match="read beside the folded map"):
        (h.sum() + x.sum()).backward()


def test_input_fold_needs_the_lookup_s_own_output_and_a_contiguous_host_weight():
    p = _problem(single=True)
    R = p["R"]
    fold = InputFold(p["weights"], p["momentum"], p["ids"], p["offsets"], 4, p["B"], torch.tensor([0.1]), 1e-8,
                     torch.full((R,), -1, dtype=torch.int32), True, None, p["front"], p["scenario"], p["tables"],
                     fold_plan(p["table_rows"], 1 << 20))
    x = torch.randn(p["B"], fold.width())
    w = torch.randn(fold.width(), 6)
    assert folded_affine.input_fold(x, w) is None  # no fold attached
    x.input_fold = fold
    assert folded_affine.input_fold(x, w) is (fold if native.available() else None)
    assert folded_affine.input_fold(x, w.t().contiguous().t()) is None  # a transposed weight
    assert folded_affine.input_fold(x[:, :], w) is None  # a view is not the lookup's output
    with torch.no_grad():
        assert folded_affine.input_fold(x, w) is None  # evaluation keeps the plain product
    folded_affine.set_enabled(False)
    try:
        assert folded_affine.input_fold(x, w) is None  # train.fold_first_layer=false
    finally:
        folded_affine.set_enabled(True)


@needs_kernels
@pytest.mark.parametrize("arch", ["shared_bottom", "mmoe", "ple"])
def test_training_with_the_folded_first_layer_matches_x_s_gradient(synthetic_small, tmp_path, monkeypatch, arch):
    """Six steps on the same batches from the same initialisation, folded and not
    (``train.fold_first_layer``): the fold ran every step, and the logits, dense weights and
    table rows agree to float rounding."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from dlrm_mtl.distributed import shutdown_distributed
    from dlrm_mtl.models.recorded_lookup import RecordedLookup
    from dlrm_mtl.train import train_step
    from tests.test_input_frame import _setup_arch

    taken = []
    real = folded_affine.input_fold

    def counting(x: torch.Tensor, weight: torch.Tensor) -> Optional[InputFold]:
        fold = real(x, weight)
        taken.append(fold is not None)
        return fold

    monkeypatch.setattr(folded_affine, "input_fold", counting)
    results = []
    try:
        for on in (True, False):
            taken.clear()
            run = _setup_arch(synthetic_small, tmp_path / f"run{on}", str(ROOT / f"configs/arch/{arch}.yaml"),
                              [f"train.fold_first_layer={str(on).lower()}"])
            calls = [c for c in run.dmp.module.model.local_lookup.calls if isinstance(c, RecordedLookup)]
            run.train_stream.set_epoch(0)
            it = iter(run.train_stream)
            logits = [train_step(run.dmp, run.optimizer, next(it))[0].clone() for _ in range(6)]
            it.close()
            assert sum(taken) == (6 if on else 0) and calls[0].input_rows_calls == 6
            state = {k: v.detach().clone() for k, v in run.dmp.state_dict().items()
                     if isinstance(v, torch.Tensor) and not isinstance(v, ShardedTensor)}
            results.append((logits, state, calls[0].tbe.weights_host.detach().clone(),
                            calls[0].tbe.momentum1_host.detach().clone()))
    finally:
        shutdown_distributed()
    (l1, s1, w1, m1), (l2, s2, w2, m2) = results
    pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]] = list(zip(l1, l2)) + [(s1[k], s2[k]) for k in s1] + [(w1, w2), (m1, m2)]
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in pairs)
    assert not all(torch.equal(a, b) for a, b in pairs)  # the sums were regrouped: not the same path
