"""Behaviour sequences (schema ``sequence: true``): schema rules, the reader's unpooled ids and
counted truncation, the EmbeddingCollection lookup and the sequence encoders' place in the model."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dlrm_mtl.config import ConfigError, ModelConfig, SequenceEncoderConfig
from dlrm_mtl.data.batch_columns import BatchColumns
from dlrm_mtl.data.source import open_source
from dlrm_mtl.data.stream import DataError, RowGroupConverter, keep_last, list_row_groups
from dlrm_mtl.models.ranking_model import MultiScenarioMultiTaskModel
from dlrm_mtl.schema import DenseFeature, ScenarioLevel, Schema, SchemaError, SparseFeature, Task


def _schema(keep: str = "last", cand: bool = True) -> Schema:
    sparse = [
        SparseFeature("item_id", "t_item", 50, 8),
        SparseFeature("hist", "t_hist", 50, 8, sequence=True, max_len=4, keep=keep),
        SparseFeature("hist_cat", "t_hcat", 10, 4, sequence=True, max_len=4, keep=keep, aligned_with="hist"),
    ]
    if cand:  # the candidate as a sequence of one: it shares the history's table (DIN)
        sparse.append(SparseFeature("cand", "t_hist", 50, 8, sequence=True, max_len=1))
    return Schema(name="s", sparse=sparse, dense=[DenseFeature("x")], scenarios=[ScenarioLevel("s", 2)],
                  tasks=[Task("ctr", "click")])


ROWS = {
    "item_id": [1, 2, 3, 4],
    "hist": [[1, 2, 3, 4, 5, 6], None, [7], [9, 8, 7, 6]],
    "hist_cat": [[1, 2, 3, 4, 5, 6], None, [7], [0, 1, 2, 3]],
    "cand": [[3], [4], [5], [6]],
    "x": [0.1, 0.2, 0.3, 0.4],
    "s": [0, 1, 0, 1],
    "click": [1, 0, 1, 0],
}


def _read(tmp_path: Path, schema: Schema, rows: Optional[Dict[str, list]] = None):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table(rows or ROWS), path)
    dset = open_source([str(path)], None)
    conv = RowGroupConverter(schema, with_oracle=False, filesystem=dset.filesystem)
    return conv, conv.read(list_row_groups(dset)[0])


# ---------------------------------------------------------------------------- schema
def test_schema_keeps_sequences_apart_and_round_trips():
    s = _schema()
    assert [f.name for f in s.sparse] == ["item_id"]
    assert [f.name for f in s.sequence] == ["hist", "hist_cat", "cand"]
    assert {g: [f.name for f in fs] for g, fs in s.sequence_groups.items()} == {"hist": ["hist", "hist_cat"], "cand": ["cand"]}
    assert all(f.multi_hot for f in s.sequence)
    d = s.to_dict()
    assert [f["name"] for f in d["sparse"]] == ["item_id", "hist", "hist_cat", "cand"]
    assert "sequence" not in d["sparse"][0] and "keep" not in d["sparse"][0]  # older files stay as they were
    assert Schema.from_dict(d) == s
    assert "hist_cat" in s.columns()


@pytest.mark.parametrize("change, message", [
    (dict(max_len=0), "needs max_len > 0"),
    (dict(keep="middle"), "keep 'middle'"),
    (dict(table="t_item"), "also holds pooled feature 'item_id'"),
    (dict(table="items"), "table name 'items' cannot be used"),
])
def test_schema_refuses_bad_sequences(change, message):
    hist = SparseFeature("hist", "t_hist", 50, 8, sequence=True, max_len=4)
    for k, v in change.items():
        setattr(hist, k, v)
    with pytest.raises(SchemaError, match=message):
        Schema(name="s", sparse=[SparseFeature("item_id", "t_item", 50, 8), hist], dense=[],
               scenarios=[ScenarioLevel("s", 2)], tasks=[Task("ctr", "click")])


@pytest.mark.parametrize("side, message", [
    (SparseFeature("c", "t_c", 10, 4, sequence=True, max_len=3, aligned_with="hist"), "differ from 'hist'"),
    (SparseFeature("c", "t_c", 10, 4, sequence=True, max_len=4, aligned_with="item_id"), "is not a sequence feature"),
])
def test_schema_refuses_misaligned_side_info(side, message):
    with pytest.raises(SchemaError, match=message):
        Schema(name="s", sparse=[SparseFeature("item_id", "t_item", 50, 8),
                                 SparseFeature("hist", "t_hist", 50, 8, sequence=True, max_len=4), side],
               dense=[], scenarios=[ScenarioLevel("s", 2)], tasks=[Task("ctr", "click")])


# ---------------------------------------------------------------------------- reader
def _lists(kjt, key: str) -> List[List[int]]:
    jt = kjt[key]
    return [v.tolist() for v in jt.to_dense()]


@pytest.mark.parametrize("keep", ["last", "first"])
def test_reader_keeps_sequences_unpooled_and_counts_truncation(tmp_path, keep):
    schema = _schema(keep)
    conv, table = _read(tmp_path, schema)
    batch = BatchColumns(table, schema, with_oracle=False).batch(0, 4, 6)  # 2 padding rows
    assert batch.sequence is not None and batch.sequence.keys() == ["hist", "hist_cat", "cand"]
    cut = (lambda x: x[-4:]) if keep == "last" else (lambda x: x[:4])
    expected = [cut(v) if v else [] for v in ROWS["hist"]] + [[], []]
    assert _lists(batch.sequence, "hist") == expected
    assert _lists(batch.sequence, "hist_cat") == [cut(v) if v else [] for v in ROWS["hist_cat"]] + [[], []]
    assert _lists(batch.sequence, "cand") == ROWS["cand"] + [[], []]
    assert conv.counters == {"null_lists/hist": 1, "null_lists/hist_cat": 1, "truncated_ids/hist": 2, "truncated_ids/hist_cat": 2}
    assert batch.sparse.keys() == ["item_id"]  # the pooled KJT is unchanged


def test_keep_last_of_a_sliced_list_array():
    col = pa.array([[9], [1, 2, 3], [], [4, 5, 6, 7, 8], [1]], type=pa.list_(pa.int64())).slice(1, 3)
    assert keep_last(col, 2).to_pylist() == [[2, 3], [], [7, 8]]


def test_reader_names_file_column_and_row_of_misaligned_side_info(tmp_path):
    rows = dict(ROWS, hist_cat=[[1, 2, 3, 4, 5, 6], None, [7, 1], [0, 1, 2, 3]])
    with pytest.raises(DataError, match=r"d\.parquet: column 'hist_cat', row 2: 2 entries, but its sequence 'hist' has 1"):
        _read(tmp_path, _schema(), rows)


def test_reader_checks_sequence_ids_like_multi_hot(tmp_path):
    rows = dict(ROWS, hist=[[1, 2, 3, 4, 5, 6], None, [7], [9, 8, 70, 6]])
    with pytest.raises(DataError, match=r"column 'hist', row 3: id 70 outside \[0, 50\)"):
        _read(tmp_path, _schema(), rows)


# ---------------------------------------------------------------------------- model
def _model(schema: Schema, encoders: Dict[str, SequenceEncoderConfig], interaction: str = "concat") -> MultiScenarioMultiTaskModel:
    torch.manual_seed(0)
    return MultiScenarioMultiTaskModel(schema, ModelConfig(interaction=interaction, sequence_encoders=encoders))


def test_mean_encoder_joins_the_pooled_embeddings(tmp_path):
    schema = _schema()
    _, table = _read(tmp_path, schema)
    batch = BatchColumns(table, schema, with_oracle=False).batch(0, 4, 4)
    model = _model(schema, {})
    assert list(model.sequence_tables) == ["dim8", "dim4"]  # one EmbeddingCollection per dim
    x = model.pooled(batch.sparse, batch.sequence)  # [B, 8 + (8 + 4) + 8]
    w_item = model.ebc.embedding_bags["t_item"].weight
    w_hist = model.sequence_tables["dim8"].embeddings["t_hist"].weight
    w_cat = model.sequence_tables["dim4"].embeddings["t_hcat"].weight
    for r in range(4):
        hist = ROWS["hist"][r][-4:] if ROWS["hist"][r] else []
        cats = ROWS["hist_cat"][r][-4:] if ROWS["hist_cat"][r] else []
        events = torch.cat([w_hist[hist], w_cat[cats]], dim=1) if hist else torch.zeros(1, 12)
        want = torch.cat([w_item[ROWS["item_id"][r]], events.mean(0), w_hist[ROWS["cand"][r][0]]])
        torch.testing.assert_close(x[r], want)
    logits, _, _ = model(batch.sparse, batch.dense, batch.scenario, batch.sequence)
    logits.sum().backward()
    assert w_hist.grad is not None and w_hist.grad[ROWS["hist"][0][-1]].abs().sum() > 0


def test_target_attention_reads_its_target_from_a_sequence_of_one(tmp_path):
    """The candidate ``cand`` (max_len 1, the history's table) is the target; changing a
    row's candidate changes that row's encoded history and no other row's."""
    pytest.importorskip("dlrm_mtl.modules.sequence.target_attention")
    schema = _schema()
    _, table = _read(tmp_path, schema)
    model = _model(schema, {"hist": SequenceEncoderConfig(type="target_attention", target=["cand"], hidden=[8])}).eval()
    a = model.pooled(*[getattr(BatchColumns(table, schema, False).batch(0, 4, 4), k) for k in ("sparse", "sequence")])
    rows = dict(ROWS, cand=[[3], [4], [11], [6]])
    _, table2 = _read(tmp_path, schema, rows)
    b = model.pooled(*[getattr(BatchColumns(table2, schema, False).batch(0, 4, 4), k) for k in ("sparse", "sequence")])
    hist_cols = slice(8, 8 + 8 + 4)
    changed = ~torch.isclose(a[:, hist_cols], b[:, hist_cols]).all(dim=1)
    assert changed.tolist() == [False, False, True, False]


@pytest.mark.parametrize("encoders, interaction, message", [
    ({"hist_cat": SequenceEncoderConfig()}, "concat", r"\['hist_cat'\] not sequence feature"),
    ({"hist": SequenceEncoderConfig(type="target_attention", target=["nope"])}, "concat", "'nope' is neither"),
    ({"hist": SequenceEncoderConfig(type="target_attention")}, "concat", "target_attention needs the candidate"),
    ({"hist": SequenceEncoderConfig(type="mean", target=["item_id"])}, "concat", "mean does not read it"),
    ({"hist": SequenceEncoderConfig(type="gru")}, "concat", "type 'gru'"),
    ({}, "dot", "one embedding dim for all features"),
])
def test_sequence_encoder_config_errors(encoders, interaction, message):
    with pytest.raises(ConfigError, match=message):
        _model(_schema(), encoders, interaction)


def test_sequence_encoders_without_sequences_refused():
    schema = _schema()
    plain = Schema(name="p", sparse=schema.sparse, dense=schema.dense, scenarios=schema.scenarios, tasks=schema.tasks)
    with pytest.raises(ConfigError, match="no sequence features"):
        _model(plain, {"hist": SequenceEncoderConfig()})


def test_inspect_data_counts_sequence_ids_and_truncation(tmp_path):
    from dlrm_mtl.inspect_data import inspect_data

    schema = _schema()
    _read(tmp_path, schema)  # writes d.parquet
    report = inspect_data(schema, [str(tmp_path / "d.parquet")])
    assert report["cardinality"]["hist"]["distinct"] == len({3, 4, 5, 6, 7, 9, 8})  # the kept (last 4) events
    assert report["counters"]["truncated_ids/hist"] == 2
