"""Behaviour sequences: the EmbeddingCollection's events -> one vector per sequence."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.sparse.jagged_tensor import JaggedTensor

from dlrm_mtl.config import ConfigError, SequenceEncoderConfig
from dlrm_mtl.modules.sequence import build_sequence_encoder
from dlrm_mtl.schema import Schema


def sequence_configs(schema: Schema) -> Dict[int, List[EmbeddingConfig]]:
    """The tables of the schema's sequence features (unpooled lookups), grouped by embedding
    dim: TorchRec's ``EmbeddingCollection`` holds tables of one dim only, so the model keeps
    one collection per dim."""
    tables: Dict[str, EmbeddingConfig] = {}
    for f in schema.sequence:
        if f.table in tables:
            tables[f.table].feature_names.append(f.name)
            continue
        tables[f.table] = EmbeddingConfig(name=f.table, embedding_dim=f.dim, num_embeddings=f.num_embeddings,
                                          feature_names=[f.name])
    by_dim: Dict[int, List[EmbeddingConfig]] = {}
    for c in tables.values():
        by_dim.setdefault(c.embedding_dim, []).append(c)
    return by_dim


def padded_events(jt: JaggedTensor, max_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A feature's looked-up events ``(values [N, D], lengths [B])`` -> ``([B, max_len, D]``
    zero-padded events, ``[B, max_len]`` bool mask of the real ones)."""
    lengths = jt.lengths()
    events = jt.to_padded_dense(desired_length=max_len, padding_value=0.0)  # [B, L, D]
    mask = torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)  # [B, L]
    return events, mask


# one part of a vector read by name: ("pooled", first column, width) or ("event", group, width)
Part = Tuple[str, object, int]
# each sequence group's padded events and mask: {group: ([B, L, Σ D], [B, L] bool)}
Events = Dict[str, Tuple[torch.Tensor, torch.Tensor]]


def feature_parts(schema: Schema, names: List[str], where: str) -> List[Part]:
    """Where the embeddings of ``names`` are: a pooled feature's columns of the pooled
    ``[B, Σ D_f]`` (schema order), or a ``max_len: 1`` sequence feature's one event (its group,
    side info included). Anything else is a ConfigError naming ``where``."""
    offsets: Dict[str, Tuple[int, int]] = {}
    start = 0
    for f in schema.sparse:
        offsets[f.name] = (start, f.dim)
        start += f.dim
    groups = schema.sequence_groups
    parts: List[Part] = []
    for name in names:
        if name in offsets:
            parts.append(("pooled", offsets[name][0], offsets[name][1]))
        elif name in groups and groups[name][0].max_len == 1:
            parts.append(("event", name, sum(f.dim for f in groups[name])))
        else:
            raise ConfigError(f"{where}: {name!r} is neither a pooled sparse feature nor a sequence feature of max_len 1",
                              where)
    return parts


def gather_parts(parts: List[Part], pooled: torch.Tensor, events: Events) -> torch.Tensor:
    """``[B, Σ width]``: the parts' embeddings side by side (a sequence of one: its event,
    zeros where the row has none)."""
    cols = [pooled[:, p[1]:p[1] + p[2]] if p[0] == "pooled" else events[p[1]][0][:, 0] for p in parts]  # type: ignore[misc]
    return cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)


class SequenceArch(nn.Module):
    """Each sequence group (a schema sequence feature with its ``aligned_with`` side info) ->
    ``[B, L, Σ D]`` events (the group's embeddings concatenated per event) and a ``[B, L]``
    mask -> its encoder (``model.sequence_encoders``, default ``mean``) -> ``[B, out]``.

    The target of an attention encoder is the concatenation of the ``target`` features'
    embeddings: a pooled feature's columns of ``pooled`` (schema order), or a ``max_len: 1``
    sequence feature's one event.

    ``pooled [B, Σ D_f]``, ``events {feature: JaggedTensor}`` (the EmbeddingCollection's
    output) -> ``[B, Σ out_g]`` in the order of :attr:`names` (the schema's sequence groups).

    Example::

        arch = SequenceArch(schema, {"hist_items": SequenceEncoderConfig(type="target_attention", target=["item_id"])})
        encoded, events = arch(pooled, [ec(batch.sequence) for ec in collections])   # [B, Σ out_g], padded events
    """

    def __init__(self, schema: Schema, encoders: Dict[str, SequenceEncoderConfig]) -> None:
        super().__init__()
        groups = schema.sequence_groups
        unknown = sorted(set(encoders) - set(groups))
        if unknown:
            raise ConfigError(f"model.sequence_encoders: {unknown} not sequence feature(s) of the schema "
                              f"(its sequences: {sorted(groups)}; side info is encoded with its sequence)",
                              "model.sequence_encoders")
        self.names: List[str] = list(groups)
        self.max_len: Dict[str, int] = {g: fs[0].max_len for g, fs in groups.items()}
        self.members: Dict[str, List[str]] = {g: [f.name for f in fs] for g, fs in groups.items()}
        self.targets: Dict[str, List[Part]] = {}  # per group: its target's parts
        self.encoders = nn.ModuleDict()
        for g, fs in groups.items():
            cfg = encoders.get(g, SequenceEncoderConfig())
            where = f"model.sequence_encoders.{g}"
            self.targets[g] = feature_parts(schema, cfg.target, f"{where}.target")
            self.encoders[g] = build_sequence_encoder(cfg, sum(f.dim for f in fs), sum(p[2] for p in self.targets[g]), where)
        self.out_dims: List[int] = [self.encoders[g].out_dim for g in self.names]
        self.out_dim = sum(self.out_dims)

    def events(self, looked_up: Dict[str, JaggedTensor]) -> Events:
        """The EmbeddingCollections' output ``{feature: JaggedTensor}`` -> each group's
        ``[B, L, Σ D]`` padded events (its features' embeddings side by side) and mask."""
        out: Events = {}
        for g in self.names:
            parts = [padded_events(looked_up[f], self.max_len[g]) for f in self.members[g]]
            x = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts], dim=2)  # [B, L, Σ D]
            out[g] = (x, parts[0][1])
        return out

    def encode(self, pooled: torch.Tensor, events: Events) -> torch.Tensor:
        """``[B, Σ out_g]``: each group's encoder over its events (and its target)."""
        encoded: List[torch.Tensor] = []
        for g in self.names:
            x, mask = events[g]
            target = gather_parts(self.targets[g], pooled, events) if self.targets[g] else None  # [B, Dt]
            encoded.append(self.encoders[g](x, mask, target))
        return encoded[0] if len(encoded) == 1 else torch.cat(encoded, dim=1)  # [B, Σ out_g]

    def forward(self, pooled: torch.Tensor, looked_up: List[Dict[str, JaggedTensor]]) -> Tuple[torch.Tensor, Events]:
        """``looked_up``: each EmbeddingCollection's output -> ``(encoded [B, Σ out_g], events)``.

        One call of this module does all the work after the collections: TorchRec's train
        pipeline fx-traces the model with every module free of sharded tables as a leaf, so
        the collections' outputs must reach a leaf's ``forward`` as arguments (a trace cannot
        iterate them)."""
        merged: Dict[str, JaggedTensor] = {}
        for part in looked_up:
            merged.update(part)
        events = self.events(merged)
        return self.encode(pooled, events), events
