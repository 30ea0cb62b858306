"""CheckpointManager on its own (one process, a small dense model): unwritable directories
and full disks fail with clear errors (before training where it can be known), a failed or
incomplete checkpoint never becomes the latest, old ones are pruned; and on real training
runs, a column-wise <-> row-wise plan change of row-wise Adagrad tables is refused with the
documented model-only fallback."""

import subprocess
import uuid

import pytest
import torch
from torchrec.optim.keyed import KeyedOptimizerWrapper

from dlrm_mtl.checkpoint import COMPLETE, CheckpointError, CheckpointManager, TrainProgress, latest_checkpoint, list_checkpoints
from dlrm_mtl.config import Config
from dlrm_mtl.data import Segment
from dlrm_mtl.distributed import DistEnv


def _setup(ckpt_dir, width=512, keep_last=2):
    cfg = Config()
    cfg.checkpoint.dir, cfg.checkpoint.keep_last = str(ckpt_dir), keep_last
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"), backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Linear(width, width)  # width 512: 1 MiB of weights, 3 MiB with Adam's moments
    opt = KeyedOptimizerWrapper(dict(model.named_parameters()), lambda ps: torch.optim.Adam(ps, lr=1e-3))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    mgr = CheckpointManager(cfg, env, ckpt_dir.parent, plan={}, fingerprint="x")
    return mgr, model, opt, sched


def _step(model, opt, sched):
    opt.zero_grad()
    model(torch.randn(4, model.in_features)).pow(2).sum().backward()
    opt.step()
    sched.step()


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 6 MiB tmpfs (needs root, like the 2-node test): a real ENOSPC."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs for the disk-full test (needs root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_unwritable_checkpoint_dir_fails_before_training(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    mgr, model, opt, _ = _setup(tmp_path / "a_file" / "checkpoints")
    with pytest.raises(CheckpointError, match=r"a_file/checkpoints is not writable"):
        mgr.preflight(model, opt)


def test_too_little_free_space_fails_before_training(tiny_disk):
    mgr, model, opt, _ = _setup(tiny_disk / "checkpoints", width=1024)  # 4 MiB weights + 8 MiB Adam > 6 MiB
    with pytest.raises(CheckpointError, match=r"MiB free on the file system of .*a checkpoint needs"):
        mgr.preflight(model, opt)


def test_disk_full_at_save_time_keeps_the_previous_checkpoint_latest(tiny_disk):
    mgr, model, opt, sched = _setup(tiny_disk / "checkpoints")
    mgr.preflight(model, opt)  # 1 MiB weights: enough room for one checkpoint (~3 MiB), not two
    progress = TrainProgress(segments=[Segment(1, 4, 0, 0, 0)])
    _step(model, opt, sched)
    progress.advance()
    first = mgr.save(model, opt, sched, progress)
    _step(model, opt, sched)
    progress.advance()
    with pytest.raises(CheckpointError, match=r"checkpoint step_000000002 not written: rank 0: .* MiB free on the "
                                              r"file system of .*disk full\?.*latest complete checkpoint is still "
                                              r".*step_000000001"):
        mgr.save(model, opt, sched, progress)
    assert latest_checkpoint(mgr.root) == first
    assert sorted(p.name for p in mgr.root.iterdir()) == ["step_000000001"]  # the partial one is gone


