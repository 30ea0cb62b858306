"""DUPN's behaviour-sequence encoder: an LSTM over the events, then attention pooling."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from dlrm_mtl.modules.softmax import softmax_last


class LSTMAttention(nn.Module):
    """The user-representation part of DUPN (Ni et al., KDD 2018, "Perceive Your Users in
    Depth: Learning Universal User Representations from Multiple E-commerce Tasks", §3): the
    behaviour sequence is read by an LSTM, and an attention net pools its hidden states into
    one vector, weighting each step by its relevance to a query. As we recall the paper's
    equations (§3.2-3.3; check numbering against the paper)::

        i_t = σ(W_i [x_t, h_{t-1}] + b_i)    f_t = σ(W_f [x_t, h_{t-1}] + b_f)
        o_t = σ(W_o [x_t, h_{t-1}] + b_o)    c_t = f_t ⊙ c_{t-1} + i_t ⊙ tanh(W_c [x_t, h_{t-1}] + b_c)
        h_t = o_t ⊙ tanh(c_t)                                             (LSTM layer)

        a_t = exp(s(h_t, q)) / Σ_τ exp(s(h_τ, q))                        (attention net)
        u   = Σ_t a_t h_t                                                 (user representation)

    Here ``s`` is an MLP over ``[h_t, q]`` with tanh hidden layers (``attention_hidden``) and a
    linear scalar output; the softmax runs over the real events only, so padding gets weight 0
    and ``u`` is a convex combination of the real ``h_t``; a row without events gives zeros.
    The query ``q`` is ``target`` (``[B, Dt]``, e.g. the candidate item) when the encoder is
    built with ``target_dim > 0``, and otherwise a learned vector of size H shared by all rows
    (attention that only learns which kinds of steps matter).

    Not here, and why:

    * DUPN's input layer embeds each behaviour as the item's embeddings (id, shop, brand,
      category, tags) plus behaviour properties (behaviour type, time), and feeds the
      properties to the attention net beside ``h_t``. Here all of these are columns of one
      event embedding (they arrive as part of D) and reach the attention only through ``h_t``.
    * DUPN's query is the user's search query together with the user profile; here it is
      whatever ``target`` the model passes (or the learned vector).
    * DUPN's multi-task layer (CTR, L2R, price preference, ... towers on top of ``u``) is the
      rest of this framework; this module only encodes the sequence.

    Args:
        event_dim: D, width of one event embedding (the LSTM's input).
        target_dim: Dt, width of the query; 0: no target, a learned query of size H.
        hidden_dim: H, the LSTM's hidden size (0: D).
        attention_hidden: sizes of the attention MLP's tanh hidden layers.

    Shapes: ``events [B, L, D]``, ``mask [B, L]`` bool (True = real event, left-aligned),
    ``target [B, Dt]`` or None -> ``[B, H]``; ``out_dim = H``. With ``target_dim == 0`` a passed
    ``target`` is ignored; with ``target_dim > 0`` it is required (a learned fallback query used
    only by some calls would be a parameter without gradient in the others, which DDP refuses).

    Example::

        dupn = LSTMAttention(event_dim=16, target_dim=8, hidden_dim=32)
        u = dupn(torch.randn(4, 10, 16), torch.rand(4, 10) > 0.5, torch.randn(4, 8))   # [4, 32]
    """

    def __init__(self, event_dim: int, target_dim: int, hidden_dim: int = 0, attention_hidden: Sequence[int] = (64,)) -> None:
        super().__init__()
        if event_dim <= 0 or target_dim < 0 or hidden_dim < 0:
            raise ValueError(f"LSTMAttention: need event_dim > 0, target_dim >= 0, hidden_dim >= 0; "
                             f"got {event_dim}, {target_dim}, {hidden_dim}")
        if any(h <= 0 for h in attention_hidden):
            raise ValueError(f"LSTMAttention: attention_hidden sizes must be > 0, got {list(attention_hidden)}")
        H = hidden_dim or event_dim
        self.event_dim = event_dim
        self.target_dim = target_dim
        self.hidden_dim = H
        self.out_dim = H
        self.lstm = nn.LSTM(event_dim, H, batch_first=True)
        self.query: Optional[nn.Parameter] = None
        if target_dim == 0:
            self.query = nn.Parameter(torch.randn(H) * H ** -0.5)
        width = H + (target_dim or H)
        layers: List[nn.Module] = []
        for h in attention_hidden:
            layers.append(nn.Linear(width, h))
            width = h
        self.layers = nn.ModuleList(layers)  # each followed by tanh
        self.out = nn.Linear(width, 1)

    def _query(self, events: torch.Tensor, mask: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        """Checks the inputs; -> ``q [B, Dq]``."""
        if events.dim() != 3 or events.shape[2] != self.event_dim:
            raise ValueError(f"LSTMAttention: events must be [B, L, {self.event_dim}], got {list(events.shape)}")
        if mask.shape != events.shape[:2]:
            raise ValueError(f"LSTMAttention: mask must be [B, L] = {list(events.shape[:2])}, got {list(mask.shape)}")
        B = events.shape[0]
        if self.query is not None:
            return self.query.to(events.dtype).unsqueeze(0).expand(B, -1)  # [B, H]
        if target is None:
            raise ValueError(f"LSTMAttention was built with target_dim={self.target_dim} and needs a target [B, {self.target_dim}]; got target=None")
        if target.shape != (B, self.target_dim):
            raise ValueError(f"LSTMAttention: target must be [B, {self.target_dim}] with B = {B}, got {list(target.shape)}")
        return target

    def _encode(self, events: torch.Tensor, mask: torch.Tensor, target: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> ``h [B, L, H]`` and the attention weights ``a [B, L]`` (0 at padding)."""
        q = self._query(events, mask, target)  # [B, Dq]
        m = mask.unsqueeze(2)  # [B, L, 1]
        events = events.masked_fill(~m, 0.0)  # padding content (even inf/NaN) reaches nothing
        # No packing: real events are left-aligned, and an LSTM is causal, so the steps it runs
        # over the padded tail come after every real step and cannot change h_t at a real
        # position; the tail's h_t get attention weight 0 below.
        h, _ = self.lstm(events)  # [B, L, H]
        x = torch.cat([h, q.unsqueeze(1).expand(-1, h.shape[1], -1)], dim=2)  # [B, L, H + Dq]
        for layer in self.layers:
            x = torch.tanh(layer(x))
        scores = self.out(x).squeeze(2)  # [B, L]
        # softmax over the real events; a row without any gets a finite uniform softmax here,
        # which the where() then zeroes (no -inf, so no NaN in values or gradients)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        a = torch.where(mask, softmax_last(scores), torch.zeros_like(scores))  # [B, L]
        return h, a

    def attention_weights(self, events: torch.Tensor, mask: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The softmax weights ``a [B, L]``: 0 at padding, summing to 1 over a row's real
        events (0 for a row without events)."""
        return self._encode(events, mask, target)[1]

    def forward(self, events: torch.Tensor, mask: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        h, a = self._encode(events, mask, target)
        return (a.unsqueeze(2) * h).sum(1)  # [B, H]
