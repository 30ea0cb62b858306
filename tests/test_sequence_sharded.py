"""Sequence features on 2 ranks: the EmbeddingCollection's tables are sharded by the planner,
checkpointed, resharded 2 -> 1 bit for bit, and every row is trained exactly once across the
world-size change (the same guarantees as the pooled tables, tests/test_checkpoint_reshard.py)."""


import pytest

from ckpt_runs import assert_exactly_once, assert_same_state, exported, kill_env, train_1proc, train_in_process, train_torchrun
from dlrm_mtl.checkpoint import latest_checkpoint

SETS = ("model.interaction=concat", "checkpoint.every_steps=3")


@pytest.mark.slow
def test_sequence_tables_shard_checkpoint_and_reshard(synthetic_seq, tmp_path):
    data, run = synthetic_seq, tmp_path / "run"
    ckpts = run / "checkpoints"
    # 2 ranks, 7 steps per epoch; rank 1 SIGKILLed after step 4: the latest checkpoint is step 3
    p = train_torchrun(data, run, 2, *SETS, env_extra=kill_env("step", 4, 1, tmp_path / "k1"), expect_ok=False)
    assert latest_checkpoint(ckpts).name == "step_000000003", p.stdout[-3000:] + p.stderr[-3000:]
    state = exported(ckpts / "step_000000003", tmp_path / "a.pt")
    tables = {k: v for k, v in state["model"].items() if ".embeddings." in k}
    assert sorted(tables) == ["model.sequence_tables.dim16.embeddings.t_hist_item.weight",
                              "model.sequence_tables.dim8.embeddings.t_hist_age.weight",
                              "model.sequence_tables.dim8.embeddings.t_hist_category.weight"]
    assert tables["model.sequence_tables.dim16.embeddings.t_hist_item.weight"].shape == (2000, 16)
    # the fused row-wise Adagrad state of the sequence tables is in the checkpoint too
    assert any("t_hist_item" in k for k in _flat_keys(state["optim"])), list(_flat_keys(state["optim"]))[:20]

    # 2 -> 1: loaded on one rank and saved again, the same state bit for bit
    train_in_process(data, tmp_path / "rt1", *SETS, f"checkpoint.resume={ckpts / 'step_000000003'}", epochs=0)
    assert_same_state(state, exported(tmp_path / "rt1" / "checkpoints" / "final", tmp_path / "b.pt"), "2 -> 1 ranks")

    # one rank finishes the run: every row exactly once per epoch across the two world sizes
    p = train_1proc(data, run, *SETS, "checkpoint.resume=auto")
    assert "world size 2 -> 1" in p.stdout, p.stdout[-2000:]
    assert "truncated_ids/hist_items" in p.stdout + p.stderr
    assert_exactly_once(run, data, epochs=2)


def _flat_keys(d, prefix=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _flat_keys(v, f"{prefix}{k}/")
    else:
        yield prefix
