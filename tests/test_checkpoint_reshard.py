"""Resume on another world size: 2 ranks -> 1 -> 2 within one epoch. The tables and optimizer
states are resharded bit for bit (a checkpoint loaded on the other world size and saved again
equals the original), and the interrupted epoch's remaining rows are trained exactly once."""

import json

import pytest

from ckpt_runs import (assert_exactly_once, assert_same_state, dataset_row_ids, exported, kill_env,
                       train_1proc, train_in_process, train_torchrun)
from dlrm_mtl.checkpoint import latest_checkpoint


@pytest.mark.slow
def test_reshard_2_to_1_to_2_mid_epoch_trains_every_row_once(synthetic_small, tmp_path):
    data, run = synthetic_small, tmp_path / "run"
    ckpts = run / "checkpoints"
    # 2 ranks (19 steps per epoch); rank 1 SIGKILLed after step 12: the latest checkpoint is step 10
    train_torchrun(data, run, 2, "checkpoint.every_steps=5", env_extra=kill_env("step", 12, 1, tmp_path / "k1"),
                   expect_ok=False)
    assert latest_checkpoint(ckpts).name == "step_000000010"

    # 2 -> 1: loaded on one rank and saved again (no step in between): the same state, bit for bit
    train_in_process(data, tmp_path / "rt1", f"checkpoint.resume={ckpts / 'step_000000010'}", epochs=0)
    assert_same_state(exported(ckpts / "step_000000010", tmp_path / "a.pt"),
                      exported(tmp_path / "rt1" / "checkpoints" / "final", tmp_path / "b.pt"), "2 -> 1 ranks")

    # one rank goes on with epoch 0's remaining rows; SIGKILLed after step 22 (latest: step 20)
    p = train_1proc(data, run, "checkpoint.every_steps=5", "checkpoint.resume=auto",
                    env_extra=kill_env("step", 22, 0, tmp_path / "k2"), expect_ok=False)
    assert "world size 2 -> 1" in p.stdout, p.stdout[-2000:]
    assert latest_checkpoint(ckpts).name == "step_000000020"
    state = json.loads((ckpts / "step_000000020" / "trainer" / "state.json").read_text())
    assert [(s["world_size"], s["batches"]) for s in state["segments"]] == [(2, 10), (1, 10)]

    # 1 -> 2, round trip again
    train_torchrun(data, tmp_path / "rt2", 2, f"checkpoint.resume={ckpts / 'step_000000020'}", epochs=0)
    assert_same_state(exported(ckpts / "step_000000020", tmp_path / "c.pt"),
                      exported(tmp_path / "rt2" / "checkpoints" / "final", tmp_path / "d.pt"), "1 -> 2 ranks")

    # two ranks finish the run: every row exactly once in each epoch, across three world-size segments
    p = train_torchrun(data, run, 2, "checkpoint.every_steps=5", "checkpoint.resume=auto")
    assert_exactly_once(run, data, epochs=2)
    result = json.loads((run / "metrics.json").read_text())
    assert result["throughput"]["rows_trained"] == 2 * len(dataset_row_ids(data))
