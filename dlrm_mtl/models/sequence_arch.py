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
        seq = arch(pooled, events)   # events: {feature: JaggedTensor} of the EmbeddingCollections
    """

    def __init__(self, schema: Schema, encoders: Dict[str, SequenceEncoderConfig]) -> None:
        super().__init__()
        groups = schema.sequence_groups
        unknown = sorted(set(encoders) - set(groups))
        if unknown:
            raise ConfigError(f"model.sequence_encoders: {unknown} not sequence feature(s) of the schema "
                              f"(its sequences: {sorted(groups)}; side info is encoded with its sequence)",
                              "model.sequence_encoders")
        offsets: Dict[str, Tuple[int, int]] = {}
        start = 0
        for f in schema.sparse:
            offsets[f.name] = (start, f.dim)
            start += f.dim
        seq = {f.name: f for f in schema.sequence}
        self.names: List[str] = list(groups)
        self.max_len: Dict[str, int] = {g: fs[0].max_len for g, fs in groups.items()}
        self.members: Dict[str, List[str]] = {g: [f.name for f in fs] for g, fs in groups.items()}
        # per group: the target's parts, ("pooled", start, dim) or ("event", feature, dim)
        self.targets: Dict[str, List[Tuple[str, object, int]]] = {}
        self.encoders = nn.ModuleDict()
        out = 0
        for g, fs in groups.items():
            cfg = encoders.get(g, SequenceEncoderConfig())
            where = f"model.sequence_encoders.{g}"
            parts: List[Tuple[str, object, int]] = []
            for name in cfg.target:
                if name in offsets:
                    parts.append(("pooled", offsets[name][0], offsets[name][1]))
                elif name in seq and seq[name].max_len == 1 and not seq[name].aligned_with:
                    parts.append(("event", name, sum(f.dim for f in groups[name])))
                else:
                    raise ConfigError(f"{where}.target: {name!r} is neither a pooled sparse feature nor a sequence feature "
                                      "of max_len 1", f"{where}.target")
            self.targets[g] = parts
            enc = build_sequence_encoder(cfg, sum(f.dim for f in fs), sum(p[2] for p in parts), where)
            self.encoders[g] = enc
            out += enc.out_dim
        self.out_dims: List[int] = [self.encoders[g].out_dim for g in self.names]
        self.out_dim = out

    def forward(self, pooled: torch.Tensor, events: Dict[str, JaggedTensor]) -> torch.Tensor:
        first: Dict[str, torch.Tensor] = {}
        encoded: List[torch.Tensor] = []
        padded: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        for g in self.names:
            parts = [padded_events(events[f], self.max_len[g]) for f in self.members[g]]
            x = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts], dim=2)  # [B, L, Σ D]
            padded[g] = (x, parts[0][1])
            if self.max_len[g] == 1:
                first[g] = x[:, 0]  # [B, D]: a candidate declared as a sequence of one
        for g in self.names:
            x, mask = padded[g]
            target: Optional[torch.Tensor] = None
            if self.targets[g]:
                cols = [pooled[:, p[1]:p[1] + p[2]] if p[0] == "pooled" else first[p[1]] for p in self.targets[g]]  # type: ignore[misc]
                target = cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)  # [B, Dt]
            encoded.append(self.encoders[g](x, mask, target))
        return encoded[0] if len(encoded) == 1 else torch.cat(encoded, dim=1)  # [B, Σ out_g]
