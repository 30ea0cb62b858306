"""Schema: YAML round trip, validation errors, chain / entire_name / columns helpers."""

import copy

import pytest
import yaml

from dlrm_mtl.schema import (
    ScenarioLevel,
    Schema,
    SchemaError,
    SparseFeature,
    Task,
)
from dlrm_mtl.synthetic import SyntheticSpec, synthetic_schema


def _chain3(**overrides) -> dict:
    """A hand-built schema dict with a 3-task chain ctr -> cvr -> repurchase."""
    d = {
        "name": "chain3",
        "row_id": "rid",
        "weight": "w",
        "sparse": [
            {"name": "user", "table": "t_user", "num_embeddings": 100, "dim": 8, "hash": True},
            {"name": "cat", "table": "t_cat", "num_embeddings": 20, "dim": 4},
            {
                "name": "hist", "table": "t_cat", "num_embeddings": 20, "dim": 4,
                "multi_hot": True, "max_len": 5, "pooling": "sum", "column": "history",
            },
        ],
        "dense": [{"name": "price", "transform": "log1p"}, {"name": "pos"}],
        "scenarios": [
            {"name": "channel", "num_values": 3, "value_names": ["a", "b", "c"]},
            {"name": "domain", "num_values": 2, "column": "dom"},
        ],
        "tasks": [
            {"name": "ctr", "label": "click", "oracle": "p_ctr"},
            {"name": "cvr", "label": "conv", "parent": "ctr", "loss_space": "parent_positive", "oracle": "p_cvr"},
            {"name": "rep", "label": "rebuy", "parent": "cvr", "weight": 0.5},
        ],
    }
    d.update(overrides)
    return d


def _roundtrip(schema: Schema, tmp_path) -> Schema:
    path = tmp_path / "schema.yaml"
    schema.save(path)
    return Schema.load(path)


# ---------------------------------------------------------------- round trip
def test_roundtrip_synthetic_schema(tmp_path):
    s = synthetic_schema()
    back = _roundtrip(s, tmp_path)
    assert back.to_dict() == s.to_dict()
    assert back == s
    # a non-default spec round-trips too (table sizes come from the spec)
    s2 = synthetic_schema(SyntheticSpec(user_table=123, num_categories=17, max_hist=3))
    back2 = _roundtrip(s2, tmp_path)
    assert back2.to_dict() == s2.to_dict()
    assert back2.sparse[0].num_embeddings == 123
    assert back2.sparse[4].max_len == 3


def test_roundtrip_hand_built_chain(tmp_path):
    s = Schema.from_dict(_chain3())
    back = _roundtrip(s, tmp_path)
    assert back.to_dict() == s.to_dict()
    assert back.tasks[2].parent == "cvr" and back.tasks[2].weight == 0.5
    assert back.tasks[1].loss_space == "parent_positive"
    assert back.sparse[2].column == "history" and back.sparse[2].multi_hot
    assert back.scenarios[1].column == "dom"
    assert back.scenarios[0].value_names == ["a", "b", "c"]
    assert back.row_id == "rid" and back.weight == "w"


def test_roundtrip_programmatic(tmp_path):
    s = Schema(
        name="prog",
        sparse=[SparseFeature("a", "ta", 10)],
        dense=[],
        scenarios=[ScenarioLevel("lvl", 4)],
        tasks=[Task("t1", "y1"), Task("t2", "y2", parent="t1"), Task("t3", "y3", parent="t2", entire_name="all3")],
    )
    back = _roundtrip(s, tmp_path)
    assert back.to_dict() == s.to_dict()
    # defaults: column = name
    assert back.sparse[0].column == "a" and back.scenarios[0].column == "lvl"


def test_saved_yaml_is_plain_mapping(tmp_path):
    path = tmp_path / "s.yaml"
    synthetic_schema().save(path)
    d = yaml.safe_load(path.read_text())
    assert d["name"] == "synthetic"
    assert [t["name"] for t in d["tasks"]] == ["ctr", "cvr"]


# ---------------------------------------------------------------- validation
def _expect(d: dict, *fragments: str):
    with pytest.raises(SchemaError) as ei:
        Schema.from_dict(d)
    msg = str(ei.value)
    for frag in fragments:
        assert frag in msg, (frag, msg)
    return msg


def test_duplicate_sparse_feature():
    d = _chain3()
    d["sparse"].append(copy.deepcopy(d["sparse"][1]))
    _expect(d, "duplicate", "sparse feature", "'cat'")


def test_duplicate_dense_feature():
    d = _chain3()
    d["dense"].append({"name": "pos"})
    _expect(d, "duplicate", "dense feature", "'pos'")


def test_duplicate_task():
    d = _chain3()
    d["tasks"].append({"name": "ctr", "label": "other"})
    _expect(d, "duplicate", "task", "'ctr'")


def test_unknown_parent():
    d = _chain3()
    d["tasks"][2]["parent"] = "nope"
    _expect(d, "'rep'", "'nope'", "not a task")


@pytest.mark.parametrize(
    "parents",
    [
        {"ctr": "cvr"},  # ctr -> cvr -> ctr
        {"ctr": "rep"},  # 3-cycle
        {"rep": "rep"},  # self parent
    ],
)
def test_parent_cycle(parents):
    d = _chain3()
    for t in d["tasks"]:
        if t["name"] in parents:
            t["parent"] = parents[t["name"]]
    _expect(d, "cycle")


