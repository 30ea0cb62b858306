"""``dlrm-mtl export`` of a model with behaviour sequences: the serving model looks the
sequences up in plain embedding tables, cuts them in the graph as the reader does (whole
histories may be passed), encodes them with the trained encoders and predicts what the
training model predicts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _train_and_export(data: Path, base: Path, config: str) -> Path:
    run = base / "run"
    sets = [f"data.train={data / 'train'}", f"data.eval={data / 'eval'}", f"data.schema={data / 'schema.yaml'}",
            f"train.run_dir={run}", "train.max_steps=6", "train.epochs=1", "data.batch_size=128",
            "train.eval_every_epoch=false", "train.progress=false", "data.check_row_ids=false"]
    cmd = [sys.executable, "-m", "dlrm_mtl", "train", "--config", "configs/demo.yaml", "--config", config]
    for kv in sets:
        cmd += ["--set", kv]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = base / "serving"
    proc = subprocess.run([sys.executable, "-m", "dlrm_mtl", "export", "--checkpoint", str(run / "checkpoints" / "final"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


def _ids(col, f) -> np.ndarray:
    from dlrm_mtl.data.stream import hash_ids

    raw = col.to_numpy(zero_copy_only=False)
    return (hash_ids(raw, f.num_embeddings) if f.hash else raw).astype(np.int64)


def _serving_inputs(schema, raw) -> Dict[str, torch.Tensor]:
    """Whole (untruncated) histories, ids hashed as the reader hashes them."""
    inputs: Dict[str, torch.Tensor] = {}
    for f in schema.sparse + schema.sequence:
        col = raw[f.column].combine_chunks()
        if f.multi_hot and (str(col.type).startswith("list") or str(col.type).startswith("large_list")):
            lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
            values = _ids(pc.list_flatten(col), f)
        else:
            lengths = np.ones(len(col), dtype=np.int64)
            values = _ids(col, f)
        inputs[f"{f.name}.values"] = torch.from_numpy(values)
        inputs[f"{f.name}.offsets"] = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    inputs["dense"] = torch.from_numpy(np.stack([raw[d.column].to_numpy().astype(np.float32) for d in schema.dense], axis=1))
    inputs["scenario"] = torch.from_numpy(np.stack([raw[s.column].to_numpy().astype(np.int64) for s in schema.scenarios], axis=1))
    return inputs


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/sequence/din.yaml", "configs/sequence/dupn.yaml"])
def test_exported_sequence_model_predicts_like_the_training_model(synthetic_seq, tmp_path, config):
    from dlrm_mtl.config import Config
    from dlrm_mtl.data.batch_columns import BatchColumns
    from dlrm_mtl.data.stream import RowGroupConverter, list_row_groups
    from dlrm_mtl.export import load_unsharded
    from dlrm_mtl.models import MultiScenarioMultiTaskModel
    from dlrm_mtl.schema import Schema
    from dlrm_mtl.scoring import named_predictions
    from dlrm_mtl.task_graph import TaskGraph

    run = _train_and_export(synthetic_seq, tmp_path, config)
    schema = Schema.load(synthetic_seq / "schema.yaml")
    sig = json.loads((tmp_path / "serving" / "signature.json").read_text())
    seq_inputs = [i for i in sig["inputs"] if i.get("sequence")]
    assert [i["name"] for i in seq_inputs] == [f"{f.name}.values" for f in schema.sequence]
    program = torch.export.load(str(tmp_path / "serving" / "model.pt2")).module()

    group = list_row_groups(synthetic_seq / "eval")[0]
    raw = pq.ParquetFile(group.path).read_row_group(group.index)
    conv = RowGroupConverter(schema, with_oracle=False)
    clean = conv.convert(raw, group)
    assert conv.counters.get("truncated_ids/hist_items", 0) > 0  # some histories are cut: the graph must cut them alike
    cfg = Config.load(str(run / "config.yaml"))
    model = MultiScenarioMultiTaskModel(schema, cfg.model)
    state = load_unsharded(run / "checkpoints" / "final")["model"]
    model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    for a, b in [(0, 200), (200, 201)]:  # a batch and a single row
        rows = clean.slice(a, b - a)
        batch = BatchColumns(rows, schema, with_oracle=False).batch(0, b - a, b - a)
        with torch.no_grad():
            logits, _, _ = model.eval()(batch.sparse, batch.dense, batch.scenario, batch.sequence)
            out = program(_serving_inputs(schema, raw.slice(a, b - a)))
        for name, p in named_predictions(TaskGraph(schema), logits).items():
            torch.testing.assert_close(out[name], p, atol=1e-5, rtol=0, msg=f"{config}: {name}, rows {a}:{b}")


def test_unrolled_lstm_equals_the_fused_one():
    from dlrm_mtl.serving import UnrolledLSTM

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(5, 7, batch_first=True)
    x = torch.randn(3, 6, 5)
    y, (h, c) = lstm(x)
    yu, (hu, cu) = UnrolledLSTM(lstm)(x)
    torch.testing.assert_close(yu, y)
    torch.testing.assert_close(hu, h)
    torch.testing.assert_close(cu, c)


@pytest.mark.parametrize("keep, want", [("last", [[3, 4, 5], [6, 0, 0], [0, 0, 0]]), ("first", [[1, 2, 3], [6, 0, 0], [0, 0, 0]])])
def test_sequence_events_cut_histories_like_the_reader(keep, want):
    from dlrm_mtl.serving import SequenceEvents

    values, offsets = torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([0, 5, 6, 6])  # rows of 5, 1 and 0 events
    ids, mask = SequenceEvents.kept_ids(values, offsets, 3, keep)
    assert ids.tolist() == want
    assert mask.tolist() == [[True] * 3, [True, False, False], [False] * 3]
