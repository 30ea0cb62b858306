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


def test_per_table_overrides_and_capacity(synthetic_small):
    cfg = Config.load(None, [
        f"data.train={synthetic_small / 'train'}",
        "sharding.types=[table_wise]",
        "sharding.tables={t_user: {types: [row_wise]}, t_item: {types: [table_row_wise]}}",
        "sharding.memory_per_rank_gb=2",
    ])
    p = sharding_plan(cfg, 2)
    kinds = {t: v["sharding_type"] for t, v in p["tables"].items()}
    assert kinds == {"t_user": "row_wise", "t_item": "table_row_wise", "t_segment": "table_wise",
                     "t_category": "table_wise", "t_device": "table_wise"}
    assert p["memory_per_rank_gb"] == 2.0
    auto = sharding_plan(Config.load(None, [f"data.train={synthetic_small / 'train'}"]), 2, local_world_size=2)
    import os
    host_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    assert auto["memory_per_rank_gb"] == pytest.approx(host_gb / 2, rel=1e-6)  # from the hardware


def test_per_table_override_of_unknown_table_is_an_error(synthetic_small):
    cfg = Config.load(None, [f"data.train={synthetic_small / 'train'}", "sharding.tables={t_nope: {types: [row_wise]}}"])
    with pytest.raises(ValueError, match="t_nope"):
        sharding_plan(cfg, 2)


def test_per_table_optimizer_overrides(synthetic_small):
    """The plan reports the optimizer registered by `apply_table_optimizers`, the function
    training uses; unknown optimizers (fbgemm has no Adam on CPU) are refused."""
    cfg = Config.load(None, [f"data.train={synthetic_small / 'train'}",
                             "sharding.tables={t_device: {optimizer: sgd, lr: 1.0e-12}, t_segment: {optimizer: adagrad}}"])
    p = sharding_plan(cfg, 1)
    assert p["tables"]["t_device"]["optimizer"] == "sgd(lr=1e-12)"
    assert p["tables"]["t_segment"]["optimizer"].startswith("adagrad(")
    assert p["tables"]["t_user"]["optimizer"].startswith("rowwise_adagrad(")
    with pytest.raises(ValueError, match="adam"):
        sharding_plan(Config.load(None, [f"data.train={synthetic_small / 'train'}", "sharding.tables={t_user: {optimizer: adam}}"]), 1)
