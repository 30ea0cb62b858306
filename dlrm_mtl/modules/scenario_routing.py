"""Rows grouped by scenario, for layers whose scenario-specific parameters see only their rows."""

from __future__ import annotations

from typing import List, NamedTuple

import torch

from dlrm_mtl.config import ConfigError, LayerConfig

ROUTINGS = ("auto", "gather", "static")
STATIC_MAX_SCENARIOS = 4  # auto: static routing on CPU up to this many scenarios


def checked_routing(cfg: LayerConfig, where: str) -> str:
    """``cfg.routing`` of a layer that reads it (cgc, separate, star scenario layers); a value
    not in :data:`ROUTINGS` is a ConfigError naming ``where.routing``."""
    if cfg.routing not in ROUTINGS:
        raise ConfigError(f"{where}: type {cfg.type}: routing {cfg.routing!r} is not one of {list(ROUTINGS)}", f"{where}.routing")
    return cfg.routing


def static_routing(routing: str, x: torch.Tensor, num_scenarios: int) -> bool:
    """Whether a layer with ``routing`` (auto | gather | static) runs the static-shape
    formulation on ``x``: ``auto`` does on GPU (no host synchronisation, capturable) and on
    CPU for few scenarios, where S × the specific experts' FLOPs cost less than grouping."""
    if routing == "auto":
        return x.is_cuda or num_scenarios <= STATIC_MAX_SCENARIOS
    return routing == "static"


def own_scenario(scenario: torch.Tensor, num_scenarios: int) -> torch.Tensor:
    """``[B, S]`` bool, True at each row's own scenario: ``one_hot`` without its range check
    (which reads the ids' min and max back to the host every call). Ids are validated where
    the batch is read."""
    return scenario.unsqueeze(1) == torch.arange(num_scenarios, device=scenario.device)


class ScenarioGroups(NamedTuple):
    """A batch's rows grouped by scenario.

    Attributes:
        order: ``[B]`` row indices, scenario 0's rows first (in batch order), then scenario 1's, ...
        counts: rows per scenario (``len == num_scenarios``; zeros included).
        inverse: ``[B]``, ``inverse[order[i]] = i``: puts grouped rows back in batch order.
    """

    order: torch.Tensor
    counts: List[int]
    inverse: torch.Tensor

    def split(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``x [B, ...]`` -> one ``[B_s, ...]`` tensor per scenario (one gather, then views)."""
        return list(x.index_select(0, self.order).split(self.counts))

    def merge(self, parts: List[torch.Tensor]) -> torch.Tensor:
        """Per-scenario outputs ``[B_s, ...]`` (in scenario order) -> ``[B, ...]`` in batch order."""
        return torch.cat(parts).index_select(0, self.inverse)


def group_by_scenario(scenario: torch.Tensor, num_scenarios: int) -> ScenarioGroups:
    """Groups rows by ``scenario [B]`` (values in ``[0, num_scenarios)``).

    One stable sort and one gather each way, instead of a mask, an ``index_select`` and an
    out-of-place ``index_copy`` of the whole output per scenario (S copies of ``[B, d]``).
    ``counts`` is read on the host (the per-scenario sizes decide the shapes of the calls).

    Example::

        g = group_by_scenario(torch.tensor([1, 0, 1]), 2)
        g.order, g.counts             # tensor([1, 0, 2]), [1, 2]
        xs = g.split(torch.arange(3.0).unsqueeze(1))   # [[1.]], [[0.], [2.]]
        g.merge(xs).squeeze(1)        # tensor([0., 1., 2.])
    """
    order = torch.argsort(scenario, stable=True)  # [B]
    counts = torch.bincount(scenario, minlength=num_scenarios).tolist()
    if len(counts) > num_scenarios:
        raise ValueError(f"scenario ids must be < {num_scenarios}, got {scenario.max().item()}")
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return ScenarioGroups(order, counts, inverse)
