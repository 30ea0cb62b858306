"""``train.flush_denormal`` (default on): a run's set-up turns on FTZ/DAZ before the intra-op
threads exist, so every thread of a parallel operator flushes subnormal floats to zero; off,
they stay. Each case runs in a fresh interpreter (the flag is per thread and inherited by the
threads created after it is set: this test process's own pool already exists)."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from dlrm_mtl.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys, torch
from dlrm_mtl.config import Config
from dlrm_mtl.distributed import init_distributed, shutdown_distributed
from dlrm_mtl.train import setup_run
data, run_dir, flag = sys.argv[1], sys.argv[2], sys.argv[3]
env = init_distributed("gloo", 60, 2)
cfg = Config.load([], [f"data.train={data}/train", f"data.eval={data}/eval", f"data.schema={data}/schema.yaml",
                       "train.progress=false", f"train.run_dir={run_dir}", f"train.flush_denormal={flag}"])
run = setup_run(cfg, env)
torch.set_num_threads(2)
tiny = torch.full((1 << 21,), 1e-39)  # subnormal; a multiply big enough for both threads
print("kept", int((tiny * 1.0).count_nonzero()), "of", tiny.numel())
shutdown_distributed()
"""


def test_on_by_default():
    assert TrainConfig().flush_denormal is True


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="FTZ/DAZ: x86 only (torch.set_flush_denormal)")
@pytest.mark.parametrize("flag", ["true", "false"])
def test_every_intra_op_thread_flushes_subnormals(synthetic_small, tmp_path, flag):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(synthetic_small), str(tmp_path / "run"), flag],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("kept"))
    kept, total = int(line.split()[1]), int(line.split()[3])
    if flag == "true":
        assert kept == 0  # every thread's share flushed
    else:
        assert kept == total  # subnormals kept by every thread
