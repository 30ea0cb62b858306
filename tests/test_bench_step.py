"""tools/bench_step.py: dlrm_mtl's step and the peer's, interleaved in one process."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench_peer  # noqa: E402
import bench_step  # noqa: E402


def test_side_a_config_is_bench_peers_command(tmp_path):
    """The step is timed on the config bench_peer's side A trains with (arch, overrides, rate)."""
    size = bench_peer.run_sizes(True)["movielens"]
    cfg = bench_step.a_config(tmp_path / "data", "ple", size, tmp_path / "run")
    assert [l.type for l in cfg.model.task_layers] == ["ple"]
    assert cfg.model.interaction == "concat" and cfg.model.dense_arch == []
    assert (cfg.data.batch_size, cfg.train.threads_per_rank) == (size.batch_size, bench_peer.THREADS)
    assert (cfg.train.dense_lr, cfg.train.lr_schedule) == (size.dense_lr, size.lr_schedule)


@pytest.mark.slow
def test_interleaved_rounds_report_both_sides(tmp_path):
    out = tmp_path / "step.json"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_step.py"), "--cases", "census:mmoe", "--train-rows", "3000",
           "--rounds", "3", "--steps", "2", "--data-root", str(tmp_path / "data"), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "census:mmoe" in proc.stdout and "ratio" in proc.stdout
    (case,) = json.loads(out.read_text())["cases"]
    assert (case["shape"], case["arch"]) == ("census", "mmoe")
    # every round timed both sides, and the ratio is the medians' (peer / A)
    assert case["steps_timed"] == {"A": 6, "peer": 6} and len(case["round_ratios"]) == 3
    assert case["ratio"] == pytest.approx(case["peer_ms"] / case["a_ms"])
    for side in ("A", "peer"):
        phases = case["phases_ms"][side]
        assert set(phases) == {"zero_grad", "forward", "backward", "step"}
        assert all(v > 0 for v in phases.values())
        # both sides really trained: finite losses, the same objective's scale (two BCE terms)
        first, last = case["loss"][side]
        assert math.isfinite(first) and math.isfinite(last) and 0 < last < 5
