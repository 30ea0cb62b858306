"""``dlrm-mtl export``: the serving model (torch.export) of a trained checkpoint runs where
neither dlrm_mtl nor TorchRec can be imported and predicts what the training model predicts."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Dict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
FUSION = {"ctr": 1.0, "ctcvr": 2.0}


def _run(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def exported(synthetic_small, tmp_path_factory):
    """A few training steps on the synthetic set with a schema that exercises every dense
    transform and mean pooling, then ``dlrm-mtl export`` of its final checkpoint."""
    base = tmp_path_factory.mktemp("export_model")
    schema = yaml.safe_load((synthetic_small / "schema.yaml").read_text())
    for f in schema["sparse"]:
        if f["table"] == "t_category":  # item_category and hist_categories (multi-hot) share it
            f["pooling"] = "mean"
    dense = {d["name"]: d for d in schema["dense"]}
    dense["price"].update(default=1.5, clip_max=4.0)  # log1p, then clip
    dense["activity"].update(standardize=True, mean=1.0, std=2.0)  # log1p, then standardize
    dense["quality"].update(clip_min=-0.5)
    schema_path = base / "schema.yaml"
    schema_path.write_text(yaml.safe_dump(schema, sort_keys=False))
    run = base / "run"
    sets = [f"data.train={synthetic_small / 'train'}", f"data.eval={synthetic_small / 'eval'}", f"data.schema={schema_path}",
            f"train.run_dir={run}", "train.max_steps=3", "train.epochs=1", "data.batch_size=256",
            "train.eval_every_epoch=false", "train.progress=false", "data.check_row_ids=false",
            "predict.fusion={ctr: 1.0, ctcvr: 2.0}"]
    _run("-m", "dlrm_mtl", "train", "--config", "configs/demo.yaml", *[a for kv in sets for a in ("--set", kv)])
    checkpoint = run / "checkpoints" / "final"
    out = base / "serving"
    proc = _run("-m", "dlrm_mtl", "export", "--checkpoint", str(checkpoint), "--out", str(out))
    assert "score" in proc.stdout
    from dlrm_mtl.schema import Schema

    return SimpleNamespace(base=base, run=run, checkpoint=checkpoint, out=out, schema=Schema.load(schema_path),
                           data=synthetic_small, signature=json.loads((out / "signature.json").read_text()))


def _eval_rows(ex):
    """The first row group of the eval set: raw (as in the Parquet file) and as the reader converts it."""
    from dlrm_mtl.data.stream import RowGroupConverter, list_row_groups

    group = list_row_groups(ex.data / "eval")[0]
    raw = pq.ParquetFile(group.path).read_row_group(group.index)
    return raw, RowGroupConverter(ex.schema, with_oracle=False).convert(raw, group), group


def _serving_inputs(schema, raw: pa.Table, clean: pa.Table) -> Dict[str, torch.Tensor]:
    """The documented inputs: ids as the reader prepares them (hashed, truncated), bag offsets,
    the raw dense values (nulls as NaN) and the scenario ids."""
    n = clean.num_rows
    inputs: Dict[str, torch.Tensor] = {}
    for f in schema.sparse:
        col = clean[f.name].combine_chunks()
        if f.multi_hot:
            lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
            values = pc.list_flatten(col).to_numpy(zero_copy_only=False)
        else:
            lengths = pc.is_valid(col).to_numpy(zero_copy_only=False).astype(np.int64)
            values = col.drop_null().to_numpy(zero_copy_only=False)
        inputs[f"{f.name}.values"] = torch.from_numpy(values.astype(np.int64))
        inputs[f"{f.name}.offsets"] = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    dense = [pc.cast(raw[d.column], pa.float32()).fill_null(np.nan).to_numpy(zero_copy_only=False) for d in schema.dense]
    inputs["dense"] = torch.from_numpy(np.stack(dense, axis=1).astype(np.float32)).reshape(n, len(schema.dense))
    inputs["scenario"] = torch.from_numpy(np.stack([raw[s.column].to_numpy().astype(np.int64) for s in schema.scenarios], axis=1))
    return inputs


def _training_predictions(ex, clean: pa.Table) -> Dict[str, torch.Tensor]:
    """The same rows through the training model (TorchRec's EmbeddingBagCollection, the reader's
    dense transforms) loaded from the same checkpoint."""
    from dlrm_mtl.config import Config
    from dlrm_mtl.data.batch_columns import BatchColumns
    from dlrm_mtl.export import load_unsharded
    from dlrm_mtl.models import MultiScenarioMultiTaskModel
    from dlrm_mtl.scoring import named_predictions
    from dlrm_mtl.task_graph import TaskGraph

    cfg = Config.load(str(ex.run / "config.yaml"))
    model = MultiScenarioMultiTaskModel(ex.schema, cfg.model)
    state = load_unsharded(ex.checkpoint)["model"]
    model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    batch = BatchColumns(clean, ex.schema, with_oracle=False).batch(0, clean.num_rows, clean.num_rows)
    with torch.no_grad():
        logits, _, _ = model.eval()(batch.sparse, batch.dense, batch.scenario)
    return named_predictions(TaskGraph(ex.schema), logits)


# the subprocess: dlrm_mtl, TorchRec and fbgemm cannot be imported there (checked), only torch
_ISOLATED = textwrap.dedent('''
    import importlib.abc, json, sys
    BLOCKED = ("dlrm_mtl", "torchrec", "fbgemm_gpu")

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this process")
            return None

    sys.meta_path.insert(0, Blocker())
    for name in BLOCKED[:2]:
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"the blocker let {name} be imported")
    import torch

    model_dir, *batches = sys.argv[1:]
    sig = json.load(open(f"{model_dir}/signature.json"))
    model = torch.export.load(f"{model_dir}/model.pt2").module()
    names = [i["name"] for i in sig["inputs"]]
    for path in batches:
        inputs = torch.load(f"{path}.in.pt", weights_only=True)
        assert sorted(inputs) == sorted(names), (sorted(inputs), names)
        with torch.no_grad():
            out = model({n: inputs[n] for n in reversed(names)})  # matched by name, any order
        assert list(out) == [o["name"] for o in sig["outputs"]], list(out)
        torch.save(dict(out), f"{path}.out.pt")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("isolated ok", torch.__version__)
''')


def test_exported_model_runs_without_dlrm_mtl_and_predicts_like_the_training_model(exported, tmp_path):
    raw, clean, _ = _eval_rows(exported)
    spans = [(0, 300), (300, 301), (301, 308)]  # three batch sizes, one of them a single row
    for i, (a, b) in enumerate(spans):
        torch.save(_serving_inputs(exported.schema, raw.slice(a, b - a), clean.slice(a, b - a)), tmp_path / f"b{i}.in.pt")
    (tmp_path / "isolated.py").write_text(_ISOLATED)
    proc = _run("-I", str(tmp_path / "isolated.py"), str(exported.out), *[str(tmp_path / f"b{i}") for i in range(len(spans))],
                cwd=tmp_path, timeout=120)
    assert "isolated ok" in proc.stdout

    names = exported.signature["outputs"]
    for i, (a, b) in enumerate(spans):
        out = torch.load(tmp_path / f"b{i}.out.pt", weights_only=True)
        ref = _training_predictions(exported, clean.slice(a, b - a))
        assert list(ref) == [o["name"] for o in names if o["kind"] != "score"]
        for name, p in ref.items():
            assert out[name].shape == (b - a,)
            torch.testing.assert_close(out[name], p, atol=1e-5, rtol=0, msg=f"{name}, rows {a}:{b}")
        by_hand = np.prod([out[n].double().numpy() ** w for n, w in FUSION.items()], axis=0)
        np.testing.assert_allclose(out["score"].double().numpy(), by_hand, rtol=1e-5)
        assert not torch.equal(out["score"], out["ctcvr"])  # the weights are used: ctr · ctcvr², not ctcvr


def test_signature_lists_every_input_and_output(exported):
    from dlrm_mtl.scoring import prediction_names

    sig, schema = exported.signature, exported.schema
    expected = [n for f in schema.sparse for n in (f"{f.name}.values", f"{f.name}.offsets")] + ["dense", "scenario"]
    assert [i["name"] for i in sig["inputs"]] == expected
    assert all(i["dtype"] in ("int64", "float32") and i["shape"] for i in sig["inputs"])
    assert [o["name"] for o in sig["outputs"]] == prediction_names(schema) + ["score"] == ["ctr", "cvr", "ctcvr", "score"]
    assert sig["fusion"] == FUSION
    assert [t["name"] for t in sig["tasks"]] == ["ctr", "cvr"] and [s["name"] for s in sig["scenarios"]] == ["channel", "domain"]
    assert sig["torch_version"] == torch.__version__ and sig["step"] == 3
    hashed = {i["feature"]: i["ids"] for i in sig["inputs"] if i["name"].endswith(".values")}
    assert "hash_ids" in hashed["user_id"] and "hash_strings" in hashed["user_id"] and "[0, 500000)" in hashed["user_id"]
    assert "hash: false" in hashed["device"]
    assert [c["name"] for c in sig["inputs"][-2]["columns"]] == ["price", "activity", "quality", "position"]
    # the program itself takes exactly these inputs and returns these outputs
    program = torch.export.load(str(exported.out / "model.pt2"))
    assert program.call_spec.in_spec.child(0).child(0).context == expected
    assert program.call_spec.out_spec.context == [o["name"] for o in sig["outputs"]]


def test_exported_model_checks_its_inputs_and_fills_dense_defaults(exported):
    from dlrm_mtl.serving import example_inputs

    model = torch.export.load(str(exported.out / "model.pt2")).module()
    x = example_inputs(exported.schema, batch=3)
    with pytest.raises(RuntimeError, match=r"'user_id.values': an id outside \[0, 500000\)"):
        model({**x, "user_id.values": torch.full_like(x["user_id.values"], 500000)})
    with pytest.raises(RuntimeError, match="'device.offsets'"):
        model({**x, "device.offsets": torch.tensor([0, 2, 4, 5])})
    with pytest.raises(RuntimeError, match=r"'scenario', column 1 \('domain'\): an id outside \[0, 2\)"):
        model({**x, "scenario": torch.tensor([[0, 0], [0, 2], [1, 1]])})
    nan = float("nan")
    with pytest.raises(RuntimeError, match="'activity'.*no default"):
        model({**x, "dense": torch.tensor([[1.0, nan, 0.5, 2.0]] * 3)})
    with pytest.raises(RuntimeError, match="'price'.*log1p of a negative"):
        model({**x, "dense": torch.tensor([[-1.0, 1.0, 0.5, 2.0]] * 3)})
    # price declares default 1.5: NaN is a missing value
    filled = model({**x, "dense": torch.tensor([[nan, 1.0, 0.5, 2.0]] * 3)})
    given = model({**x, "dense": torch.tensor([[1.5, 1.0, 0.5, 2.0]] * 3)})
    torch.testing.assert_close(filled["score"], given["score"], atol=0, rtol=0)


def test_dense_transform_equals_the_reader(exported):
    """Nulls (default), log1p, clip and standardize: in the graph as the reader computes them."""
    from dlrm_mtl.serving import DenseTransform

    raw, _, group = _eval_rows(exported)
    raw = raw.slice(0, 200)
    price = raw["price"].combine_chunks()
    nulls = np.arange(len(price)) % 7 == 0
    raw = raw.set_column(raw.schema.get_field_index("price"), "price", pa.array(price.to_numpy(), mask=nulls))
    from dlrm_mtl.data.stream import RowGroupConverter

    clean = RowGroupConverter(exported.schema, with_oracle=False).convert(raw, group)
    want = torch.from_numpy(clean["dense"].combine_chunks().flatten().to_numpy().reshape(200, 4).copy())
    got = DenseTransform(exported.schema)(_serving_inputs(exported.schema, raw, clean)["dense"])
    assert torch.isnan(_serving_inputs(exported.schema, raw, clean)["dense"][:, 0]).sum() == nulls.sum()
    assert (got[:, 0] <= 4.0).all() and (got[:, 0] == 4.0).any()  # clip_max reached on some rows
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("spec", ["esm2", "regression"])
def test_task_graph_predictions_export(spec):
    """TaskGraph's chains, sums and regression heads trace under torch.export as they are."""
    from dlrm_mtl.scoring import fused_score, fusion_weights, named_predictions
    from dlrm_mtl.serving import Predictions
    from dlrm_mtl.synthetic import SyntheticSpec, synthetic_schema
    from dlrm_mtl.task_graph import TaskGraph

    schema = synthetic_schema(SyntheticSpec(**{spec: True}))
    weights = fusion_weights(schema, {})
    head = Predictions(schema, weights)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(head, (torch.randn(4, len(schema.tasks)),), dynamic_shapes=({0: batch},))
    logits = torch.randn(9, len(schema.tasks)) * 3
    got = program.module()(logits)
    want = named_predictions(TaskGraph(schema), logits)
    assert list(got) == list(want) + ["score"]
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got["score"], fused_score(want, weights))


