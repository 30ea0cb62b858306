"""Training keeps the best model: evaluations every ``train.eval_every_steps`` on at most
``train.eval_rows`` rows, early stopping on ``train.early_stopping``'s metric, the atomic
``checkpoints/best`` (never pruned) that a run resumes from exactly, and the run's config and
final metrics on TensorBoard's HPARAMS page (docs/checkpoints.md, "Best checkpoint and early
stopping").

Early stopping needs a metric that falls on cue: the runs below replace the tracked value of
each evaluation through the documented test hook ``DLRM_MTL_TEST_METRIC_SCRIPT``
(:func:`dlrm_mtl.train.scripted_metric`); everything else is the real training run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List

import pyarrow.parquet as pq
import pytest
import torch

from ckpt_runs import audit_lines, train_1proc, train_torchrun
from dlrm_mtl import checkpoint as ckpt_mod
from dlrm_mtl.checkpoint import COMPLETE, CheckpointError, CheckpointManager, TrainProgress, latest_checkpoint, list_checkpoints
from dlrm_mtl.config import Config, ConfigError, check_values
from dlrm_mtl.data import Segment
from dlrm_mtl.distributed import DistEnv
from dlrm_mtl.schema import Schema
from dlrm_mtl.train import Tracker, eval_batches, flat_config, tracked_value

SCRIPT = "DLRM_MTL_TEST_METRIC_SCRIPT"


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer" / "state.json").read_text())


def _marker_step(ckpt: Path) -> int:
    return int(json.loads((ckpt / COMPLETE).read_text())["step"])


def _rank_rows(run: Path) -> List[int]:
    return [json.loads(p.read_text())["rows_trained"] for p in sorted((run / "ranks").glob("rank*.json"))]


def _all_row(metrics: dict, task: str) -> dict:
    return next(r for r in metrics["metrics"] if r["scenario"] == "all" and r["task"] == task)


def _tensorboard(run: Path):
    """(provider, context) over RUN/tb, read as TensorBoard's own pages read it."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(run / "tb"))
    mux.Reload()
    return data_provider.MultiplexerDataProvider(mux, str(run / "tb")), context.RequestContext()


def _scalar_steps(run: Path, tag: str) -> Dict[str, List[int]]:
    from tensorboard.data.provider import RunTagFilter

    provider, ctx = _tensorboard(run)
    data = provider.read_scalars(ctx, experiment_id="", plugin_name="scalars", downsample=1000,
                                 run_tag_filter=RunTagFilter(tags=[tag]))
    return {r: [p.step for p in tags[tag]] for r, tags in data.items() if tag in tags}


# ---------------------------------------------------------------- whole runs


