"""DIN's target attention over a behaviour sequence, with the Dice activation."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

ACTIVATIONS = ("dice", "prelu")


class Dice(nn.Module):
    """Dice, DIN's data-adaptive activation (Zhou et al., KDD 2018, §4.3, eq. 9-10)::

        p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + ε))
        f(s) = p(s) · s + (1 - p(s)) · α · s

    per unit: ``E[s]``, ``Var[s]`` are the batch mean and (biased) variance in training and
    running estimates in eval, as in a BatchNorm without affine parameters (gradients flow
    through the batch statistics, as with BatchNorm); ``α`` is learned per unit (initialised to
    0 as in the authors' code, so Dice starts as a smooth ReLU-like gate).

    With ``mask`` the statistics are taken over the real events only, so the amount of padding
    in a batch does not shift them (the authors' code takes them over padded positions too).
    A training batch with no real event leaves the running estimates unchanged; the running
    variance is updated with the unbiased estimate, like :class:`torch.nn.BatchNorm1d`.

    ``x [..., H]``, optional ``mask [...]`` bool -> ``[..., H]``.

    Example::

        dice = Dice(40)
        y = dice(torch.randn(8, 10, 40), torch.rand(8, 10) > 0.3)   # [8, 10, 40]
    """

    def __init__(self, num_features: int, eps: float = 1e-8, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.alpha = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.training:
            flat = x.reshape(-1, self.num_features)  # [N, H]
            if mask is None:
                m = torch.ones(flat.shape[0], 1, dtype=x.dtype, device=x.device)
            else:
                m = mask.reshape(-1, 1).to(x.dtype)  # [N, 1]
            n = m.sum()
            mean = (flat * m).sum(0) / n.clamp(min=1.0)  # [H]
            var = ((flat - mean) * m).pow(2).sum(0) / n.clamp(min=1.0)  # [H], biased
            with torch.no_grad():
                # no host sync: an empty batch updates with weight 0
                weight = self.momentum * (n > 0).to(x.dtype)
                unbiased = var * n / (n - 1).clamp(min=1.0)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), weight.to(self.running_mean.dtype))
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), weight.to(self.running_var.dtype))
        else:
            mean, var = self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
        p = torch.sigmoid((x - mean) / torch.sqrt(var + self.eps))
        return x * (p + (1.0 - p) * self.alpha)


class PReLU(nn.Module):
    """``f(s) = max(s, 0) + α · min(s, 0)`` with ``α`` learned per unit of the LAST dimension
    (:class:`torch.nn.PReLU` takes dimension 1 as the channel, which for ``[B, L, H]`` is L).
    ``mask`` is accepted for the same call as :class:`Dice` and ignored.

    Example::

        act = PReLU(40)
        y = act(torch.randn(8, 10, 40))   # [8, 10, 40]
    """

    def __init__(self, num_features: int, init: float = 0.25) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((num_features,), init))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x.clamp(min=0) + self.alpha * x.clamp(max=0)


class TargetAttention(nn.Module):
    """DIN's target attention (Zhou et al., KDD 2018, "Deep Interest Network for Click-Through
    Rate Prediction", §4.3): each past event ``e_j`` of the user's behaviour sequence is weighted
    by a local activation unit that reads it together with the candidate ``v_A``, and the user's
    interest in the candidate is the weighted SUM of the events (eq. 3)::

        x_j      = [e_j, v_A, e_j - v_A, e_j ⊙ v_A]                      [4D]
        a_j      = w_o^T g_K(... g_1(W_1 x_j + b_1) ...) + b_o               scalar
        v_U(A)   = Σ_j m_j · a_j · e_j                                      [D]

    with ``g_k`` Dice (eq. 9-10) or PReLU and ``m_j`` the mask. As the paper stresses, the
    weights are NOT normalised by a softmax (``Σ_j a_j`` need not be 1): their total keeps the
    intensity of the user's interest, so a history with twice as many relevant events gives a
    representation twice as large. Padding events get weight 0; a row without events gives
    zeros.

    The activation unit's input: the paper's Fig. 2 feeds the two embeddings and their "out
    product"; we use ``[e_j, v_A, e_j - v_A, e_j ⊙ v_A]``, the form of the authors' released code.
    The element-wise product is the diagonal of the outer product (D inputs instead of D², so
    the first layer stays small), and the difference gives the MLP the distance between the
    event and the candidate directly, which it would otherwise have to learn from the two
    embeddings.

    Deviation: the paper's event and candidate embeddings share one embedding space (the same
    item/shop/category tables). When ``target_dim != event_dim`` the target is first projected
    to ``event_dim`` by a bias-free linear map ``v_A = P t``, learned jointly; with equal
    widths it is used as is. ``P`` starts as the identity on the leading columns when the
    target is narrower (``[I; 0]``): a target whose parts share the tables of the events'
    leading parts (the candidate's item and category next to the events' item, category and
    age) starts in the paper's shared space, e ⊙ v comparing like with like.

    Dice's statistics are taken over the real events of the batch (padding excluded).

    Args:
        event_dim: D, width of one event embedding.
        target_dim: Dt, width of the candidate's embedding.
        hidden: sizes of the activation unit's hidden layers (paper: 80, 40).
        activation: ``"dice"`` or ``"prelu"``.

    Shapes: ``events [B, L, D]``, ``mask [B, L]`` bool (True = real event, left-aligned),
    ``target [B, Dt]`` -> ``[B, D]``; ``out_dim = D``.

    Example::

        din = TargetAttention(event_dim=16, target_dim=16)
        v = din(torch.randn(4, 10, 16), torch.rand(4, 10) > 0.5, torch.randn(4, 16))   # [4, 16]
    """

    def __init__(self, event_dim: int, target_dim: int, hidden: Sequence[int] = (80, 40), activation: str = "dice") -> None:
        super().__init__()
        if event_dim <= 0 or target_dim <= 0:
            raise ValueError(f"TargetAttention: event_dim and target_dim must be > 0, got {event_dim}, {target_dim}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"TargetAttention: activation {activation!r}: expected one of {', '.join(ACTIVATIONS)}")
        if any(h <= 0 for h in hidden):
            raise ValueError(f"TargetAttention: hidden sizes must be > 0, got {list(hidden)}")
        self.event_dim = event_dim
        self.target_dim = target_dim
        self.out_dim = event_dim
        self.target_proj: nn.Module = nn.Identity() if target_dim == event_dim else nn.Linear(target_dim, event_dim, bias=False)
        if 0 < target_dim < event_dim:
            with torch.no_grad():  # [I; 0]: the target's columns onto the events' leading ones
                self.target_proj.weight.copy_(torch.eye(event_dim, target_dim))  # type: ignore[union-attr]
        layers: List[nn.Module] = []
        activations: List[nn.Module] = []
        width = 4 * event_dim
        for h in hidden:
            layers.append(nn.Linear(width, h))
            activations.append(Dice(h) if activation == "dice" else PReLU(h))
            width = h
        self.layers = nn.ModuleList(layers)
        self.activations = nn.ModuleList(activations)
        self.out = nn.Linear(width, 1)

    def _check(self, events: torch.Tensor, mask: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        if target is None:
            raise ValueError("TargetAttention needs a target (the candidate's embedding [B, target_dim]); got target=None")
        if events.dim() != 3 or events.shape[2] != self.event_dim:
            raise ValueError(f"TargetAttention: events must be [B, L, {self.event_dim}], got {list(events.shape)}")
        if mask.shape != events.shape[:2]:
            raise ValueError(f"TargetAttention: mask must be [B, L] = {list(events.shape[:2])}, got {list(mask.shape)}")
        if target.shape != (events.shape[0], self.target_dim):
            raise ValueError(f"TargetAttention: target must be [B, {self.target_dim}] with B = {events.shape[0]}, got {list(target.shape)}")
        return target

    def _weights(self, events: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``events`` already zeroed at padding; -> ``a [B, L]``, 0 at padding."""
        v = self.target_proj(target).unsqueeze(1).expand_as(events)  # [B, L, D]
        x = torch.cat([events, v, events - v, events * v], dim=2)  # [B, L, 4D]
        for layer, act in zip(self.layers, self.activations):
            x = act(layer(x), mask)  # [B, L, h]
        scores = self.out(x).squeeze(2)  # [B, L]
        return scores.masked_fill(~mask, 0.0)

    def attention_weights(self, events: torch.Tensor, mask: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        """The unnormalised weights ``a [B, L]`` of eq. 3 (0 at padding). In training mode this
        updates Dice's running statistics, as :meth:`forward` does."""
        target = self._check(events, mask, target)
        events = events.masked_fill(~mask.unsqueeze(2), 0.0)
        return self._weights(events, mask, target)

    def forward(self, events: torch.Tensor, mask: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        target = self._check(events, mask, target)
        # zero the padding first: whatever it holds (even inf/NaN) then reaches neither the
        # output nor the gradients
        events = events.masked_fill(~mask.unsqueeze(2), 0.0)  # [B, L, D]
        a = self._weights(events, mask, target)  # [B, L]
        return (a.unsqueeze(2) * events).sum(1)  # [B, D]
