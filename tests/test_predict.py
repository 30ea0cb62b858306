"""dlrm-mtl predict: every input row exactly once, the model's own probabilities, the fused
score by hand, label-free input, atomic output."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(cmd, ok=True):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained(synthetic_small, tmp_path_factory):
    run = tmp_path_factory.mktemp("predict") / "run"
    _run([sys.executable, "-m", "dlrm_mtl", "train", "--set", f"data.train={synthetic_small / 'train'}",
          "--set", f"data.eval={synthetic_small / 'eval'}", "--set", f"train.run_dir={run}", "--set", "data.batch_size=256",
          "--set", "train.max_steps=8", "--set", "train.progress=false", "--set", "train.eval_every_epoch=false"])
    return run


def _predict(run: Path, data: Path, out: Path, *extra: str, nproc: int = 1, ok: bool = True):
    head = [sys.executable, "-m", "dlrm_mtl"] if nproc == 1 else [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), "-m", "dlrm_mtl"]
    return _run(head + ["predict", "--config", str(run / "config.yaml"), "--checkpoint", str(run / "checkpoints" / "final"),
                        "--data", str(data), "--out", str(out), "--set", "data.batch_size=100", *extra], ok=ok)


def _reference(run: Path, data: Path):
    """row_id -> (ctr, cvr, ctcvr) from the unsharded model with the checkpoint's weights."""
    from dlrm_mtl.config import Config
    from dlrm_mtl.data import ParquetStream
    from dlrm_mtl.export import load_unsharded
    from dlrm_mtl.losses import EntireSpaceLoss
    from dlrm_mtl.models import MultiScenarioMultiTaskModel, TrainModule
    from dlrm_mtl.schema import Schema
    from dlrm_mtl.scoring import named_predictions
    from dlrm_mtl.task_graph import TaskGraph

    cfg = Config.load(str(run / "config.yaml"))
    schema = Schema.load(cfg.data.schema_path())
    module = TrainModule(MultiScenarioMultiTaskModel(schema, cfg.model, device=torch.device("cpu")), EntireSpaceLoss(schema, cfg.loss),
                         cuda_graph="eager")
    sd = load_unsharded(run / "checkpoints" / "final")["model"]
    missing, unexpected = module.load_state_dict(sd, strict=False)
    assert not [k for k in missing if "ebc" in k or "dense_arch" in k] and not unexpected
    module.eval()
    out = {}
    with torch.no_grad():
        for b in ParquetStream(schema, str(data), 128, prefetch_batches=0):
            probs = named_predictions(TaskGraph(schema), module(b)[1][0])
            for i, rid in enumerate(b.row_id.tolist()):
                if rid >= 0:
                    out[rid] = tuple(float(probs[n][i]) for n in ("ctr", "cvr", "ctcvr"))
    return out


def _eval_row_ids(data: Path):
    return sorted(pq.read_table(data, columns=["row_id"])["row_id"].to_pylist())


def test_predict_writes_every_row_once_with_the_models_probabilities(trained, synthetic_small, tmp_path):
    data = synthetic_small / "eval"
    out = tmp_path / "pred"
    proc = _predict(trained, data, out, "--keep", "user_id", "--set", "predict.fusion={ctr: 1, ctcvr: 2}")
    assert "rows scored" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["_SUCCESS", "part-00000.parquet"]
    t = pq.read_table(out / "part-00000.parquet")
    assert t.schema.names == ["row_id", "user_id", "ctr", "cvr", "ctcvr", "score"]
    assert sorted(t["row_id"].to_pylist()) == _eval_row_ids(data)  # every row once, no padding row
    ref = _reference(trained, data)
    got = {r: (a, b, c) for r, a, b, c in zip(*(t[k].to_pylist() for k in ("row_id", "ctr", "cvr", "ctcvr")))}
    assert set(got) == set(ref)
    diff = max(abs(x - y) for r in ref for x, y in zip(got[r], ref[r]))
    assert diff < 1e-6, diff
    # the fused score by hand (PLE eq. 1): ctr^1 * ctcvr^2
    ctr, ctcvr, score = (np.array(t[k].to_pylist(), dtype=np.float64) for k in ("ctr", "ctcvr", "score"))
    np.testing.assert_allclose(score, ctr * ctcvr ** 2, rtol=1e-5, atol=1e-12)
    # --keep copies the input column row for row
    src = pq.read_table(data, columns=["row_id", "user_id"])
    by_id = dict(zip(src["row_id"].to_pylist(), src["user_id"].to_pylist()))
    assert all(by_id[r] == u for r, u in zip(t["row_id"].to_pylist(), t["user_id"].to_pylist()))


