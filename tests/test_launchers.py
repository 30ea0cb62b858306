"""TorchX dry runs for Slurm and Kubernetes: the generated job has the nodes, processes,
resources, rendezvous and the exact training command, with no cluster needed."""

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRAIN_CMD = "-m dlrm_mtl train --config configs/demo.yaml --set train.epochs=3 --set data.batch_size=4096"


def _dryrun(*args: str) -> str:
    cmd = [str(BIN / "torchx"), "run", "--workspace", "", "--dryrun", *args]
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    marker = "=== SCHEDULER REQUEST ==="
    out = proc.stdout if marker in proc.stdout else proc.stdout + proc.stderr  # logs go to stderr
    return out[out.index("=== SCHEDULER REQUEST ===") + len("=== SCHEDULER REQUEST ===") :]


COMPONENT = ["launchers/dlrm_mtl_train.py:train", "-j", "2x4", "--gpu", "4", "--cpu", "16", "--memMB", "65536",
             "--max_retries", "2", "--config", "configs/demo.yaml"]
OVERRIDES = ["train.epochs=3", "data.batch_size=4096"]  # trailing KEY=VALUE -> --set


def test_slurm_dryrun():
    script = _dryrun("-s", "slurm", *COMPONENT, *OVERRIDES)
    groups = re.findall(r"#SBATCH --job-name=dlrm_mtl-\d+ (.*)", script)
    assert len(groups) == 2  # one heterogeneous group per node
    for g in groups:
        assert "--ntasks-per-node=1" in g and "--cpus-per-task=16" in g and "--mem=65536" in g and "--gpus-per-task=4" in g
    assert "export TORCHX_MAX_RETRIES=2" in script
    assert script.count("--rdzv_backend c10d") == 2
    assert script.count("--nnodes 2 --nproc_per_node 4") == 2
    assert "${SLURM_JOB_NODELIST_HET_GROUP_0:=localhost}:29500" in script
    assert script.count(TRAIN_CMD) == 2


def test_kubernetes_dryrun():
    request = _dryrun("-s", "kubernetes", "-cfg", "queue=ranking", *COMPONENT, "--image", "registry/dlrm-mtl:1", *OVERRIDES)
    job = yaml.safe_load(request)
    assert job["kind"] == "Job" and job["apiVersion"].startswith("batch.volcano.sh")
    assert job["spec"]["queue"] == "ranking" and job["spec"]["schedulerName"] == "volcano"
    tasks = job["spec"]["tasks"]
    assert len(tasks) == 2
    for t in tasks:
        (c,) = t["template"]["spec"]["containers"]
        assert c["image"] == "registry/dlrm-mtl:1"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
        assert c["resources"]["limits"]["cpu"] == "16000m"
        assert c["ports"] == [{"containerPort": 29500, "name": "c10d"}]
        command = " ".join(c["command"])
        assert "torchrun --rdzv_backend c10d" in command and "--nnodes 2 --nproc_per_node 4" in command
        assert TRAIN_CMD in " ".join(command.split())
