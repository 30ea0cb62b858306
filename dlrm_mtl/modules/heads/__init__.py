"""Task heads: ``model.heads.type`` -> the module turning the task layers' output into logits.

==========  ==================  ======================================================
type        fields read         what
==========  ==================  ======================================================
``towers``  —                   T independent towers (:class:`TaskTowers`; the default)
``dbmtl``   relation_dim        DBMTL (Wang et al. 2019): a task's tower reads its
                                parent's relation layer (:mod:`.dbmtl`)
``aitm``    calibrator_weight   AITM (Xi et al., KDD 2021): AIT attention from the
                                previous step + calibrator aux loss (:mod:`.aitm`)
``nmtr``    —                   NMTR (Gao et al., ICDE 2019): cascaded scores over the
                                ordered behaviours (:mod:`.nmtr`)
==========  ==================  ======================================================

Every head reads ``model.tower`` for its per-task MLP sizes. Input ``x [T, B, d]`` (task t
reads ``x[t]``) or ``[B, d]``; ``towers`` returns logits ``[B, T]``, the others a
:class:`LayerOutput` whose ``y`` are logits ``[B, T]`` in the loss's convention (each task's
*conditional* logit, σ(z_t) = P(t | its parent, x)), with ``aux`` and ``gates`` as layers have
them and an ``aux_weight`` attribute that :class:`DenseArch` multiplies the aux losses by.

Example::

    head = build_heads(HeadsConfig(type="dbmtl"), schema, in_dim=64, tower=[64])
    head(torch.randn(len(schema.tasks), 8, 64)).y.shape   # [8, T]
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Tuple

from torch import nn

from dlrm_mtl.config import ConfigError, HeadsConfig
from dlrm_mtl.modules.heads.aitm import AITMHead, AdaptiveInformationTransfer
from dlrm_mtl.modules.heads.common import TaskChain, TaskLogits, TowerBank, conditional_logits, task_chain
from dlrm_mtl.modules.heads.dbmtl import DBMTLHead
from dlrm_mtl.modules.heads.nmtr import NMTRHead
from dlrm_mtl.modules.towers import TaskTowers
from dlrm_mtl.schema import Schema

# the HeadsConfig fields each type reads (the table above); a field set to anything but its
# default on a type that does not read it is refused, not ignored
HEAD_FIELDS: Dict[str, Tuple[str, ...]] = {
    "towers": (),
    "dbmtl": ("relation_dim",),
    "aitm": ("calibrator_weight",),
    "nmtr": (),
}

# (cfg, schema, in_dim, tower hidden sizes) -> module
HeadBuilder = Callable[[HeadsConfig, Schema, int, List[int]], nn.Module]

def _aitm(c: HeadsConfig, s: Schema, d: int, tower: List[int]) -> nn.Module:
    chain = task_chain(s, chain=True)
    for _, t in chain.links:
        task = s.tasks[t]
        if task.loss_space != "entire":
            # ŷ_c / ŷ_p trained by BCE on the parent's positives has an unbounded gradient as
            # ŷ_c -> ŷ_p; AITM trains every step's ŷ on all impressions (loss_space: entire)
            raise ValueError(f"trains every step's entire-space probability on all impressions (loss_space: entire), but "
                             f"task {task.name!r} has loss_space {task.loss_space!r}; use type dbmtl or nmtr")
    return AITMHead(chain, d, tower, c.calibrator_weight)


HEADS: Dict[str, HeadBuilder] = {
    "towers": lambda c, s, d, tower: TaskTowers(len(s.tasks), d, tower),
    "dbmtl": lambda c, s, d, tower: DBMTLHead(task_chain(s, chain=False), d, tower, c.relation_dim),
    "aitm": _aitm,
    "nmtr": lambda c, s, d, tower: NMTRHead(task_chain(s, chain=True), d, tower),
}


def check_heads(c: HeadsConfig, where: str = "model.heads") -> None:
    """The fields of ``c`` that need no schema: a known type, no field the type does not read
    (``{type: nmtr, relation_dim: 8}`` is refused), sizes and weights in range."""
    if c.type not in HEADS:
        raise ConfigError(f"{where}.type: unknown type {c.type!r}; known: {sorted(HEADS)}", f"{where}.type")
    default = HeadsConfig()
    reads = set(HEAD_FIELDS[c.type]) | {"type"}
    unread = [f.name for f in dataclasses.fields(HeadsConfig) if f.name not in reads and getattr(c, f.name) != getattr(default, f.name)]
    if unread:
        raise ConfigError(f"{where}: type {c.type} does not read {unread} (it reads {sorted(HEAD_FIELDS[c.type])})",
                          f"{where}.{unread[0]}")
    if c.relation_dim < 1:
        raise ConfigError(f"{where}.relation_dim: must be >= 1, got {c.relation_dim} (type {c.type})", f"{where}.relation_dim")
    if not c.calibrator_weight >= 0:
        raise ConfigError(f"{where}.calibrator_weight: must be >= 0, got {c.calibrator_weight} (type {c.type})",
                          f"{where}.calibrator_weight")


def build_heads(c: HeadsConfig, schema: Schema, in_dim: int, tower: List[int], where: str = "model.heads") -> nn.Module:
    """The heads ``c`` on ``in_dim`` inputs for ``schema``'s tasks; a config they cannot build
    (unknown type, unread field, a chain head on a schema without a chain) is a ConfigError
    naming ``where``. ``towers`` builds exactly today's :class:`TaskTowers`."""
    check_heads(c, where)
    try:
        return HEADS[c.type](c, schema, in_dim, list(tower))
    except ValueError as e:
        raise ConfigError(f"{where}: type {c.type} {e}", f"{where}.type") from e


__all__ = [
    "AITMHead",
    "AdaptiveInformationTransfer",
    "DBMTLHead",
    "HEADS",
    "HEAD_FIELDS",
    "NMTRHead",
    "TaskChain",
    "TaskLogits",
    "TowerBank",
    "build_heads",
    "check_heads",
    "conditional_logits",
    "task_chain",
]
