"""Config and schema mistakes: one line naming the file and the key (or schema field), exit
code 2, before any process group starts, from the CLI as users run it."""

import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

from dlrm_mtl.config import Config, ConfigError, check
from dlrm_mtl.schema import Schema, SchemaError

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlrm_mtl", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _error_line(proc: subprocess.CompletedProcess, cmd: str) -> str:
    """The one line a failed command printed (asserting there is exactly one, no traceback)."""
    out = proc.stdout + proc.stderr
    lines = [line for line in out.splitlines() if line.strip()]
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out and len(lines) == 1, out[-3000:]
    assert lines[0].startswith(f"dlrm-mtl {cmd}: error: "), lines[0]
    return lines[0]


def _schema_with(data: Path, tmp: Path, section: str, index: int, **fields: object) -> str:
    """A copy of the data set's schema with ``fields`` of ``section[index]`` replaced."""
    d = yaml.safe_load((data / "schema.yaml").read_text())
    d[section][index].update(fields)
    path = tmp / "schema.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return str(path)


def _write(tmp: Path, name: str, text: str) -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


# name -> (command line after `dlrm-mtl`, words the error line must hold); {tmp} is the
# test's directory (files made by _files)
CASES: Dict[str, tuple] = {
    "unknown_layer_type": (["train", "--set", "model.task_layers=[{type: nosuch}]"], ["model.task_layers[0].type", "'nosuch'"]),
    "unknown_key_set": (["train", "--set", "train.nosuch=1"], ["train.nosuch"]),
    "field_the_type_does_not_read": (["train", "--set", "model.task_layers=[{type: mmoe, levels: 5}]"],
                                     ["model.task_layers[0]", "type mmoe does not read ['levels']"]),
    "unknown_key_file": (["train", "--config", "{tmp}/unknown.yaml"], ["{tmp}/unknown.yaml", "train.nosuch"]),
    "batch_size_zero": (["train", "--set", "data.batch_size=0"], ["data.batch_size", ">= 1"]),
    "batch_size_zero_file": (["train", "--config", "{tmp}/batch.yaml"], ["{tmp}/batch.yaml", "data.batch_size"]),
    "negative_experts": (["train", "--config", "{tmp}/experts.yaml"], ["{tmp}/experts.yaml", "model.task_layers[0].num_experts", "-2"]),
    "invalid_yaml": (["train", "--config", "{tmp}/bad.yaml"], ["{tmp}/bad.yaml", "invalid YAML", "line 2"]),
    "dot_dims": (["train", "--set", "data.schema={tmp}/schema.yaml"], ["model.interaction", "{tmp}/schema.yaml", "sparse[0] user_id"]),
    "hash_not_bool": (["train", "--set", "data.schema={tmp}/schema.yaml"], ["{tmp}/schema.yaml", "sparse[1].hash", "'yes please'"]),
    "num_values_string": (["train", "--set", "data.schema={tmp}/schema.yaml"], ["{tmp}/schema.yaml", "scenarios[0].num_values", "'2'"]),
    "plan_world_size_zero": (["plan", "--world-size", "0"], ["--world-size", "got 0"]),
    "plan_missing_config": (["plan", "--world-size", "1", "--config", "{tmp}/missing.yaml"], ["{tmp}/missing.yaml"]),
}


def _files(case: str, data: Path, tmp: Path) -> None:
    if case == "unknown_key_file":
        _write(tmp, "unknown.yaml", "train:\n  epochs: 1\n  nosuch: 1\n")
    elif case == "batch_size_zero_file":
        _write(tmp, "batch.yaml", "data:\n  batch_size: 0\n")
    elif case == "negative_experts":
        _write(tmp, "experts.yaml", "model:\n  task_layers: [{type: mmoe, num_experts: -2}]\n")
    elif case == "invalid_yaml":
        _write(tmp, "bad.yaml", "train: {epochs: 1\n")
    elif case == "dot_dims":
        _schema_with(data, tmp, "sparse", 0, dim=8)
    elif case == "hash_not_bool":
        _schema_with(data, tmp, "sparse", 1, hash="yes please")
    elif case == "num_values_string":
        _schema_with(data, tmp, "scenarios", 0, num_values="2")


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_error_is_one_line_naming_file_and_key(case, synthetic_small, tmp_path):
    argv, words = CASES[case]
    _files(case, synthetic_small, tmp_path)
    fill = lambda s: s.replace("{tmp}", str(tmp_path))  # noqa: E731
    data = ["--set", f"data.train={synthetic_small / 'train'}", "--set", f"data.eval={synthetic_small / 'eval'}",
            "--set", f"train.run_dir={tmp_path / 'run'}"]
    line = _error_line(_cli(*[fill(a) for a in argv], *data), argv[0])
    for w in words:
        assert fill(w) in line, line
    assert not (tmp_path / "run").exists()  # refused before the run started


