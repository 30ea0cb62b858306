"""The layer registry of models/arch.py: LAYER_FIELDS is what the layer types declare, and
every type built through ``from_config`` (or its named builder) is the module the former
positional builders made: same class, same arguments, same parameters for a fixed seed."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence

import pytest
import torch
from torch import nn

from dlrm_mtl.config import LayerConfig
from dlrm_mtl.models.arch import (
    LAYER_FIELDS,
    SCENARIO_ARCH_FIELDS,
    SCENARIO_LAYERS,
    TASK_LAYERS,
    build_scenario_layer,
    build_task_layer,
)
from dlrm_mtl.modules import (
    AESMScenarioLayer,
    AESMTaskLayer,
    AsymmetricLayer,
    CrossStitchLayer,
    HiNetScenarioLayer,
    HMoELayer,
    MMoELayer,
    MultiLevelMMoELayer,
    PLELayer,
    ScenarioCGCLayer,
    SharedBottomLayer,
    SluiceLayer,
    STARLayer,
    resolve_task_edges,
)

# the hand-written table LAYER_FIELDS replaced (as sets; the order is the declarations')
FORMER_LAYER_FIELDS = {
    "scenario": {
        "separate": {"level", "routing", "hidden", "out_dim"},
        "cgc": {"level", "routing", "num_shared", "num_specific", "hidden", "out_dim"},
        "aesm": {"level", "num_experts", "k_specific", "k_shared", "noise", "aux_weight", "hidden", "out_dim"},
        "star": {"level", "routing", "norm", "hidden", "out_dim"},
        "hmoe": {"level", "hidden", "out_dim"},
        "hinet": {"level", "sub_experts", "hidden", "out_dim"},
    },
    "task": {
        "separate": {"hidden", "out_dim"},
        "shared_bottom": {"hidden", "out_dim"},
        "omoe": {"num_experts", "gate", "top_k", "noise", "hidden", "out_dim"},
        "mmoe": {"num_experts", "gate", "top_k", "noise", "hidden", "out_dim"},
        "cgc": {"num_shared", "num_specific", "hidden", "out_dim"},
        "ple": {"num_shared", "num_specific", "levels", "hidden", "out_dim"},
        "aesm": {"task_emb_dim", "num_experts", "k_specific", "k_shared", "noise", "aux_weight", "hidden", "out_dim"},
        "ml_mmoe": {"num_experts", "levels", "hidden", "out_dim"},
        "cross_stitch": {"levels", "hidden", "out_dim"},
        "asymmetric": {"edges", "hidden", "out_dim"},
        "sluice": {"levels", "subspaces", "aux_weight", "hidden", "out_dim"},
    },
}

# the former registry's positional builders, verbatim: (cfg, d, S, e, T) and (cfg, d, T, ctx[, names])
FORMER_SCENARIO_BUILDERS: Dict[str, Callable[..., nn.Module]] = {
    "separate": lambda c, d, S, e, T: ScenarioCGCLayer(d, S, e, 0, 1, c.hidden, c.out_dim, routing=c.routing),
    "cgc": lambda c, d, S, e, T: ScenarioCGCLayer(d, S, e, c.num_shared, c.num_specific, c.hidden, c.out_dim, routing=c.routing),
    "aesm": lambda c, d, S, e, T: AESMScenarioLayer(d, S, e, c.num_experts, c.k_specific, c.k_shared, c.hidden, c.out_dim, noise=c.noise),
    "star": lambda c, d, S, e, T: STARLayer(d, S, e, T, c.hidden, c.out_dim, norm=c.norm, routing=c.routing),
    "hmoe": lambda c, d, S, e, T: HMoELayer(d, S, e, c.hidden, c.out_dim),
    "hinet": lambda c, d, S, e, T: HiNetScenarioLayer(d, S, e, c.sub_experts, c.hidden, c.out_dim),
}
FORMER_TASK_BUILDERS: Dict[str, Callable[..., nn.Module]] = {
    "separate": lambda c, d, T, ctx: PLELayer(d, T, 0, 1, c.hidden, c.out_dim, levels=1),
    "shared_bottom": lambda c, d, T, ctx: SharedBottomLayer(d, T, c.hidden, c.out_dim),
    "omoe": lambda c, d, T, ctx: MMoELayer(d, T, c.num_experts, c.hidden, c.out_dim, one_gate=True, gate=c.gate, top_k=c.top_k, noise=c.noise),
    "mmoe": lambda c, d, T, ctx: MMoELayer(d, T, c.num_experts, c.hidden, c.out_dim, gate=c.gate, top_k=c.top_k, noise=c.noise),
    "cgc": lambda c, d, T, ctx: PLELayer(d, T, c.num_shared, c.num_specific, c.hidden, c.out_dim, levels=1),
    "ple": lambda c, d, T, ctx: PLELayer(d, T, c.num_shared, c.num_specific, c.hidden, c.out_dim, levels=c.levels),
    "aesm": lambda c, d, T, ctx: AESMTaskLayer(
        d, T, ctx, c.num_experts, c.k_specific, c.k_shared, c.hidden, c.out_dim, noise=c.noise, task_emb_dim=c.task_emb_dim,
    ),
    "ml_mmoe": lambda c, d, T, ctx: MultiLevelMMoELayer(d, T, c.num_experts, c.hidden, c.out_dim, levels=c.levels),
    "cross_stitch": lambda c, d, T, ctx: CrossStitchLayer(d, T, c.hidden, c.out_dim, levels=c.levels),
    "asymmetric": lambda c, d, T, ctx, names: AsymmetricLayer(d, T, resolve_task_edges(c.edges, names), c.hidden, c.out_dim),
    "sluice": lambda c, d, T, ctx: SluiceLayer(d, T, c.hidden, c.out_dim, levels=c.levels, subspaces=c.subspaces),
}

# values other than the defaults for every field some type reads (argument mix-ups show)
NON_DEFAULT: Dict[str, Any] = dict(
    routing="gather", num_shared=2, num_specific=3, num_experts=5, hidden=[7], out_dim=8, levels=2, sub_experts=3,
    gate="topk", top_k=2, noise=0.5, k_specific=2, k_shared=1, aux_weight=0.1, norm=False, task_emb_dim=3,
    edges=[["cvr", "ctr"]], subspaces=4,
)
IN_DIM, NUM_SCENARIOS, EMB_DIM, NUM_TASKS, CONTEXT_DIM = 6, 3, 4, 2, 5
TASK_NAMES = ["ctr", "cvr"]


def config_reading_all_its_fields(kind: str, type_: str) -> LayerConfig:
    """The config of ``type_`` with a non-default value in every field it reads (``level``: the dense arch's)."""
    reads = set(LAYER_FIELDS[kind][type_]) - set(SCENARIO_ARCH_FIELDS)
    return LayerConfig(type=type_, **{k: v for k, v in NON_DEFAULT.items() if k in reads})


def plain_attributes(m: nn.Module) -> Dict[str, Any]:
    """The module's own scalar and list attributes (routing, one_gate, order, ...), not its parameters."""
    return {k: v for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, (bool, int, float, str, list, tuple))}


