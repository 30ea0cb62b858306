"""Behaviour-sequence encoders: ``[B, L, D]`` events + ``[B, L]`` mask (+ a ``[B, Dt]`` target)
-> ``[B, out_dim]``, selected per sequence feature by ``model.sequence_encoders``."""

from __future__ import annotations

from typing import Dict, Tuple

from torch import nn

from dlrm_mtl.config import ConfigError, SequenceEncoderConfig
from dlrm_mtl.modules.sequence.mean import MeanPooling

SEQUENCE_ENCODERS: Tuple[str, ...] = ("mean", "target_attention", "lstm_attention")
# the fields each type reads; the others must keep their defaults
ENCODER_FIELDS: Dict[str, Tuple[str, ...]] = {
    "mean": (),
    "target_attention": ("target", "hidden"),
    "lstm_attention": ("target", "hidden", "lstm_dim"),
}


def build_sequence_encoder(cfg: SequenceEncoderConfig, event_dim: int, target_dim: int, where: str) -> nn.Module:
    """The encoder ``cfg.type`` for events of width ``event_dim`` and a target of width
    ``target_dim`` (0: no target); ``where`` names the config entry in errors."""
    if cfg.type not in SEQUENCE_ENCODERS:
        raise ConfigError(f"{where}.type {cfg.type!r}: expected one of {', '.join(SEQUENCE_ENCODERS)}", f"{where}.type")
    default = SequenceEncoderConfig()
    for name in ("target", "hidden", "lstm_dim"):
        if name not in ENCODER_FIELDS[cfg.type] and getattr(cfg, name) != getattr(default, name):
            raise ConfigError(f"{where}.{name}: {cfg.type} does not read it (it reads {list(ENCODER_FIELDS[cfg.type]) or 'nothing'})",
                              f"{where}.{name}")
    if any(h <= 0 for h in cfg.hidden):
        raise ConfigError(f"{where}.hidden: sizes must be > 0, got {cfg.hidden}", f"{where}.hidden")
    if cfg.type == "mean":
        return MeanPooling(event_dim)
    if cfg.type == "target_attention":
        from dlrm_mtl.modules.sequence.target_attention import TargetAttention

        if target_dim == 0:
            raise ConfigError(f"{where}.target: target_attention needs the candidate's features (e.g. [item_id])", f"{where}.target")
        return TargetAttention(event_dim, target_dim, hidden=list(cfg.hidden))
    from dlrm_mtl.modules.sequence.lstm_attention import LSTMAttention

    if cfg.lstm_dim < 0:
        raise ConfigError(f"{where}.lstm_dim: must be >= 0, got {cfg.lstm_dim}", f"{where}.lstm_dim")
    return LSTMAttention(event_dim, target_dim, hidden_dim=cfg.lstm_dim, attention_hidden=list(cfg.hidden))


__all__ = ["MeanPooling", "SEQUENCE_ENCODERS", "build_sequence_encoder"]
