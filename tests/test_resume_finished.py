"""Resuming a run that already finished trains nothing and keeps its metrics.json."""

import json
import sys
from pathlib import Path

from ckpt_runs import run, train_args

ROOT = Path(__file__).resolve().parents[1]


def test_resume_of_a_finished_run_keeps_its_metrics_unless_asked(synthetic_small, tmp_path):
    cmd = [sys.executable, "-m", "dlrm_mtl", "train", *train_args(synthetic_small, tmp_path, epochs=1)]
    run(cmd + ["--set", "train.max_steps=6"])
    metrics = tmp_path / "metrics.json"
    before = metrics.read_bytes()
    again = run(cmd + ["--set", "train.max_steps=6", "--set", "checkpoint.resume=auto"])
    assert "finished at step 6: nothing to train" in again.stdout
    assert metrics.read_bytes() == before
    asked = run(cmd + ["--set", "train.max_steps=6", "--set", "checkpoint.resume=auto", "--set", "checkpoint.reevaluate_finished=true"])
    assert "nothing to train" not in asked.stdout
    assert json.loads(metrics.read_text())["metrics"] == json.loads(before)["metrics"]  # same weights, evaluated again
    assert metrics.read_bytes() != before  # rewritten (its timings differ)
