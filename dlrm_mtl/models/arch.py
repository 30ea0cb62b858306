"""Layer types of the expert arch: ``LayerConfig.type`` -> module.

A *scenario layer* maps ``(x [B, d], scenario [B], scenario_emb [B, e])`` to a
:class:`LayerOutput` with ``y [B, d']``; a *task layer* maps ``(x [B, d] or [T, B, d],
context [B, c])`` to one with ``y [T, B, d']`` (``context`` is the concatenated scenario
embeddings, read by layers whose gates are scenario-aware). Any scenario layer composes with
any task layer, and layers of one kind stack.

==================  ==================================================================
scenario layers     fields read
==================  ==================================================================
``separate``        hidden, out_dim — one network per scenario (Parallel DNN)
``cgc``             num_shared, num_specific, hidden, out_dim
``aesm``            num_experts, k_specific, k_shared, noise, hidden, out_dim, aux_weight
                    — AESM² expert selection over the level's scenarios (noise std noise·E)
``star``            hidden, out_dim, norm — STAR: W_s ⊙ W FCN, partitioned norm, aux net
``hmoe``            hidden, out_dim — HMoE: one expert per scenario, others stop-grad
``hinet``           sub_experts, hidden, out_dim — HiNet SEI + SAN; out_dim of the
                    layer is 3 × out_dim (shared ⊕ own specific ⊕ SAN)
==================  ==================================================================

==================  ==================================================================
task layers         fields read
==================  ==================================================================
``separate``        hidden, out_dim — one network per task (single-task baseline)
``shared_bottom``   hidden, out_dim
``omoe``            num_experts, hidden, out_dim, gate, top_k, noise
``mmoe``            num_experts, hidden, out_dim, gate, top_k, noise
``cgc``             num_shared, num_specific, hidden, out_dim
``ple``             num_shared, num_specific, hidden, out_dim, levels
``aesm``            num_experts, k_specific, k_shared, noise, task_emb_dim, hidden, out_dim,
                    aux_weight — AESM² expert selection over tasks
``ml_mmoe``         num_experts, hidden, out_dim, levels — multi-level MMoE
``cross_stitch``    hidden, out_dim, levels — one network per task, α mixing per level
``asymmetric``      edges, hidden, out_dim — one bottom per task; along the DAG ``edges``
                    ([parent, child] task names) the parent's bottom output is concatenated
                    to the child's bottom input
``sluice``          hidden, out_dim, levels, subspaces, aux_weight — one network per task,
                    layers split into subspaces, α mixing over tasks × subspaces, β mixing
                    of the layers; aux loss: subspace orthogonality
==================  ==================================================================

``gate`` (omoe, mmoe): ``softmax`` | ``noisy`` (Shazeer et al. 2017, noise in training only;
``top_k`` 0 = all experts) | ``topk`` (each row keeps ``top_k`` experts).

The registry: ``SCENARIO_LAYERS`` and ``TASK_LAYERS`` map a type name to the module class that
builds it. Each class declares the fields it reads (``CONFIG_FIELDS``) and builds itself with
``from_config(cfg, dims, where)`` (:class:`~dlrm_mtl.modules.layer_config.LayerDims`: the input
width, tasks, scenarios, embedding and context sizes, task names), checking the fields only it
reads (gate, routing, selection sizes, edges, subspaces) with a ConfigError naming ``where``.
A type that shares a class with another but reads fewer fields (scenario ``separate``; task
``separate``, ``cgc``, ``omoe``) maps to a named builder here, ``(cfg, dims, where) -> module``,
declaring its fields with ``reads_fields``. ``LAYER_FIELDS`` (the tables above) is derived from
those declarations, plus ``level`` for every scenario layer (read by the dense arch); a field
set to anything but its default on a type that does not read it is refused
(:func:`check_layer`). A new type: a class with ``CONFIG_FIELDS`` and ``from_config``, one
entry here, one row in the table above.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from torch import nn

from dlrm_mtl.config import ConfigError, LayerConfig, check_layer_sizes
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
)
from dlrm_mtl.modules.layer_config import LayerDims, reads_fields
from dlrm_mtl.modules.scenario_routing import checked_routing

# A layer type: a class with ``CONFIG_FIELDS`` and ``from_config(cfg, dims, where)``, or a
# named builder ``(cfg, dims, where) -> module`` declaring its fields with ``reads_fields``
LayerType = Union[type, Callable[[LayerConfig, LayerDims, str], nn.Module]]


# -- named builders: types that share a class with another type but read fewer fields ---------

@reads_fields("routing", "hidden", "out_dim")
def separate_scenario_layer(cfg: LayerConfig, dims: LayerDims, where: str) -> ScenarioCGCLayer:
    """``separate`` scenario layer: one network per scenario, a CGC layer with no shared expert
    and one specific expert (Parallel DNN)."""
    routing = checked_routing(cfg, where)
    return ScenarioCGCLayer(dims.in_dim, dims.num_scenarios, dims.emb_dim, 0, 1, cfg.hidden, cfg.out_dim, routing=routing)


@reads_fields("hidden", "out_dim")
def separate_task_layer(cfg: LayerConfig, dims: LayerDims, where: str) -> PLELayer:
    """``separate`` task layer: one network per task (the single-task baseline), a one-level
    PLE layer with no shared expert and one specific expert."""
    return PLELayer(dims.in_dim, dims.num_tasks, 0, 1, cfg.hidden, cfg.out_dim, levels=1)


@reads_fields("num_shared", "num_specific", "hidden", "out_dim")
def cgc_task_layer(cfg: LayerConfig, dims: LayerDims, where: str) -> PLELayer:
    """``cgc`` task layer: a one-level PLE layer (CGC, Tang et al. 2020)."""
    return PLELayer(dims.in_dim, dims.num_tasks, cfg.num_shared, cfg.num_specific, cfg.hidden, cfg.out_dim, levels=1)


@reads_fields(*MMoELayer.CONFIG_FIELDS)
def omoe_task_layer(cfg: LayerConfig, dims: LayerDims, where: str) -> MMoELayer:
    """``omoe`` task layer: an MMoE layer whose tasks share one gate."""
    return MMoELayer.from_config(cfg, dims, where, one_gate=True)


SCENARIO_LAYERS: Dict[str, LayerType] = {
    "separate": separate_scenario_layer,
    "cgc": ScenarioCGCLayer,
    "aesm": AESMScenarioLayer,
    "star": STARLayer,
    "hmoe": HMoELayer,
    "hinet": HiNetScenarioLayer,
}

TASK_LAYERS: Dict[str, LayerType] = {
    "separate": separate_task_layer,
    "shared_bottom": SharedBottomLayer,
    "omoe": omoe_task_layer,
    "mmoe": MMoELayer,
    "cgc": cgc_task_layer,
    "ple": PLELayer,
    "aesm": AESMTaskLayer,
    "ml_mmoe": MultiLevelMMoELayer,
    "cross_stitch": CrossStitchLayer,
    "asymmetric": AsymmetricLayer,
    "sluice": SluiceLayer,
}

# read by the dense arch for every scenario layer (which scenario level routes its rows)
SCENARIO_ARCH_FIELDS: Tuple[str, ...] = ("level",)


def _fields_of(layer_types: Mapping[str, LayerType], arch_fields: Tuple[str, ...]) -> Dict[str, Tuple[str, ...]]:
    return {name: arch_fields + tuple(t.CONFIG_FIELDS) for name, t in layer_types.items()}  # type: ignore[union-attr]


# the LayerConfig fields each layer type reads (the tables in the module docstring), from the
# types' ``CONFIG_FIELDS``; a field set to anything but its default on a type that does not read
# it is refused, not ignored
LAYER_FIELDS: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "scenario": _fields_of(SCENARIO_LAYERS, SCENARIO_ARCH_FIELDS),
    "task": _fields_of(TASK_LAYERS, ()),
}


def layer_builder(layer_type: LayerType) -> Callable[[LayerConfig, LayerDims, str], nn.Module]:
    """``(cfg, dims, where) -> module`` of a layer type: a class's ``from_config``, or the named builder itself."""
    return layer_type.from_config if isinstance(layer_type, type) else layer_type  # type: ignore[attr-defined]


