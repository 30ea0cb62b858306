"""Exact resume on one process: a run SIGKILLed mid-epoch, restarted, SIGKILLed again while
writing a checkpoint and restarted again ends with the same parameters and optimizer states,
bit for bit, as an uninterrupted run, having trained the same rows at the same steps."""

import json

import pytest

from ckpt_runs import (assert_exactly_once, assert_same_state, audit_lines, exported, kill_env, train_1proc)
from dlrm_mtl.checkpoint import is_complete, latest_checkpoint


@pytest.mark.slow
def test_resume_after_kill_mid_epoch_and_kill_during_save_is_exact(synthetic_small, tmp_path):
    data = synthetic_small
    ref, run = tmp_path / "ref", tmp_path / "run"
    train_1proc(data, ref)  # uninterrupted: 38 steps per epoch, 2 epochs

    # killed after step 35 (mid epoch 0): the latest checkpoint is step 30, 8 steps before the epoch ends
    train_1proc(data, run, "checkpoint.every_steps=10", env_extra=kill_env("step", 35, 0, tmp_path / "k1"), expect_ok=False)
    assert (tmp_path / "k1").exists()
    assert latest_checkpoint(run / "checkpoints").name == "step_000000030"

    # restarted; killed while writing the step-50 checkpoint (its shards on disk, no COMPLETE)
    p = train_1proc(data, run, "checkpoint.every_steps=10", "checkpoint.resume=auto",
                    env_extra=kill_env("save", 50, 0, tmp_path / "k2"), expect_ok=False)
    assert "resumed from" in p.stdout and "step 30, epoch 0, 30 steps into the epoch" in p.stdout, p.stdout[-2000:]
    partial = run / "checkpoints" / ".tmp-step_000000050"
    assert (partial / ".metadata").exists() and not is_complete(partial)
    assert latest_checkpoint(run / "checkpoints").name == "step_000000040"  # the previous one stays usable

    p = train_1proc(data, run, "checkpoint.every_steps=10", "checkpoint.resume=auto")
    assert "step 40, epoch 1, 2 steps into the epoch" in p.stdout, p.stdout[-2000:]
    assert not partial.exists()  # incomplete checkpoints are removed on start

    # the same rows at the same steps, and every row once per epoch
    assert audit_lines(run) == audit_lines(ref)
    assert_exactly_once(run, data, epochs=2)
    a = exported(ref / "checkpoints" / "final", tmp_path / "ref.pt")
    b = exported(run / "checkpoints" / "final", tmp_path / "run.pt")
    assert a["trainer"]["step"] == b["trainer"]["step"] == 76
    assert_same_state(a, b, "uninterrupted vs killed twice and resumed")
    ra = json.loads((ref / "ranks" / "rank0.json").read_text())
    rb = json.loads((run / "ranks" / "rank0.json").read_text())
    assert ra["rows_trained"] == rb["rows_trained"] and ra["dense_sha256"] == rb["dense_sha256"]
