"""`dlrm-mtl evaluate` through the TorchX `evaluate` component on 2 workers reproduces the
metrics a 1-process training run computed at its end (the checkpoint's tables are resharded
from one rank to two on load)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_evaluate_two_workers_reproduces_training_metrics(synthetic_small, tmp_path):
    run = tmp_path / "run"
    train = [sys.executable, "-m", "dlrm_mtl", "train", "--config", "configs/demo.yaml",
             "--set", f"data.train={synthetic_small / 'train'}", "--set", f"data.eval={synthetic_small / 'eval'}",
             "--set", f"train.run_dir={run}", "--set", "train.max_steps=20", "--set", "train.epochs=1",
             "--set", "data.batch_size=256", "--set", "train.progress=false"]
    proc = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "eval"
    cmd = [str(BIN / "torchx"), "run", "-s", "local_cwd", "launchers/dlrm_mtl_train.py:evaluate", "-j", "1x2",
           "--config", str(run / "config.yaml"), "--checkpoint", str(run / "checkpoints" / "final"), "--out", str(out)]
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trained = {(m["scenario"], m["task"]): m for m in json.loads((run / "metrics.json").read_text())["metrics"]}
    result = json.loads((out / "metrics.json").read_text())
    assert result["world_size"] == 2
    evaluated = {(m["scenario"], m["task"]): m for m in result["metrics"]}
    assert evaluated.keys() == trained.keys()
    for key, m in trained.items():
        assert evaluated[key]["count"] == m["count"] and evaluated[key]["positives"] == m["positives"]
        # one and two workers score a row to within a few ulps (≤ 9e-8 measured: the batches
        # differ), so two near-equal predictions of opposite labels can swap: one swap moved
        # ctcvr's AUC by 9e-6 here (a run trained with sharding.cpu_backward=one_table)
        assert evaluated[key]["auc"] == pytest.approx(m["auc"], abs=5e-5), key
        assert evaluated[key]["logloss"] == pytest.approx(m["logloss"], rel=1e-5), key
        # issue 4's metrics flow through evaluate too (GAUC: the synthetic schema declares user_id)
        for k in ("ne", "gauc", "positive_rate"):
            assert evaluated[key][k] == pytest.approx(m[k], rel=1e-5, nan_ok=True), (key, k)
        # the AUC's bound from tied scores moves with such a swap as the AUC does
        assert evaluated[key]["auc_max_error"] == pytest.approx(m["auc_max_error"], abs=5e-5, nan_ok=True), key


def test_evaluate_rejects_an_incomplete_checkpoint(tmp_path, synthetic_small):
    from dlrm_mtl.config import Config
    from dlrm_mtl.evaluate import evaluate_checkpoint

    (tmp_path / "ckpt").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        evaluate_checkpoint(Config(), str(tmp_path / "ckpt"), str(synthetic_small / "eval"), str(tmp_path / "out"))


def test_evaluation_batches_do_not_change_the_metrics(synthetic_small, tmp_path):
    """``data.eval_batch_size``: the evaluation during training runs in batches of the training
    batch, at least ``EVAL_BATCH_MIN`` rows by default; the metrics are sums over rows, so 100-row
    and 4096-row batches give the same counts and histograms (a row's score moves by float
    rounding at most between batchings: AUC and log-loss agree to that)."""
    from dlrm_mtl.config import EVAL_BATCH_MIN, Config
    from dlrm_mtl.data import ParquetStream
    from dlrm_mtl.distributed import init_distributed, shutdown_distributed
    from dlrm_mtl.evaluate import evaluate
    from dlrm_mtl.train import setup_run

    cfg = Config.load([str(ROOT / "configs/demo.yaml")], [
        f"data.train={synthetic_small / 'train'}", f"data.eval={synthetic_small / 'eval'}",
        f"train.run_dir={tmp_path / 'run'}", "data.batch_size=256", "train.progress=false", "train.threads_per_rank=1",
    ])
    env = init_distributed("gloo", 60, 1)
    try:
        run = setup_run(cfg, env)
        assert run.eval_stream.batch_size == EVAL_BATCH_MIN == 4096
        for _, p in run.dmp.module.model.dense_arch.named_parameters():  # away from init: spread-out scores
            p.data.add_(torch.randn_like(p) * 0.05)
        got = {}
        for b in (100, EVAL_BATCH_MIN):
            sizes = []
            hook = run.dmp.register_forward_pre_hook(lambda m, args: sizes.append(args[0].row_id.shape[0]))
            got[b] = {(r["scenario"], r["task"]): r for r in evaluate(run.dmp, ParquetStream(run.schema, cfg.data.eval, b, 0, 1),
                                                                          run.schema, env.device)}
            hook.remove()
            assert max(sizes) == b
    finally:
        shutdown_distributed()
    assert got[100].keys() == got[EVAL_BATCH_MIN].keys()
    for key, m in got[100].items():
        o = got[EVAL_BATCH_MIN][key]
        assert (m["count"], m["positives"]) == (o["count"], o["positives"]), key
        assert m["auc"] == pytest.approx(o["auc"], abs=1e-5), key
        assert m["logloss"] == pytest.approx(o["logloss"], rel=1e-6), key


def test_eval_batch_size_is_checked():
    from dlrm_mtl.config import Config, ConfigError, check_values

    with pytest.raises(ConfigError, match="data.eval_batch_size"):
        check_values(Config.load(None, ["data.eval_batch_size=-1"]), None)
    data = Config.load(None, ["data.batch_size=8192"]).data
    assert data.eval_rows_per_batch() == 8192  # a training batch above the minimum is kept
    assert Config.load(None, ["data.eval_batch_size=64"]).data.eval_rows_per_batch() == 64


def test_write_scalars_reads_back_as_add_scalar_s_events(tmp_path):
    """An evaluation's and a log window's scalars go to TensorBoard as one event
    (``train.write_scalars``): read back, every tag has the step and value that one
    ``add_scalar`` per value writes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from dlrm_mtl.train import write_scalars

    scalars = {"eval_auc/ctr/all": 0.71234, "eval_auc/ctr/home": 0.5, "loss/total": 1.25e-3, "lr/factor": 1.0}
    read = {}
    for name in ("one_event", "per_value"):
        w = SummaryWriter(str(tmp_path / name))
        for step in (3, 7):
            if name == "one_event":
                write_scalars(w, {k: v * step for k, v in scalars.items()}, step)
            else:
                for k, v in scalars.items():
                    w.add_scalar(k, v * step, step)
        write_scalars(w, {}, 9)  # nothing to write: no event
        w.close()
        ev = EventAccumulator(str(tmp_path / name), size_guidance={"scalars": 0}).Reload()
        read[name] = {t: [(e.step, e.value) for e in ev.Scalars(t)] for t in ev.Tags()["scalars"]}
    assert read["one_event"] == read["per_value"] and sorted(read["one_event"]) == sorted(scalars)
    assert read["one_event"]["loss/total"] == [(3, pytest.approx(3.75e-3)), (7, pytest.approx(8.75e-3))]
