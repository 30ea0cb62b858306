"""Every task-relation head (configs/heads/) trains sharded: 2 processes over gloo, embedding
tables sharded by the planner across both ranks, the dense arch — heads included — replicated
by DDP and identical on both ranks afterwards; AITM's calibrator reaches the loss and its
attention gate the utilisation images. One pair of processes trains the heads in turn (a
fresh process group per head), as tests/test_arch_sharded.py does for the layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from two_ranks import free_port_block, run_two_ranks

ROOT = Path(__file__).resolve().parents[1]
HEADS = ["dbmtl", "aitm", "nmtr"]

WORKER = r'''
import os, sys
from pathlib import Path
from dlrm_mtl.config import Config
from dlrm_mtl.train import train

root, data, runs, base_port = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
for i, name in enumerate(sys.argv[5:]):
    os.environ["MASTER_PORT"] = str(base_port + i)
    cfg = Config.load(
        [f"{root}/configs/demo.yaml", f"{root}/configs/heads/{name}.yaml"],
        [f"data.train={data / 'train'}", f"data.eval={data / 'eval'}", f"train.run_dir={runs / name}",
         "data.batch_size=256", "train.epochs=1", "train.max_steps=8", "train.progress=false",
         "train.log_every=4", "train.threads_per_rank=1", "train.timeout_s=60", "sharding.types=[row_wise]",
         "checkpoint.keep_best=false"],
    )
    train(cfg)
'''


@pytest.mark.slow
def test_every_head_trains_with_two_sharded_ranks(synthetic_small, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    runs = tmp_path / "runs"
    run_two_ranks(script, [str(ROOT), str(synthetic_small), str(runs), str(free_port_block(len(HEADS)))] + HEADS, timeout=600)

    for name in HEADS:
        run = runs / name
        result = json.loads((run / "metrics.json").read_text())
        assert all(sorted(p["ranks"]) == [0, 1] for p in result["plan"].values()), (name, result["plan"])
        r0, r1 = (json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1))
        assert r0["dense_sha256"] == r1["dense_sha256"], name  # heads replicated by DDP
        assert result["step"] == 8
        saved = (run / "config.yaml").read_text()
        assert f"type: {name}" in saved, name  # the resolved config names the head
        loss = result["loss"]
        assert all(v == v and abs(v) < 100 for v in loss.values()), (name, loss)
        by = {(r["scenario"], r["task"]): r for r in result["metrics"]}
        for task in ("ctr", "cvr", "ctcvr"):
            auc = by[("all", task)]["auc"]
            assert 0.0 <= auc <= 1.0, (name, task, auc)
        if name == "aitm":
            # the calibrator is a logged aux term; α · L_lc ≥ 0 and included in the total
            assert "aux/heads/calibrator" in loss and loss["aux/heads/calibrator"] >= 0, loss
            u = result["expert_utilisation"]["heads/ait"]
            assert len(u["matrix"][0]) == 2  # (transferred info, own tower)
            assert all(abs(sum(row) - 1) < 1e-4 for row in u["matrix"]), u
        else:
            assert not any(k.startswith("aux/heads") for k in loss), (name, loss)
