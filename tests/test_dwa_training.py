"""DWA in the real loop on two ranks: λ moves from the third epoch on, and it learns as static
weighting does on the same data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _train(data: Path, run: Path, weighting: str) -> dict:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "dlrm_mtl", "train",
           "--set", f"data.train={data / 'train'}", "--set", f"data.eval={data / 'eval'}",
           "--set", f"train.run_dir={run}", "--set", "data.batch_size=256", "--set", "train.epochs=4",
           "--set", "train.eval_every_epoch=false", "--set", "train.progress=false", "--set", f"loss.weighting={weighting}",
           "--set", "train.log_every=5", "--set", "checkpoint.keep_best=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_dwa_weights_move_after_two_epochs_and_it_learns_like_static(synthetic_small, tmp_path):
    dwa = _train(synthetic_small, tmp_path / "dwa", "dwa")
    weights = {k: v for k, v in dwa["loss"].items() if k.startswith("loss_weight/")}
    # K · softmax(r / T): sums to K (the logged value is the mean over the ranks, which agree)
    assert len(weights) == 2 and abs(sum(weights.values()) - 2) < 1e-4
    assert all(abs(v - 1) > 1e-6 for v in weights.values())  # moved from 1 after the second epoch
    static = _train(synthetic_small, tmp_path / "static", "static")
    assert all(v == 1.0 for k, v in static["loss"].items() if k.startswith("loss_weight/"))
    a = {r["task"]: r["auc"] for r in dwa["metrics"] if r["scenario"] == "all"}
    b = {r["task"]: r["auc"] for r in static["metrics"] if r["scenario"] == "all"}
    assert all(a[t] > b[t] - 0.03 for t in b), (a, b)
