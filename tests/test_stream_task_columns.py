"""Stream columns added by issue 4: position-bias features (Batch.bias), user ids (Batch.user),
regression labels with nulls, ESM² branch labels; Batch.to keeps them."""

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dlrm_mtl.data import ParquetStream
from dlrm_mtl.data.errors import DataError
from dlrm_mtl.data.stream import hash_strings
from dlrm_mtl.schema import DenseFeature, PositionBias, ScenarioLevel, Schema, SparseFeature, Task
from dlrm_mtl.synthetic import SyntheticSpec, generate, synthetic_schema


@pytest.fixture(scope="module")
def options_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("opts")
    spec = SyntheticSpec(train_files=1, eval_files=1, row_group_rows=500, esm2=True, regression=True, position_bias=True)
    schema = generate(out, rows=2000, seed=4, spec=spec)
    return out, schema


def test_bias_user_regression_and_branch_labels(options_data):
    out, schema = options_data
    assert schema.position_bias is not None and "position" not in [d.name for d in schema.dense]
    t = pq.read_table(out / "train")
    pos = {int(r): i for i, r in enumerate(t["row_id"].to_numpy())}
    stream = ParquetStream(schema, str(out / "train"), batch_size=300, prefetch_batches=0)
    ti = {n: schema.task_index(n) for n in schema.task_names}
    seen = 0
    for batch in stream:
        real = batch.row_id >= 0
        idx = [pos[int(r)] for r in batch.row_id[real]]
        rows = t.take(pa.array(idx))
        seen += len(idx)
        assert batch.bias.shape == (300, 1)
        assert batch.bias[real][:, 0].tolist() == rows["position"].to_numpy().astype(np.float32).tolist()
        assert batch.user[real].tolist() == rows["user_id"].to_pylist()
        assert (batch.user[~real] == -1).all()
        comp = rows["completion"].to_pylist()
        assert batch.label_mask[real][:, ti["completion"]].all()
        assert batch.labels[real][:, ti["completion"]].tolist() == pytest.approx(comp)
        assert batch.labels[real][:, ti["dact"]].tolist() == [float(v) for v in rows["d_action"].to_pylist()]
        assert batch.labels[real][:, ti["buy_o"]].tolist() == [float(v) for v in rows["conversion"].to_pylist()]
        moved = batch.to(torch.device("cpu"))
        assert torch.equal(moved.bias, batch.bias) and torch.equal(moved.user, batch.user)
    assert seen == t.num_rows


def test_synthetic_truths_consistent(options_data):
    out, _ = options_data
    tab = pq.read_table(out / "train")
    c = {k: tab[k].to_numpy(zero_copy_only=False) for k in tab.column_names if k != "hist_categories"}
    # ESM²: pCVR is the mixture of the branches; D and buy only on clicked rows
    mix = c["true_pdact"] * c["true_pbuy_d"] + (1 - c["true_pdact"]) * c["true_pbuy_o"]
    np.testing.assert_allclose(c["true_pcvr"], mix, rtol=1e-5)
    assert (c["d_action"] <= c["click"]).all() and (c["conversion"] <= c["click"]).all()
    comp = c["completion"].astype(np.float64)
    assert ((comp >= 0) & (comp <= 1)).all()
    # completion follows its truth (Beta with mean μ, κ = 8): centred residual, variance μ(1−μ)/9
    mu = c["true_completion"].astype(np.float64)
    assert abs((comp - mu).mean()) < 0.01
    assert ((comp - mu) ** 2).mean() == pytest.approx((mu * (1 - mu) / 9).mean(), rel=0.1)


def test_default_data_unchanged_by_options(tmp_path):
    a = generate(tmp_path / "a", rows=600, seed=2, spec=SyntheticSpec(train_files=1, eval_files=1))
    generate(tmp_path / "b", rows=600, seed=2, spec=SyntheticSpec(train_files=1, eval_files=1, esm2=False, regression=False))
    ta, tb = pq.read_table(tmp_path / "a" / "train"), pq.read_table(tmp_path / "b" / "train")
    assert ta.equals(tb)
    # an option keeps every default column except the ones it redefines
    generate(tmp_path / "c", rows=600, seed=2, spec=SyntheticSpec(train_files=1, eval_files=1, regression=True))
    tc = pq.read_table(tmp_path / "c" / "train")
    for c in ta.column_names:
        assert tc[c].equals(ta[c]), c
    assert a.user_id == "user_id"


def _tiny(tmp_path, users, position):
    schema = Schema(
        name="tiny", sparse=[SparseFeature("item", "t", 10)], dense=[DenseFeature("price")],
        scenarios=[ScenarioLevel("s", 1)], tasks=[Task("ctr", "click")], user_id="uid",
        position_bias=PositionBias(features=["pos"], tasks=["ctr"]),
    )
    pq.write_table(pa.table({"item": [1, 2, 3], "price": [1.0, 2.0, 3.0], "s": [0, 0, 0], "click": [0, 1, 0],
                             "uid": users, "pos": position}), tmp_path / "p.parquet")
    return schema


def test_string_user_ids_hashed_and_null_bias_rejected(tmp_path):
    schema = _tiny(tmp_path, ["ann", "bob", "ann"], [1, 2, 3])
    (batch,) = list(ParquetStream(schema, str(tmp_path / "p.parquet"), batch_size=3, prefetch_batches=0))
    assert batch.user.tolist() == hash_strings(pa.array(["ann", "bob", "ann"]), 2**62).tolist()
    assert batch.user[0] == batch.user[2] != batch.user[1]
    schema = _tiny(tmp_path, [1, 2, 3], [1, None, 3])
    with pytest.raises(DataError, match=r"column 'pos', row 1"):
        list(ParquetStream(schema, str(tmp_path / "p.parquet"), batch_size=3, prefetch_batches=0))
