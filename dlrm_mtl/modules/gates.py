"""Gates: softmax weights over experts; noisy and top-K masked variants (Shazeer et al. 2017)."""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dlrm_mtl.modules.softmax import softmax_last


def gate_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x W_g + b_g`` for G gates at once: ``x [B, in]`` (shared) or ``[G, B, in]`` (one input
    per gate) -> ``[B, G, E]``, with ``weight [G, in, E]``, ``bias [G, E]``.

    A shared input (2-D, or a stride-0 ``expand`` over the gates) is one ``addmm`` over the
    concatenated weights (bias fused); one input per gate is one ``baddbmm`` over the gate axis
    (a transposed view of it is returned).

    The product reads the weights *column-major* (``[G·E, in]`` in memory, as ``nn.Linear``
    stores them), from one small copy per step: with only E (or G·E) output columns, MKL's
    product with a row-major ``[in, E]`` right operand runs 2-3x slower, and autograd then
    computes the weight gradient as ``x.T @ grad`` (``[in, B] @ [B, E]``), which is up to 8x
    slower than the ``grad.T @ x`` it picks for a column-major operand (``docs/performance.md``,
    "Fifth round"). The parameters keep their ``[G, in, E]`` shape, so
    checkpoints are unchanged.
    """
    G, d, E = weight.shape
    if x.dim() == 2 or x.stride(0) == 0:
        shared = x if x.dim() == 2 else x[0]  # [B, in]
        w = weight.permute(0, 2, 1).contiguous().view(G * E, d).t()  # [in, G·E], column-major (one copy)
        return torch.addmm(bias.reshape(-1), shared, w).view(-1, G, E)
    w = weight.mT.contiguous().mT  # [G, in, E], each column-major (one copy)
    return torch.baddbmm(bias.unsqueeze(1), x, w).transpose(0, 1)


class SoftmaxGate(nn.Module):
    """G independent softmax gates over E experts: ``w_g(x) = softmax(W_g x + b_g)`` (MMoE, Ma et
    al. KDD 2018, eq. 6; PLE, Tang et al. RecSys 2020, eq. 3).

    The input is either shared by all gates, ``x [B, in]``, or one per gate, ``x [G, B, in]``
    (PLE: task k's gate reads task k's representation). Initialised like ``nn.Linear``.

    Example::

        gate = SoftmaxGate(32, num_gates=3, num_experts=4)
        gate(torch.randn(8, 32)).shape      # [8, 3, 4], sums to 1 over the last axis
        gate(torch.randn(3, 8, 32)).shape   # per-gate inputs: [8, 3, 4]
    """

    def __init__(self, in_dim: int, num_gates: int, num_experts: int) -> None:
        super().__init__()
        self.num_gates, self.num_experts = num_gates, num_experts
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(num_gates, in_dim, num_experts).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_gates, num_experts).uniform_(-bound, bound))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in]`` or ``[G, B, in]`` -> gate logits ``[B, G, E]``."""
        # one gate reads the shared input through gate_affine's addmm as well: its column-major
        # copy of W[0] gives the [1, in, E] parameter a gradient with the parameter's own strides
        # (a batched product over a gate axis of size 1 would not, and DDP would then warn "Grad
        # strides do not match bucket view strides" and copy the gradient every step)
        return gate_affine(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softmax_last(self.logits(x))  # [B, G, E]

    def input_map(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The gates' logits on a shared input as one affine map ``(weight [in, G·E], bias
        [G·E])``, gate after gate (for :func:`shared_input_affine` with the experts' layer 0)."""
        G, d, E = self.weight.shape
        return self.weight.permute(1, 0, 2).reshape(d, G * E), self.bias.reshape(-1)

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, G·E]`` logits of :meth:`input_map` -> the gate weights ``[B, G, E]`` (what
        ``forward`` returns for the same input, where :meth:`reads_logits_only`)."""
        return softmax_last(self._grouped(logits))

    def _grouped(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, G·E]`` -> ``[B, G, E]`` (a view)."""
        return logits.view(logits.shape[0], self.num_gates, self.num_experts)

    def reads_logits_only(self) -> bool:
        """Whether the gate weights are a function of :meth:`input_map`'s logits alone (not of
        another map of the input, as a noisy gate's noise scale in training)."""
        return True


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """KeepTopK of Shazeer et al. 2017 (eq. 5): the k largest entries of the last axis keep
    their value, the others become −∞, so a following softmax gives them exactly 0 and
    renormalises the kept ones to sum to 1. Exactly k entries are kept per row even under ties
    (``torch.topk`` picks k indices; the mask is built from the indices, not a threshold).

    Example::

        keep_top_k(torch.tensor([[1.0, 3.0, 2.0]]), 2)   # [[-inf, 3., 2.]]
    """
    E = logits.shape[-1]
    if not 1 <= k <= E:
        raise ValueError(f"top_k must be in [1, {E}] (the number of experts), got {k}")
    if k == E:
        return logits
    idx = logits.topk(k, dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, idx, True)
    return logits.masked_fill(~keep, float("-inf"))


class TopKGate(SoftmaxGate):
    """G softmax gates that keep only each row's ``top_k`` experts (Shazeer et al. 2017, eq. 3
    and 5 without the noise)::

        G(x) = softmax(KeepTopK(W_g x + b_g, k))

    The other experts' weights are exactly 0 and the kept ones sum to 1. Same API as
    :class:`SoftmaxGate` (``.logits()`` are the dense logits).

    Example::

        gate = TopKGate(32, num_gates=2, num_experts=4, top_k=2)
        w = gate(torch.randn(8, 32))       # [8, 2, 4], two non-zeros per row, rows sum to 1
    """

    def __init__(self, in_dim: int, num_gates: int, num_experts: int, top_k: int) -> None:
        super().__init__(in_dim, num_gates, num_experts)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}] (the number of experts), got {top_k}")
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softmax_last(keep_top_k(self.logits(x), self.top_k))  # [B, G, E]

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return softmax_last(keep_top_k(self._grouped(logits), self.top_k))


