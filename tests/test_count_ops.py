"""tools/count_ops.py: the operator / host-synchronisation counter, and the numbers it pins."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import count_ops  # noqa: E402

# The default config's operators per non-logging step, counted before the work that cut them
# (docs/performance.md) and the ceiling now: at most half.
DEFAULT_OPS_BEFORE = 1276


def test_counter_sees_value_reads_data_dependent_shapes_and_host_copies():
    x = torch.arange(6.0)
    host = torch.zeros((), dtype=torch.int64)
    counter = count_ops.OpCounter(host_resident=[host])
    with counter, count_ops.counting_host_reads(counter):
        y = (x * 2).sum()
        step0 = counter.cut()
        _ = y.item()  # value read
        _ = x[x > 2]  # boolean mask: data-dependent shape
        _ = torch.nonzero(x)
        _ = x.tolist()  # not dispatched: wrapped
        _ = torch.repeat_interleave(torch.tensor([1, 2]))
        step1 = counter.cut()
        _ = host.item()  # a host-resident counter: not a synchronisation
        _ = torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)
        step2 = counter.cut()
    assert step0.ops == 2 and step0.syncs == 0
    assert step1.syncs == 5, step1.sync_by_op
    assert set(step1.sync_by_op) >= {"_local_scalar_dense", "nonzero", "tolist", "repeat_interleave"}
    assert step2.syncs == 0 and step2.host_reads == 1
    assert torch.Tensor.tolist is not None and "counted" not in torch.Tensor.tolist.__name__  # restored


@pytest.mark.slow
def test_default_config_has_no_host_sync_outside_logging_steps_and_half_the_operators(tmp_path):
    """The real loop (world of one, default config): 0 host synchronisations on a
    non-logging step, some on a logging step (the counter is live), ≤ half the operators."""
    data = count_ops.ensure_data(ROOT / "data" / "count_ops", 40_000)
    r = count_ops.count_case("default", count_ops.fragments()["default"], data, tmp_path, steps=10, log_every=4)
    assert r.syncs_per_step == 0, r.sync_ops
    assert r.syncs_logging_step > 0
    assert r.ops_per_step <= DEFAULT_OPS_BEFORE // 2, r.top_ops[:10]