def test_each_torchrun_rank_prints_one_line(synthetic_small, tmp_path):
    """Under torchrun every rank checks the config before the rendezvous: one line per rank
    (torchrun may stop a rank before it prints, once another failed), no rank's traceback.
    torchrun's own report of the failed job follows; it is torchrun's, not a rank's."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "dlrm_mtl", "train",
         "--set", f"data.train={synthetic_small / 'train'}", "--set", "data.batch_size=0",
         "--set", f"train.run_dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert 1 <= out.count("dlrm-mtl train: error: data.batch_size: must be >= 1, got 0") <= 2, out[-3000:]
    assert "[rank0]" not in out and "[rank1]" not in out and f'File "{ROOT / "dlrm_mtl"}' not in out, out[-3000:]


# ---------------------------------------------------------------- in process: what check() accepts
def _configs() -> List[List[str]]:
    demo = str(ROOT / "configs" / "demo.yaml")
    return [[demo]] + [[demo, str(p)] for p in sorted((ROOT / "configs" / "arch").glob("*.yaml"))]


@pytest.mark.parametrize("paths", _configs(), ids=lambda p: Path(p[-1]).stem)
def test_shipped_configs_pass_the_check(paths, synthetic_small):
    cfg = Config.load(paths, [f"data.train={synthetic_small / 'train'}"])
    check(cfg, Schema.load(synthetic_small / "schema.yaml"))


@pytest.mark.parametrize("overrides", [
    ["loss.scenario_weighting=inverse_share",
     "loss.scenario_shares={home/hot_card: 0.4, home/product_card: 0.3, vertical/hot_card: 0.2, vertical/product_card: 0.1}"],
    ["loss.weighting=uncertainty", "loss.decay={ctr: 0.9}", "loss.task_weights={cvr: 2}"],
    ["model.interaction=concat", "model.dense_arch=[]", "model.scenario_layers=[]", "model.task_layers=[]"],
    ["sharding.tables={t_user: {types: [row_wise], compute_kernels: [fused], optimizer: adagrad, lr: 0.1}}"],
])
def test_valid_overrides_pass_the_check(overrides, synthetic_small):
    cfg = Config.load(None, [f"data.train={synthetic_small / 'train'}"] + overrides)
    check(cfg, Schema.load(synthetic_small / "schema.yaml"))


@pytest.mark.parametrize("overrides, words", [
    (["model.scenario_layers=[{type: cgc, level: country}]"], ["model.scenario_layers[0]", "level 'country'"]),
    (["model.task_layers=[{type: ple, levels: 2, num_shared: 0}]"], ["model.task_layers[0]", "type ple"]),
    (["model.task_layers=[{type: mmoe, gate: topk, top_k: 9}]"], ["model.task_layers[0]", "top_k"]),
    (["loss.decay={ctr: 2}"], ["loss.decay.ctr"]),
    (["loss.scenario_shares={home/hot_card: -1}"], ["loss.scenario_shares.home/hot_card"]),
    (["sharding.tables={t_nosuch: {types: [row_wise]}}"], ["sharding.tables.t_nosuch"]),
    (["train.pipeline=fast"], ["train.pipeline", "'fast'"]),
    (["model.interaction=dotty"], ["model.interaction", "'dotty'"]),
    (["sharding.bounds_check=strict"], ["sharding.bounds_check", "'strict'"]),
])
def test_check_names_the_key(overrides, words, synthetic_small):
    cfg = Config.load(None, [f"data.train={synthetic_small / 'train'}"] + overrides)
    with pytest.raises(ConfigError) as ei:
        check(cfg, Schema.load(synthetic_small / "schema.yaml"))
    for w in words:
        assert w in str(ei.value)


def test_file_named_only_for_keys_it_set(tmp_path):
    """A key a later --set replaced is not blamed on the file; one the file set is."""
    path = _write(tmp_path, "a.yaml", "data: {batch_size: 0, shuffle_buffer_rows: -1}\n")
    cfg = Config.load(path, ["data.batch_size=0"])
    assert cfg.origin("data.batch_size") == "" and cfg.origin("data.shuffle_buffer_rows") == path
    assert str(cfg.error("data.batch_size", "x")) == "data.batch_size: x"
    assert str(cfg.error("data.shuffle_buffer_rows", "x")) == f"{path}: data.shuffle_buffer_rows: x"
    later = _write(tmp_path, "b.yaml", "model:\n  task_layers: [{type: ple}]\n")
    cfg = Config.load([path, later])
    assert cfg.origin("model.task_layers[0].levels") == later and cfg.origin("train.epochs") == ""


@pytest.mark.parametrize("field, value, where", [
    ("multi_hot", "no", "sparse[0].multi_hot"),
    ("num_embeddings", 1.5, "sparse[0].num_embeddings"),
    ("dim", True, "sparse[0].dim"),
    ("name", 7, "sparse[0].name"),
])
def test_schema_field_types(field, value, where, synthetic_small):
    d = yaml.safe_load((synthetic_small / "schema.yaml").read_text())
    d["sparse"][0][field] = value
    with pytest.raises(SchemaError, match=re.escape(f"{where}: expected")):
        Schema.from_dict(d)


class _FieldReadRecorder:
    """A LayerConfig stand-in that records which of its fields are read."""

    def __init__(self, cfg) -> None:
        self._cfg, self.read = cfg, set()

    def __getattr__(self, name: str):
        self.read.add(name)
        return getattr(self._cfg, name)


def test_every_layer_type_reads_the_fields_its_builder_uses():
    """LAYER_FIELDS against the builders: a field a builder reads is in its type's list (else a
    config setting it would be refused), and each listed field changes the built layer's
    parameters or behaviour is out of scope here; the unread check itself: mmoe + levels.
    The fields read are recorded while each type's ``from_config`` (or named builder) builds
    a layer, once with the defaults and once with the branch-opening values below."""
    from dlrm_mtl.config import LayerConfig
    from dlrm_mtl.models.arch import LAYER_FIELDS, SCENARIO_LAYERS, TASK_LAYERS, layer_builder, unread_fields
    from dlrm_mtl.modules.layer_config import LayerDims

    dims = LayerDims(in_dim=6, num_tasks=2, num_scenarios=2, emb_dim=3, context_dim=3, task_names=("ctr", "cvr"))
    variants = [dict(out_dim=4, num_experts=3), dict(out_dim=4, num_experts=3, gate="topk", top_k=1, edges=[["ctr", "cvr"]])]
    for kind, table in (("scenario", SCENARIO_LAYERS), ("task", TASK_LAYERS)):
        assert set(LAYER_FIELDS[kind]) == set(table)
        for name, layer_type in table.items():
            used = set()
            for fields in variants:
                recorder = _FieldReadRecorder(LayerConfig(type=name, **fields))
                layer_builder(layer_type)(recorder, dims, f"model.{kind}_layers[0]")
                used |= recorder.read - {"type"}  # every type reads its type
            assert used, (kind, name, "no field read: not recorded")
            assert used <= set(LAYER_FIELDS[kind][name]), (kind, name, used - set(LAYER_FIELDS[kind][name]))
    assert unread_fields(LayerConfig(type="mmoe", levels=5), "task") == ["levels"]
    assert unread_fields(LayerConfig(type="ple", levels=5), "task") == []
    assert unread_fields(LayerConfig(type="cgc", level="channel"), "task") == ["level"]
    assert unread_fields(LayerConfig(type="cgc", level="channel"), "scenario") == []


def test_config_value_checks_do_not_import_torch(synthetic_small):
    """``dlrm-mtl train`` checks the config's values before it imports the stack, and times
    that import apart (``import_s`` next to ``startup_s``): a check that imports torch would
    move ~1 s of imports into the start-up the benchmark holds to ≤ 2 s."""
    code = (
        "import sys; from dlrm_mtl.config import Config, check_values; from dlrm_mtl.schema import Schema; "
        f"cfg = Config.load(['configs/demo.yaml'], ['data.schema={synthetic_small / 'schema.yaml'}', 'predict.fusion={{ctr: 1, ctcvr: 2}}']); "
        "check_values(cfg, Schema.load(cfg.data.schema_path())); "
        "print('TORCH', 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TORCH False" in out.stdout, out.stdout
