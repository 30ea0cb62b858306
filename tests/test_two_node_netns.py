"""A real 2-node job on one machine: two hosts in their own network namespaces joined by a
veth pair, torchrun's c10d rendezvous across the veth addresses, tables sharded across the
two nodes, replicated parameters identical at the end. Needs root (`ip netns`); where the
machine cannot make namespaces the test fails and says so."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


@pytest.fixture()
def two_hosts():
    tag = uuid.uuid4().hex[:6]
    ns = [f"dlrm_n0_{tag}", f"dlrm_n1_{tag}"]
    dev = [f"dv0{tag}", f"dv1{tag}"]
    addr = ["10.77.0.1", "10.77.0.2"]
    try:
        for n in ns:
            _ip("netns", "add", n)
        _ip("link", "add", dev[0], "type", "veth", "peer", "name", dev[1])
        for n, d, a in zip(ns, dev, addr):
            _ip("link", "set", d, "netns", n)
            _ip("-n", n, "addr", "add", f"{a}/24", "dev", d)
            _ip("-n", n, "link", "set", d, "up")
            _ip("-n", n, "link", "set", "lo", "up")
    except (RuntimeError, FileNotFoundError) as e:
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
        pytest.fail(f"this machine cannot make network namespaces for the 2-node test (needs root and iproute2): {e}")
    try:
        yield list(zip(ns, dev, addr))
    finally:
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


@pytest.mark.slow
def test_two_nodes_over_veth(two_hosts, synthetic_small, tmp_path):
    run = tmp_path / "run"
    master = two_hosts[0][2]
    procs = []
    for node, (ns, dev, addr) in enumerate(two_hosts):
        cmd = [
            "ip", "netns", "exec", ns, str(BIN / "torchrun"),
            "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"{master}:29611", "--rdzv_id", f"netns-{run.name}", "--local_addr", addr,
            # node 0 hosts the c10d store: torchrun cannot tell from the hostname that the veth
            # address is its own
            "--rdzv_conf", f"is_host={'true' if node == 0 else 'false'}",
            "-m", "dlrm_mtl", "train", "--config", "configs/demo.yaml",
            "--set", f"data.train={synthetic_small / 'train'}", "--set", f"data.eval={synthetic_small / 'eval'}",
            "--set", f"train.run_dir={run}", "--set", "data.batch_size=512", "--set", "train.epochs=1",
            "--set", "train.progress=false", "--set", "train.timeout_s=60",
        ]
        env = dict(os.environ, GLOO_SOCKET_IFNAME=dev, PATH=f"{BIN}:{os.environ.get('PATH', '')}")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the 2-node job did not finish within 300 s")
        outs.append(out)
    for node, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {node} failed:\n{out[-4000:]}"

    plan = json.loads((run / "plan.json").read_text())
    hosting = set()
    for p in plan.values():
        hosting.update(p["ranks"])
    assert hosting == {0, 1}, plan  # one rank per node: tables live on both nodes
    r0 = json.loads((run / "ranks" / "rank0.json").read_text())
    r1 = json.loads((run / "ranks" / "rank1.json").read_text())
    assert r0["dense_sha256"] == r1["dense_sha256"]
    assert r0["rows_trained"] + r1["rows_trained"] > 0
    result = json.loads((run / "metrics.json").read_text())
    assert result["throughput"]["world_size"] == 2
