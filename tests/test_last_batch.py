"""``data.last_batch``: a CPU world of one trains its epoch's last batch with its real rows
only (no padding rows computed), the same rows and the same updates as the padded batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dlrm_mtl.config import Config, ConfigError, check_values
from dlrm_mtl.distributed import DistEnv
from dlrm_mtl.train import pad_last_batch

ROOT = Path(__file__).resolve().parents[1]


def test_the_short_last_batch_trains_the_rows_the_padded_one_does(synthetic_small, tmp_path):
    """One epoch of 9,600 rows at batch 512: 18 full batches and one of 384 rows. ``auto`` (a
    CPU world of one: short) trains no padding row; ``padded`` trains 128. The first 18 steps
    are the same computation and the last one sees the same real rows, so the dense weights
    end equal to the last step's float rounding (a padding row that carried loss or gradient,
    or a real row left out, would move them by far more)."""
    from dlrm_mtl.distributed import init_distributed, shutdown_distributed
    from dlrm_mtl.train import run_training, setup_run

    env = init_distributed("gloo", 60, 1)
    weights, ranks = {}, {}
    try:
        for mode in ("auto", "padded"):
            cfg = Config.load([str(ROOT / "configs/demo.yaml")], [
                f"data.train={synthetic_small / 'train'}", f"data.eval={synthetic_small / 'eval'}",
                f"train.run_dir={tmp_path / mode}", "data.batch_size=512", "train.epochs=1", "train.progress=false",
                "train.threads_per_rank=1", f"data.last_batch={mode}",
            ])
            run = setup_run(cfg, env)
            sizes = []
            run.dmp.register_forward_pre_hook(lambda m, args: sizes.append(args[0].row_id.shape[0]))
            run_training(run)
            weights[mode] = {n: p.detach().clone() for n, p in run.dmp.module.model.dense_arch.named_parameters()}
            ranks[mode] = json.loads((tmp_path / mode / "ranks" / "rank0.json").read_text())
            if mode == "auto":
                assert sizes[:19] == [512] * 18 + [384]  # training steps (evaluation batches follow)
    finally:
        shutdown_distributed()
    short, padded = ranks["auto"], ranks["padded"]
    assert short["rows_trained"] == padded["rows_trained"] == 9_600
    assert (short["padding_rows"], padded["padding_rows"]) == (0, 19 * 512 - 9_600)
    for name, w in weights["auto"].items():
        torch.testing.assert_close(w, weights["padded"][name], rtol=1e-4, atol=1e-6, msg=name)


def test_last_batch_resolves_per_world_and_device():
    cpu1 = DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo")
    cpu2 = DistEnv(0, 2, 0, 2, torch.device("cpu"), "gloo")
    gpu1 = DistEnv(0, 1, 0, 1, torch.device("cuda", 0), "nccl")
    data = Config.load([str(ROOT / "configs/demo.yaml")], []).data
    assert data.last_batch == "auto"
    assert pad_last_batch(data, cpu1, pin=False) is False
    assert pad_last_batch(data, cpu2, pin=False) is True  # every rank takes equal steps
    assert pad_last_batch(data, gpu1, pin=False) is True  # a CUDA-graphed step keeps its shape
    data.last_batch = "padded"
    assert pad_last_batch(data, cpu1, pin=False) is True
    data.last_batch = "short"
    assert pad_last_batch(data, gpu1, pin=False) is False
    for env, pin in ((cpu2, False), (gpu1, True)):
        with pytest.raises(ConfigError, match="data.last_batch"):
            pad_last_batch(data, env, pin)
    bad = Config.load([str(ROOT / "configs/demo.yaml")], ["data.last_batch=ragged"])
    with pytest.raises(ConfigError, match="data.last_batch"):
        check_values(bad, None)
