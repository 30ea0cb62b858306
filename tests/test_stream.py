"""Parquet -> Batch: contents equal the rows read back with pyarrow; exactly once across ranks."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dlrm_mtl.data import ParquetStream, assign_row_groups, list_row_groups
from dlrm_mtl.data.stream import DataError, hash_ids
from dlrm_mtl.schema import Schema


def _rows_by_id(path):
    t = pq.read_table(path)
    ids = t["row_id"].to_numpy()
    return t, {int(r): i for i, r in enumerate(ids)}


@pytest.mark.parametrize("shuffle", [0, 2500])
def test_batches_equal_parquet_rows(synthetic_small, shuffle):
    schema = Schema.load(synthetic_small / "schema.yaml")
    table, pos = _rows_by_id(synthetic_small / "train")
    stream = ParquetStream(schema, str(synthetic_small / "train"), batch_size=512, shuffle_buffer_rows=shuffle, seed=1)
    seen = 0
    for batch in stream:
        real = batch.row_id >= 0
        idx = np.array([pos[int(r)] for r in batch.row_id[real]])
        rows = table.take(pa.array(idx))
        n = len(idx)
        seen += n
        for f in schema.sparse:
            jt = batch.sparse[f.name]
            lengths = jt.lengths()[:n]
            offsets = np.concatenate([[0], np.cumsum(lengths.numpy())])
            vals = jt.values().numpy()
            expected = rows[f.name].to_pylist()
            if f.hash:
                expected = hash_ids(np.array(expected, dtype=np.int64), f.num_embeddings).tolist()
            for i in range(n):
                got = vals[offsets[i] : offsets[i + 1]].tolist()
                exp = expected[i] if f.multi_hot else [expected[i]]
                assert got == exp, (f.name, i)
            assert int(jt.lengths()[n:].sum()) == 0  # padding rows have no ids
        for j, d in enumerate(schema.dense):
            x = rows[d.column].to_numpy().astype(np.float32)
            x = np.log1p(x) if d.transform == "log1p" else x
            np.testing.assert_allclose(batch.dense[real][:, j].numpy(), x, rtol=1e-6)
        for j, lvl in enumerate(schema.scenarios):
            assert batch.scenario[real][:, j].tolist() == rows[lvl.column].to_pylist()
        for j, t in enumerate(schema.tasks):
            assert batch.labels[real][:, j].tolist() == [float(v) for v in rows[t.label].to_pylist()]
            np.testing.assert_allclose(batch.oracle[real][:, j].numpy(), rows[t.oracle].to_numpy())
        assert not batch.label_mask[~real].any()
        assert (batch.weight[~real] == 0).all() and (batch.weight[real] == 1).all()
    assert seen == table.num_rows


def test_batch_kjt_carries_per_key_lengths_and_offsets(synthetic_small):
    """The reader hands TorchRec per-key lengths and offsets computed on the host (the input
    dist would otherwise read them back from the device every step); they must match the
    lengths, also on the padded last batch."""
    schema = Schema.load(synthetic_small / "schema.yaml")
    stream = ParquetStream(schema, str(synthetic_small / "train"), 1000, 0, 1, shuffle_buffer_rows=0, prefetch_batches=0)
    batches = list(stream)
    stream_small = ParquetStream(schema, str(synthetic_small / "train"), 4096, 0, 1, shuffle_buffer_rows=0, prefetch_batches=0)
    batches.append(list(stream_small)[-1])  # 9600 rows: the last batch of 4096 is padded
    assert (batches[-1].row_id < 0).any()
    for b in batches:
        kjt = b.sparse
        assert kjt._length_per_key is not None and kjt._offset_per_key is not None
        lengths = kjt.lengths().view(len(kjt.keys()), -1)
        assert kjt._length_per_key == lengths.sum(1).tolist()
        assert kjt._offset_per_key == [0] + torch.cumsum(lengths.sum(1), 0).tolist()
        assert kjt.offsets()[-1].item() == kjt.values().numel()
        pad = b.row_id < 0
        assert (lengths[:, pad] == 0).all()
