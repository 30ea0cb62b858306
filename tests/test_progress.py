"""Progress lines in a non-terminal log: every epoch shows its progress at a steady cadence."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"\[dlrm_mtl\] epoch (\d+) step (\d+)/(\d+) \(global (\d+)\) rows ([\d,]+) loss [\d.]+ ([\d,]+) samples/s, epoch ETA \d+s")


def test_every_epoch_prints_progress_every_log_every_steps(synthetic_small, tmp_path):
    cmd = [sys.executable, "-m", "dlrm_mtl", "train", "--set", f"data.train={synthetic_small / 'train'}",
           "--set", f"data.eval={synthetic_small / 'eval'}", "--set", f"train.run_dir={tmp_path / 'run'}",
           "--set", "data.batch_size=256", "--set", "train.epochs=3", "--set", "train.log_every=7",
           "--set", "train.eval_every_epoch=false", "--set", "checkpoint.at_end=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)  # a pipe, not a terminal
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "training: epochs 0..2 x" in out.split("epoch 0 step", 1)[0]  # said before the first step
    lines = [tuple(int(g.replace(",", "")) for g in m.groups()) for m in LINE.finditer(out)]
    steps = lines[0][2]
    assert steps % 7 != 0  # the case that used to silence every epoch after the first
    for epoch in range(3):
        mine = [l for l in lines if l[0] == epoch]
        # a line every 7 global steps inside the epoch, plus its last step
        want = sorted({i for i in range(1, steps + 1) if (epoch * steps + i) % 7 == 0} | {steps})
        assert [l[1] for l in mine] == want, (epoch, [l[1] for l in mine])
        # global step, rows so far (real rows: an epoch's last batch may be padded), samples/s
        assert all(l[3] == epoch * steps + l[1] and (l[3] - epoch - 1) * 256 < l[4] <= l[3] * 256 and l[5] > 0 for l in mine)
    assert [l[4] for l in lines] == sorted(l[4] for l in lines)
