"""The fused C kernels (dlrm_mtl/native.py, dlrm_mtl/csrc/cpu_kernels.c) against the ATen
paths they replace and a float64 reference."""

from __future__ import annotations

import os

import pytest
import torch

from dlrm_mtl import native
from dlrm_mtl.config import LossConfig
from dlrm_mtl.losses import EntireSpaceLoss
from dlrm_mtl.schema import ScenarioLevel, Schema, SparseFeature
from test_losses import _GRAPHS


@pytest.fixture
def with_native():
    """Runs a test with the kernels on, then restores the process setting (skipped where
    ``DLRM_MTL_NATIVE=0`` keeps them off; an install without them fails here)."""
    if os.environ.get("DLRM_MTL_NATIVE") == "0":
        pytest.skip("DLRM_MTL_NATIVE=0: the kernels are off on purpose")
    assert native.built(), "dlrm_mtl._cpu_kernels did not build: run `make install` (needs a C compiler)"
    was = native.available()
    native.set_enabled(True)
    yield
    native.set_enabled(was)


def test_the_extension_is_built():
    """`make install` compiles dlrm_mtl/csrc (setup.py); an install that silently lost the C
    compiler or the extension would otherwise run every test on the ATen paths only."""
    if os.environ.get("DLRM_MTL_NATIVE") == "0":
        pytest.skip("DLRM_MTL_NATIVE=0: the kernels are off on purpose")
    assert native.built(), "dlrm_mtl._cpu_kernels did not build: run `make install` (needs a C compiler)"


@pytest.mark.parametrize("flush", [False, True])
@pytest.mark.parametrize("which,name", [(0, "exp"), (1, "log1p"), (2, "expm1"), (3, "log")])
def test_the_loss_passes_float_math_is_within_two_ulp_of_float64(with_native, which, name, flush):
    """The vectorised exp (x <= 0), log1p (x in [0, 1]), expm1 (x <= 0) and log (x > 0) the
    loss terms' C passes use instead of glibc's scalar calls: within 2 ulp of the float64
    result over their whole ranges, uniform and log-spaced down to 1e-30 (measured: at most
    0.96, 1.19, 1.37 and 0.80 ulp); exp is 0 below -87 (the smallest normal float's range)."""
    g = torch.Generator().manual_seed(which)
    uniform = torch.rand(100_000, generator=g)
    tiny = torch.logspace(-30, 0, 50_000)
    x = {0: torch.cat([-87 * uniform, -tiny, -torch.logspace(0, 1.9, 1000)]),
         1: torch.cat([uniform, tiny, torch.tensor([0.0, 1.0])]),
         2: torch.cat([-87 * uniform, -tiny, -torch.logspace(0, 1.9, 1000)]),
         3: torch.cat([uniform + 1e-30, tiny, 1 + 1000 * uniform[:1000]])}[which].float().contiguous()
    was = float(torch.tensor([1e-40]) * 2) == 0.0  # subnormals flushed now (an earlier in-process run)
    torch.set_flush_denormal(flush)  # both ways: training sets it (train.flush_denormal)
    try:
        out = native.float_math(name, x)
    finally:
        torch.set_flush_denormal(was)
    ref = {0: torch.exp, 1: torch.log1p, 2: torch.expm1, 3: torch.log}[which](x.double())
    # a float32 ulp of each result, in float64 (float32 spacings of tiny values are subnormal,
    # flushed to 0 where an earlier in-process run set train.flush_denormal)
    ulp = torch.ldexp(torch.ones_like(ref), torch.frexp(ref.abs())[1] - 24).clamp(min=2.0**-149)
    err = ((out.double() - ref).abs() / ulp)
    assert float(err.max()) <= 2.0, (name, float(err.max()), float(x[err.argmax()]))
    if which == 0:
        assert torch.equal(native.float_math("exp", torch.tensor([-87.5, -100.0, -1e30])), torch.zeros(3))


def _loss_case(graph: str, weighting: str, scale: float, seed: int = 7):
    tasks = _GRAPHS[graph]
    schema = Schema("m", [SparseFeature("a", "ta", 10, 4)], [], [ScenarioLevel("s", 3)], tasks)
    cfg = LossConfig(scenario_weighting=weighting,
                     scenario_weights={"s1": 3.0, "s2": 0.5} if weighting == "static" else {})
    loss = EntireSpaceLoss(schema, cfg)
    g = torch.Generator().manual_seed(seed)
    B, T = 301, len(tasks)
    z = scale * torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    y = (torch.rand(B, T, generator=g) < 0.4).float() * mask
    w = torch.rand(B, generator=g)
    w[-7:] = 0  # padding rows
    lam = loss.scenario_lambda[torch.randint(0, 3, (B,), generator=g)] if weighting != "none" else None
    return loss, z, y, mask, w, lam


