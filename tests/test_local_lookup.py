"""LocalPooledLookup: a world of one looks its tables up through their fbgemm kernels without
TorchRec's input/output dist, and trains exactly like the sharded module's forward."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _train(data: Path, run: Path, *sets: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "dlrm_mtl", "train", "--config", "configs/demo.yaml",
        "--set", f"data.train={data / 'train'}", "--set", f"data.eval={data / 'eval'}",
        "--set", f"data.schema={data / 'schema.yaml'}",
        "--set", f"train.run_dir={run}", "--set", "train.max_steps=10", "--set", "train.epochs=2",
        "--set", "data.batch_size=256", "--set", "train.progress=false", "--set", "train.log_every=5",
    ] + [a for kv in sets for a in ("--set", kv)]
    # on the host even where a GPU is present: the runs are compared bit for bit, and a CUDA
    # run sums the scenario rows' gradient (``index_select``'s backward, ``index_add``) with
    # atomics, which no two runs order alike (a lent H100 gave two-group runs that differed in
    # the scenario embeddings only, every other weight bit for bit)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# the config that splits _two_groups' tables into two kernel groups: the multi-hot feature's
# own table trained by another fused optimizer (TorchRec groups tables by it)
TWO_GROUPS_SETS = ("sharding.tables.t_multi_hot_own.optimizer=adagrad",)


def _two_groups(data: Path, out: Path) -> Path:
    """The synthetic set with its multi-hot feature moved to a table of its own, and read a
    second time into another table, both mean-pooled: under ``TWO_GROUPS_SETS`` (element-wise
    Adagrad on the first) the tables form two kernel groups whose features are not in schema
    order, each with a mean-pooled feature (one group's kernel module called as it is, the
    other's through a RecordedLookup)."""
    out.mkdir()
    for split in ("train", "eval"):
        (out / split).symlink_to(data / split)
    schema = yaml.safe_load((data / "schema.yaml").read_text())
    multi = [f for f in schema["sparse"] if f.get("multi_hot")]
    assert multi, "the synthetic schema has a multi-hot feature"
    multi[0]["table"] = "t_multi_hot_own"
    multi[0]["pooling"] = "mean"
    position = [f["name"] for f in schema["sparse"]].index(multi[0]["name"])
    assert 0 < position < len(schema["sparse"]) - 1, "in the middle: its columns must be put back in place"
    again = dict(multi[0], name=multi[0]["name"] + "_again", column=multi[0].get("column") or multi[0]["name"],
                 table="t_multi_hot_again")
    schema["sparse"].append(again)
    (out / "schema.yaml").write_text(yaml.safe_dump(schema, sort_keys=False))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["one_group", "two_groups"])
def test_local_lookup_trains_exactly_like_the_sharded_forward(synthetic_small, tmp_path, layout):
    data = synthetic_small if layout == "one_group" else _two_groups(synthetic_small, tmp_path / "data")
    if layout == "one_group":
        shutil.copy(synthetic_small / "schema.yaml", tmp_path / "schema.yaml")  # unchanged
    runs = {}
    for local in ("true", "false"):
        # cpu_backward per_table: the local lookup's update bit for bit the sharded module's
        proc = _train(data, tmp_path / local, f"sharding.local_lookup={local}", "sharding.cpu_backward=per_table",
                      *(TWO_GROUPS_SETS if layout == "two_groups" else ()))
        used = "fbgemm kernels called directly" in proc.stdout + proc.stderr
        assert used == (local == "true"), proc.stdout[-2000:]
        runs[local] = (json.loads((tmp_path / local / "ranks" / "rank0.json").read_text()),
                       json.loads((tmp_path / local / "metrics.json").read_text()))
    (rank_l, met_l), (rank_s, met_s) = runs["true"], runs["false"]
    assert rank_l["rows_trained"] == rank_s["rows_trained"] == 2 * 10 * 256
    assert rank_l["dense_sha256"] == rank_s["dense_sha256"]  # the dense weights, bit for bit
    assert met_l["metrics"] == met_s["metrics"]  # evaluated through the tables: they are equal too


