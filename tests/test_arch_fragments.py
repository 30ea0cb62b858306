"""The architecture fragments in configs/arch/ compose with the demo config, build the layers
they name, and (AESM², the one with auxiliary losses) train through the real training path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlrm_mtl.config import Config
from dlrm_mtl.models.ranking_model import DenseArch
from dlrm_mtl.modules import (
    AESMScenarioLayer, AESMTaskLayer, AsymmetricLayer, CrossStitchLayer, HiNetScenarioLayer, HMoELayer, MMoELayer, MultiLevelMMoELayer,
    PLELayer, ScenarioCGCLayer, SharedBottomLayer, SluiceLayer, STARLayer,
)
from dlrm_mtl.synthetic import synthetic_schema

from test_arch import check_trains_every_parameter

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = synthetic_schema()

# fragment -> (classes of its scenario layers, classes of its task layers), in stack order
EXPECTED = {
    "aesm": ([AESMScenarioLayer] * 2, [AESMTaskLayer]),  # channel, then domain
    "mmoe": ([], [MMoELayer]),
    "omoe": ([], [MMoELayer]),
    "ml_mmoe": ([], [MultiLevelMMoELayer]),
    "cross_stitch": ([], [CrossStitchLayer]),
    "asymmetric": ([], [AsymmetricLayer]),
    "sluice": ([], [SluiceLayer]),
    "cgc": ([ScenarioCGCLayer] * 2, [PLELayer]),  # the default arch: scenario CGC per level + CGC
    "ple": ([], [PLELayer]),
    "star": ([STARLayer], []),  # one STAR network over the leaf scenarios
    "hmoe": ([HMoELayer], []),
    "hinet": ([HiNetScenarioLayer], [PLELayer]),
    "parallel_dnn": ([ScenarioCGCLayer], [SharedBottomLayer]),
    "shared_bottom": ([], [SharedBottomLayer]),
    "single_task": ([], [PLELayer]),
}


def test_every_fragment_is_tested():
    assert {p.stem for p in (ROOT / "configs" / "arch").glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fragment_composes_with_demo_and_builds_its_layers(name):
    cfg = Config.load([str(ROOT / "configs/demo.yaml"), str(ROOT / f"configs/arch/{name}.yaml")])
    assert cfg.data.batch_size == 1024  # the demo's settings survive the merge
    torch.manual_seed(0)
    model = DenseArch(SCHEMA, cfg.model)
    scen, task = EXPECTED[name]
    assert [type(l) for l in model.scenario_layers] == scen
    assert [type(l) for l in model.task_layers] == task
    if name == "omoe":
        assert model.task_layers[0].one_gate
    if name == "asymmetric":  # the fragment's edge, by schema task name: ctr's bottom feeds cvr's
        assert model.task_layers[0].parents == [[], [SCHEMA.task_names.index("ctr")]]
    _, _, aux = check_trains_every_parameter(model)
    if name == "aesm":
        assert model.scenario_layer_names == ["scenario0/channel", "scenario1/domain"]
        assert set(aux) == {f"aux/{n}/{k}" for n in ("scenario0/channel", "scenario1/domain", "task0") for k in ("kl_specific", "kl_shared")}
    if name == "sluice":
        assert set(aux) == {"aux/task0/orthogonality"} and aux["aux/task0/orthogonality"] > 0
    # DDP's gradient layout contract: a gradient with other strides than its parameter is
    # copied into the bucket every step (and warned about) instead of being written in place
    odd = [(n, p.stride(), p.grad.stride()) for n, p in model.named_parameters()
           if p.grad is not None and p.grad.stride() != p.stride()]
    assert odd == [], odd


@pytest.mark.slow
def test_aesm_fragment_trains(synthetic_small, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dlrm_mtl", "train", "--config", "configs/demo.yaml", "--config", "configs/arch/aesm.yaml",
           "--set", f"data.train={synthetic_small / 'train'}", "--set", f"data.eval={synthetic_small / 'eval'}",
           "--set", f"train.run_dir={run}", "--set", "train.max_steps=30", "--set", "train.epochs=1",
           "--set", "data.batch_size=256", "--set", "train.log_every=10", "--set", "train.progress=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((run / "metrics.json").read_text())
    loss = result["loss"]
    kl = {k: v for k, v in loss.items() if k.startswith("aux/")}
    assert len(kl) == 6 and all(v > 0 for v in kl.values()), loss
    # the weighted KL terms are part of the optimised total
    tasks = sum(v for k, v in loss.items() if k.startswith("loss/") and k != "loss/total")
    assert loss["loss/total"] == pytest.approx(tasks + sum(kl.values()), rel=1e-5), loss
    # 30 small steps already rank clicks better than chance (learning quality against the
    # oracle is the comparison's job, not this smoke run's)
    ctr = {(m["scenario"], m["task"]): m for m in result["metrics"]}[("all", "ctr")]
    assert ctr["auc"] > 0.5, ctr