def _terms_and_grad(loss, z, y, mask, w, lam, native_on: bool):
    native.set_enabled(native_on)
    zz = z.detach().requires_grad_()  # keeps z's strides
    per = loss._per_task_matrix(zz, y, mask, w, lam)
    (grad,) = torch.autograd.grad(per @ torch.arange(1.0, len(per) + 1, dtype=per.dtype), zz)
    return per.detach(), grad, type(per.grad_fn).__name__


@pytest.mark.parametrize("graph", sorted(_GRAPHS))
@pytest.mark.parametrize("weighting", ["none", "static"])
@pytest.mark.parametrize("scale", [3.0, 30.0])
def test_fused_term_means_equal_the_aten_path_and_float64(with_native, graph, weighting, scale):
    """FusedTermMeans (one C pass) gives every term's mean loss and the logits' gradient of the
    float64 per-term loop to float32 rounding — as close as TermMeans' float32 ATen path is —
    for ESMM chains, PLE masks, negated parents and root tasks, with scenario λ, padding rows
    and logits of scale 30 (probabilities within 1e-13 of 0 and 1: the clamp's branch)."""
    loss, z, y, mask, w, lam = _loss_case(graph, weighting, scale)
    fused, g_fused, fn = _terms_and_grad(loss, z, y, mask, w, lam, True)
    assert fn == "FusedTermMeansBackward"
    aten, g_aten, fn = _terms_and_grad(loss, z, y, mask, w, lam, False)
    assert fn == "TermMeansBackward"
    loss.double()
    zz = z.double().requires_grad_()
    ref = loss._per_task_loop(zz, y.double(), mask, w.double(), None if lam is None else lam.double())
    (g_ref,) = torch.autograd.grad(ref @ torch.arange(1.0, len(ref) + 1, dtype=ref.dtype), zz)
    loss.float()
    for got in (fused, aten):
        torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)
    for got in (g_fused, g_aten):
        torch.testing.assert_close(got.double(), g_ref, rtol=1e-5, atol=2e-7)
    torch.testing.assert_close(fused, aten, rtol=1e-6, atol=1e-7)