def test_local_lookup_pooled_equals_the_sharded_collection(synthetic_small, tmp_path):
    """In-process, world of one: the same ``[B, Σ D]`` as the sharded collection's KeyedTensor
    in schema order with the schema's mean pooling applied (``mean_of_bags``), for two kernel
    groups whose features are not in schema order; its backward updates the tables."""
    import torch

    from dlrm_mtl.config import Config
    from dlrm_mtl.distributed import init_distributed, shutdown_distributed
    from dlrm_mtl.models.ranking_model import mean_of_bags, pooled_in_order
    from dlrm_mtl.models.recorded_lookup import RecordedLookup
    from dlrm_mtl.train import setup_run

    data = _two_groups(synthetic_small, tmp_path / "data")
    cfg = Config.load([str(ROOT / "configs/demo.yaml")], [
        f"data.train={data / 'train'}", f"data.eval={data / 'eval'}", f"data.schema={data / 'schema.yaml'}",
        f"train.run_dir={tmp_path / 'run'}", "data.batch_size=64", "train.threads_per_rank=1", "train.progress=false",
        *TWO_GROUPS_SETS,
    ])
    env = init_distributed("gloo", 60, 1)
    try:
        run = setup_run(cfg, env)
        model = run.dmp.module.model
        lookup = model.local_lookup
        assert lookup is not None and lookup.perm is not None and len(lookup.runs) > 2
        it = iter(run.train_stream)
        batch = next(it)
        # the reader builds the batch in the kernels' feature order: nothing to permute
        assert batch.sparse.keys() == lookup.kernel_keys != model.feature_names
        expected = mean_of_bags(pooled_in_order(model.ebc(batch.sparse), model.feature_names), batch.sparse,
                                model.mean_spans)
        got = lookup(batch.sparse)
        # a mean-pooled feature in each group, one group called through a RecordedLookup
        assert len(lookup.group_spans) == 2 and all(lookup.group_spans)
        assert sorted(isinstance(c, RecordedLookup) for c in lookup.calls) == [False, True]
        assert got.shape == expected.shape and torch.equal(got, expected)
        # the kernel modules called as they are (no RecordedLookup): their sums divided here
        calls, lookup.calls = lookup.calls, list(lookup.modules)
        assert torch.equal(lookup(batch.sparse), expected)
        lookup.calls = calls
        # a batch in schema order (another reader, predict) is permuted first: the same result
        in_schema_order = batch.sparse.permute([batch.sparse.keys().index(n) for n in model.feature_names])
        assert torch.equal(lookup(in_schema_order), expected)
        with pytest.raises(ValueError, match="not an order of the schema's sparse features"):
            run.train_stream.set_sparse_order(model.feature_names[1:])
        # backward through it reaches the fused optimizer of the tables (the training test above
        # shows the update equals the sharded path's, bit for bit)
        before = [p.detach().clone() for p in model.ebc.parameters()]
        run.optimizer.zero_grad()
        (got * torch.arange(got.shape[1], dtype=got.dtype)).sum().backward()
        assert any(not torch.equal(p.detach(), b) for p, b in zip(model.ebc.parameters(), before))
        it.close()
    finally:
        shutdown_distributed()


@pytest.mark.parametrize("mode", ["none", "fatal"])
def test_bounds_check_follows_the_config(synthetic_small, tmp_path, mode):
    """``sharding.bounds_check``: none (the default; the reader checks every id) runs no fbgemm
    bounds check before the lookup; fatal runs one per kernel and an id outside its table is
    an error, not a read of another row."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from dlrm_mtl.config import Config
    from dlrm_mtl.distributed import init_distributed, shutdown_distributed
    from dlrm_mtl.train import setup_run

    cfg = Config.load([str(ROOT / "configs/demo.yaml")], [
        f"data.train={synthetic_small / 'train'}", f"data.eval={synthetic_small / 'eval'}",
        f"train.run_dir={tmp_path / 'run'}", "data.batch_size=64", "train.threads_per_rank=1", "train.progress=false",
        f"sharding.bounds_check={mode}",
    ])
    assert Config.load([str(ROOT / "configs/demo.yaml")], []).sharding.bounds_check == "none"

    class Checks(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += "bounds_check_indices" in str(func)
            return func(*args, **(kwargs or {}))

    env = init_distributed("gloo", 60, 1)
    try:
        run = setup_run(cfg, env)
        model = run.dmp.module.model
        batch = next(iter(run.train_stream))
        checks = Checks()
        with checks:
            model.embed(batch.sparse, batch.sequence)
        kernels = len(model.local_lookup.modules)
        assert checks.n == (0 if mode == "none" else kernels)
        if mode == "fatal":
            values = batch.sparse.values().clone()
            values[0] = 10**6  # beyond every table
            bad = type(batch.sparse)(keys=batch.sparse.keys(), values=values, lengths=batch.sparse.lengths())
            with pytest.raises(Exception):
                model.embed(bad, batch.sequence)
    finally:
        shutdown_distributed()
