"""Faults: a worker SIGKILLed mid-epoch under TorchX with torchrun restarts (the job resumes
from the last complete checkpoint and trains every row exactly once per epoch), a broken
rank ending a 2-node job with an error within bounded time instead of hanging it, and
tampered checkpoint files refused before anything in them runs."""

import json
import os
import pickle
import random
import shlex
import subprocess
import time
import warnings

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from dlrm_mtl.checkpoint import UnsafeCheckpointError, load_rank_state, restore_rng, safe_dcp_load, save_rank_state
from ckpt_runs import BIN, ROOT, assert_exactly_once, dataset_row_ids, kill_env, train_args
from test_two_node_netns import two_hosts  # noqa: F401  (fixture: two network namespaces)


@pytest.mark.slow
def test_torchx_restarts_a_killed_worker_and_no_row_is_lost_or_repeated(synthetic_small, tmp_path):
    data, run = synthetic_small, tmp_path / "run"
    overrides = train_args(data, run, "checkpoint.every_steps=5")[1::2]
    cmd = [str(BIN / "torchx"), "run", "-s", "local_cwd", "launchers/dlrm_mtl_train.py:train", "-j", "1x2",
           "--max_restarts", "1", "--config", "configs/demo.yaml", *overrides]
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", **kill_env("step", 12, 1, tmp_path / "killed"))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert (tmp_path / "killed").exists(), "the worker was never killed"
    # the restarted job resumed (checkpoint.resume "" = auto after a launcher restart) from step 10
    assert "resumed from" in out and "step 10, epoch 0, 10 steps into the epoch" in out, out[-4000:]
    assert_exactly_once(run, data, epochs=2)
    r = [json.loads((run / "ranks" / f"rank{i}.json").read_text()) for i in range(2)]
    assert r[0]["rows_trained"] + r[1]["rows_trained"] == 2 * len(dataset_row_ids(data))
    assert r[0]["dense_sha256"] == r[1]["dense_sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["step", "end"])
def test_a_dead_node_ends_a_two_node_job_within_bounded_time(two_hosts, synthetic_small, tmp_path, where):  # noqa: F811
    """Node 1's only rank is SIGKILLed mid-training (``step``) or after the last collective of
    training (``end``: node 0 would otherwise exit 0 and its launcher wait for node 1 in its
    exit barrier). Both launchers must fail within ``bound`` seconds of the kill, far below
    the 300 s collective timeout set here, and node 0's error must name the broken peer."""
    run, marker = tmp_path / "run", tmp_path / "killed"
    step = 3 if where == "step" else "*"
    procs = []
    for node, (ns, dev, addr) in enumerate(two_hosts):
        cmd = ["ip", "netns", "exec", ns, str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{two_hosts[0][2]}:29623", "--rdzv_id", f"fault-{where}",
               "--local_addr", addr, "--rdzv_conf", f"is_host={'true' if node == 0 else 'false'}",
               "-m", "dlrm_mtl", "train", "--config", "configs/demo.yaml",
               *train_args(synthetic_small, run, "train.timeout_s=300", "checkpoint.at_end=false", epochs=1)]
        env = dict(os.environ, GLOO_SOCKET_IFNAME=dev, PATH=f"{BIN}:{os.environ.get('PATH', '')}",
                   **kill_env(where, step, 1, marker))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs, ended = [], []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the 2-node job hung")
        ended.append(time.time())
    assert marker.exists(), "rank 1 was never killed:\n" + outs[1][-3000:]
    killed_at = marker.stat().st_mtime
    bound = 60
    print(f"{where}: nodes failed {[round(t - killed_at, 1) for t in ended]} s after the kill")
    for node, (p, out, t) in enumerate(zip(procs, outs, ended)):
        assert p.returncode != 0, f"node {node} exited 0 although its peer died:\n{out[-3000:]}"
        assert t - killed_at < bound, f"node {node} needed {t - killed_at:.0f} s to fail"
    assert "Connection closed by peer" in outs[0] or "Connection reset by peer" in outs[0], outs[0][-3000:]


# ------------------------------------------------ loading runs no code from the checkpoint
class _Payload:
    """Pickles as a call of ``os.system("touch MARKER")``: what a tampered file could hold."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, ("touch " + shlex.quote(self.marker),))


def _draws() -> list:
    """The next values of torch's, numpy's (incl. its cached Gaussian) and Python's RNGs."""
    return [torch.rand(3).tolist(), np.random.standard_normal(3).tolist(), np.random.randint(0, 2**31, 3).tolist(),
            [random.random() for _ in range(3)], random.gauss(0, 1)]


def _seed_and_advance() -> None:
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    _draws()
    np.random.standard_normal()  # an odd count: numpy holds a cached Gaussian (has_gauss = 1)
    random.gauss(0, 1)  # Python's too (gauss_next set)


def test_rank_state_round_trip_restores_rng_exactly_and_holds_no_objects(tmp_path):
    _seed_and_advance()
    f = tmp_path / "rank0.pt"
    save_rank_state(f, rows_trained=1234, padding_rows=56)
    want = _draws()
    _draws()  # move every generator on
    state = load_rank_state(f)
    restore_rng(state)
    assert _draws() == want
    assert (state["rows_trained"], state["padding_rows"]) == (1234, 56)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(f) == []  # tensors, lists, numbers only
    torch.load(f, weights_only=True)  # loads with no allow-list at all


def test_rank_state_written_before_safe_loading_still_loads(tmp_path):
    """Format 1 (numpy's state tuple with its uint32 array, Python's state tuple) loads with
    the uint32-array allow-list alone and restores the RNGs exactly."""
    _seed_and_advance()
    f = tmp_path / "rank0.pt"
    torch.save({"torch": torch.get_rng_state(), "cuda": None, "numpy": np.random.get_state(),
                "python": random.getstate(), "rows_trained": 9, "padding_rows": 1}, f)
    want = _draws()
    _draws()
    state = load_rank_state(f)
    restore_rng(state)
    assert _draws() == want
    assert (state["rows_trained"], state["padding_rows"]) == (9, 1)


def test_tampered_rank_state_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "MARKER"
    f = tmp_path / "checkpoints" / "step_000000010" / "trainer" / "rank0.pt"
    f.parent.mkdir(parents=True)
    torch.save({"torch": _Payload(marker), "cuda": None, "numpy": None, "python": None,
                "rows_trained": 0, "padding_rows": 0}, f)
    with pytest.raises(UnsafeCheckpointError) as ei:
        load_rank_state(f)
    msg = str(ei.value)
    assert str(f) in msg and "refused" in msg and "system" in msg and "nothing from it was run" in msg, msg
    assert "rank*.pt" in msg  # how to go on without loading it
    assert not marker.exists()
    torch.load(f, weights_only=False)  # the payload is real: unsafe loading would have run it
    assert marker.exists()


def test_tampered_dcp_metadata_is_refused_and_runs_nothing(tmp_path):
    ckpt, marker = tmp_path / "ckpt", tmp_path / "MARKER"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: single process"
        dcp.save({"w": torch.arange(6.0)}, checkpoint_id=str(ckpt))
        state = {"w": torch.zeros(6)}
        safe_dcp_load(state, ckpt)  # an untampered checkpoint loads
        assert state["w"].tolist() == list(range(6))
        (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
        with pytest.raises(UnsafeCheckpointError) as ei:
            safe_dcp_load({"w": torch.zeros(6)}, ckpt)
    assert ".metadata" in str(ei.value) and "system" in str(ei.value), str(ei.value)
    assert not marker.exists()


def test_tampered_dcp_item_is_refused_and_runs_nothing(tmp_path):
    """DCP stores non-tensor values as torch.save blobs; one that would run code is refused."""
    ckpt, marker = tmp_path / "ckpt", tmp_path / "MARKER"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.arange(3.0), "extra": {"lr": 0.5, "betas": (0.9, 0.99)}, "obj": _Payload(marker)},
                 checkpoint_id=str(ckpt))
        assert not marker.exists()
        state = {"w": torch.zeros(3), "extra": {"lr": 0.0, "betas": (0.0, 0.0)}}
        safe_dcp_load(state, ckpt)  # plain non-tensor values load
        assert state["extra"] == {"lr": 0.5, "betas": (0.9, 0.99)} and state["w"].tolist() == [0.0, 1.0, 2.0]
        with pytest.raises(UnsafeCheckpointError) as ei:
            safe_dcp_load({"w": torch.zeros(3), "obj": None}, ckpt)
    assert "'obj'" in str(ei.value) and "system" in str(ei.value), str(ei.value)
    assert not marker.exists()
