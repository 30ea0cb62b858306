"""Faults: a worker SIGKILLed mid-epoch under TorchX with torchrun restarts (the job resumes
from the last complete checkpoint and trains every row exactly once per epoch), and a broken
rank ending a 2-node job with an error within bounded time instead of hanging it."""

import json
import os
import subprocess
import time

import pytest

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