def test_fused_term_means_edge_rows(with_native):
    """A term without rows is 0 with no gradient; a confidently wrong negative entire-space row
    (σ(20)² rounds to 1 in float32: the clamp) keeps its gradient, as in the ATen path."""
    loss, z, y, mask, w, lam = _loss_case("esmm", "none", 3.0)
    mask[:, 1] = False  # no row has a cvr label: the ctcvr term (chain rows) has no rows
    fused, g_fused, _ = _terms_and_grad(loss, z, y * mask, mask, w, lam, True)
    aten, g_aten, _ = _terms_and_grad(loss, z, y * mask, mask, w, lam, False)
    assert fused[1] == 0 and aten[1] == 0
    torch.testing.assert_close(g_fused, g_aten, rtol=1e-5, atol=1e-8)
    z2, y2 = torch.full((1, 2), 20.0), torch.zeros(1, 2)
    m2, w2 = torch.ones(1, 2, dtype=torch.bool), torch.ones(1)
    fused, g_fused, _ = _terms_and_grad(loss, z2, y2, m2, w2, None, True)
    aten, g_aten, _ = _terms_and_grad(loss, z2, y2, m2, w2, None, False)
    torch.testing.assert_close(fused, aten, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(g_fused, g_aten, rtol=1e-5, atol=0.0)
    assert (g_fused > 0.4).all()


def test_fused_path_only_on_contiguous_host_float32(with_native):
    """float64 logits, non-contiguous term inputs, or the switch off take the ATen TermMeans;
    strided logits (a transposed layout, as the towers of task-specific inputs leave them)
    take the C pass, with the same values and gradient as contiguous ones."""
    loss, z, y, mask, w, lam = _loss_case("esmm", "none", 3.0)
    want, g_want, fn = _terms_and_grad(loss, z, y, mask, w, lam, True)
    assert fn == "FusedTermMeansBackward"
    for strided in (torch.stack([z, z], dim=2)[..., 0], z.t().contiguous().t()):
        got, g_got, fn = _terms_and_grad(loss, strided, y, mask, w, lam, True)
        assert fn == "FusedTermMeansBackward" and not strided.is_contiguous()
        assert torch.equal(got, want) and torch.equal(g_got, g_want)
    m = loss.term_matrices
    y_k, r_k = m.inputs(y, mask, w)
    per = loss._per_task_matrix(z.detach().requires_grad_(), y, mask, w, lam, (y_k, torch.cat([r_k, r_k], 1)[:, ::2]))
    assert type(per.grad_fn).__name__ == "TermMeansBackward"  # strided row weights
    assert _terms_and_grad(loss.double(), z.double(), y.double(), mask, w.double(), lam, True)[2] == "TermMeansBackward"
    loss.float()
    assert _terms_and_grad(loss, z, y, mask, w, lam, False)[2] == "TermMeansBackward"


@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("offsets_dtype", [torch.int64, torch.int32])
def test_shift_ids_equal_the_aten_shift(with_native, ids_dtype, offsets_dtype):
    """RecordedLookup's id shift (each feature's ids plus its table's first row) in one C
    pass equals its four-operator ATen path bit for bit, for multi-hot bags with empty ones
    and a feature without ids in the batch; bad offsets raise instead of reading past the ids."""
    from dlrm_mtl.models.recorded_lookup import RecordedLookup

    g = torch.Generator().manual_seed(5)
    F, B = 4, 33
    lengths = torch.randint(0, 4, (F, B), generator=g)
    lengths[2] = 0  # a feature with no ids in this batch
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.flatten().cumsum(0)]).to(offsets_dtype)
    indices = torch.randint(0, 1000, (int(lengths.sum()),), generator=g, dtype=ids_dtype)
    row_start = torch.tensor([0, 1000, 1700, 2500], dtype=torch.int64)
    native.set_enabled(True)
    assert native.shift_applies(indices, offsets, row_start) == (ids_dtype == torch.int64)
    fused = RecordedLookup._shifted(indices, offsets, row_start)
    native.set_enabled(False)
    aten = RecordedLookup._shifted(indices, offsets, row_start)
    assert fused.dtype == aten.dtype == torch.int64 and torch.equal(fused, aten)
    assert not torch.equal(fused, indices.long())  # it did shift
    if ids_dtype != torch.int64:
        return
    native.set_enabled(True)
    bad = offsets.clone()
    bad[B] = indices.numel() + 1  # feature 1 would start past the last id
    with pytest.raises(ValueError, match="offset"):
        native.shift_ids(indices, bad, row_start)
    with pytest.raises(ValueError, match="offset"):  # ids past the last offset would stay unwritten
        native.shift_ids(torch.cat([indices, indices[:1]]), offsets, row_start)


def _mean_pooled_schema(data, out):
    """``data``'s schema with its multi-hot feature mean-pooled (and the features sharing its
    table: a table has one pooling)."""
    from dataclasses import replace

    from dlrm_mtl.schema import Schema

    schema = Schema.load(data / "schema.yaml")
    tables = {f.table for f in schema.sparse if f.multi_hot}
    mean = replace(schema, sparse=[replace(f, pooling="mean") if f.table in tables else f for f in schema.sparse])
    assert any(f.pooling == "mean" and f.multi_hot for f in mean.sparse)
    path = out / "schema_mean.yaml"
    mean.save(path)
    return path