def test_a_table_too_big_for_memory_is_refused_before_loading(exported, monkeypatch, capsys):
    import dlrm_mtl.export as export
    from dlrm_mtl.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the memory check")

    monkeypatch.setattr(export, "load_unsharded", no_load)
    tables, model_bytes, largest = export.checkpoint_sizes(exported.checkpoint)
    assert tables[0].name == "t_user" and tables[0].bytes == largest == 500_000 * 16 * 4
    need = export.check_export_memory(exported.checkpoint, available=2**50)["needed_bytes"]
    assert need == model_bytes + 2 * largest + export.EXPORT_OVERHEAD_BYTES

    monkeypatch.setattr(export, "available_memory_bytes", lambda: 20 * 2**20)  # less than t_user alone
    with pytest.raises(export.ExportError, match=r"table 't_user' \(500,000 x 16 float32, 30.5 MiB\) alone is larger than the 20.0 MiB"):
        export.export_model(exported.checkpoint, exported.base / "refused")
    monkeypatch.setattr(export, "available_memory_bytes", lambda: need - 1)  # every table fits, not all at once
    assert main(["export", "--checkpoint", str(exported.checkpoint), "--out", str(exported.base / "refused")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dlrm-mtl export: error: ") and "'t_user' (500,000 x 16 float32" in err and "'t_item'" in err
    assert "available" in err and not (exported.base / "refused").exists()


def test_missing_run_config_is_a_clear_error(tmp_path):
    from dlrm_mtl.config import ConfigError
    from dlrm_mtl.export import run_config_path

    with pytest.raises(ConfigError, match="no run config at .*config.yaml.*pass --config"):
        run_config_path(tmp_path / "checkpoints" / "final")
    assert run_config_path(tmp_path / "x", config="other.yaml") == Path("other.yaml")
