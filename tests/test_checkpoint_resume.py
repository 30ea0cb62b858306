"""Exact resume on one process: a run SIGKILLed mid-epoch while writing a checkpoint and
restarted from the previous one ends with the same parameters and optimizer states, bit for
bit, as an uninterrupted run, having trained the same rows at the same steps."""

import json

import pytest

from ckpt_runs import assert_same_state, audit_lines, exported, kill_env, train_1proc
from dlrm_mtl.checkpoint import is_complete, latest_checkpoint


@pytest.mark.slow
def test_resume_after_kill_during_save_mid_epoch_is_exact(synthetic_small, tmp_path):
    data = synthetic_small
    ref, run = tmp_path / "ref", tmp_path / "run"
    short = ("train.max_steps=20", "train.threads_per_rank=1")  # 20 of the 38 steps of each of 2 epochs
    train_1proc(data, ref, *short)  # uninterrupted

    # killed while writing the step-18 checkpoint (its shards on disk, no COMPLETE): the latest
    # complete one is step 12, in the middle of epoch 0
    train_1proc(data, run, *short, "checkpoint.every_steps=6", env_extra=kill_env("save", 18, 0, tmp_path / "k"),
                expect_ok=False)
    assert (tmp_path / "k").exists()
    partial = run / "checkpoints" / ".tmp-step_000000018"
    assert (partial / ".metadata").exists() and not is_complete(partial)
    assert latest_checkpoint(run / "checkpoints").name == "step_000000012"  # the previous one stays usable

    p = train_1proc(data, run, *short, "checkpoint.every_steps=6", flags=["--resume", "auto"])
    assert "resumed from" in p.stdout and "step 12, epoch 0, 12 steps into the epoch" in p.stdout, p.stdout[-2000:]
    assert not partial.exists()  # incomplete checkpoints are removed on start

    # the same rows at the same steps, and every row once per epoch
    assert audit_lines(run) == audit_lines(ref)
    assert sorted({s for steps in audit_lines(run).values() for s in steps}) == list(range(1, 41))  # every step once
    a = exported(ref / "checkpoints" / "final", tmp_path / "ref.pt")
    b = exported(run / "checkpoints" / "final", tmp_path / "run.pt")
    assert a["trainer"]["step"] == b["trainer"]["step"] == 40
    assert_same_state(a, b, "uninterrupted vs killed twice and resumed")
    ra = json.loads((ref / "ranks" / "rank0.json").read_text())
    rb = json.loads((run / "ranks" / "rank0.json").read_text())
    assert ra["rows_trained"] == rb["rows_trained"] and ra["dense_sha256"] == rb["dense_sha256"]