@pytest.mark.parametrize("bags", ["multi_hot", "single_hot", "mean"])
def test_one_table_lookup_trains_bit_for_bit_like_fbgemm(with_native, synthetic_small, tmp_path, bags):
    """OneTableLookup (the C pooled sum and exact row-wise Adagrad) against fbgemm's kernel call
    through the same one-table layout: two identical runs, one on the C kernels, one on
    fbgemm's forward and backward, stay identical bit for bit after every step (losses, dense
    weights, tables, Adagrad state, counters; a cosine schedule gives the tables a new learning
    rate every step), for multi-hot bags (empty ones among them), for single-hot ones (where
    fbgemm's path is the gather) and for a mean-pooled multi-hot feature (averaged in the C
    passes on one side, by ``mean_of_bags`` after fbgemm's sum on the other); and so does a
    lookup without autograd."""
    from dlrm_mtl.distributed import init_distributed, shutdown_distributed
    from test_recorded_lookup import _cfg, _single_hot_schema, _train_alike
    from dlrm_mtl.train import setup_run

    sets = ["sharding.cpu_backward=one_table"]
    if bags == "single_hot":
        sets.append(f"data.schema={_single_hot_schema(synthetic_small, tmp_path)}")
    if bags == "mean":
        sets.append(f"data.schema={_mean_pooled_schema(synthetic_small, tmp_path)}")
    single_hot = bags == "single_hot"
    env = init_distributed("gloo", 60, 1)
    try:
        runs = [setup_run(_cfg(synthetic_small, tmp_path / name, *sets), env) for name in ("native", "fbgemm")]
        ours, theirs = (r.dmp.module.model.local_lookup.calls for r in runs)
        for c in theirs:
            c._native_applies = lambda ids, offsets, table: False  # fbgemm's kernels every call
        streams = _train_alike(runs, 7)
        # every call, the recording one included (its kernel call held back and run in C)
        assert all(c.native_calls == 7 for c in ours) and all(c.native_calls == 0 for c in theirs)
        # both sides return the schema's pooling: ours averages in the C passes (its mean flags
        # were built), theirs divides fbgemm's sums (no flags)
        assert all(bool(c.mean_spans) == (bags == "mean") for c in ours + theirs)
        assert all(any(f is not None for f in c._means.values()) == (bags == "mean") for c in ours)
        assert not any(c._means for c in theirs)
        assert all((c.gathers > 0) == single_hot for c in theirs)
        batch = next(streams[0])
        with torch.no_grad():
            outs = [r.dmp.module.model.local_lookup(batch.sparse) for r in runs]
        assert torch.equal(outs[0], outs[1])
        for it in streams:
            it.close()
    finally:
        shutdown_distributed()


def test_one_table_lookup_rejects_bad_ids_before_writing(with_native):
    """An id outside the table or offsets that do not end at the ids' count raise, naming
    what is wrong, and leave the table, its state and the slots untouched."""
    w, m = torch.randn(5, 4), torch.rand(5)
    slot = torch.full((5,), -1, dtype=torch.int32)
    ids, offsets = torch.tensor([0, 4, 2]), torch.tensor([0, 1, 3])
    assert native.one_table_applies(w, m, ids, offsets, torch.tensor(0.1))
    out = native.pooled_sum(w, ids, offsets, 1, 2)
    torch.testing.assert_close(out, torch.stack([w[0], w[4] + w[2]]), rtol=0, atol=0)
    w0, m0 = w.clone(), m.clone()
    with pytest.raises(IndexError, match="id 5"):
        native.rowwise_adagrad_update(torch.ones(2, 4), w, m, torch.tensor([0, 5, 2]), offsets, 1, 2,
                                      torch.tensor(0.1), 1e-8, slot)
    with pytest.raises(ValueError, match="offsets"):
        native.pooled_sum(w, ids, torch.tensor([0, 1, 2]), 1, 2)
    assert torch.equal(w, w0) and torch.equal(m, m0) and bool((slot == -1).all())
    native.rowwise_adagrad_update(torch.ones(2, 4), w, m, ids, offsets, 1, 2, torch.tensor(0.1), 1e-8, slot)
    assert bool((slot == -1).all()) and not torch.equal(w, w0)
    assert torch.equal(w[[1, 3]], w0[[1, 3]])  # rows no id touched


@pytest.mark.parametrize("e", [8, 5])
def test_table_rows_equal_index_select_and_index_add_bit_for_bit(with_native, e):
    """``TableRows`` (the scenario embedding's gather, C both ways): the rows of
    ``index_select`` and, from a column slice of a wider gradient (what ``cat``'s backward
    hands it), the table gradient ``index_add`` sums into a zeroed table, bit for bit; a
    table row no id reads gets exactly 0. Off the kernels (native off, float64, a traced
    call) the ATen operators run."""
    from dlrm_mtl.models.scenario_rows import TableRows, scenario_rows

    g = torch.Generator().manual_seed(3)
    V, B = 6, 2049
    ids = torch.randint(0, V - 1, (B, 2), generator=g)[:, 1]  # a strided column; row V - 1 never read
    weight = torch.randn(V, e, generator=g, requires_grad=True)
    ref_w = weight.detach().clone().requires_grad_()
    assert native.table_rows_applies(weight, ids)
    out = scenario_rows(weight, ids)
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "TableRowsBackward"
    ref = ref_w.index_select(0, ids)
    assert torch.equal(out, ref)
    wide = torch.randn(B, 3 + e + 4, generator=g) * 1e3
    grad = wide[:, 3:3 + e]  # row stride 7 + e
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(weight.grad, torch.zeros(V, e).index_add_(0, ids, grad))
    assert torch.equal(weight.grad, ref_w.grad) and bool((weight.grad[V - 1] == 0).all())
    native.set_enabled(False)
    try:
        assert not native.table_rows_applies(weight, ids)
        assert scenario_rows(weight, ids).grad_fn.name() == "IndexSelectBackward0"
    finally:
        native.set_enabled(True)
    assert not native.table_rows_applies(weight.double(), ids)
    assert TableRows.apply(weight, ids).shape == (B, e)


