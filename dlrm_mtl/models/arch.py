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
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn

from dlrm_mtl.config import ConfigError, LayerConfig, check_layer_sizes
from dlrm_mtl.modules import MMoELayer, PLELayer, ScenarioCGCLayer, SharedBottomLayer
from dlrm_mtl.modules.scenario_routing import ROUTINGS
from dlrm_mtl.modules import GATE_KINDS, AESMScenarioLayer, AESMTaskLayer, CrossStitchLayer, MultiLevelMMoELayer
from dlrm_mtl.modules import AsymmetricLayer, SluiceLayer, resolve_task_edges
from dlrm_mtl.modules.asymmetric import check_task_edges


def _gate_args(c: LayerConfig) -> Dict[str, Any]:
    """The gate fields of omoe/mmoe (checked by :func:`check_layer`)."""
    return dict(gate=c.gate, top_k=c.top_k, noise=c.noise)


def _routing(c: LayerConfig) -> str:
    return c.routing


_SIZES = ("hidden", "out_dim")
_AESM = ("num_experts", "k_specific", "k_shared", "noise", "aux_weight") + _SIZES
# the LayerConfig fields each layer type reads (the tables in the module docstring); a field
# set to anything but its default on a type that does not read it is refused, not ignored
LAYER_FIELDS: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "scenario": {
        "separate": ("level", "routing") + _SIZES,
        "cgc": ("level", "routing", "num_shared", "num_specific") + _SIZES,
        "aesm": ("level",) + _AESM,
        "star": ("level", "routing", "norm") + _SIZES,
        "hmoe": ("level",) + _SIZES,
        "hinet": ("level", "sub_experts") + _SIZES,
    },
    "task": {
        "separate": _SIZES,
        "shared_bottom": _SIZES,
        "omoe": ("num_experts", "gate", "top_k", "noise") + _SIZES,
        "mmoe": ("num_experts", "gate", "top_k", "noise") + _SIZES,
        "cgc": ("num_shared", "num_specific") + _SIZES,
        "ple": ("num_shared", "num_specific", "levels") + _SIZES,
        "aesm": ("task_emb_dim",) + _AESM,
        "ml_mmoe": ("num_experts", "levels") + _SIZES,
        "cross_stitch": ("levels",) + _SIZES,
        "asymmetric": ("edges",) + _SIZES,
        "sluice": ("levels", "subspaces", "aux_weight") + _SIZES,
    },
}


def unread_fields(c: LayerConfig, kind: str) -> List[str]:
    """Fields of ``c`` that differ from their defaults although its type does not read them."""
    reads = set(LAYER_FIELDS[kind].get(c.type, ())) | {"type"}
    default = LayerConfig()
    return [f.name for f in dataclasses.fields(LayerConfig)
            if f.name not in reads and getattr(c, f.name) != getattr(default, f.name)]


def check_layer(c: LayerConfig, where: str, kind: str) -> None:
    """The fields of one layer that need no input sizes: its type, counts and sizes, the gate,
    routing and selection fields of the types that read them, and no field its type does not
    read (``{type: mmoe, levels: 5}`` is refused). ``kind``: scenario or task; ``where``: the
    layer's config key, e.g. ``model.task_layers[0]``."""
    known = SCENARIO_LAYERS if kind == "scenario" else TASK_LAYERS
    if c.type not in known:
        raise ConfigError(f"{where}.type: unknown type {c.type!r}; known: {sorted(known)}", f"{where}.type")
    unread = unread_fields(c, kind)
    if unread:
        raise ConfigError(f"{where}: type {c.type} does not read {unread} (it reads {sorted(LAYER_FIELDS[kind][c.type])})",
                          f"{where}.{unread[0]}")
    check_layer_sizes(c, where)
    if kind == "task" and c.type in ("omoe", "mmoe"):
        _check_gate(c, where)
    if kind == "scenario" and c.type in ("separate", "cgc", "star") and c.routing not in ROUTINGS:
        raise ConfigError(f"{where}: type {c.type}: routing {c.routing!r} is not one of {list(ROUTINGS)}", f"{where}.routing")
    if kind == "task" and c.type == "asymmetric":
        try:
            check_task_edges(c.edges)  # pairs, no self-edge, no repeat, no cycle; the names: build_task_layer
        except ValueError as e:
            raise ConfigError(f"{where}.edges: type asymmetric: {e}", f"{where}.edges") from None
    if kind == "task" and c.type == "sluice" and c.out_dim % c.subspaces:
        raise ConfigError(f"{where}.subspaces: type sluice: out_dim ({c.out_dim}) must be a multiple of subspaces ({c.subspaces})",
                          f"{where}.subspaces")
    if c.type == "aesm" and not (c.k_specific + c.k_shared >= 1 and c.k_specific + c.k_shared <= c.num_experts):
        raise ConfigError(
            f"{where}: type aesm needs 1 <= k_specific + k_shared <= num_experts ({c.num_experts}), got {c.k_specific} + {c.k_shared}",
            f"{where}.k_specific",
        )


def _check_gate(c: LayerConfig, where: str) -> None:
    if c.gate not in GATE_KINDS:
        raise ConfigError(f"{where}: type {c.type}: gate {c.gate!r} is not one of {list(GATE_KINDS)}", f"{where}.gate")
    if c.gate == "topk" and not 1 <= c.top_k <= c.num_experts:
        raise ConfigError(f"{where}: type {c.type}: gate topk needs 1 <= top_k <= num_experts ({c.num_experts}), got {c.top_k}", f"{where}.top_k")
    if c.gate == "noisy" and not 0 <= c.top_k <= c.num_experts:
        raise ConfigError(f"{where}: type {c.type}: top_k must be in [0, num_experts ({c.num_experts})], got {c.top_k}", f"{where}.top_k")


