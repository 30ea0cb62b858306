"""What a trained model outputs per row: named probabilities and the fused ranking score.

Prediction names (:func:`prediction_names`): every task by its name (its conditional
probability; a root task's is also its entire-space one; a regression task's raw output),
then every chained binary task's entire-space probability by its entire name (``ctcvr``).

The fused score follows PLE (Tang et al., RecSys 2020), eq. 1::

    score = Π_name p_name ^ w_name

with the weights of ``predict.fusion`` (``{ctr: 1, ctcvr: 2}``). Deviation: the product is
computed as ``exp(Σ w · log max(p, 1e-12))`` so that small probabilities raised to large
weights do not underflow to 0 before the ranking sees them. Default weights (``{}``): 1 on the
entire-space probability of every task that is no other task's parent (``ctcvr`` for
ctr → cvr; every task when the tasks are independent).

Example::

    names = prediction_names(schema)                   # ["ctr", "cvr", "ctcvr"]
    probs = named_predictions(graph, logits)           # {"ctr": [B], "cvr": [B], "ctcvr": [B]}
    score = fused_score(probs, fusion_weights(schema, {"ctr": 1, "ctcvr": 2}))   # [B]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Mapping

if TYPE_CHECKING:  # torch only in annotations: config checks import this module before torch
    import torch

    from dlrm_mtl.schema import Schema
    from dlrm_mtl.task_graph import TaskGraph

PROB_FLOOR = 1e-12


def prediction_names(schema: "Schema") -> List[str]:
    """Task names in schema order, then the entire names of chained binary tasks."""
    names = [t.name for t in schema.tasks]
    names += [schema.entire_name(t) for t in schema.tasks if t.parent is not None and t.type == "binary"]
    return names


def fusion_weights(schema: "Schema", fusion: Mapping[str, float]) -> Dict[str, float]:
    """The fused score's weights: ``fusion`` checked against :func:`prediction_names` (only
    binary predictions: a regression output is no probability), or the default."""
    names = prediction_names(schema)
    regression = {t.name for t in schema.tasks if t.type == "regression"}
    if not fusion:
        parents = {t.parent_name for t in schema.tasks if t.parent is not None}
        leaves = [t for t in schema.tasks if t.name not in parents and t.type == "binary"]
        return {(schema.entire_name(t) if t.parent is not None else t.name): 1.0 for t in leaves}
    out: Dict[str, float] = {}
    for name, w in fusion.items():
        if name not in names:
            raise ValueError(f"{name!r} is not a prediction of this schema; known: {names}")
        if name in regression:
            raise ValueError(f"{name!r} is a regression output, not a probability: it cannot be fused")
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ValueError(f"{name}: weight must be a number, got {w!r}")
        out[name] = float(w)
    return out


def named_predictions(graph: "TaskGraph", logits: torch.Tensor) -> Dict[str, torch.Tensor]:
    """``logits [B, T]`` -> ``{name: [B]}`` in :func:`prediction_names` order."""
    probs = graph.probabilities(logits)
    return {n: probs[n] for n in prediction_names(graph.schema)}


def fused_score(probs: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """``Π p_name ^ w_name`` (PLE eq. 1) over ``weights``, ``[B]``."""
    log = None
    for name, w in weights.items():
        term = w * probs[name].clamp_min(PROB_FLOOR).log()
        log = term if log is None else log + term
    if log is None:
        raise ValueError("fused_score: no weights")
    return log.exp()
