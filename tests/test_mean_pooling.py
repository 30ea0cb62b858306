"""Mean pooling after the lookup: every table's kernel sums its bags and the model divides the
mean-pooled features' columns by their bag lengths (``mean_spans``, ``mean_of_bags``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_mtl.config import ModelConfig
from dlrm_mtl.models.ranking_model import MultiScenarioMultiTaskModel, embedding_configs, mean_of_bags, mean_spans
from dlrm_mtl.schema import Schema

ROOT = Path(__file__).resolve().parents[1]


def _schema(features):
    d = yaml.safe_load((ROOT / "datasets" / "movielens" / "schema.yaml").read_text())
    d["sparse"] = features
    return Schema.from_dict(d)


def _mixed():
    """single-hot sum, multi-hot mean (dim 4), single-hot 'mean', multi-hot sum, multi-hot mean (dim 8)."""
    return _schema([
        {"name": "s0", "table": "t_s0", "num_embeddings": 10, "dim": 4},
        {"name": "m_mean", "table": "t_mm", "num_embeddings": 12, "dim": 4, "multi_hot": True, "max_len": 5, "pooling": "mean"},
        {"name": "s_mean", "table": "t_sm", "num_embeddings": 6, "dim": 4, "pooling": "mean"},
        {"name": "m_sum", "table": "t_ms", "num_embeddings": 9, "dim": 4, "multi_hot": True, "max_len": 5, "pooling": "sum"},
        {"name": "m_mean8", "table": "t_mm8", "num_embeddings": 7, "dim": 8, "multi_hot": True, "max_len": 5, "pooling": "mean"},
    ])


def test_every_table_sums_and_the_mean_pooled_multi_hot_features_have_spans():
    schema = _mixed()
    assert {c.pooling for c in embedding_configs(schema)} == {PoolingType.SUM}  # one kernel group
    # a single-hot feature needs no division whatever its pooling (one id or none per bag)
    assert mean_spans(schema) == [("m_mean", 4, 8), ("m_mean8", 16, 24)]
    movielens = Schema.load(ROOT / "datasets" / "movielens" / "schema.yaml")
    at = sum(f.dim for f in movielens.sparse[:2])
    assert mean_spans(movielens) == [("genres", at, at + 16)]


def _batch(schema, keys):
    """A KJT in ``keys`` order over batch 4: bags of 0-3 ids, an empty bag in each multi-hot feature."""
    g = torch.Generator().manual_seed(0)
    by_name = {f.name: f for f in schema.sparse}
    lengths, values = [], []
    for k in keys:
        f = by_name[k]
        ls = [1, 0, 1, 1] if not f.multi_hot else [3, 0, 1, 2]
        lengths += ls
        values.append(torch.randint(0, f.num_embeddings, (sum(ls),), generator=g))
    return KeyedJaggedTensor(keys=list(keys), values=torch.cat(values), lengths=torch.tensor(lengths, dtype=torch.int32))


@pytest.mark.parametrize("order", ["schema", "reversed"])
def test_pooled_is_each_features_schema_pooling_forward_and_backward(order):
    """The model's pooled embeddings equal ``embedding_bag`` with each feature's own pooling
    (mean of a bag, zeros for an empty one) on the same weights, and so do the tables'
    gradients; the KJT's key order does not matter (the reader may build it in kernel order)."""
    torch.manual_seed(0)
    schema = _mixed()
    model = MultiScenarioMultiTaskModel(schema, ModelConfig(interaction="concat"))
    names = [f.name for f in schema.sparse]
    kjt = _batch(schema, names if order == "schema" else names[::-1])
    pooled = model.pooled(kjt)  # [4, 24]
    weight = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(1))
    (pooled * weight).sum().backward()

    tables = {n: bag.weight for n, bag in model.ebc.embedding_bags.items()}
    by_key = kjt.to_dict()
    expected, at = [], 0
    for f in schema.sparse:
        w = tables[f.table].detach().clone().requires_grad_(True)
        jt = by_key[f.name]
        ref = torch.nn.functional.embedding_bag(jt.values(), w, jt.offsets(), mode=f.pooling, include_last_offset=True)
        (ref * weight[:, at:at + f.dim]).sum().backward()
        expected.append(ref.detach())
        torch.testing.assert_close(tables[f.table].grad, w.grad, rtol=1e-6, atol=1e-7)
        at += f.dim
    torch.testing.assert_close(pooled.detach(), torch.cat(expected, 1), rtol=1e-6, atol=1e-7)
    assert (pooled.detach()[1] == 0).all()  # the empty bags
    assert not torch.equal(pooled.detach()[0, 4:8], expected[1][0] * 3)  # genuinely divided, not a sum


def test_fbgemm_sum_then_divide_equals_fbgemm_mean():
    """Against fbgemm's own mean-pooling kernel (which ``embedding_configs`` no longer uses):
    the same output and, after one row-wise Adagrad step, the same tables, to float rounding."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen

    torch.manual_seed(0)
    init = [torch.randn(12, 4), torch.randn(7, 4)]
    lengths = torch.tensor([3, 0, 1, 2, 2, 1, 0, 4])  # 2 features x batch 4
    indices = torch.cat([torch.randint(0, 12, (6,)), torch.randint(0, 7, (7,))])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=indices, lengths=lengths.int())
    grad = torch.randn(4, 8)
    out, tables = {}, {}
    for mode in (PoolingMode.SUM, PoolingMode.MEAN):
        tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(12, 4, EmbeddingLocation.HOST, ComputeDevice.CPU), (7, 4, EmbeddingLocation.HOST, ComputeDevice.CPU)],
            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.1, pooling_mode=mode)
        for w, src in zip(tbe.split_embedding_weights(), init):
            w.data.copy_(src)
        y = tbe(indices, offsets)  # [4, 8]
        if mode == PoolingMode.SUM:
            y = mean_of_bags(y, kjt, [("a", 0, 4), ("b", 4, 8)])
        y.backward(grad)
        out[mode] = y.detach()
        tables[mode] = [w.detach().clone() for w in tbe.split_embedding_weights()]
    torch.testing.assert_close(out[PoolingMode.SUM], out[PoolingMode.MEAN], rtol=1e-6, atol=1e-7)
    for a, b, src in zip(tables[PoolingMode.SUM], tables[PoolingMode.MEAN], init):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert not torch.equal(a, src)  # the update happened