def assert_same_module(new: nn.Module, old: nn.Module) -> None:
    assert type(new) is type(old)
    new_state, old_state = new.state_dict(), old.state_dict()
    assert list(new_state) == list(old_state)
    for k in old_state:
        assert new_state[k].shape == old_state[k].shape, k
        assert torch.equal(new_state[k], old_state[k]), k
    for (name, a), (_, b) in zip(new.named_modules(), old.named_modules()):
        assert plain_attributes(a) == plain_attributes(b), name


def seeded(build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return build()


def test_layer_fields_are_what_the_layer_types_declare():
    for kind, table, arch_fields in (("scenario", SCENARIO_LAYERS, SCENARIO_ARCH_FIELDS), ("task", TASK_LAYERS, ())):
        assert set(LAYER_FIELDS[kind]) == set(table) == set(FORMER_LAYER_FIELDS[kind])
        for name, layer_type in table.items():
            declared = tuple(arch_fields) + tuple(layer_type.CONFIG_FIELDS)
            assert LAYER_FIELDS[kind][name] == declared, (kind, name)
            assert len(set(declared)) == len(declared), (kind, name, "a field declared twice")
            assert set(declared) <= {f.name for f in dataclasses.fields(LayerConfig)} - {"type"}, (kind, name)
            assert set(declared) == FORMER_LAYER_FIELDS[kind][name], (kind, name)
    # the classes registered under their own type declare and build themselves
    for layer_type in list(SCENARIO_LAYERS.values()) + list(TASK_LAYERS.values()):
        if isinstance(layer_type, type):
            assert issubclass(layer_type, nn.Module) and callable(layer_type.from_config)


@pytest.mark.parametrize("type_", sorted(SCENARIO_LAYERS))
def test_every_scenario_type_builds_what_the_former_builder_built(type_):
    cfg = config_reading_all_its_fields("scenario", type_)
    new = seeded(lambda: build_scenario_layer(cfg, IN_DIM, NUM_SCENARIOS, EMB_DIM, NUM_TASKS))
    old = seeded(lambda: FORMER_SCENARIO_BUILDERS[type_](cfg, IN_DIM, NUM_SCENARIOS, EMB_DIM, NUM_TASKS))
    assert_same_module(new, old)


@pytest.mark.parametrize("type_", sorted(TASK_LAYERS))
@pytest.mark.parametrize("task_names", [TASK_NAMES, None])
def test_every_task_type_builds_what_the_former_builder_built(type_, task_names: Optional[Sequence[str]]):
    cfg = config_reading_all_its_fields("task", type_)
    if type_ == "asymmetric" and task_names is None:  # built without a schema, tasks are named "0", "1", ...
        cfg = dataclasses.replace(cfg, edges=[["1", "0"]])
    new = seeded(lambda: build_task_layer(cfg, IN_DIM, NUM_TASKS, CONTEXT_DIM, task_names=task_names))
    former = FORMER_TASK_BUILDERS[type_]
    if type_ == "asymmetric":
        names = TASK_NAMES if task_names is not None else ["0", "1"]
        old = seeded(lambda: former(cfg, IN_DIM, NUM_TASKS, CONTEXT_DIM, names))
        assert new.order == [1, 0]  # the edge cvr -> ctr (1 -> 0) resolved by name
    else:
        old = seeded(lambda: former(cfg, IN_DIM, NUM_TASKS, CONTEXT_DIM))
    assert_same_module(new, old)


@pytest.mark.parametrize("type_", sorted(TASK_LAYERS))
def test_a_task_layer_that_says_it_does_not_read_the_context_does_not(type_):
    """``reads_context``: the dense arch skips the scenario rows it would hand a task layer as
    ``context`` when no layer reads them (DenseArch.reads_scenario_rows). A layer that says
    False gives the same output, gates and aux losses with ``context`` None and with random
    scenario rows (eval mode: no gate noise); one that reads them (AESM's gates) says True, and
    does read them."""
    cfg = config_reading_all_its_fields("task", type_)
    layer = seeded(lambda: build_task_layer(cfg, IN_DIM, NUM_TASKS, CONTEXT_DIM, task_names=TASK_NAMES)).eval()
    x = torch.randn(16, IN_DIM, generator=torch.Generator().manual_seed(1))
    context = torch.randn(16, CONTEXT_DIM, generator=torch.Generator().manual_seed(2))
    reads = getattr(type(layer), "reads_context", None)
    assert reads is not None, f"{type(layer).__name__} does not say whether it reads the context"
    with torch.no_grad():
        if reads:
            a, b = layer(x, context), layer(x, context * 3 + 1)
            assert not torch.equal(a.y, b.y)  # it does read them
            return
        a, b = layer(x, None), layer(x, context)
    assert torch.equal(a.y, b.y)
    assert a.gates.keys() == b.gates.keys() and all(torch.equal(a.gates[k], b.gates[k]) for k in a.gates)
    assert a.aux.keys() == b.aux.keys() and all(torch.equal(a.aux[k], b.aux[k]) for k in a.aux)