def test_incomplete_checkpoints_are_ignored_and_old_ones_pruned(tmp_path):
    mgr, model, opt, sched = _setup(tmp_path / "checkpoints", width=8, keep_last=2)
    mgr.preflight(model, opt)
    progress = TrainProgress(segments=[Segment(1, 4, 0, 0, 0)])
    for _ in range(3):
        _step(model, opt, sched)
        progress.advance()
        mgr.save(model, opt, sched, progress)
    assert [s for s, _ in list_checkpoints(mgr.root)] == [2, 3]  # keep_last=2
    final = mgr.save(model, opt, sched, progress, name="final")
    # a later checkpoint whose COMPLETE marker was never written: ignored, then removed
    fake = mgr.root / "step_000000009"
    fake.mkdir()
    (fake / ".metadata").write_bytes(b"partial")
    assert latest_checkpoint(mgr.root) == final
    (final / COMPLETE).unlink()  # a final without marker is ignored as well
    assert latest_checkpoint(mgr.root).name == "step_000000003"
    mgr.preflight(model, opt)
    assert sorted(p.name for p in mgr.root.iterdir()) == ["step_000000002", "step_000000003"]
    # killed while replacing `final`: the old one (set aside, complete) comes back
    final = mgr.save(model, opt, sched, progress, name="final")
    final.rename(mgr.root / ".trash-final")
    (mgr.root / "final").mkdir()
    (mgr.root / "final" / ".metadata").write_bytes(b"partial")
    mgr.preflight(model, opt)
    assert latest_checkpoint(mgr.root) == final
    assert sorted(p.name for p in mgr.root.iterdir()) == ["final", "step_000000002", "step_000000003"]


@pytest.mark.slow
def test_column_wise_to_row_wise_is_refused_unless_model_only(synthetic_small, tmp_path):
    import json

    from ckpt_runs import exported, small_schema, train_in_process
    from dlrm_mtl.losses import EntireSpaceLoss
    from dlrm_mtl.models import MultiScenarioMultiTaskModel, TrainModule
    from dlrm_mtl.schema import Schema

    cw = tmp_path / "cw"
    train_in_process(synthetic_small, cw, "sharding.types=[column_wise]", "train.max_steps=3", epochs=1)
    plan = json.loads((cw / "plan.json").read_text())
    assert {p["sharding_type"] for p in plan.values()} == {"column_wise"}
    final = cw / "checkpoints" / "final"
    with pytest.raises(CheckpointError, match=r"cannot reshard row-wise Adagrad state to or from column-wise.*"
                                              r"t_user: column_wise .* -> row_wise.*checkpoint.model_only=true"):
        train_in_process(synthetic_small, tmp_path / "rw", "sharding.types=[row_wise]", f"checkpoint.resume={final}", epochs=1)
    # the fallback: weights only (the run had finished its one epoch: no step, `final` = the loaded weights)
    rw = tmp_path / "rw2"
    train_in_process(synthetic_small, rw, "sharding.types=[row_wise]", f"checkpoint.resume={final}",
                     "checkpoint.model_only=true", epochs=1)
    a, b = exported(final, tmp_path / "a.pt"), exported(rw / "checkpoints" / "final", tmp_path / "b.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the optimizer state was reset: row-wise Adagrad's accumulators start from zero again
    moments = [k for k in b["optim"]["state"] if "t_user" in k]
    assert moments and all(float(v.abs().sum()) == 0 for k in moments for v in b["optim"]["state"][k].values()
                           if isinstance(v, torch.Tensor))
    # the exported file loads into an unsharded TrainModule (model and loss state) with strict keys
    cfg = Config.load(None, [f"data.schema={small_schema(synthetic_small)}"])
    schema = Schema.load(cfg.data.schema)
    module = TrainModule(MultiScenarioMultiTaskModel(schema, cfg.model), EntireSpaceLoss(schema, cfg.loss))
    module.load_state_dict(b["model"], strict=True)
    assert torch.equal(module.state_dict()["model.ebc.embedding_bags.t_user.weight"], a["model"]["model.ebc.embedding_bags.t_user.weight"])


def test_due_every_n_steps_and_every_m_minutes(tmp_path):
    import time

    mgr, *_ = _setup(tmp_path / "checkpoints", width=8)
    mgr.cfg.checkpoint.every_steps = 3
    assert [s for s in range(1, 10) if mgr.due(s)] == [3, 6, 9]
    mgr.cfg.checkpoint.every_steps, mgr.cfg.checkpoint.every_minutes, mgr.cfg.train.log_every = 0, 0.002, 2
    assert not mgr.due(2)  # 0.12 s have not passed since the manager started
    time.sleep(0.15)
    assert not mgr.due(3)  # time is checked on log steps only (where ranks sync anyway)
    assert mgr.due(4)