class NoisyGate(SoftmaxGate):
    """Noisy (top-K) gating of Shazeer et al. 2017, "Outrageously Large Neural Networks" (§2.1,
    eq. 3-5)::

        H(x)_i = (x W_g)_i + noise · N(0, 1) · softplus((x W_noise)_i)     (eq. 4)
        G(x)   = softmax(KeepTopK(H(x), k))                                 (eq. 3, 5)

    The noise is drawn only in training; in eval mode ``H(x) = x W_g`` and the gate equals the
    noiseless (top-K) softmax gate. ``top_k = 0`` keeps every expert (a dense noisy softmax
    gate). ``noise`` scales the learned noise (1 = the paper). ``W_noise`` starts at zero as
    in the paper (§2.1, "we initialize W_g and W_noise to zeros"; ``W_g`` keeps SoftmaxGate's
    initialisation so that the gates differ from the start). Deviation: the paper's
    load-balancing losses (importance / load, §4) are not included.

    Example::

        gate = NoisyGate(32, num_gates=2, num_experts=4, top_k=2)
        gate.train(); gate(torch.randn(8, 32))   # noisy, [8, 2, 4], two non-zeros per row
        gate.eval();  gate(torch.randn(8, 32))   # deterministic
    """

    def __init__(self, in_dim: int, num_gates: int, num_experts: int, top_k: int = 0, noise: float = 1.0) -> None:
        super().__init__(in_dim, num_gates, num_experts)
        if not 0 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [0, {num_experts}] (0 = all experts), got {top_k}")
        self.top_k, self.noise = top_k, noise
        self.noise_weight = nn.Parameter(torch.zeros(num_gates, in_dim, num_experts))
        self.noise_bias = nn.Parameter(torch.zeros(num_gates, num_experts))

    def noisy_logits(self, x: torch.Tensor) -> torch.Tensor:
        """H(x) ``[B, G, E]`` (eq. 4): logits plus noise in training, the plain logits in eval."""
        h = self.logits(x)  # [B, G, E]
        if not self.training or self.noise == 0:
            return h
        std = F.softplus(gate_affine(x, self.noise_weight, self.noise_bias))  # [B, G, E]
        # a contiguous [B, G, E] draw (h itself is a transposed view)
        return h + self.noise * torch.randn(h.shape, dtype=h.dtype, device=h.device) * std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.noisy_logits(x)
        if self.top_k:
            h = keep_top_k(h, self.top_k)
        return softmax_last(h)  # [B, G, E]

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        h = self._grouped(logits)
        return softmax_last(keep_top_k(h, self.top_k) if self.top_k else h)

    def reads_logits_only(self) -> bool:
        return not self.training or self.noise == 0  # training noise reads its own map of x


GATE_KINDS = ("softmax", "noisy", "topk")


def make_gate(kind: str, in_dim: int, num_gates: int, num_experts: int, top_k: int = 0, noise: float = 1.0) -> SoftmaxGate:
    """The gate named by ``LayerConfig.gate``: ``softmax`` | ``noisy`` (top_k 0 = dense) | ``topk``.

    Example::

        make_gate("topk", 32, num_gates=2, num_experts=4, top_k=1)   # a TopKGate
    """
    if kind == "softmax":
        return SoftmaxGate(in_dim, num_gates, num_experts)
    if kind == "noisy":
        return NoisyGate(in_dim, num_gates, num_experts, top_k=top_k, noise=noise)
    if kind == "topk":
        return TopKGate(in_dim, num_gates, num_experts, top_k=top_k)
    raise ValueError(f"unknown gate {kind!r}; known: {list(GATE_KINDS)}")
