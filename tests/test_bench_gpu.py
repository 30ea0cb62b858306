"""tools/bench_gpu.py on the CPU: its JSON (both step sides, counts, dense-arch ratios), a failing
case recorded with its error (exit code 1), and the profiler-trace summary it reads on a GPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench_gpu  # noqa: E402

FAST = ["--device", "cpu", "--batch-sizes", "256", "--arch-batch", "256"]


def _run(argv, out: Path):
    rc = bench_gpu.main([*argv, "--json", str(out)])
    return rc, json.loads(out.read_text())


def test_quick_run_on_cpu_reports_both_sides_counts_and_arch_ratios(synthetic_small, tmp_path):
    rc, r = _run(["--quick", "--data", str(synthetic_small), *FAST], tmp_path / "gpu.json")
    assert rc == 0
    assert set(r) == {"device", "steps", "arch", "command"}
    assert set(r["device"]) == {"name", "torch", "torchrec", "fbgemm_gpu", "cuda"}
    assert r["device"]["torch"] == torch.__version__ and r["command"].startswith("python3 tools/bench_gpu.py --quick")
    [case] = r["steps"]
    assert (case["batch"], case["precision"]) == (256, "fp32")
    for name in ("real", "plain"):
        side = case[name]
        assert "error" not in side, side
        assert side["samples_per_s"] > 0 and side["ms_per_step"] > 0 and side["median_ms_per_step"] > 0
        assert side["steps"] == 6 and side["busy"] is None  # busy is a GPU figure
        c = side["counts"]
        assert isinstance(c["ops_per_step"], int) and c["ops_per_step"] > 0
        assert isinstance(c["value_reads_per_step"], int) and c["value_reads_per_step"] >= 0
        assert "kernels_per_step" not in c  # profiler figures only on CUDA
    assert case["ratio"] == pytest.approx(case["real"]["samples_per_s"] / case["plain"]["samples_per_s"])
    assert case["real"]["pipeline"] is None  # train.pipeline auto: none on CPU
    assert case["real"]["plan"]  # every table placed
    assert [a["fragment"] for a in r["arch"]] == ["mmoe", "ple"]
    for a in r["arch"]:
        assert a["batched_ms"] > 0 and a["loop_ms"] > 0 and a["ratio"] == pytest.approx(a["loop_ms"] / a["batched_ms"])
        assert a["max_abs_diff"] < 1e-4  # the loop copy computes the same logits


def test_a_failing_case_is_recorded_and_the_others_still_run(synthetic_small, tmp_path, monkeypatch):
    build = bench_gpu.build_plain

    def flaky(schema, cfg, device, batches, precision):
        if precision == "bf16":
            raise RuntimeError("boom: bf16 unsupported here")
        return build(schema, cfg, device, batches, precision)

    monkeypatch.setattr(bench_gpu, "build_plain", flaky)
    argv = ["--data", str(synthetic_small), *FAST, "--precision", "fp32", "bf16", "--steps", "2", "--warmup", "1",
            "--chunk", "1", "--count-steps", "1", "--skip-arch"]
    rc, r = _run(argv, tmp_path / "gpu.json")
    assert rc == 1
    fp32, bf16 = r["steps"]
    assert fp32["precision"] == "fp32" and fp32["ratio"] > 0 and "error" not in fp32["plain"]
    assert "boom: bf16 unsupported here" in bf16["plain"]["error"] and bf16["ratio"] is None
    assert bf16["real"]["samples_per_s"] > 0  # the other side of the failed case still ran
    assert r["arch"] == []


def test_a_failing_count_keeps_the_timings_and_fails_the_run(synthetic_small, tmp_path, monkeypatch):
    def broken(side, n):
        raise RuntimeError("counter broke")

    monkeypatch.setattr(bench_gpu, "op_counts", broken)
    rc, r = _run(["--data", str(synthetic_small), *FAST, "--precision", "fp32", "--steps", "1", "--warmup", "1",
                  "--count-steps", "1", "--skip-arch"], tmp_path / "gpu.json")
    assert rc == 1
    [case] = r["steps"]
    for name in ("real", "plain"):
        assert case[name]["samples_per_s"] > 0
        assert "counter broke" in case[name]["counts"]["errors"]["operator_count"]
    assert case["ratio"] > 0


def test_a_bad_override_fails_every_case_without_stopping(synthetic_small, tmp_path):
    rc, r = _run(["--data", str(synthetic_small), *FAST, "--precision", "fp32", "--set", "train.no_such_key=1",
                  "--skip-arch"], tmp_path / "gpu.json")
    assert rc == 1
    [case] = r["steps"]
    assert "no_such_key" in case["error"]


def test_trace_summary_counts_kernels_launches_syncs_and_busy_time():
    """A hand-made Chrome trace of 2 steps: runtime calls count inside the step windows only (the
    synchronisation around the profiled steps does not), graph launches count as one call each,
    CUPTI's versioned names are normalised, busy is the union of the kernel intervals."""
    mark = bench_gpu.STEP_MARK
    ev = [
        {"ph": "X", "cat": "user_annotation", "name": mark, "ts": 0, "dur": 100},
        {"ph": "X", "cat": "user_annotation", "name": mark, "ts": 200, "dur": 100},
        {"ph": "X", "cat": "gpu_user_annotation", "name": mark, "ts": 0, "dur": 300},  # not a window
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 10, "dur": 2},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernelExC_v11060", "ts": 20, "dur": 2},
        {"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernel", "ts": 30, "dur": 2},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 210, "dur": 2},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 250, "dur": 5},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": 260, "dur": 1},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaDeviceSynchronize", "ts": 350, "dur": 5},  # outside: ours
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 15, "dur": 40},
        {"ph": "X", "cat": "kernel", "name": "relu", "ts": 40, "dur": 30},  # overlaps gemm: 15..70 busy
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 215, "dur": 10},  # graph kernels still show
        {"ph": "X", "cat": "kernel", "name": "relu", "ts": 225, "dur": 10},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pageable)", "ts": 261, "dur": 1},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 1, "dur": 1},
        {"ph": "i", "name": "instant"},
    ]
    s = bench_gpu.summarise_trace(ev, steps=2, wall_s=400e-6)
    assert s["kernels_per_step"] == 2
    assert s["launch_calls_per_step"] == 2 and s["launch_calls"]["cudaLaunchKernelExC"] == 0.5
    assert s["launch_calls"]["cudaGraphLaunch"] == 0.5
    assert s["syncs_per_step"] == 0.5 and s["syncs"] == {"cudaStreamSynchronize": 0.5}
    assert s["d2h_copies_per_step"] == 0.5 and s["h2d_copies_per_step"] == 0.5
    assert s["busy"] == pytest.approx((55 + 20) / 400) and s["kernel_ms_per_step"] == pytest.approx(75 / 2 / 1e3)
    assert s["top_kernels"][0] == ["gemm", 1.0]
    assert bench_gpu.union_us([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == pytest.approx(4)


def test_profiler_path_runs_on_cpu_and_finds_no_device_work():
    x = torch.randn(64, 64)
    side = bench_gpu.Side("cpu", step=lambda: (x @ x).sum())
    s = bench_gpu.profile_counts(side, 3, lambda: None, cuda=False)
    assert s["kernels_per_step"] == 0 and s["launch_calls_per_step"] == 0 and s["busy"] == 0
    assert s["profiled_ms_per_step"] > 0 and side.last_loss is not None


def test_sync_debug_warnings_are_counted_per_step_by_source_line(monkeypatch):
    """The second sync figure: PyTorch's sync debug mode warns at every synchronising call (faked
    here, no CUDA on this machine); every warning counts, even with warnings filtered globally."""
    import warnings

    mode = {"now": "default"}
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: mode.update(now=m))

    def step():
        if mode["now"] == "warn":
            warnings.warn("called a synchronizing CUDA operation", UserWarning)
            warnings.warn("called a synchronizing CUDA operation", UserWarning)  # a second call site
            warnings.warn("something else", UserWarning)
        return torch.zeros(())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as quiet_third_party_logs does for torch's UserWarnings
        s = bench_gpu.sync_warning_counts(bench_gpu.Side("s", step=step), 3, lambda: None)
    assert mode["now"] == "default"  # restored
    assert s["sync_warnings_per_step"] == 2
    assert sorted(s["sync_warnings"].values()) == [1.0, 1.0]  # two source lines, once per step each
    assert all(k.startswith("test_bench_gpu.py:") for k in s["sync_warnings"])