def test_shared_table_disagrees_on_num_embeddings():
    d = _chain3()
    d["sparse"][2]["num_embeddings"] = 21
    _expect(d, "'cat'", "'hist'", "'t_cat'", "num_embeddings")


def test_shared_table_disagrees_on_dim():
    d = _chain3()
    d["sparse"][2]["dim"] = 8
    _expect(d, "'t_cat'")


def test_bad_pooling():
    d = _chain3()
    d["sparse"][2]["pooling"] = "max"
    _expect(d, "'hist'", "pooling", "'max'")


def test_bad_loss_space():
    d = _chain3()
    d["tasks"][1]["loss_space"] = "everywhere"
    _expect(d, "'cvr'", "loss_space", "'everywhere'")


def test_bad_transform_and_task_type():
    d = _chain3()
    d["dense"][0]["transform"] = "sqrt"
    _expect(d, "'price'", "'sqrt'")
    d = _chain3()
    d["tasks"][0]["type"] = "ranking"
    _expect(d, "'ctr'", "'ranking'")
    # a regression task cannot be a parent
    d = _chain3()
    d["tasks"][0]["type"] = "regression"
    _expect(d, "parent 'ctr'", "regression")


def test_unknown_top_level_key():
    _expect(_chain3(labels=["x"]), "unknown schema keys", "labels")


def test_unknown_item_key():
    d = _chain3()
    d["sparse"][0]["embedding_dim"] = 8
    _expect(d, "sparse[0]", "embedding_dim")


def test_no_tasks():
    _expect(_chain3(tasks=[]), "at least one task")
    d = _chain3()
    del d["tasks"]
    _expect(d, "at least one task")


def test_no_sparse_no_scenarios():
    _expect(_chain3(sparse=[]), "sparse")
    _expect(_chain3(scenarios=[]), "scenario")


def test_nonpositive_sizes():
    d = _chain3()
    d["sparse"][0]["num_embeddings"] = 0
    _expect(d, "'user'", "num_embeddings")
    d = _chain3()
    d["scenarios"][0]["num_values"] = 0
    _expect(d, "'channel'", "num_values")


def test_load_error_names_file(tmp_path):
    d = _chain3()
    d["tasks"][1]["loss_space"] = "bogus"
    path = tmp_path / "broken_schema.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(SchemaError) as ei:
        Schema.load(path)
    assert str(path) in str(ei.value)
    assert "bogus" in str(ei.value)


def test_load_empty_file_names_file(tmp_path):
    path = tmp_path / "empty_schema.yaml"
    path.write_text("")
    with pytest.raises(SchemaError) as ei:
        Schema.load(path)
    assert str(path) in str(ei.value)


# ---------------------------------------------------------------- helpers
def test_chain_and_entire_name():
    s = Schema.from_dict(_chain3())
    assert s.chain("ctr") == [0]
    assert s.chain("cvr") == [0, 1]
    assert s.chain("rep") == [0, 1, 2]
    assert s.entire_name(s.tasks[0]) == "ctr"
    assert s.entire_name(s.tasks[1]) == "ctr_cvr"
    assert s.entire_name(s.tasks[2]) == "ctr_cvr_rep"
    s.tasks[2].entire_name = "ctcvr_rep"
    assert s.entire_name(s.tasks[2]) == "ctcvr_rep"


def test_chain_with_tasks_out_of_order():
    d = _chain3()
    d["tasks"] = [d["tasks"][2], d["tasks"][0], d["tasks"][1]]  # rep, ctr, cvr
    s = Schema.from_dict(d)
    assert s.task_names == ["rep", "ctr", "cvr"]
    assert s.chain("rep") == [1, 2, 0]
    assert s.entire_name(s.tasks[0]) == "ctr_cvr_rep"


def test_synthetic_entire_name():
    s = synthetic_schema()
    assert s.chain("cvr") == [0, 1]
    assert s.entire_name(s.tasks[1]) == "ctcvr"
    assert s.num_leaf_scenarios == 4


def test_columns():
    s = Schema.from_dict(_chain3())
    cols = s.columns()
    assert len(cols) == len(set(cols))
    assert cols[0] == "rid"
    assert cols == [
        "rid", "user", "cat", "history", "price", "pos", "channel", "dom",
        "click", "conv", "rebuy", "w", "p_ctr", "p_cvr",
    ]
    no_oracle = s.columns(with_oracle=False)
    assert "p_ctr" not in no_oracle and "p_cvr" not in no_oracle
    assert no_oracle == cols[:-2]


def test_columns_deduplicates_shared_columns():
    d = _chain3()
    # a second feature reading the same column, and a scenario level reading a sparse column
    d["sparse"].append({"name": "cat2", "table": "t_cat2", "num_embeddings": 20, "column": "cat"})
    d["scenarios"][1]["column"] = "cat"
    cols = Schema.from_dict(d).columns()
    assert len(cols) == len(set(cols))
    assert cols.count("cat") == 1


def test_synthetic_columns():
    s = synthetic_schema()
    cols = s.columns()
    assert len(cols) == len(set(cols))
    for c in ("row_id", "true_pctr", "true_pcvr", "user_id", "hist_categories", "price", "channel", "domain", "click", "conversion"):
        assert c in cols


def test_scenario_value_names_are_checked():
    from dlrm_mtl.schema import ScenarioLevel, SchemaError

    with pytest.raises(SchemaError, match="reserved"):
        ScenarioLevel("country", 2, value_names=["all", "NL"])
    with pytest.raises(SchemaError, match="3 value_names for num_values 2"):
        ScenarioLevel("country", 2, value_names=["a", "b", "c"])
