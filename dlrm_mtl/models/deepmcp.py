"""DeepMCP (Ouyang et al. 2019): the matching and correlation subnets next to the prediction subnet."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from dlrm_mtl.config import ConfigError, DeepMCPConfig
from dlrm_mtl.models.sequence_arch import Events, feature_parts, gather_parts
from dlrm_mtl.modules.correlation_subnet import CorrelationSubnet
from dlrm_mtl.modules.matching_subnet import MatchingSubnet
from dlrm_mtl.schema import Schema


class DeepMCP(nn.Module):
    """DeepMCP's auxiliary subnets (Ouyang et al., IJCAI 2019, "Representation
    Learning-Assisted Click-Through Rate Prediction"). The *prediction subnet* is the rest of
    the model (embeddings, scenario and task layers, towers: any dlrm_mtl architecture); the
    *matching subnet* (user–item, :class:`MatchingSubnet`) and the *correlation subnet*
    (item–item over the behaviour sequence, :class:`CorrelationSubnet`) read the same
    embeddings and add their losses, so the joint objective is the paper's::

        L = L_p + α L_m + β L_c

    α = ``matching_weight``, β = ``correlation_weight``. Both subnets are training-only: the
    prediction subnet alone scores (evaluation, predict); they shape its embeddings.
    Deviations: the correlation subnet's negatives come from the batch (see
    :class:`CorrelationSubnet`); the defaults α = β = 0.1 are this project's choice (the
    paper tunes both on validation data; its values could not be checked here); the prediction
    subnet is not the paper's plain DNN but whatever the config builds.

    ``pooled [B, Σ D_f]``, the sequence ``events``, ``labels``/``label_mask [B, T]``,
    ``weight [B]`` -> ``(α L_m + β L_c, {"loss/deepmcp_matching": L_m, ...})``.

    Example::

        mcp = DeepMCP(schema, DeepMCPConfig(task="ctr", user=["user_id"], item=["item_id"]))
        extra, terms = mcp(pooled, events, batch.labels, batch.label_mask, batch.weight)
    """

    def __init__(self, schema: Schema, cfg: DeepMCPConfig) -> None:
        super().__init__()
        where = "model.deepmcp"
        if cfg.task not in schema.task_names:
            raise ConfigError(f"{where}.task {cfg.task!r} is not a task of the schema {schema.task_names}", f"{where}.task")
        task = schema.tasks[schema.task_index(cfg.task)]
        if task.type != "binary" or task.derived:
            raise ConfigError(f"{where}.task {cfg.task!r}: the matching subnet predicts a binary head task's label", f"{where}.task")
        for name in ("user", "item"):
            if not getattr(cfg, name):
                raise ConfigError(f"{where}.{name}: the matching subnet's {name} tower needs features", f"{where}.{name}")
        for name in ("matching_weight", "correlation_weight"):
            if getattr(cfg, name) < 0:
                raise ConfigError(f"{where}.{name}: must be >= 0, got {getattr(cfg, name)}", f"{where}.{name}")
        self.task = schema.task_index(cfg.task)
        self.user = feature_parts(schema, cfg.user, f"{where}.user")
        self.item = feature_parts(schema, cfg.item, f"{where}.item")
        if not cfg.towers or any(s <= 0 for s in cfg.towers):
            raise ConfigError(f"{where}.towers: sizes must be > 0, got {cfg.towers}", f"{where}.towers")
        self.matching = MatchingSubnet(sum(p[2] for p in self.user), sum(p[2] for p in self.item), list(cfg.towers))
        self.sequence = cfg.sequence
        self.correlation: Optional[CorrelationSubnet] = None
        if cfg.sequence:
            groups = schema.sequence_groups
            if cfg.sequence not in groups:
                raise ConfigError(f"{where}.sequence {cfg.sequence!r} is not a sequence of the schema {sorted(groups)}",
                                  f"{where}.sequence")
            if cfg.window < 1 or cfg.negatives < 0 or cfg.correlation_dim <= 0:
                raise ConfigError(f"{where}: window >= 1, negatives >= 0 and correlation_dim > 0 needed, got "
                                  f"{cfg.window}, {cfg.negatives}, {cfg.correlation_dim}", f"{where}.window")
            self.correlation = CorrelationSubnet(sum(f.dim for f in groups[cfg.sequence]), cfg.correlation_dim,
                                                 cfg.window, cfg.negatives)
        self.register_buffer("alpha", torch.tensor(float(cfg.matching_weight)), persistent=False)
        self.register_buffer("beta", torch.tensor(float(cfg.correlation_weight)), persistent=False)

    def forward(self, pooled: torch.Tensor, events: Events, labels: torch.Tensor, label_mask: torch.Tensor,
                weight: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        rows = weight * label_mask[:, self.task]  # [B]: the task's labelled rows (padding has weight 0)
        l_m, _ = self.matching(gather_parts(self.user, pooled, events), gather_parts(self.item, pooled, events),
                               labels[:, self.task], rows)
        extra = self.alpha * l_m
        terms = {"loss/deepmcp_matching": l_m.detach(), "loss_weight/deepmcp_matching": self.alpha.clone()}
        if self.correlation is not None:
            x, mask = events[self.sequence]
            l_c, pairs = self.correlation(x, mask)
            extra = extra + self.beta * l_c
            terms.update({"loss/deepmcp_correlation": l_c.detach(), "loss_weight/deepmcp_correlation": self.beta.clone(),
                          "deepmcp/pairs": pairs.detach()})
        return extra, terms


def with_auxiliary(out: Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor]],
                   extra: Tuple[torch.Tensor, Dict[str, torch.Tensor]]):
    """The dense step's ``(loss, logits, terms, gates)`` with an auxiliary loss added to the
    total and its terms logged next to the others (fx-wrapped where it is called,
    ``dlrm_mtl/models/ranking_model.py``: one call in a traced model)."""
    loss = out[0] + extra[0]
    terms = dict(out[2])
    terms.update(extra[1])
    terms["loss/total"] = loss.detach()
    return loss, out[1], terms, out[3]