def test_table_rows_reject_ids_outside_the_table(with_native):
    """An id outside ``[0, V)`` raises IndexError naming the id and its row, forward and
    backward (no write outside the table)."""
    w = torch.randn(3, 8)
    with pytest.raises(IndexError, match=r"id 3 \(row 1\)"):
        native.table_rows(w, torch.tensor([0, 3, 1]))
    with pytest.raises(IndexError, match=r"id -1 \(row 2\)"):
        native.rows_by_id(torch.ones(3, 8), torch.tensor([0, 2, -1]), 3)


def _shared_table_bags(g: torch.Generator, B: int):
    """Five features' bags over one table of 3,400 rows: f0 single ids in rows [0, 3000),
    f1 and f2 one table (rows [3000, 3100), multi-hot, empty bags among them), f3 two hot rows,
    f4 multi-hot in [3102, 3400) — ids feature after feature, offsets ``[5·B + 1]``."""
    spans = [(0, 3000, 1, 1), (3000, 3100, 0, 4), (3000, 3100, 1, 3), (3100, 3102, 1, 1), (3102, 3400, 0, 5)]
    ids, lengths = [], []
    for lo, hi, least, most in spans:
        n = torch.randint(least, most + 1, (B,), generator=g)
        lengths.append(n)
        ids.append(torch.randint(lo, hi, (int(n.sum()),), generator=g))
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cat(lengths).cumsum(0)])
    return torch.cat(ids), offsets


def test_lookup_kernels_on_two_threads_equal_one_thread_bit_for_bit(with_native):
    """``pooled_sum`` and ``rowwise_adagrad_update`` on PyTorch's two (and three) OpenMP threads
    give the one-thread results bit for bit — the sums, the updated table and its Adagrad
    state — for features that share a table (f1, f2), a mean-pooled one, empty bags and two
    hot rows read by every row of the batch; the plan puts the features that share rows on
    one thread and uses both threads."""
    if not native.openmp_threads() and os.uname().sysname == "Linux":
        pytest.fail("dlrm_mtl._cpu_kernels was built without OpenMP on Linux: its lookup runs on one thread")
    if os.uname().sysname == "Linux":  # the kernels' threads are PyTorch's own: one runtime mapped
        assert len(native.openmp_runtimes()) == 1, native.openmp_runtimes()
    g = torch.Generator().manual_seed(11)
    B, F, R, D = 1500, 5, 3400, 16
    ids, offsets = _shared_table_bags(g, B)
    mean = torch.tensor([0, 0, 1, 0, 0], dtype=torch.uint8)
    w0, m0 = torch.randn(R, D, generator=g), torch.rand(R, generator=g)
    grad = torch.randn(B, F * D + 7, generator=g)[:, 3:3 + F * D]  # a column slice: row stride F·D + 7
    lr = torch.tensor(0.05)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert native.openmp_threads() in (0, t)
            w, m = w0.clone(), m0.clone()
            slot = torch.full((R,), -1, dtype=torch.int32)
            out = native.pooled_sum(w, ids, offsets, F, B, mean=mean)
            native.rowwise_adagrad_update(grad, w, m, ids, offsets, F, B, lr, 1e-8, slot, mean=mean)
            assert bool((slot == -1).all())
            results.append((out, w, m))
        torch.set_num_threads(2)
        groups, thread_of = native.lookup_plan(ids, offsets, F, B, 2)
        if native.openmp_threads():  # the switch native.py throws where a second runtime is mapped
            native._kernels.set_one_thread(1)
            assert native.openmp_threads() == 1
            native._kernels.set_one_thread(0)
            assert native.openmp_threads() == 2
    finally:
        torch.set_num_threads(threads)
    for later in results[1:]:
        for a, b in zip(results[0], later):
            assert torch.equal(a, b)
    assert not torch.equal(results[0][1], w0)  # the update changed the table
    assert groups == 4 and thread_of[1] == thread_of[2] and set(thread_of.tolist()) == {0, 1}


