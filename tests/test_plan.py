"""`dlrm-mtl plan`: the training planner, run for any world size without training."""

import pytest

from dlrm_mtl.config import Config
from dlrm_mtl.plan import sharding_plan


def _cfg(synthetic_small, types):
    return Config.load(None, [f"data.train={synthetic_small / 'train'}", f"sharding.types=[{types}]"])


@pytest.mark.parametrize("types", ["table_wise", "row_wise"])
def test_memory_per_rank_falls_as_ranks_grow(synthetic_small, types):
    plans = {ws: sharding_plan(_cfg(synthetic_small, types), ws) for ws in (1, 2, 4)}
    for ws, p in plans.items():
        assert {t["sharding_type"] for t in p["tables"].values()} == {types}
        assert len(p["bytes_per_rank"]) == ws
    mean = {ws: sum(p["bytes_per_rank"]) / ws for ws, p in plans.items()}
    peak = {ws: max(p["bytes_per_rank"]) for ws, p in plans.items()}
    assert mean[1] > mean[2] > mean[4]
    # table-wise: the biggest table bounds the peak (plus a few % of per-rank buffers)
    assert peak[1] > peak[2] and peak[4] <= 1.02 * peak[2]
    if types == "row_wise":  # every table is split over every rank: the peak shrinks too
        assert peak[1] > 1.5 * peak[2] and peak[2] > 1.5 * peak[4]
        assert all(t["ranks"] == [0, 1, 2, 3] for t in plans[4]["tables"].values())
        assert plans[4]["imbalance"] < 1.05


def test_plan_cli_prints_tables_and_ranks(synthetic_small, capsys):
    from dlrm_mtl.cli import main

    assert main(["plan", "--world-size", "2", "--set", f"data.train={synthetic_small / 'train'}"]) == 0
    out = capsys.readouterr().out
    for table in ("t_user", "t_item", "t_segment", "t_category", "t_device"):
        assert table in out
    assert "rank 1" in out and "imbalance" in out