@pytest.mark.slow
def test_early_stopping_stops_at_the_expected_evaluation_and_best_resumes_exactly(synthetic_small, tmp_path):
    """Evaluations at steps 4, 8, 12, 16 score 0.60, 0.70, 0.65, 0.66 (scripted): with patience 2
    the run stops at step 16, best = step 8. Step checkpoints every 3 steps with keep_last=1
    never prune ``best``. Resuming from ``best`` continues at step 9 of the same epoch, trains
    the same rows as the original run did after step 8, and runs the remaining steps to 20."""
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    p = train_1proc(synthetic_small, run, "train.max_steps=20", "train.eval_every_steps=4",
                    "train.early_stopping.patience=2", "checkpoint.every_steps=3", "checkpoint.keep_last=1",
                    epochs=1, env_extra={SCRIPT: "0.60,0.70,0.65,0.66,0.90"})
    out = p.stdout
    assert ("early stopping at step 16: auc of ctcvr 0.660000 has not improved by more than 0 for 2 evaluation(s); "
            "best 0.700000 at step 8") in out, out[-3000:]
    m = _metrics(run)
    assert m["step"] == 16 and m["throughput"]["steps"] == 16
    assert m["early_stopped"] == {"step": 16, "best_step": 8, "best_value": 0.7, "metric": "auc of ctcvr"}
    assert m["best"]["step"] == 8 and m["best"]["value"] == 0.7 and m["best"]["predictions"] == ["ctcvr"]
    assert _rank_rows(run) == [16 * 256]
    assert sorted(audit_lines(run)[0]) == list(range(1, 17))  # nothing trained after the stop
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "final", "step_000000015"]  # keep_last=1 kept best
    best = ckpts / "best"
    assert _marker_step(best) == 8 and _marker_step(ckpts / "final") == 16
    state = _state(best)
    assert state["step"] == 8 and state["epoch"] == 0 and state["segments"][0]["batches"] == 8
    assert state["tracker"]["best_step"] == 8 and state["tracker"]["best_value"] == 0.7
    assert "saved" in out and f"{best} (auc of ctcvr 0.700000 at step 8)" in out
    # evaluations are on TensorBoard at their steps, the scripted value of the tracked metric too
    assert _scalar_steps(run, "eval_auc/ctcvr/all") == {".": [4, 8, 12, 16]}
    assert _scalar_steps(run, "early_stopping/auc") == {".": [4, 8, 12, 16]}

    # the run counts as finished: resuming its latest checkpoint (final) trains nothing more
    p = train_1proc(synthetic_small, run, "train.max_steps=20", "train.eval_every_steps=4",
                    "train.early_stopping.patience=2", epochs=1, flags=["--resume", "auto"])
    assert "this run finished at step 16: nothing to train" in p.stdout, p.stdout[-3000:]
    assert _metrics(run)["early_stopped"]["step"] == 16

    # resume from best (a path, as for any checkpoint) into another run directory
    p = train_1proc(synthetic_small, resumed, "train.max_steps=20", f"checkpoint.resume={best}", epochs=1)
    assert f"resumed from {best}: step 8, epoch 0, 8 steps into the epoch" in p.stdout, p.stdout[-3000:]
    m = _metrics(resumed)
    assert m["step"] == 20 and "early_stopped" not in m
    assert _rank_rows(resumed) == [20 * 256]  # the best checkpoint's 8 steps of rows + 12 trained here
    a, b = audit_lines(run)[0], audit_lines(resumed)[0]
    assert sorted(b) == list(range(9, 21))
    assert {s: b[s] for s in range(9, 17)} == {s: a[s] for s in range(9, 17)}  # the exact data position