@pytest.mark.slow
def test_two_ranks_through_torchx_write_every_row_once_with_the_same_scores(trained, synthetic_small, tmp_path):
    import os

    data = synthetic_small / "eval"
    one = _predict(trained, data, tmp_path / "one")
    assert one.returncode == 0
    cmd = [str(BIN / "torchx"), "run", "-s", "local_cwd", "launchers/dlrm_mtl_train.py:predict", "-j", "1x2",
           "--config", str(trained / "config.yaml"), "--checkpoint", str(trained / "checkpoints" / "final"),
           "--data", str(data), "--out", str(tmp_path / "two"), "--keep", "user_id", "data.batch_size=100"]
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert parts == ["_SUCCESS", "part-00000.parquet", "part-00001.parquet"]
    a = pq.read_table(tmp_path / "one" / "part-00000.parquet")
    b = pa.concat_tables([pq.read_table(tmp_path / "two" / p) for p in parts[1:]])
    assert sorted(b["row_id"].to_pylist()) == _eval_row_ids(data)
    assert all(pq.read_table(tmp_path / "two" / p).num_rows > 0 for p in parts[1:])  # both ranks scored rows
    sa = {r: s for r, s in zip(a["row_id"].to_pylist(), a["score"].to_pylist())}
    sb = {r: s for r, s in zip(b["row_id"].to_pylist(), b["score"].to_pylist())}
    assert max(abs(sa[r] - sb[r]) for r in sa) < 1e-6
    assert (tmp_path / "two" / "_SUCCESS").read_text().startswith(f"{len(sa)} rows in 2 part(s)")


def test_rows_without_labels_are_scored_and_outputs_are_atomic(trained, synthetic_small, tmp_path):
    schema_cols = ("click", "conversion", "true_pctr", "true_pcvr", "true_pctcvr")
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for f in sorted((synthetic_small / "eval").glob("*.parquet")):
        t = pq.read_table(f)
        pq.write_table(t.drop_columns([c for c in schema_cols if c in t.column_names]), unlabeled / f.name, row_group_size=700)
    _predict(trained, unlabeled, tmp_path / "a")
    _predict(trained, synthetic_small / "eval", tmp_path / "b")
    a, b = (pq.read_table(tmp_path / d / "part-00000.parquet") for d in ("a", "b"))
    sa = dict(zip(a["row_id"].to_pylist(), a["ctcvr"].to_pylist()))
    sb = dict(zip(b["row_id"].to_pylist(), b["ctcvr"].to_pylist()))
    assert sa.keys() == sb.keys() and max(abs(sa[r] - sb[r]) for r in sa) < 1e-6
    # an existing output directory is refused; a failing run leaves no _SUCCESS
    again = _predict(trained, unlabeled, tmp_path / "a", ok=False)
    assert again.returncode != 0 and "exists and is not empty" in again.stderr
    bad = _predict(trained, unlabeled, tmp_path / "c", "--keep", "no_such_column", ok=False)
    assert bad.returncode != 0 and "no_such_column" in bad.stderr
    assert not (tmp_path / "c" / "_SUCCESS").exists() and not list((tmp_path / "c").glob("part-*.parquet"))
    clash = _predict(trained, unlabeled, tmp_path / "d", "--keep", "row_id", ok=False)
    assert clash.returncode != 0 and "clash" in clash.stderr