from dlrm_mtl.modules import HiNetScenarioLayer, HMoELayer, STARLayer

# (cfg, in_dim, num_scenarios, emb_dim, num_tasks) -> module
ScenarioLayerBuilder = Callable[[LayerConfig, int, int, int, int], nn.Module]
# (cfg, in_dim, num_tasks, context_dim) -> module; a type that reads ``edges`` takes the task
# names as a fifth argument
TaskLayerBuilder = Callable[..., nn.Module]

SCENARIO_LAYERS: Dict[str, ScenarioLayerBuilder] = {
    "separate": lambda c, d, S, e, T: ScenarioCGCLayer(d, S, e, 0, 1, c.hidden, c.out_dim, routing=_routing(c)),
    "cgc": lambda c, d, S, e, T: ScenarioCGCLayer(d, S, e, c.num_shared, c.num_specific, c.hidden, c.out_dim, routing=_routing(c)),
    "aesm": lambda c, d, S, e, T: AESMScenarioLayer(d, S, e, c.num_experts, c.k_specific, c.k_shared, c.hidden, c.out_dim, noise=c.noise),
    "star": lambda c, d, S, e, T: STARLayer(d, S, e, T, c.hidden, c.out_dim, norm=c.norm, routing=_routing(c)),
    "hmoe": lambda c, d, S, e, T: HMoELayer(d, S, e, c.hidden, c.out_dim),
    "hinet": lambda c, d, S, e, T: HiNetScenarioLayer(d, S, e, c.sub_experts, c.hidden, c.out_dim),
}

TASK_LAYERS: Dict[str, TaskLayerBuilder] = {
    "separate": lambda c, d, T, ctx: PLELayer(d, T, 0, 1, c.hidden, c.out_dim, levels=1),
    "shared_bottom": lambda c, d, T, ctx: SharedBottomLayer(d, T, c.hidden, c.out_dim),
    "omoe": lambda c, d, T, ctx: MMoELayer(d, T, c.num_experts, c.hidden, c.out_dim, one_gate=True, **_gate_args(c)),
    "mmoe": lambda c, d, T, ctx: MMoELayer(d, T, c.num_experts, c.hidden, c.out_dim, **_gate_args(c)),
    "cgc": lambda c, d, T, ctx: PLELayer(d, T, c.num_shared, c.num_specific, c.hidden, c.out_dim, levels=1),
    "ple": lambda c, d, T, ctx: PLELayer(d, T, c.num_shared, c.num_specific, c.hidden, c.out_dim, levels=c.levels),
    "aesm": lambda c, d, T, ctx: AESMTaskLayer(
        d, T, ctx, c.num_experts, c.k_specific, c.k_shared, c.hidden, c.out_dim, noise=c.noise, task_emb_dim=c.task_emb_dim,
    ),
    "ml_mmoe": lambda c, d, T, ctx: MultiLevelMMoELayer(d, T, c.num_experts, c.hidden, c.out_dim, levels=c.levels),
    "cross_stitch": lambda c, d, T, ctx: CrossStitchLayer(d, T, c.hidden, c.out_dim, levels=c.levels),
    # a type whose fields name tasks (reads ``edges``) also gets the task names, see build_task_layer
    "asymmetric": lambda c, d, T, ctx, names: AsymmetricLayer(d, T, resolve_task_edges(c.edges, names), c.hidden, c.out_dim),
    "sluice": lambda c, d, T, ctx: SluiceLayer(d, T, c.hidden, c.out_dim, levels=c.levels, subspaces=c.subspaces),
}


def build_scenario_layer(cfg: LayerConfig, in_dim: int, num_scenarios: int, emb_dim: int, num_tasks: int,
                         where: str = "model.scenario_layers") -> nn.Module:
    """The scenario layer ``cfg``; a config it cannot build is a ConfigError naming ``where``."""
    check_layer(cfg, where, "scenario")
    return _built(lambda: SCENARIO_LAYERS[cfg.type](cfg, in_dim, num_scenarios, emb_dim, num_tasks), cfg, where)


def build_task_layer(cfg: LayerConfig, in_dim: int, num_tasks: int, context_dim: int, where: str = "model.task_layers",
                     task_names: Optional[Sequence[str]] = None) -> nn.Module:
    """The task layer ``cfg``; a config it cannot build is a ConfigError naming ``where``.
    ``task_names``: the schema's tasks, which ``edges`` name (asymmetric)."""
    check_layer(cfg, where, "task")
    if "edges" not in LAYER_FIELDS["task"][cfg.type]:
        return _built(lambda: TASK_LAYERS[cfg.type](cfg, in_dim, num_tasks, context_dim), cfg, where)
    # edges name the schema's tasks (``task_names``; built on its own, tasks are named "0", "1", ...)
    names = [str(t) for t in range(num_tasks)] if task_names is None else list(task_names)
    try:
        resolve_task_edges(cfg.edges, names)
    except ValueError as e:
        raise ConfigError(f"{where}.edges: type {cfg.type}: {e}", f"{where}.edges") from None
    return _built(lambda: TASK_LAYERS[cfg.type](cfg, in_dim, num_tasks, context_dim, names), cfg, where)


def _built(make: Callable[[], nn.Module], cfg: LayerConfig, where: str) -> nn.Module:
    """``make()``, with a module's own refusal of its sizes (a ValueError, e.g. PLE's shared
    gate without shared experts) turned into a ConfigError naming the layer's key."""
    try:
        return make()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{where}: type {cfg.type}: {e}", where) from e