@pytest.mark.slow
def test_eval_every_steps_on_eval_rows_leaves_training_untouched_and_writes_hparams(synthetic_small, tmp_path):
    """Evaluations inside the epochs (TorchRec's pipeline detached and attached around each,
    mid-stream) on the first eval rows only: at steps 5, 10, 15, 20 and the end (24) with
    ``count`` = the bound rule, and training bit-identical to a plain run that evaluates only
    at the end (same dense weights, same rows at the same steps). The config and final metrics
    are on the HPARAMS page of the run itself."""
    evald, plain = tmp_path / "evaluated", tmp_path / "plain"
    train_1proc(synthetic_small, evald, "train.max_steps=12", "train.eval_every_steps=5", "train.eval_rows=1000",
                "data.eval_batch_size=300", "train.pipeline=sparse_dist", "train.threads_per_rank=1", epochs=2)
    # per_table: the plain loop's local lookup updates the tables bit for bit as the pipeline's sharded module
    train_1proc(synthetic_small, plain, "train.max_steps=12", "train.pipeline=none", "train.threads_per_rank=1",
                "sharding.cpu_backward=per_table", epochs=2)
    ra, rb = (json.loads((r / "ranks" / "rank0.json").read_text()) for r in (evald, plain))
    assert ra["rows_trained"] == rb["rows_trained"] == 24 * 256
    assert ra["dense_sha256"] == rb["dense_sha256"]
    assert audit_lines(evald) == audit_lines(plain)

    assert _scalar_steps(evald, "eval_auc/ctcvr/all") == {".": [5, 10, 15, 20, 24]}
    assert _scalar_steps(plain, "eval_auc/ctcvr/all") == {".": [24]}
    eval_rows = pq.ParquetDataset(synthetic_small / "eval").read(columns=["row_id"]).num_rows
    cfg = Config.load(None, ["data.batch_size=256", "data.eval_batch_size=300", "train.eval_rows=1000"])
    assert eval_batches(cfg, 1) == 4  # ceil(1000 / (300 x 1))
    assert _all_row(_metrics(evald), "ctr")["count"] == min(eval_rows, 4 * 300) == 1200
    # the default evaluation batch: the training batch, at least EVAL_BATCH_MIN rows
    assert eval_batches(Config.load(None, ["data.batch_size=256", "train.eval_rows=1000"]), 1) == 1
    assert eval_batches(Config.load(None, ["data.batch_size=256", "train.eval_rows=9000"]), 2) == 2  # ceil(9000 / 8192)
    assert _all_row(_metrics(plain), "ctr")["count"] == eval_rows  # the whole eval set
    m = _metrics(evald)
    assert m["best"]["step"] in (5, 10, 15, 20, 24) and "early_stopped" not in m
    assert _marker_step(evald / "checkpoints" / "best") == m["best"]["step"]

    # HPARAMS: in the run's own event file (no sub-run), the config flattened, the final metrics
    from tensorboard.plugins.hparams import metadata

    provider, ctx = _tensorboard(evald)
    assert [r.run_name for r in provider.list_runs(ctx, experiment_id="")] == ["."]
    tensors = provider.list_tensors(ctx, experiment_id="", plugin_name=metadata.PLUGIN_NAME)["."]
    assert set(tensors) == {metadata.EXPERIMENT_TAG, metadata.SESSION_START_INFO_TAG, metadata.SESSION_END_INFO_TAG}
    experiment = metadata.parse_experiment_plugin_data(tensors[metadata.EXPERIMENT_TAG].plugin_content)
    names = {h.name for h in experiment.hparam_infos}
    assert {"train.eval_rows", "train.early_stopping.metric", "checkpoint.keep_best", "data.batch_size"} <= names
    metric_tags = {mi.name.tag for mi in experiment.metric_infos}
    assert metric_tags == {"hparams/auc/ctr", "hparams/auc/cvr", "hparams/auc/ctcvr", "hparams/best_auc"}
    start = metadata.parse_session_start_info_plugin_data(tensors[metadata.SESSION_START_INFO_TAG].plugin_content)
    assert start.hparams["train.eval_rows"].number_value == 1000
    assert start.hparams["train.pipeline"].string_value == "sparse_dist"
    for tag in metric_tags:  # the values the HPARAMS table shows: scalars of those tags
        assert _scalar_steps(evald, tag) == {".": [24]}
    from tensorboard.data.provider import RunTagFilter

    final_auc = provider.read_scalars(ctx, experiment_id="", plugin_name="scalars", downsample=10,
                                      run_tag_filter=RunTagFilter(tags=["hparams/auc/ctcvr"]))["."]["hparams/auc/ctcvr"]
    assert math.isclose(final_auc[0].value, _all_row(m, "ctcvr")["auc"], rel_tol=1e-6)


@pytest.mark.slow
def test_two_ranks_stop_at_the_same_evaluation(synthetic_small, tmp_path):
    """Two ranks judge the same (rank-merged, broadcast) value: both stop after step 6, and the
    best checkpoint of step 3 holds both ranks' state."""
    run = tmp_path / "run"
    train_torchrun(synthetic_small, run, 2, "train.max_steps=12", "train.eval_every_steps=3",
                   "train.early_stopping.patience=1", epochs=1, env_extra={SCRIPT: "0.7,0.6"})
    m = _metrics(run)
    assert m["early_stopped"]["step"] == 6 and m["early_stopped"]["best_step"] == 3
    assert _rank_rows(run) == [6 * 256, 6 * 256]
    best = run / "checkpoints" / "best"
    assert _marker_step(best) == 3 and sorted(p.name for p in (best / "trainer").glob("rank*.pt")) == ["rank0.pt", "rank1.pt"]


