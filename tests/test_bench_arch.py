"""tools/bench_arch.py compares the same math: its loop reference replaces every ExpertBank of
every architecture fragment and reproduces the batched model's logits and gradients."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from dlrm_mtl.models.ranking_model import DenseArch
from dlrm_mtl.modules.expert_bank import ExpertBank
from dlrm_mtl.synthetic import synthetic_schema

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_arch", ROOT / "tools" / "bench_arch.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

FRAGMENTS = sorted(p.stem for p in (ROOT / "configs" / "arch").glob("*.yaml"))


@pytest.mark.parametrize("arch", FRAGMENTS)
def test_loop_reference_is_the_same_model(arch):
    torch.manual_seed(0)
    schema = synthetic_schema()
    cfg = bench.scaled_config(ROOT / "configs" / "arch" / f"{arch}.yaml", experts=4, hidden=8)
    batched = DenseArch(schema, cfg.model)
    loop = bench.to_loop(batched)
    n_banks = sum(isinstance(m, ExpertBank) for m in batched.modules())
    assert sum(isinstance(m, bench.LoopExpertBank) for m in loop.modules()) == n_banks
    assert not any(isinstance(m, ExpertBank) for m in loop.modules())
    batch = bench.inputs(schema, 64)
    batched.eval(), loop.eval()
    out_b, out_l = batched(*batch)[0], loop(*batch)[0]
    torch.testing.assert_close(out_l, out_b, rtol=1e-5, atol=1e-5)
    # gradients of the shared (non-bank) parameters agree too: the loop differs only inside banks
    out_b.sum().backward(), out_l.sum().backward()
    grads_l = {n: p.grad for n, p in loop.named_parameters()}
    for name, p in batched.named_parameters():
        if name in grads_l and p.grad is not None:
            torch.testing.assert_close(grads_l[name], p.grad, rtol=1e-4, atol=1e-5)


def test_bank_benchmark_floor_counts_the_banks_matmuls():
    """The GEMM floor runs one forward, weight-gradient and input-gradient matmul per layer,
    with the shapes of the bank's own: [B, in] x [in, E*h] at layer 0, [E, B, h] x [E, h, k] deeper."""
    bank = ExpertBank(3, 10, [6], 5)
    ops = bench.bank_gemms(bank, 16)
    assert len(ops) == 3 * 2
    outs = [op() for op in ops]
    assert [tuple(o.shape) for o in outs] == [(16, 18), (10, 18), (16, 10), (3, 16, 5), (3, 6, 5), (3, 16, 6)]
    r = bench.bench_bank(16, 3, [6], 10, 5, steps=2, warmup=1, chunk=1)
    assert r["max_abs_diff"] < 1e-6 and r["floor_ms"] > 0 and r["max_ratio"] == r["loop_ms"] / r["floor_ms"]


def test_mixture_benchmark_compares_the_same_model_and_restores_the_threshold():
    from dlrm_mtl.modules import mixture

    before = mixture.SMALL_MIXTURE
    applies, runs_on = mixture.native.mixture_applies, mixture.native.mixture_runs_on
    r = bench.bench_mixture(None, 64, steps=2, warmup=1, chunk=1)  # the default arch: CGC layers with small mixtures
    assert mixture.SMALL_MIXTURE == before  # every switch restored
    assert mixture.native.mixture_applies is applies and mixture.native.mixture_runs_on is runs_on
    assert r["max_abs_diff"] < 1e-5 and r["mixture_median_ms"] > 0 and r["bmm_median_ms"] > 0 and r["aten_median_ms"] > 0
    assert r["aten_ratio"] == pytest.approx(r["aten_median_ms"] / r["mixture_median_ms"])


def test_free_banks_record_every_bank_call_for_the_dense_arch_bound():
    """--bound: the dense arch with free banks records each bank call's rows; scenario-specific
    experts see only their scenario's rows (CGC per level), so the floor is timed for exactly
    the GEMMs the batched model runs."""
    torch.manual_seed(0)
    schema = synthetic_schema()
    cfg = bench.scaled_config(ROOT / "configs" / "arch" / "cgc.yaml", experts=4, hidden=8)
    for layer in cfg.model.scenario_layers:
        layer.routing = "gather"  # rows grouped by scenario (static routing runs every expert on every row)
    model = DenseArch(schema, cfg.model)
    free = bench.to_free(model)
    batch = bench.inputs(schema, 64)
    ops = bench.gemm_floor_ops(free, batch)
    calls = [c for m in free.modules() if isinstance(m, bench.FreeExpertBank) for c in m.calls]
    n_banks = sum(isinstance(m, ExpertBank) for m in model.modules())
    assert len([m for m in free.modules() if isinstance(m, bench.FreeExpertBank)]) == n_banks
    # each scenario level: a shared-expert call on all rows, and one call per scenario value on
    # that value's rows only (together: every row once per level)
    assert sum(r for r, _, _ in calls if r < 64) == 64 * len(schema.scenarios)
    assert len(ops) == 3 * 2 * len(calls)  # forward, weight grad, input grad for both layers of every call
