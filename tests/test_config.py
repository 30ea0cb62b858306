"""Config: YAML + --set overrides, typed coercion and errors, save/load, schema_path lookup."""

import pytest
import yaml

from dlrm_mtl.config import Config, ConfigError, DataConfig


def _write(tmp_path, d, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(d))
    return str(path)


def test_defaults_without_file():
    cfg = Config.load()
    assert cfg.to_dict() == Config().to_dict()
    assert cfg.data.batch_size == 2048


def test_load_yaml_and_overrides(tmp_path):
    path = _write(tmp_path, {
        "data": {"train": "x/train", "batch_size": 64},
        "train": {"epochs": 3, "dense_lr": 0.01},
        "model": {"tower": [32, 16]},
    })
    cfg = Config.load(path, overrides=[
        "train.epochs=5",                      # override a value from the file
        "model.task_layers=[{type: mmoe, num_experts: 7}]",   # list of dataclasses
        "model.dense_arch=[8, 4]",      # list of ints
        "sharding.types=[table_wise]",         # list of strings
        "train.dense_lr=1",                    # int -> float
        "sharding.memory_per_rank_gb=2",       # int -> float
        "train.progress=false",                # bool
        "train.eval_every_epoch=true",
        "train.run_dir=runs/x=y",              # '=' inside the value
    ])
    assert cfg.data.train == "x/train"  # from file, untouched
    assert cfg.data.batch_size == 64
    assert cfg.train.epochs == 5
    assert cfg.model.tower == [32, 16]
    assert cfg.model.task_layers[0].type == "mmoe" and cfg.model.task_layers[0].num_experts == 7
    assert cfg.model.task_layers[0].num_specific == 1  # rest of the layer keeps defaults
    assert cfg.model.dense_arch == [8, 4]
    assert cfg.sharding.types == ["table_wise"]
    assert cfg.train.dense_lr == 1.0 and type(cfg.train.dense_lr) is float
    assert cfg.sharding.memory_per_rank_gb == 2.0 and type(cfg.sharding.memory_per_rank_gb) is float
    assert cfg.train.progress is False
    assert cfg.train.eval_every_epoch is True
    assert cfg.train.run_dir == "runs/x=y"


def test_overrides_applied_in_order():
    cfg = Config.load(None, ["train.epochs=2", "train.epochs=9"])
    assert cfg.train.epochs == 9


def test_empty_yaml_file(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert Config.load(str(path)).to_dict() == Config().to_dict()


@pytest.mark.parametrize("override, key", [
    ("train.epoch=2", "train.epoch"),
    ("trian.epochs=2", "trian"),
    ("model.task_layers=[{type: mmoe, experts: 2}]", "model.task_layers.experts"),
])
def test_unknown_key_from_override(override, key):
    with pytest.raises(ConfigError) as ei:
        Config.load(None, [override])
    assert key in str(ei.value)


def test_unknown_key_from_file(tmp_path):
    path = _write(tmp_path, {"data": {"batchsize": 3}})
    with pytest.raises(ConfigError) as ei:
        Config.load(path)
    assert "data.batchsize" in str(ei.value)


@pytest.mark.parametrize("override, where", [
    ("train.epochs=two", "train.epochs"),
    ("train.epochs=1.5", "train.epochs"),
    ("data.batch_size=true", "data.batch_size"),  # bool is not an int here
    ("train.progress=1", "train.progress"),
    ("train.run_dir=123", "train.run_dir"),
    ("model.tower=64", "model.tower"),  # not a list
    ("model.tower=[64, x]", "model.tower"),  # bad element
    ("model.scenario_layers=3", "model.scenario_layers"),  # section given a scalar
])
def test_wrong_type(override, where):
    with pytest.raises(ConfigError) as ei:
        Config.load(None, [override])
    assert where in str(ei.value)


@pytest.mark.parametrize("override", ["train.dense_lr=abc", "sharding.memory_per_rank_gb=true"])
def test_wrong_type_float_field(override):
    with pytest.raises(ConfigError):
        Config.load(None, [override])


def test_override_without_equals():
    with pytest.raises(ConfigError) as ei:
        Config.load(None, ["train.epochs"])
    assert "train.epochs" in str(ei.value)


def test_override_through_scalar():
    with pytest.raises(ConfigError):
        Config.load(None, ["train.epochs=2", "train.epochs.x=3"])


def test_save_load_roundtrip(tmp_path):
    cfg = Config.load(None, [
        "data.train=/d/train", "data.schema=/d/s.yaml", "train.epochs=4", "train.dense_lr=0.5",
        "sharding.types=[row_wise, table_wise]", "model.dense_arch=[3]", "train.progress=false",
    ])
    path = tmp_path / "saved.yaml"
    cfg.save(path)
    back = Config.load(str(path))
    assert back.to_dict() == cfg.to_dict()
    assert back == cfg
    assert back.sharding.types == ["row_wise", "table_wise"]


def test_schema_path_next_to_train(tmp_path):
    train = tmp_path / "ds" / "train"
    train.mkdir(parents=True)
    (train / "schema.yaml").write_text("x: 1")
    (tmp_path / "ds" / "schema.yaml").write_text("x: 1")
    # next to (inside) the train directory wins over the one above
    assert DataConfig(train=str(train)).schema_path() == str(train / "schema.yaml")


def test_schema_path_above_train(tmp_path):
    train = tmp_path / "ds" / "train"
    train.mkdir(parents=True)
    (train / "part-00000.parquet").write_bytes(b"")
    (tmp_path / "ds" / "schema.yaml").write_text("x: 1")
    want = str(tmp_path / "ds" / "schema.yaml")
    assert DataConfig(train=str(train)).schema_path() == want
    # a file or a glob under train/ finds the same schema
    assert DataConfig(train=str(train / "part-00000.parquet")).schema_path() == want
    assert DataConfig(train=str(train / "*.parquet")).schema_path() == want


def test_schema_path_explicit(tmp_path):
    assert DataConfig(train=str(tmp_path), schema="/else/where.yaml").schema_path() == "/else/where.yaml"


def test_schema_path_missing(tmp_path):
    train = tmp_path / "a" / "b" / "train"
    train.mkdir(parents=True)
    (tmp_path / "schema.yaml").write_text("x: 1")  # two levels above: not looked at
    with pytest.raises(ConfigError) as ei:
        DataConfig(train=str(train)).schema_path()
    assert str(train) in str(ei.value)


def test_schema_path_of_synthetic_data(synthetic_small):
    cfg = Config.load(None, [f"data.train={synthetic_small / 'train'}"])
    assert cfg.data.schema_path() == str(synthetic_small / "schema.yaml")


def test_config_files_compose_later_overrides_earlier(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train: {epochs: 3, seed: 5}\nmodel:\n  task_layers: [{type: cgc}, {type: mmoe}]\n  tower: [16]\n")
    arch = tmp_path / "arch.yaml"
    arch.write_text("train: {epochs: 1}\nmodel:\n  task_layers: [{type: ple, levels: 2}]\n")
    cfg = Config.load([str(base), str(arch)], ["train.seed=9"])
    assert cfg.train.epochs == 1 and cfg.train.seed == 9  # mapping merged key by key
    assert [l.type for l in cfg.model.task_layers] == ["ple"]  # a list is replaced, not merged
    assert cfg.model.task_layers[0].levels == 2 and cfg.model.tower == [16]
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        Config.load([str(base), str(bad)])

