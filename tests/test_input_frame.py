"""The world-of-one C lookup writing the dense arch's whole input (InputFrame,
OneTableInputRows): the same training, bit for bit, as the pooled lookup followed by the dense
arch's ``cat`` (dlrm_mtl/models/input_frame.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import pytest
import torch

from dlrm_mtl import native

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arch", ["shared_bottom", "aesm"])
def test_the_lookup_writing_x_trains_bit_for_bit_like_the_cat(synthetic_small, tmp_path, monkeypatch, arch):
    """Six steps on the same batches, twice from the same initialisation: once with the C lookup
    writing ``x`` whole (every call: ``input_rows_calls``), once with
    the dense arch's ``cat`` of the pooled lookup's output (``input_frame`` off). Every dense
    parameter, every table row, the tables' optimizer state and the logits are equal bit for
    bit where only ``x`` reads the scenario rows (Shared-Bottom); where a layer reads them as
    well (AESM's task gates), the scenario table's gradient is the sum of two partial sums
    instead of one: equal up to rounding."""
    if os.environ.get("DLRM_MTL_NATIVE") == "0":
        pytest.skip("DLRM_MTL_NATIVE=0: the kernels are off on purpose")
    from dlrm_mtl.distributed import shutdown_distributed
    from dlrm_mtl.models.ranking_model import DenseArch
    from dlrm_mtl.models.recorded_lookup import RecordedLookup
    from dlrm_mtl.train import train_step
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    arch_cfg = str(ROOT / f"configs/arch/{arch}.yaml")
    results = []
    frame_of = DenseArch.input_frame
    try:
        for use_frame in (True, False):
            monkeypatch.setattr(DenseArch, "input_frame", frame_of if use_frame else (lambda self, d, s: None))
            # the first layer's folded backward off: it regroups the sums (tests/test_folded_affine.py)
            run = _setup_arch(synthetic_small, tmp_path / f"run{use_frame}", arch_cfg, ["train.fold_first_layer=false"])
            assert native.available()
            model = run.dmp.module.model
            calls = [c for c in model.local_lookup.calls if isinstance(c, RecordedLookup)]
            assert len(calls) == 1 and len(model.local_lookup.runs) == 1
            run.train_stream.set_epoch(0)
            it = iter(run.train_stream)
            losses = []
            for _ in range(6):
                out = train_step(run.dmp, run.optimizer, next(it))
                losses.append(out[0].clone())  # the logits [B, T]
            it.close()
            assert calls[0].native_calls == 6  # the recording call too (its kernel call held back)
            assert calls[0].input_rows_calls == (6 if use_frame else 0)
            # the dense weights (the tables are ShardedTensors: compared through their kernel below)
            state = {k: v.detach().clone() for k, v in run.dmp.state_dict().items()
                     if isinstance(v, torch.Tensor) and not isinstance(v, ShardedTensor)}
            tables = [t.detach().clone() for t in (calls[0].tbe.weights_host, calls[0].tbe.momentum1_host)]
            results.append((losses, state, tables))
    finally:
        shutdown_distributed()
    (l1, s1, t1), (l2, s2, t2) = results
    assert s1.keys() == s2.keys() and any("scenario_emb" in k for k in s1)
    pairs = list(zip(l1, l2)) + [(s1[k], s2[k]) for k in s1] + list(zip(t1, t2))
    if arch == "shared_bottom":  # nothing else reads the scenario rows: the same sums, bit for bit
        assert all(torch.equal(a, b) for a, b in pairs)
    else:  # AESM's gates read them too: their table's gradient is two sums added, not one (rounding)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in pairs)


def _setup_arch(data: Path, run_dir: Path, arch_cfg: str, extra: Sequence[str] = ()):
    from dlrm_mtl.config import Config
    from dlrm_mtl.distributed import init_distributed
    from dlrm_mtl.train import setup_run

    cfg = Config.load([str(ROOT / "configs/demo.yaml"), arch_cfg], [
        f"data.train={data / 'train'}", f"data.eval={data / 'eval'}", f"train.run_dir={run_dir}",
        "data.batch_size=128", "train.threads_per_rank=1", "train.progress=false", "train.epochs=1",
        "model.dense_arch=[]", "model.interaction=concat", *extra,
    ])
    return setup_run(cfg, init_distributed("gloo", 60, 1))


def test_the_frame_applies_only_where_x_needs_no_forward_before_the_lookup(synthetic_small):
    """``input_frame``: the concat interaction on raw dense features only (a dense MLP computes
    part of ``x`` from the dense features first); its width is the dense arch's input width."""
    from dlrm_mtl.config import ModelConfig
    from dlrm_mtl.models.ranking_model import DenseArch
    from dlrm_mtl.schema import Schema

    schema = Schema.load(synthetic_small / "schema.yaml")
    dense, scenario = torch.randn(4, len(schema.dense)), torch.zeros(4, len(schema.scenarios), dtype=torch.int64)
    plain = DenseArch(schema, ModelConfig(dense_arch=[], interaction="concat"))
    frame = plain.input_frame(dense, scenario)
    assert frame is not None and frame.width(sum(f.dim for f in schema.sparse)) == plain.input_dim
    assert DenseArch(schema, ModelConfig(dense_arch=[8], interaction="concat")).input_frame(dense, scenario) is None