def test_lookup_plan_groups_overlapping_features_and_balances_ids(with_native):
    """The update's plan: features whose id ranges overlap form one group (also through a
    chain: [0, 10] meets [5, 20] meets [18, 30]); groups go costliest first to the least
    loaded thread, a feature's cost counting the rows it may touch as well as its ids; a
    feature without ids in the batch goes to thread 0."""
    B = 1
    spans = [[0, 10], [5, 20], [18, 30], [40, 41], [50, 60, 61], [], [70]]
    ids = torch.tensor([i for s in spans for i in s])
    offsets = torch.tensor([0] + [len(s) for s in spans]).cumsum(0)
    groups, thread_of = native.lookup_plan(ids, offsets, len(spans), B, 2)
    assert groups == 4  # {0, 1, 2}, {3}, {4}, {6}
    t = thread_of.tolist()
    assert t[0] == t[1] == t[2] and t[5] == 0
    # costs (ids + 2 min(ids, id range)): group {0,1,2} 18 -> thread 0; {4} 9, {3} 6, {6} 3 -> thread 1
    assert t[0] == 0 and t[4] == 1 and t[3] == 1 and t[6] == 1
    groups, thread_of = native.lookup_plan(ids, offsets, len(spans), B, 1)
    assert bool((thread_of == 0).all())
    # as many ids each, but f0's spread over a wide table (18) and f1, f2 on one row each (8):
    # f1 and f2 share a thread, where counting ids alone would pair f0 with f2
    spans = [[100, 300, 500, 700, 900, 1100], [5] * 6, [7] * 6]
    ids = torch.tensor([i for s in spans for i in s])
    offsets = torch.tensor([0] + [len(s) for s in spans]).cumsum(0)
    groups, thread_of = native.lookup_plan(ids, offsets, 3, B, 2)
    assert groups == 3 and thread_of.tolist() == [0, 1, 1]


def _mixture_case(B, G, E, D, layout, seed=0):
    """gates ``[B, G, E]`` and experts ``[B, E, D]`` in one of the layouts the layers hand
    :func:`mix_experts`, as leaves (the tensors gradients land on) and the views passed."""
    g = torch.Generator().manual_seed(seed)
    if layout == "gates_transposed":  # gates as the transpose of a [B, E, G] tensor
        gl = torch.randn(B, E, G, generator=g).requires_grad_()
        gates = gl.transpose(1, 2)
    else:
        gl = torch.randn(B, G, E, generator=g).requires_grad_()
        gates = gl
    if layout == "expert_major":  # ExpertBank's output: a [B, E, D] view of [E, B, D]
        xl = torch.randn(E, B, D, generator=g).requires_grad_()
        experts = xl.transpose(0, 1)
    elif layout == "broadcast":  # one set of experts for every row (stride 0 along B)
        xl = torch.randn(1, E, D, generator=g).requires_grad_()
        experts = xl.expand(B, E, D)
    else:
        xl = torch.randn(B, E, D, generator=g).requires_grad_()
        experts = xl
    return gl, xl, gates, experts


@pytest.mark.parametrize("layout", ["contiguous", "expert_major", "gates_transposed", "broadcast"])
@pytest.mark.parametrize("B,G,E,D", [(2048, 3, 4, 64), (300, 1, 3, 128), (7, 2, 5, 17), (5, 4, 1, 3)])
def test_expert_mixture_equals_the_matmul_and_float64(with_native, layout, B, G, E, D):
    """The C mixture (forward, both gradients) against PyTorch's batched matmul and float64,
    in every layout the layers pass (expert-major banks, transposed gates, broadcast experts),
    D not a multiple of the dot products' 16 lanes."""
    from dlrm_mtl.modules.mixture import ExpertMixture

    gl, xl, gates, experts = _mixture_case(B, G, E, D, layout)
    assert native.mixture_applies(gates, [experts])
    gy = torch.randn(B, G, D, generator=torch.Generator().manual_seed(1))
    out = {}
    for name, fn, dtype in (("c", lambda g, x: ExpertMixture.apply(g, (G,), False, x), torch.float32),
                            ("aten", torch.matmul, torch.float32), ("f64", torch.matmul, torch.float64)):
        gl.grad = xl.grad = None
        y = fn(gates.to(dtype), experts.to(dtype))
        y.backward(gy.to(dtype))
        out[name] = (y.detach().double(), gl.grad.double(), xl.grad.double())
    for what, c, a, r in zip(("y", "d gates", "d experts"), out["c"], out["aten"], out["f64"]):
        scale = float(r.abs().max()) + 1e-30
        assert float((c - r).abs().max()) <= 2e-6 * scale * max(D, E, G), (what, float((c - r).abs().max()), scale)
        assert float((c - a).abs().max()) <= 4e-6 * scale * max(D, E, G), what
    if layout == "expert_major":  # the experts' gradient came back in their own layout: no copy before the bank's backward
        y = ExpertMixture.apply(gates, (G,), False, experts)
        gx = torch.autograd.grad(y, experts, gy)[0]
        assert gx.stride() == experts.stride()


