"""tools/count_ops.py: the operator / host-synchronisation counter, and the numbers it pins."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import count_ops  # noqa: E402

# The default config's operators per non-logging step, counted before the work that cut them
# (docs/performance.md) and the ceiling now: at most half.
DEFAULT_OPS_BEFORE = 1276


def test_counter_sees_value_reads_data_dependent_shapes_and_host_copies():
    x = torch.arange(6.0)
    host = torch.zeros((), dtype=torch.int64)
    counter = count_ops.OpCounter(host_resident=[host])
    with counter, count_ops.counting_host_reads(counter):
        y = (x * 2).sum()
        step0 = counter.cut()
        _ = y.item()  # value read
        _ = x[x > 2]  # boolean mask: data-dependent shape
        _ = torch.nonzero(x)
        _ = x.tolist()  # not dispatched: wrapped
        _ = torch.repeat_interleave(torch.tensor([1, 2]))
        step1 = counter.cut()
        _ = host.item()  # a host-resident counter: not a synchronisation
        _ = torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)
        step2 = counter.cut()
    assert step0.ops == 2 and step0.syncs == 0
    assert step1.syncs == 5, step1.sync_by_op
    assert set(step1.sync_by_op) >= {"_local_scalar_dense", "nonzero", "tolist", "repeat_interleave"}
    assert step2.syncs == 0 and step2.host_reads == 1
    assert torch.Tensor.tolist is not None and "counted" not in torch.Tensor.tolist.__name__  # restored


@pytest.mark.slow
def test_default_config_has_no_host_sync_outside_logging_steps_and_half_the_operators(tmp_path):
    """The real loop (world of one, default config): 0 host synchronisations on a
    non-logging step, some on a logging step (the counter is live), ≤ half the operators."""
    data = count_ops.ensure_data(ROOT / "data" / "count_ops", 40_000)
    r = count_ops.count_case("default", count_ops.fragments()["default"], data, tmp_path, steps=10, log_every=4)
    assert r.syncs_per_step == 0, r.sync_ops
    assert r.syncs_logging_step > 0
    assert r.ops_per_step <= DEFAULT_OPS_BEFORE // 2, r.top_ops[:10]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt and per-thread rusage are Linux/glibc")
def test_kept_host_memory_means_no_fresh_pages_per_step(tmp_path):
    """``train.keep_host_memory`` (the default): a non-logging step of the default config
    reuses the pages it freed: a tenth of the minor page faults on the training thread or less. Without it glibc
    returns the step's large temporaries to the kernel and faults them in again every step.
    Each setting runs in its own process: mallopt is process-wide and sticky. The run without
    it fixes glibc's starting thresholds (128 KiB): left adaptive, glibc raises them after
    freeing some large block, at a point that depends on what ran before (another thread's
    reads, the step's own temporaries), and the baseline would measure that history."""
    import subprocess

    data = count_ops.ensure_data(ROOT / "data" / "count_ops", 40_000)
    code = ("import sys, json; sys.path.insert(0, {tools!r}); import count_ops; "
            "from dlrm_mtl.host_memory import keep_freed_memory; "
            "sys.argv[2].endswith('false') and keep_freed_memory(128 << 10, 128 << 10); "
            "r = count_ops.count_case('default', count_ops.fragments()['default'], __import__('pathlib').Path({data!r}), "
            "__import__('pathlib').Path(sys.argv[1]), steps=20, log_every=4, overrides=[sys.argv[2]]); print('FAULTS', r.page_faults_per_step)")
    faults = {}
    for keep in ("true", "false"):
        run_dir = tmp_path / keep
        out = subprocess.run([sys.executable, "-c", code.format(tools=str(ROOT / "tools"), data=str(data)), str(run_dir),
                              f"train.keep_host_memory={keep}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
        line = [l for l in out.stdout.splitlines() if l.startswith("FAULTS")]
        assert out.returncode == 0 and line, out.stderr[-2000:]
        faults[keep] = float(line[0].split()[1])
    # the measure sees the faulted pages (630-1,200 per step here, fewer on a loaded machine) ...
    assert faults["false"] >= 100, faults
    # ... and the setting removes nearly all of them (a step that reads a new row group inline
    # still faults in pages for it: measured 0-70 of a median step)
    assert faults["true"] * 10 <= faults["false"], faults


def _probe(code: str, arg: str) -> list:
    """Runs ``code`` with ``arg`` in a process of its own (mallopt and the pyarrow pool are
    process-wide and sticky) and returns the fields after ``FAULTS`` on its output line."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, cwd=ROOT, timeout=120)
    line = [l for l in out.stdout.splitlines() if l.startswith("FAULTS")]
    assert out.returncode == 0 and line, out.stderr[-2000:]
    return line[0].split()[1:]


_ARENA_PROBE = """
import sys, threading, resource
import numpy as np
from dlrm_mtl.host_memory import keep_freed_memory
assert keep_freed_memory(arenas=int(sys.argv[1]))
def faults():
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
def other():  # allocates, touches and frees 16 MiB on a thread of its own (as the reader's do)
    a = np.ones(2 << 20)
    del a
t = threading.Thread(target=other); t.start(); t.join()
f0 = faults()
b = np.ones(2 << 20)  # the same size on this thread
print("FAULTS", faults() - f0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt and per-thread rusage are Linux/glibc")
def test_one_arena_lets_a_thread_reuse_memory_another_thread_freed():
    """``keep_freed_memory(arenas=1)`` (the CPU's ``train.keep_host_memory``): 16 MiB freed by
    another thread is reused by this one without faulting in fresh pages; glibc's default
    arenas leave it in the other thread's arena."""
    faults = {arenas: int(_probe(_ARENA_PROBE, str(arenas))[0]) for arenas in (0, 1)}
    assert faults[0] >= 100, faults  # fresh pages (of the 4,096 it spans: the heap had some free ones)
    assert faults[1] * 10 <= faults[0], faults


_ARROW_PROBE = """
import sys, threading, resource
import numpy as np, pyarrow as pa, torch
from dlrm_mtl.config import TrainConfig
from dlrm_mtl.train import configure_backends
from dlrm_mtl.host_memory import keep_freed_memory
if sys.argv[1] == "train":  # the training set-up's settings on the CPU
    configure_backends(TrainConfig(), torch.device("cpu"))
else:  # the same malloc settings, pyarrow's own allocator left
    assert keep_freed_memory(arenas=1)
def faults():
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
def other():  # 16 MiB written by pyarrow on a thread of its own (a decoded row group), then freed
    arr = pa.repeat(pa.scalar(1.0), 2 << 20)
    assert arr.nbytes >= 16 << 20
    del arr
t = threading.Thread(target=other); t.start(); t.join()
f0 = faults()
b = np.ones(2 << 20)  # numpy's 16 MiB on this thread
print("FAULTS", faults() - f0, pa.default_memory_pool().backend_name)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt and per-thread rusage are Linux/glibc")
def test_kept_host_memory_on_cpu_reuses_what_pyarrow_freed():
    """``train.keep_host_memory`` (the default) on the CPU puts pyarrow on the system allocator
    (one arena): the pages of a table pyarrow freed on another thread serve this thread's next
    numpy array; with the same malloc settings and pyarrow's own allocator, that allocator
    keeps them."""
    got = {keep: (int(f), pool) for keep in ("train", "own") for f, pool in [_probe(_ARROW_PROBE, keep)]}
    assert got["train"][1] == "system" and got["own"][1] != "system", got
    assert got["own"][0] >= 100 and got["train"][0] * 10 <= got["own"][0], got