def unread_fields(c: LayerConfig, kind: str) -> List[str]:
    """Fields of ``c`` that differ from their defaults although its type does not read them."""
    reads = set(LAYER_FIELDS[kind].get(c.type, ())) | {"type"}
    default = LayerConfig()
    return [f.name for f in dataclasses.fields(LayerConfig)
            if f.name not in reads and getattr(c, f.name) != getattr(default, f.name)]


def check_layer(c: LayerConfig, where: str, kind: str) -> None:
    """The fields of one layer every type shares: its type, no field its type does not read
    (``{type: mmoe, levels: 5}`` is refused), counts and sizes. The fields only some types
    read (gate, routing, selection sizes, edges, subspaces) are checked by the type's
    ``from_config``. ``kind``: scenario or task; ``where``: the layer's config key, e.g.
    ``model.task_layers[0]``."""
    known = SCENARIO_LAYERS if kind == "scenario" else TASK_LAYERS
    if c.type not in known:
        raise ConfigError(f"{where}.type: unknown type {c.type!r}; known: {sorted(known)}", f"{where}.type")
    unread = unread_fields(c, kind)
    if unread:
        raise ConfigError(f"{where}: type {c.type} does not read {unread} (it reads {sorted(LAYER_FIELDS[kind][c.type])})",
                          f"{where}.{unread[0]}")
    check_layer_sizes(c, where)


def build_scenario_layer(cfg: LayerConfig, in_dim: int, num_scenarios: int, emb_dim: int, num_tasks: int,
                         where: str = "model.scenario_layers") -> nn.Module:
    """The scenario layer ``cfg``; a config it cannot build is a ConfigError naming ``where``."""
    check_layer(cfg, where, "scenario")
    dims = LayerDims(in_dim=in_dim, num_tasks=num_tasks, num_scenarios=num_scenarios, emb_dim=emb_dim)
    return _built(layer_builder(SCENARIO_LAYERS[cfg.type]), cfg, dims, where)


def build_task_layer(cfg: LayerConfig, in_dim: int, num_tasks: int, context_dim: int, where: str = "model.task_layers",
                     task_names: Optional[Sequence[str]] = None) -> nn.Module:
    """The task layer ``cfg``; a config it cannot build is a ConfigError naming ``where``.
    ``task_names``: the schema's tasks, which ``edges`` name (asymmetric; built without them,
    the tasks are named "0", "1", ...)."""
    check_layer(cfg, where, "task")
    dims = LayerDims(in_dim=in_dim, num_tasks=num_tasks, context_dim=context_dim,
                     task_names=tuple(task_names) if task_names is not None else ())
    return _built(layer_builder(TASK_LAYERS[cfg.type]), cfg, dims, where)


def _built(build: Callable[[LayerConfig, LayerDims, str], nn.Module], cfg: LayerConfig, dims: LayerDims,
           where: str) -> nn.Module:
    """``build(cfg, dims, where)``, with a module's own refusal of its sizes (a ValueError, e.g.
    PLE's shared gate without shared experts) turned into a ConfigError naming the layer's key."""
    try:
        return build(cfg, dims, where)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{where}: type {cfg.type}: {e}", where) from e
