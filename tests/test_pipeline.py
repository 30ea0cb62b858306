"""TorchRec's TrainPipelineSparseDist (the GPU overlap path) has a CPU twin under test: it
must train exactly like the plain loop, bit for bit."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _train(data: Path, run: Path, pipeline: str, *sets: str, config: str = "") -> dict:
    cmd = [
        sys.executable, "-m", "dlrm_mtl", "train", "--config", "configs/demo.yaml", *(["--config", config] if config else []),
        "--set", f"data.train={data / 'train'}", "--set", f"data.eval={data / 'eval'}",
        "--set", f"train.run_dir={run}", "--set", "train.max_steps=12", "--set", "train.epochs=2",
        "--set", "train.eval_every_epoch=true", "--set", "data.batch_size=256",
        "--set", "train.progress=false", "--set", f"train.pipeline={pipeline}",
        # the plain loop's local lookup updates the tables bit for bit as the sharded module does
        "--set", "sharding.cpu_backward=per_table",
    ] + [a for kv in sets for a in ("--set", kv)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((run / "ranks" / "rank0.json").read_text())


@pytest.mark.slow
def test_sparse_dist_pipeline_matches_plain_loop(synthetic_small, tmp_path):
    plain = _train(synthetic_small, tmp_path / "plain", "none")
    piped = _train(synthetic_small, tmp_path / "piped", "sparse_dist")
    assert plain["rows_trained"] == piped["rows_trained"] == 2 * 12 * 256
    assert plain["dense_sha256"] == piped["dense_sha256"]
    m_plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    m_piped = json.loads((tmp_path / "piped" / "metrics.json").read_text())
    assert m_plain["metrics"] == m_piped["metrics"]  # eval after detach() uses the same weights
    # the step graph's CPU twin inside the real path (DMP, fused tables fed the gradient of the
    # static pooled input) and under the pipeline: the same weights bit for bit
    graphed = _train(synthetic_small, tmp_path / "graphed", "sparse_dist", "train.cuda_graph=graph")
    assert graphed["dense_sha256"] == plain["dense_sha256"]
    assert json.loads((tmp_path / "graphed" / "metrics.json").read_text())["metrics"] == m_plain["metrics"]  # tables too
    t = m_plain["throughput"]
    assert 0 < t["first_step_seconds"] < t["train_seconds"] and 0 <= t["input_wait_seconds"] < t["train_seconds"]


def test_auto_pipelines_only_where_an_all_to_all_is_hidden():
    import torch

    from dlrm_mtl.distributed import DistEnv
    from dlrm_mtl.train import pipeline_wanted

    def env(world: int, device: str) -> DistEnv:
        return DistEnv(0, world, 0, world, torch.device(device), "nccl" if device == "cuda" else "gloo")

    assert pipeline_wanted("auto", env(2, "cuda")) and pipeline_wanted("auto", env(8, "cuda"))
    assert not pipeline_wanted("auto", env(1, "cuda"))  # world of one: measured slower with it
    assert not pipeline_wanted("auto", env(2, "cpu"))
    assert pipeline_wanted("sparse_dist", env(1, "cpu")) and not pipeline_wanted("none", env(2, "cuda"))
    with pytest.raises(ValueError, match="train.pipeline"):
        pipeline_wanted("always", env(1, "cpu"))


@pytest.mark.slow
def test_sparse_dist_pipeline_matches_plain_loop_with_sequences_and_deepmcp(synthetic_seq, tmp_path):
    """The pipeline's trace follows the sequence path (the EmbeddingCollections' outputs go
    into SequenceArch, a leaf) and DeepMCP's auxiliary losses: bit for bit the plain loop.

    Without the correlation subnet's negatives: with them the tables (the pooled user table
    too) end 12 steps up to 1e-7 apart (2–3 float32 ulps at their magnitude, measured): the
    same computation summed in another order, not another computation."""
    sets = (f"data.schema={synthetic_seq / 'schema.yaml'}", "model.deepmcp.negatives=0")
    plain = _train(synthetic_seq, tmp_path / "plain", "none", *sets, config="configs/sequence/deepmcp.yaml")
    piped = _train(synthetic_seq, tmp_path / "piped", "sparse_dist", *sets, config="configs/sequence/deepmcp.yaml")
    assert plain["rows_trained"] == piped["rows_trained"] == 2 * 12 * 256
    assert plain["dense_sha256"] == piped["dense_sha256"]
    m_plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    m_piped = json.loads((tmp_path / "piped" / "metrics.json").read_text())
    assert m_plain["metrics"] == m_piped["metrics"]  # the sequence tables too (eval reads them)
