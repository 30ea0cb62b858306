"""Helpers for the checkpoint tests: small-table schema, training runs, audits, exports."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pyarrow.parquet as pq
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def small_schema(data: Path) -> Path:
    """The synthetic schema with 2,000-row hashed tables: checkpoints of ~3 MB instead of ~50 MB."""
    out = data / "schema_small_tables.yaml"
    if not out.exists():
        d = yaml.safe_load((data / "schema.yaml").read_text())
        for f in d["sparse"]:
            if f.get("hash"):
                f["num_embeddings"] = 2000
        out.write_text(yaml.safe_dump(d, sort_keys=False))
    return out


def train_args(data: Path, run: Path, *extra: str, epochs: int = 2) -> List[str]:
    sets = [f"data.train={data / 'train'}", f"data.eval={data / 'eval'}", f"data.schema={small_schema(data)}",
            f"train.run_dir={run}", "data.batch_size=256", f"train.epochs={epochs}", "train.progress=false",
            "train.eval_every_epoch=false", "train.timeout_s=30", "data.shuffle_buffer_rows=1500",
            "checkpoint.audit_rows=true", "checkpoint.keep_last=0", *extra]
    return [a for s in sets for a in ("--set", s)]


def run(cmd: Sequence[str], env_extra: Optional[Dict[str, str]] = None, expect_ok: bool = True,
        timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DLRM_MTL_TEST_KILL"}
    env.update(PATH=f"{BIN}:{os.environ.get('PATH', '')}", **(env_extra or {}))
    proc = subprocess.run(list(cmd), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    else:
        assert proc.returncode != 0, "expected the run to fail:\n" + proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def train_1proc(data: Path, run_dir: Path, *extra: str, epochs: int = 2, flags: Sequence[str] = (),
                **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dlrm_mtl", "train", "--config", "configs/demo.yaml", *flags,
                *train_args(data, run_dir, *extra, epochs=epochs)], **kw)


def train_torchrun(data: Path, run_dir: Path, nproc: int, *extra: str, epochs: int = 2, max_restarts: int = 0,
                   **kw) -> subprocess.CompletedProcess:
    return run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), "--max_restarts",
                str(max_restarts), "-m", "dlrm_mtl", "train", "--config", "configs/demo.yaml",
                *train_args(data, run_dir, *extra, epochs=epochs)], **kw)


def kill_env(where: str, step, rank: int, marker: Path) -> Dict[str, str]:
    return {"DLRM_MTL_TEST_KILL": f"{where}:{step}:{rank}:{marker}"}


def audit_lines(run_dir: Path) -> Dict[int, Dict[int, List[int]]]:
    """rank -> step -> row ids, from RUN/audit/rankR.rows."""
    out: Dict[int, Dict[int, List[int]]] = {}
    for f in sorted((run_dir / "audit").glob("rank*.rows")):
        rank = int(f.stem[4:])
        steps: Dict[int, List[int]] = {}
        for line in f.read_text().splitlines():
            parts = line.split()
            step = int(parts[0])
            assert step not in steps, f"{f}: step {step} logged twice"
            steps[step] = [int(x) for x in parts[2:]]
        out[rank] = steps
    return out


def rows_per_epoch(run_dir: Path) -> Dict[int, Counter]:
    """epoch -> Counter(row id -> times trained), over every rank's audit file."""
    out: Dict[int, Counter] = {}
    for f in sorted((run_dir / "audit").glob("rank*.rows")):
        for line in f.read_text().splitlines():
            parts = line.split()
            out.setdefault(int(parts[1]), Counter()).update(int(x) for x in parts[2:])
    return out


def dataset_row_ids(data: Path) -> List[int]:
    return sorted(pq.ParquetDataset(data / "train").read(columns=["row_id"])["row_id"].to_pylist())


def assert_exactly_once(run_dir: Path, data: Path, epochs: int) -> None:
    ids = dataset_row_ids(data)
    per_epoch = rows_per_epoch(run_dir)
    assert sorted(per_epoch) == list(range(epochs)), sorted(per_epoch)
    for e, counter in per_epoch.items():
        twice = [r for r, n in counter.items() if n > 1]
        assert not twice, f"epoch {e}: {len(twice)} rows trained more than once, e.g. {twice[:5]}"
        missing = set(ids) - set(counter)
        assert not missing, f"epoch {e}: {len(missing)} rows never trained, e.g. {sorted(missing)[:5]}"
        assert sorted(counter) == ids


def exported(ckpt: Path, out: Path) -> dict:
    """``dlrm-mtl export-checkpoint --with-optimizer`` (in this process), loaded back."""
    from dlrm_mtl.cli import main

    assert main(["export-checkpoint", "--checkpoint", str(ckpt), "--out", str(out), "--with-optimizer"]) == 0
    return torch.load(out, weights_only=False)


def flat(sd, prefix: str = "") -> Dict[str, object]:
    out: Dict[str, object] = {}
    if isinstance(sd, dict):
        for k, v in sd.items():
            out.update(flat(v, f"{prefix}{k}/"))
    elif isinstance(sd, (list, tuple)):
        for i, v in enumerate(sd):
            out.update(flat(v, f"{prefix}{i}/"))
    else:
        out[prefix.rstrip("/")] = sd
    return out


def assert_same_state(a: dict, b: dict, what: str) -> None:
    """Bit-for-bit equality of two exported checkpoints' model and optimizer states."""
    fa, fb = flat({k: a[k] for k in ("model", "optim")}), flat({k: b[k] for k in ("model", "optim")})
    assert fa.keys() == fb.keys(), (what, sorted(set(fa) ^ set(fb))[:10])
    diffs = []
    for k in fa:
        x, y = fa[k], fb[k]
        if isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                diffs.append(f"{k}: max |diff| {(x.double() - y.double()).abs().max().item():.3g}")
        elif x != y:
            diffs.append(f"{k}: {x!r} != {y!r}")
    assert not diffs, f"{what}: {len(diffs)} entries differ: " + "; ".join(diffs[:8])


def train_in_process(data: Path, run_dir: Path, *extra: str, epochs: int = 2) -> dict:
    """One rank in this very process (no import cost); the launcher's env vars are restored after."""
    from dlrm_mtl.config import Config
    from dlrm_mtl.train import train

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    sets = train_args(data, run_dir, *extra, epochs=epochs)[1::2]
    try:
        return train(Config.load(str(ROOT / "configs" / "demo.yaml"), sets))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