@pytest.mark.parametrize("relu", [False, True])
def test_expert_mixture_over_parts_with_split_outputs_and_relu_equals_the_layers_ops(with_native, relu):
    """Two banks' outputs (one expert-major, one contiguous) mixed where they lie into two output
    blocks, the experts' last ReLU inside (``relu``), against what the layers did before:
    ReLU, ``cat``, the matmul and ``split`` — outputs and every gradient, the pre-activations'
    included (0 wherever a value was ≤ 0, exact zeros among them)."""
    from dlrm_mtl.modules.mixture import ExpertMixture

    g = torch.Generator().manual_seed(4)
    B, D = 513, 40
    gates = torch.softmax(torch.randn(B, 3, 5, generator=g), -1).requires_grad_()
    a = torch.randn(2, B, D, generator=g)
    a[0, :7] = 0.0  # ReLU's kink: the gradient there is 0, as threshold_backward gives
    a = a.requires_grad_()
    b = torch.randn(B, 3, D, generator=g).requires_grad_()
    up = (torch.randn(B, 2, D, generator=g), torch.randn(B, 1, D, generator=g))

    def reference():
        parts = [a.transpose(0, 1), b]
        pool = torch.cat([p.relu() if relu else p for p in parts], dim=1)  # [B, 5, D]
        return torch.matmul(gates, pool).split([2, 1], dim=1)

    res = []
    for fn in (reference, lambda: ExpertMixture.apply(gates, (2, 1), relu, a.transpose(0, 1), b)):
        gates.grad = a.grad = b.grad = None
        outs = fn()
        torch.autograd.backward(list(outs), list(up))
        res.append([o.detach() for o in outs] + [gates.grad, a.grad, b.grad])
    for x, y in zip(*res):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    if relu:  # the pre-activations' gradient is exactly 0 where they were <= 0
        assert torch.equal(res[1][3] == 0, res[0][3] == 0) and bool((res[1][3][0, :7] == 0).all())
    assert res[1][3].stride() == a.stride()  # expert-major gradient for the expert-major part


