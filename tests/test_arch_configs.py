"""The architecture fragments in configs/arch/ compose with configs/demo.yaml, build the model
they describe, and one of them trains end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlrm_mtl.config import Config
from dlrm_mtl.models.ranking_model import DenseArch
from dlrm_mtl.synthetic import synthetic_schema

ROOT = Path(__file__).resolve().parents[1]
FRAGMENTS = sorted((ROOT / "configs" / "arch").glob("*.yaml"))

# fragment -> (scenario layer classes, task layer classes) it must build; fragments not listed
# here (added with other architectures) are still built and run
EXPECTED = {
    "star": (["STARLayer"], []),
    "hmoe": (["HMoELayer"], []),
    "hinet": (["HiNetScenarioLayer"], ["PLELayer"]),
    "parallel_dnn": (["ScenarioCGCLayer"], ["SharedBottomLayer"]),
    "shared_bottom": ([], ["SharedBottomLayer"]),
    "single_task": ([], ["PLELayer"]),
}


@pytest.mark.parametrize("path", FRAGMENTS, ids=[p.stem for p in FRAGMENTS])
def test_fragment_composes_with_demo_and_builds_its_architecture(path):
    cfg = Config.load([str(ROOT / "configs" / "demo.yaml"), str(path)])
    assert cfg.data.batch_size == 1024  # demo.yaml's data section survives the composition
    schema = synthetic_schema()
    torch.manual_seed(0)
    model = DenseArch(schema, cfg.model)
    if path.stem in EXPECTED:
        scen, task = EXPECTED[path.stem]
        assert [type(l).__name__ for l in model.scenario_layers] == scen
        assert [type(l).__name__ for l in model.task_layers] == task
    B = 32
    pooled = torch.randn(B, len(schema.sparse), schema.sparse[0].dim)
    scenario = torch.stack([torch.arange(B) % 2, (torch.arange(B) // 2) % 2], dim=1)
    logits, gates, _ = model(pooled, torch.randn(B, len(schema.dense)), scenario)
    assert logits.shape == (B, len(schema.tasks)) and torch.isfinite(logits).all()


def test_the_scenario_side_fragments_exist():
    assert set(EXPECTED) <= {p.stem for p in FRAGMENTS}


@pytest.mark.slow
def test_hinet_fragment_trains(synthetic_small, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dlrm_mtl", "train", "--config", "configs/demo.yaml", "--config", "configs/arch/hinet.yaml",
           "--set", f"data.train={synthetic_small / 'train'}", "--set", f"data.eval={synthetic_small / 'eval'}",
           "--set", f"train.run_dir={run}", "--set", "train.epochs=2",
           "--set", "data.batch_size=256", "--set", "train.progress=false", "--set", "train.threads_per_rank=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = Config.load(str(run / "config.yaml"))
    assert [l.type for l in saved.model.scenario_layers] == ["hinet"]
    rows = json.loads((run / "metrics.json").read_text())["metrics"]
    ctr = {r["scenario"]: r for r in rows if r["task"] == "ctr"}
    # 2 epochs of 9.6k rows: far from converged (0.60 here; the oracle is 0.85, the default
    # architecture gets ~0.59 on this budget), but above chance: an untrained model's AUC on
    # these 2,400 rows (159 clicks) has a standard deviation of ~0.024 around 0.5
    print("hinet fragment, 2 epochs: ctr auc", ctr["all"]["auc"], "oracle", ctr["all"]["oracle_auc"])
    assert ctr["all"]["auc"] > 0.56, ctr["all"]