# ---------------------------------------------------------------- the checkpoint manager


def _manager(root: Path, resume: str = "", keep_last: int = 1):
    cfg = Config()
    cfg.checkpoint.dir, cfg.checkpoint.keep_last, cfg.checkpoint.resume = str(root), keep_last, resume
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"), backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    from torchrec.optim.keyed import KeyedOptimizerWrapper

    opt = KeyedOptimizerWrapper(dict(model.named_parameters()), lambda ps: torch.optim.Adam(ps, lr=1e-3))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return CheckpointManager(cfg, env, root.parent, plan={}, fingerprint="x"), model, opt, sched


def test_best_is_replaced_whole_never_pruned_and_never_the_latest(tmp_path):
    mgr, model, opt, sched = _manager(tmp_path / "checkpoints")
    mgr.preflight(model, opt)
    progress = TrainProgress(segments=[Segment(1, 4, 0, 0, 0)])
    for step in range(1, 5):
        progress.advance()
        mgr.save(model, opt, sched, progress)
        if step in (2, 3):
            progress.tracker = {"best_step": step}
            mgr.save(model, opt, sched, progress, name="best")
    names = sorted(p.name for p in mgr.root.iterdir())
    assert names == ["best", "step_000000004"]  # keep_last=1 pruned the steps, not best; no temp left
    assert _marker_step(mgr.root / "best") == 3 and _state(mgr.root / "best")["tracker"] == {"best_step": 3}
    assert [s for s, _ in list_checkpoints(mgr.root)] == [4] and latest_checkpoint(mgr.root).name == "step_000000004"


def test_a_crash_while_replacing_best_leaves_the_previous_one(tmp_path, monkeypatch):
    """Where directories cannot be exchanged atomically: a crash between setting the old best
    aside and renaming the new one into place leaves no ``best`` on disk for a moment, but the
    old one complete; the next start puts it back."""
    mgr, model, opt, sched = _manager(tmp_path / "checkpoints")
    mgr.preflight(model, opt)
    progress = TrainProgress(segments=[Segment(1, 4, 0, 0, 0)])
    progress.advance()
    mgr.save(model, opt, sched, progress, name="best")
    monkeypatch.setattr(ckpt_mod, "_exchange_dirs", lambda a, b: False)
    real_replace, calls = os.replace, []

    def crash_before_new_in_place(src, dst):
        if Path(dst).parent == mgr.root:  # directory renames (files inside them are written via renames too)
            calls.append((Path(src).name, Path(dst).name))
            if Path(dst).name == "best":
                raise OSError("simulated crash between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", crash_before_new_in_place)
    progress.advance()
    with pytest.raises(CheckpointError, match="simulated crash"):
        mgr.save(model, opt, sched, progress, name="best")
    monkeypatch.setattr(ckpt_mod.os, "replace", real_replace)
    assert calls == [("best", ".trash-best"), (".tmp-best", "best")]
    assert not (mgr.root / "best").exists() and _marker_step(mgr.root / ".trash-best") == 1
    mgr.preflight(model, opt)  # the next start
    assert sorted(p.name for p in mgr.root.iterdir()) == ["best"] and _marker_step(mgr.root / "best") == 1
    # and with the fallback working, the new one replaces it whole
    mgr.save(model, opt, sched, progress, name="best")
    assert sorted(p.name for p in mgr.root.iterdir()) == ["best"] and _marker_step(mgr.root / "best") == 2


def test_resume_best_names_the_best_checkpoint(tmp_path):
    mgr, model, opt, sched = _manager(tmp_path / "checkpoints", resume="best")
    mgr.preflight(model, opt)
    with pytest.raises(CheckpointError, match="checkpoint.resume=best: .*best is not a complete checkpoint"):
        mgr.resume_path()
    progress = TrainProgress(segments=[Segment(1, 4, 0, 0, 0)])
    progress.advance()
    mgr.save(model, opt, sched, progress, name="best")
    progress.advance()
    mgr.save(model, opt, sched, progress)
    assert mgr.resume_path() == mgr.root / "best"  # not the later step checkpoint


