"""DenseArch composition: every scenario layer type with every task layer type, built from config."""

from __future__ import annotations

import pytest
import torch

from dlrm_mtl.config import ConfigError, LayerConfig, ModelConfig
from dlrm_mtl.models.arch import SCENARIO_LAYERS, TASK_LAYERS
from dlrm_mtl.models.ranking_model import DenseArch
from dlrm_mtl.synthetic import synthetic_schema

SCHEMA = synthetic_schema()  # 2 levels (channel x domain = 4 leaves), 2 tasks (ctr -> cvr)


def inputs(B=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    F, D = len(SCHEMA.sparse), SCHEMA.sparse[0].dim
    pooled = torch.randn(B, F, D, generator=g)
    dense = torch.randn(B, len(SCHEMA.dense), generator=g)
    # every leaf scenario present
    scenario = torch.stack([torch.arange(B) % 2, (torch.arange(B) // 2) % 2], dim=1)
    return pooled, dense, scenario


def small(type_: str, **kw) -> LayerConfig:
    """Small sizes for whichever of these fields ``type_`` reads (as a scenario or task layer),
    then ``kw`` as given."""
    from dlrm_mtl.models.arch import LAYER_FIELDS

    base = dict(num_shared=1, num_specific=1, num_experts=3, hidden=[], out_dim=8, levels=2,
                sub_experts=2, k_specific=1, k_shared=1, aux_weight=0.1)
    reads = set(LAYER_FIELDS["scenario"].get(type_, ())) | set(LAYER_FIELDS["task"].get(type_, ()))
    base = {k: v for k, v in base.items() if k in reads}
    base.update(kw)
    return LayerConfig(type=type_, **base)


def arch(scen, task, **kw) -> DenseArch:
    torch.manual_seed(0)
    cfg = ModelConfig(dense_arch=[8], scenario_emb_dim=4, scenario_layers=scen, task_layers=task, tower=[8], **kw)
    return DenseArch(SCHEMA, cfg)


def check_trains_every_parameter(model: DenseArch):
    pooled, dense, scenario = inputs()
    model.train()
    logits, gates, aux = model(pooled, dense, scenario)
    assert logits.shape == (64, len(SCHEMA.tasks))
    assert torch.isfinite(logits).all()
    for name, g in gates.items():
        assert g.dim() in (2, 3) and g.shape[0] == 64, name
        torch.testing.assert_close(g.sum(-1), torch.ones_like(g.sum(-1)), atol=1e-5, rtol=0, msg=name)
    loss = (logits * torch.randn_like(logits)).sum() + sum(aux.values(), torch.zeros(()))
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, f"parameters without gradient: {dead}"
    return logits, gates, aux


@pytest.mark.parametrize("scen_type", sorted(SCENARIO_LAYERS))
def test_every_scenario_layer_type_composes_with_ple(scen_type):
    model = arch([small(scen_type, level="each")], [small("ple")])
    _, gates, _ = check_trains_every_parameter(model)
    assert any(k.startswith("scenario0/channel") for k in gates) or scen_type in ("star",)
    assert len(model.scenario_layers) == 2  # "each": one per level


@pytest.mark.parametrize("task_type", sorted(TASK_LAYERS))
def test_every_task_layer_type_composes_with_scenario_cgc(task_type):
    model = arch([small("cgc", level="leaf")], [small(task_type)])
    check_trains_every_parameter(model)


@pytest.mark.parametrize("task_type", sorted(TASK_LAYERS))
def test_task_layers_stack_on_each_other(task_type):
    model = arch([], [small("mmoe"), small(task_type)])
    check_trains_every_parameter(model)


def test_no_layers_at_all_is_a_plain_multi_tower_dlrm():
    model = arch([], [])
    _, gates, aux = check_trains_every_parameter(model)
    assert gates == {} and aux == {}


def test_leaf_level_routes_by_combined_id():
    model = arch([small("separate", level="leaf")], [small("shared_bottom")])
    layer = model.scenario_layers[0]
    assert layer.num_scenarios == 4
    pooled, dense, scenario = inputs(B=8)
    seen = {}

    def hook(mod, args):
        seen["ids"] = args[1].clone()

    layer.register_forward_pre_hook(hook)
    model(pooled, dense, scenario)
    assert seen["ids"].tolist() == (scenario[:, 0] * 2 + scenario[:, 1]).tolist()


def test_named_level_and_gate_names():
    model = arch([small("cgc", level="domain")], [small("ple", levels=2)])
    _, gates, _ = model(*inputs())
    assert set(gates) == {"scenario0/domain", "task0/level0/task", "task0/level0/shared", "task0/level1/task"}


@pytest.mark.parametrize("bad,match", [
    (dict(scen=[LayerConfig(type="nope")], task=[]), "unknown type 'nope'"),
    (dict(scen=[], task=[LayerConfig(type="nope")]), "unknown type 'nope'"),
    (dict(scen=[LayerConfig(type="cgc", level="country")], task=[]), "level 'country'"),
])
def test_config_errors_name_the_problem(bad, match):
    with pytest.raises(ConfigError, match=match):
        arch(bad["scen"], bad["task"])


@pytest.mark.parametrize("fragment", ["", "mmoe", "ple", "hinet"])
def test_a_rows_logits_do_not_depend_on_its_batch(fragment):
    """Evaluation and prediction split rows into batches by world size and position (a rank's
    last batch is short): a row's logits must be the same bit for bit whatever batch it comes
    in, so that `dlrm-mtl evaluate` on two workers reproduces training's metrics
    (tests/test_evaluate.py). A softmax over gates laid out with the batch innermost broke this:
    PyTorch's vectorised exp and its scalar tail round differently, so rows moved between
    them with the batch size."""
    from pathlib import Path

    from dlrm_mtl.config import Config

    root = Path(__file__).resolve().parents[1]
    configs = [str(root / "configs" / "arch" / f"{fragment}.yaml")] if fragment else []
    torch.manual_seed(0)
    model = DenseArch(SCHEMA, Config.load(configs, []).model).eval()
    pooled, dense, scenario = inputs(B=1024, seed=1)
    with torch.no_grad():
        full, _, _ = model(pooled, dense, scenario)  # [1024, T]
        for k in (300, 512, 1000):
            part, _, _ = model(pooled[:k], dense[:k], scenario[:k])
            assert torch.equal(part, full[:k]), (k, (part - full[:k]).abs().max().item())


@pytest.mark.parametrize("values", [1, 3])
def test_scenario_rows_are_the_tables_rows_and_train_alike(values):
    """``scenario_rows``: a level's embedding rows for its ids, the same values and table
    gradient whether the table's one row is expanded (one value: every id is 0) or its rows are
    indexed (several values; the reference here for both)."""
    from dlrm_mtl.models.scenario_rows import scenario_rows

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, values, (257,), generator=g)
    weight = torch.randn(values, 8, generator=g, requires_grad=True)
    ref_weight = weight.detach().clone().requires_grad_()
    out, ref = scenario_rows(weight, ids), ref_weight.index_select(0, ids)
    assert out.shape == (257, 8) and torch.equal(out, ref)
    grad = torch.randn(257, 8, generator=g)
    out.backward(grad)
    ref.backward(grad)
    assert torch.allclose(weight.grad, ref_weight.grad, rtol=1e-5, atol=1e-5)
    if values == 1:  # the expanded row: a view of the table, no gather
        assert out._base is weight or out.stride(0) == 0
