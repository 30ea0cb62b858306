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
``omoe``            num_experts, hidden, out_dim
``mmoe``            num_experts, hidden, out_dim
``cgc``             num_shared, num_specific, hidden, out_dim
``ple``             num_shared, num_specific, hidden, out_dim, levels
==================  ==================================================================
"""

from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from dlrm_mtl.config import ConfigError, LayerConfig
from dlrm_mtl.modules import MMoELayer, PLELayer, ScenarioCGCLayer, SharedBottomLayer
from dlrm_mtl.modules import HiNetScenarioLayer, HMoELayer, STARLayer

# (cfg, in_dim, num_scenarios, emb_dim, num_tasks) -> module
ScenarioLayerBuilder = Callable[[LayerConfig, int, int, int, int], nn.Module]
# (cfg, in_dim, num_tasks, context_dim) -> module
TaskLayerBuilder = Callable[[LayerConfig, int, int, int], nn.Module]

SCENARIO_LAYERS: Dict[str, ScenarioLayerBuilder] = {
    "separate": lambda c, d, S, e, T: ScenarioCGCLayer(d, S, e, 0, 1, c.hidden, c.out_dim),
    "cgc": lambda c, d, S, e, T: ScenarioCGCLayer(d, S, e, c.num_shared, c.num_specific, c.hidden, c.out_dim),
    "star": lambda c, d, S, e, T: STARLayer(d, S, e, T, c.hidden, c.out_dim, norm=c.norm),
    "hmoe": lambda c, d, S, e, T: HMoELayer(d, S, e, c.hidden, c.out_dim),
    "hinet": lambda c, d, S, e, T: HiNetScenarioLayer(d, S, e, c.sub_experts, c.hidden, c.out_dim),
}

TASK_LAYERS: Dict[str, TaskLayerBuilder] = {
    "separate": lambda c, d, T, ctx: PLELayer(d, T, 0, 1, c.hidden, c.out_dim, levels=1),
    "shared_bottom": lambda c, d, T, ctx: SharedBottomLayer(d, T, c.hidden, c.out_dim),
    "omoe": lambda c, d, T, ctx: MMoELayer(d, T, c.num_experts, c.hidden, c.out_dim, one_gate=True),
    "mmoe": lambda c, d, T, ctx: MMoELayer(d, T, c.num_experts, c.hidden, c.out_dim),
    "cgc": lambda c, d, T, ctx: PLELayer(d, T, c.num_shared, c.num_specific, c.hidden, c.out_dim, levels=1),
    "ple": lambda c, d, T, ctx: PLELayer(d, T, c.num_shared, c.num_specific, c.hidden, c.out_dim, levels=c.levels),
}


def build_scenario_layer(cfg: LayerConfig, in_dim: int, num_scenarios: int, emb_dim: int, num_tasks: int) -> nn.Module:
    if cfg.type not in SCENARIO_LAYERS:
        raise ConfigError(f"model.scenario_layers: unknown type {cfg.type!r}; known: {sorted(SCENARIO_LAYERS)}")
    return SCENARIO_LAYERS[cfg.type](cfg, in_dim, num_scenarios, emb_dim, num_tasks)


def build_task_layer(cfg: LayerConfig, in_dim: int, num_tasks: int, context_dim: int) -> nn.Module:
    if cfg.type not in TASK_LAYERS:
        raise ConfigError(f"model.task_layers: unknown type {cfg.type!r}; known: {sorted(TASK_LAYERS)}")
    return TASK_LAYERS[cfg.type](cfg, in_dim, num_tasks, context_dim)
