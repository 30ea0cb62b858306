"""Single-hot tables share the multi-hot tables' kernel pooling (one fbgemm kernel group)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from dlrm_mtl.models.ranking_model import embedding_configs, kernel_poolings
from dlrm_mtl.schema import Schema

ROOT = Path(__file__).resolve().parents[1]


def _schema(multi_poolings, single=2):
    sparse = [{"name": f"s{i}", "table": f"t_s{i}", "num_embeddings": 10, "dim": 4} for i in range(single)]
    sparse += [{"name": f"m{i}", "table": f"t_m{i}", "num_embeddings": 10, "dim": 4, "multi_hot": True, "pooling": p}
               for i, p in enumerate(multi_poolings)]
    d = yaml.safe_load((ROOT / "datasets" / "movielens" / "schema.yaml").read_text())
    d["sparse"] = sparse
    return Schema.from_dict(d)


@pytest.mark.parametrize("multi,single", [([], "sum"), (["mean"], "mean"), (["sum"], "sum"), (["mean", "sum"], "sum"),
                                          (["mean", "mean", "sum"], "mean")])
def test_single_hot_tables_take_the_multi_hot_tables_pooling(multi, single):
    pool = kernel_poolings(_schema(multi))
    assert pool["t_s0"] == pool["t_s1"] == single
    assert [pool[f"t_m{i}"] for i in range(len(multi))] == multi  # a multi-hot table pools as its schema says
    configs = {c.name: c for c in embedding_configs(_schema(multi))}
    assert configs["t_s0"].pooling.name == single.upper()


def test_movielens_schema_is_one_kernel_group():
    schema = Schema.load(ROOT / "datasets" / "movielens" / "schema.yaml")
    assert any(f.multi_hot and f.pooling == "mean" for f in schema.sparse)
    assert any(not f.multi_hot and f.pooling == "sum" for f in schema.sparse)
    assert set(kernel_poolings(schema).values()) == {"mean"}


def test_fbgemm_mean_and_sum_agree_on_bags_of_one_id_or_none():
    """The premise: with one id per bag (or none: a null single-hot id) fbgemm's mean and sum
    kernels give the same output and the same row-wise Adagrad update, bit for bit."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen

    torch.manual_seed(0)
    init = [torch.randn(10, 4), torch.randn(7, 8)]
    indices = torch.tensor([3, 0, 9, 1, 6, 2], dtype=torch.int64)
    lengths = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1])  # 2 tables x batch 4, two empty bags
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    grad = torch.randn(4, 12)
    out, weights = {}, {}
    for mode in (PoolingMode.SUM, PoolingMode.MEAN):
        tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(10, 4, EmbeddingLocation.HOST, ComputeDevice.CPU), (7, 8, EmbeddingLocation.HOST, ComputeDevice.CPU)],
            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.1, pooling_mode=mode)
        for w, src in zip(tbe.split_embedding_weights(), init):
            w.data.copy_(src)
        y = tbe(indices, offsets)  # [4, 12]
        y.backward(grad)
        out[mode] = y.detach()
        weights[mode] = [w.detach().clone() for w in tbe.split_embedding_weights()]
    assert torch.equal(out[PoolingMode.SUM], out[PoolingMode.MEAN])
    assert (out[PoolingMode.SUM][1, :4] == 0).all()  # the empty bag
    for a, b in zip(weights[PoolingMode.SUM], weights[PoolingMode.MEAN]):
        assert torch.equal(a, b)
    assert not torch.equal(weights[PoolingMode.SUM][0], init[0])  # the update happened
