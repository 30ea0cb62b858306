"""What every scenario and task layer returns."""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch


class LayerOutput(NamedTuple):
    """Output of one expert layer.

    Attributes:
        y: the representation passed on: ``[B, d']`` from a scenario layer, ``[T, B, d']``
            from a task layer.
        gates: expert weights by gate name, for utilisation logging. ``[B, E]`` (one gate per
            row, chosen by the row's scenario) or ``[B, G, E]`` (G gates, e.g. one per task).
            Weights of experts a row cannot use are 0.
        aux: auxiliary losses (scalars, unweighted) by name, e.g. AESM²'s ``kl_specific``.
        logit_offset: ``[B, T]`` added to every task's logit (STAR's auxiliary network), or None.
        shared: the ``[B, d']`` that every task's row of ``y`` is, when a task layer's output is
            the same for all tasks (Shared-Bottom: ``y`` is its stride-0 expand), else None.
            The towers read it instead of ``y``: indexing the expand would make its backward
            fill and sum a ``[T, B, d']`` gradient.
    """

    y: torch.Tensor
    gates: Dict[str, torch.Tensor] = {}
    aux: Dict[str, torch.Tensor] = {}
    logit_offset: Optional[torch.Tensor] = None
    shared: Optional[torch.Tensor] = None
