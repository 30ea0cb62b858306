"""Every architecture in configs/arch/ trains sharded: 2 processes over gloo, embedding tables
sharded by the planner across both ranks, the dense arch replicated by DDP. One pair of
processes trains all architectures in turn (a fresh process group per architecture)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from two_ranks import free_port_block, run_two_ranks

ROOT = Path(__file__).resolve().parents[1]
ARCHS = sorted(p.stem for p in (ROOT / "configs" / "arch").glob("*.yaml"))

WORKER = r'''
import json, os, sys
from pathlib import Path
from dlrm_mtl.config import Config
from dlrm_mtl.train import train

root, data, runs, base_port = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
for i, name in enumerate(sys.argv[5:]):
    os.environ["MASTER_PORT"] = str(base_port + i)
    cfg = Config.load(
        [f"{root}/configs/demo.yaml", f"{root}/configs/arch/{name}.yaml"],
        [f"data.train={data / 'train'}", f"data.eval={data / 'eval'}", f"train.run_dir={runs / name}",
         "data.batch_size=256", "train.epochs=1", "train.max_steps=8", "train.progress=false",
         "train.log_every=4", "train.threads_per_rank=1", "train.timeout_s=60", "sharding.types=[row_wise]"],
    )
    train(cfg)
'''


@pytest.mark.slow
def test_every_architecture_trains_with_two_sharded_ranks(synthetic_small, tmp_path):
    assert len(ARCHS) >= 2, ARCHS
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    runs = tmp_path / "runs"
    run_two_ranks(script, [str(ROOT), str(synthetic_small), str(runs), str(free_port_block(len(ARCHS)))] + ARCHS, timeout=900)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ARCHS:
        run = runs / name
        result = json.loads((run / "metrics.json").read_text())
        # tables really sharded over both ranks
        assert all(sorted(p["ranks"]) == [0, 1] for p in result["plan"].values()), (name, result["plan"])
        # DDP kept the dense arch identical on both ranks
        r0, r1 = (json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1))
        assert r0["dense_sha256"] == r1["dense_sha256"], name
        assert result["step"] == 8
        losses = [v for k, v in result["loss"].items()]
        assert losses and all(v == v and abs(v) < 100 for v in losses), (name, result["loss"])
        ctr = {r["scenario"]: r for r in result["metrics"] if r["task"] == "ctr"}
        assert ctr["all"]["auc"] == ctr["all"]["auc"], name  # finite metrics from the sharded eval
        # expert utilisation: one heatmap per gate, in metrics.json and as a TensorBoard image
        ev = EventAccumulator(str(run / "tb"), size_guidance={"images": 0}).Reload()
        images = set(ev.Tags()["images"])
        for gate, u in result["expert_utilisation"].items():
            assert f"utilisation/{gate}" in images, (name, gate, images)
            assert len(u["matrix"]) == len(u["rows"])