# ---------------------------------------------------------------- tracking, config


def test_tracker_counts_evaluations_without_improvement_beyond_min_delta():
    t = Tracker(["ctcvr"], "logloss", "min", patience=2, min_delta=0.01)
    assert t.observe(0.50, 1) and t.best_step == 1
    assert not t.observe(0.495, 2)  # better, but not by more than min_delta
    assert t.observe(0.48, 3) and t.bad_evals == 0
    assert not t.observe(math.nan, 4) and not t.should_stop()
    assert not t.observe(0.60, 5) and t.should_stop() and (t.best_value, t.best_step) == (0.48, 3)
    assert not Tracker(["ctcvr"], "auc", "max", patience=0, min_delta=0.0).should_stop()


def test_tracked_value_reads_the_all_rows(synthetic_small):
    rows = [{"scenario": "all", "task": "ctr", "auc": 0.7}, {"scenario": "all", "task": "ctcvr", "auc": 0.8},
            {"scenario": "home/hot_card", "task": "ctcvr", "auc": 0.1}, {"scenario": "all", "task": "cvr", "auc": 0.6}]
    assert tracked_value(rows, ["ctcvr"], "auc") == 0.8
    assert math.isclose(tracked_value(rows, ["ctr", "cvr", "ctcvr"], "auc"), 0.7)
    assert math.isnan(tracked_value(rows, ["ctcvr"], "gauc"))
    schema = Schema.load(synthetic_small / "schema.yaml")
    from dlrm_mtl.config import tracked_predictions

    assert tracked_predictions(schema, "auc", "") == ["ctcvr"]  # entire space of the last task
    assert tracked_predictions(schema, "logloss", "all") == ["ctr", "cvr", "ctcvr"]
    assert tracked_predictions(schema, "auc", "cvr") == ["cvr"]


@pytest.mark.parametrize("overrides, words", [
    (["train.early_stopping.mode=up"], ["train.early_stopping.mode", "'up'"]),
    (["train.early_stopping.patience=-1"], ["train.early_stopping.patience", ">= 0"]),
    (["train.early_stopping.metric=accuracy"], ["train.early_stopping.metric", "'accuracy'"]),
    (["train.early_stopping.task=ctcvrr"], ["train.early_stopping.task", "'ctcvrr' is not a prediction"]),
    (["train.early_stopping.metric=mse"], ["train.early_stopping.metric", "no prediction of this schema has a 'mse'"]),
    (["train.eval_every_steps=-5"], ["train.eval_every_steps"]),
    (["train.eval_rows=-1"], ["train.eval_rows"]),
])
def test_config_check_names_the_key(overrides, words, synthetic_small):
    cfg = Config.load(None, [f"data.train={synthetic_small / 'train'}"] + overrides)
    with pytest.raises(ConfigError) as ei:
        check_values(cfg, Schema.load(synthetic_small / "schema.yaml"))
    for w in words:
        assert w in str(ei.value)


def test_a_metric_nothing_reads_is_not_checked(synthetic_small):
    cfg = Config.load(None, [f"data.train={synthetic_small / 'train'}", "train.early_stopping.metric=mse",
                             "checkpoint.keep_best=false"])
    check_values(cfg, Schema.load(synthetic_small / "schema.yaml"))


def test_flat_config_is_scalars_and_strings():
    flat = flat_config(Config.load(None, ["loss.task_weights={ctr: 2}"]).to_dict())
    assert flat["train.early_stopping.patience"] == 0 and flat["checkpoint.keep_best"] is True
    assert flat["loss.task_weights.ctr"] == 2 and flat["loss.decay"] == "{}"
    assert json.loads(flat["model.task_layers"])[0]["type"]
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