def test_expert_mixture_on_two_threads_equals_one_thread_and_skips_unwanted_gradients(with_native):
    """Rows split over PyTorch's threads: every bit the one-thread result; a gradient not
    asked for is not computed (None)."""
    gl, xl, gates, experts = _mixture_case(4096, 3, 4, 64, "expert_major", seed=2)
    gates, experts = gates.detach(), experts.detach()
    gy = torch.randn(4096, 3, 64, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    res = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for relu in (False, True):
                y = native.mixture_forward(gates, [experts], [3], relu)[0]
                gw, (gx,) = native.mixture_backward([gy], gates, [experts], relu)
                res.append((y, gw, gx))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(res[:2], res[2:]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    gw, (gx,) = native.mixture_backward([gy], gates, [experts], want_gates=False)
    assert gw is None and torch.equal(gx, res[0][2])
    gw, (gx,) = native.mixture_backward([gy], gates, [experts], want_parts=[False])
    assert gx is None and torch.equal(gw, res[0][1])


def test_mix_experts_takes_the_c_mixture_only_where_it_applies(with_native):
    """``mix_experts`` runs :class:`ExpertMixture` on 3-D float32 host tensors with the kernels
    on, and the ATen forms otherwise (kernels off, float64, leading dimensions that broadcast),
    each the same sum to float rounding."""
    from dlrm_mtl.modules.mixture import mix_experts

    gates = torch.softmax(torch.randn(64, 2, 4), -1).requires_grad_()
    experts = torch.randn(64, 4, 16).requires_grad_()
    y = mix_experts(gates, experts)
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "ExpertMixtureBackward"
    native.set_enabled(False)
    try:
        ref = mix_experts(gates, experts)
        assert "ExpertMixture" not in type(ref.grad_fn).__name__
    finally:
        native.set_enabled(True)
    assert torch.allclose(y, ref, atol=1e-6)
    y64 = mix_experts(gates.double(), experts.double())
    assert y64.dtype == torch.float64 and "ExpertMixture" not in type(y64.grad_fn).__name__
    y4 = mix_experts(gates.unsqueeze(0).expand(3, 64, 2, 4), experts.unsqueeze(0).expand(3, 64, 4, 16))
    assert "ExpertMixture" not in type(y4.grad_fn).__name__ and torch.allclose(y4[1], y, atol=1e-6)
    with pytest.raises(ValueError, match="4 gate weights per row for 3 experts"):
        mix_experts(gates, experts[:, :3])
    empty = mix_experts(gates[:0], experts[:0])  # an empty batch (a rank's padded share of nothing)
    assert empty.shape == (0, 2, 16) and type(empty.grad_fn).__name__ == "ExpertMixtureBackward"
    empty.sum().backward()
    assert gates.grad.abs().sum() == 0 and experts.grad.abs().sum() == 0


def test_take_rows_equals_numpy_take_on_every_layout(with_native):
    """The reader's shuffle in C: every row width (1 to 40 bytes, and zero-width columns), 1-D
    and 2-D arrays along axis 0 and a single-hot id matrix along axis 1 give numpy's take,
    dtype and shape included; on one thread and on two the same bytes."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 40_000  # above the kernels' threading threshold
    idx = rng.permutation(n)
    arrays = [rng.random(n, dtype=np.float32), rng.integers(0, 9, (n, 1)), rng.random((n, 2)) < 0.5,
              rng.integers(0, 200, (n, 3)).astype(np.uint8), rng.random((n, 3), dtype=np.float32),
              np.arange(n, dtype=np.int16), rng.random((n, 5)), np.zeros((n, 0), np.float32),
              rng.random((n, 2, 3), dtype=np.float32)]
    outs = native.take_rows([(a, 0) for a in arrays], idx, n)
    for a, o in zip(arrays, outs):
        want = np.take(a, idx, axis=0)
        assert o.dtype == want.dtype and o.shape == want.shape
        np.testing.assert_array_equal(o, want)
    matrix = rng.integers(0, 10**6, (7, n))
    part = idx[: n // 3]
    (o,) = native.take_rows([(matrix, 1)], part, n)
    np.testing.assert_array_equal(o, np.take(matrix, part, axis=1))
    one = np.empty((n, 5))
    native._kernels.take_rows(idx, n, n, 1, arrays[6], 40, one, 40, 40)
    two = np.empty((n, 5))
    native._kernels.take_rows(idx, n, n, 2, arrays[6], 40, two, 40, 40)
    assert one.tobytes() == two.tobytes() == outs[6].tobytes()
    assert [o.shape for o in native.take_rows([(arrays[1], 0), (matrix, 1)], np.zeros(0, np.int64), n)] == [(0, 1), (7, 0)]


def test_take_rows_rejects_indices_outside_the_rows_before_writing(with_native):
    import numpy as np

    src = np.arange(10, dtype=np.int64)
    for bad in ([0, 10, 1], [3, -1]):
        dst = np.full(len(bad), 77, np.int64)
        with pytest.raises(IndexError, match="out of range for 10 rows"):
            native._kernels.take_rows(np.array(bad, np.int64), len(bad), 10, 2, src, 8, dst, 8, 8)
        assert (dst == 77).all()
    with pytest.raises(ValueError, match="rows along axis 0, expected 11"):
        native.take_rows([(src, 0)], np.array([0]), 11)
    with pytest.raises(IndexError):
        native.take_lists(np.ones(3, np.int32), np.arange(4), np.arange(3), np.array([0, 3]))
    assert not native.take_applies(src[::2]) and native.take_applies(src, None)


def test_take_lists_equals_the_numpy_gather_of_list_rows(with_native, monkeypatch):
    """A multi-hot column's rows in a new order (empty lists included) as the numpy path of
    ``batch_columns._take_lists`` computes them; on a reader thread the gather keeps to that
    thread (one thread: its own OpenMP team would be a second pool)."""
    import threading

    import numpy as np

    from dlrm_mtl.data import batch_columns

    rng = np.random.default_rng(2)
    n = 50_000
    lens = rng.integers(0, 5, n).astype(np.int32)
    offs = np.concatenate([[0], np.cumsum(lens, dtype=np.int64)])
    vals = rng.integers(0, 10**9, int(offs[-1]))
    idx = np.concatenate([rng.permutation(n), rng.integers(0, n, 100)])  # repeated rows too
    got = native.take_lists(lens, offs, vals, idx)
    monkeypatch.setattr(native, "_enabled", False)
    want = batch_columns._take_lists((lens, offs, vals), idx)
    monkeypatch.setattr(native, "_enabled", True)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)
    seen = []
    th = threading.Thread(target=lambda: seen.append(native._take_threads()))
    th.start()
    th.join()
    assert seen == [1] and native._take_threads() == torch.get_num_threads()
