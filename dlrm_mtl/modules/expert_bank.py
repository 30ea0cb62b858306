"""E MLP experts evaluated as one batched operation."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import nn

from dlrm_mtl.modules.folded_affine import folded_affine
from dlrm_mtl.modules.fused_affine import affine_act


class ExpertBank(nn.Module):
    """E independent MLP experts with stacked weights, evaluated without a Python loop over experts.

    Every expert is ``in_dim -> hidden... -> out_dim`` with ReLU after every layer (experts in
    MMoE/PLE/HiNet are ReLU MLPs). Layer 0 of all experts is a single ``[B, in] @ [in, E*h]``
    matmul; deeper layers are one batched matmul ``[E, B, h] x [E, h, k]`` (expert-major, so
    no copies between layers). The output is a ``[B, E, out]`` view of an expert-major tensor.

    Args:
        num_experts: E.
        in_dim: input features (shared by all experts).
        hidden: hidden sizes of each expert.
        out_dim: output size of each expert.

    Example::

        bank = ExpertBank(4, in_dim=32, hidden=[64], out_dim=16)
        bank(torch.randn(8, 32)).shape               # [8, 4, 16]
        bank(torch.randn(8, 32), start=2, count=2)   # experts 2 and 3 only: [8, 2, 16]
        bank(torch.randn(8, 4, 32)).shape            # expert e on input [:, e]: [8, 4, 16]
    """

    def __init__(self, num_experts: int, in_dim: int, hidden: List[int], out_dim: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.in_dim = in_dim
        self.out_dim = out_dim
        sizes = [in_dim] + list(hidden) + [out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(sizes[:-1], sizes[1:]):
            # He (Kaiming) uniform init: keeps activation variance through ReLU layers; the
            # nn.Linear default (bound 1/sqrt(in)) shrinks it ~6x per layer, which starves a
            # stack of scenario and task layers of signal.
            bound = math.sqrt(6.0 / a)
            self.weights.append(nn.Parameter(torch.empty(num_experts, a, b).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.zeros(num_experts, b)))

    def forward(self, x: torch.Tensor, start: int = 0, count: Optional[int] = None, last_relu: bool = True,
                fold: bool = False) -> torch.Tensor:
        """Experts ``start .. start+count-1`` (default all) -> ``[B, count, out]``.

        x: ``[B, in]`` (every expert sees the same input) or ``[B, count, in]`` (expert e sees
        ``x[:, e]``, e.g. PLE's task-specific experts on their task's input).

        Layer 0 with a shared input is one ``addmm`` over the concatenated weights ``[in, E·h]``
        (bias fused); every other layer is one ``baddbmm`` over the expert axis. A single expert
        on a shared input runs every layer as an ``addmm`` (CPU ``bmm`` is slower than ``mm``
        for the same product). ReLU runs in
        place on the fresh matmul outputs (no extra pass over memory); on float32 host tensors
        every layer is :func:`~dlrm_mtl.modules.fused_affine.affine_act` (the product, then the
        bias and ReLU in one pass; their backward in one pass). ``last_relu=False``: the
        last layer's pre-activations, for a consumer that applies the ReLU itself
        (:func:`dlrm_mtl.modules.mixture.mix_expert_parts`). ``fold=True`` (a caller for which
        this bank is ``x``'s one reader): a single expert's layer 0 on the world-of-one
        lookup's ``x`` runs through :func:`~dlrm_mtl.modules.folded_affine.folded_affine`
        (its backward by table row) where ``x`` carries the lookup's arguments.
        """
        E = self.num_experts - start if count is None else count
        weights, biases = list_params(self.weights), list_params(self.biases)
        if E == 1 and x.dim() == 2:  # one expert (Shared-Bottom): plain addmm per layer, not bmm
            h = x
            for i, (w, b, relu) in enumerate(zip(weights, biases, relu_flags(len(weights), last_relu))):
                w1 = w.view(w.shape[1], w.shape[2]) if w.shape[0] == 1 else w[start]  # [in, out]
                b1 = b.view(-1) if b.shape[0] == 1 else b[start]
                folded = folded_affine(h, [(w1, b1)], relu=[relu]) if fold and i == 0 else None
                if folded is not None:
                    h = folded[0]  # [B, out]
                    continue
                h = affine_act(h, w1, b1, relu)  # [B, out]
            return h.unsqueeze(1)  # [B, 1, out]
        if start == 0 and E == self.num_experts:
            return run_experts(weights, biases, x, last_relu=last_relu)
        return run_experts([w[start : start + E] for w in weights], [b[start : start + E] for b in biases], x,
                           last_relu=last_relu)


def list_params(plist: nn.ParameterList) -> List[nn.Parameter]:
    """A ``ParameterList``'s parameters as a plain list, in order, read from its parameter dict:
    ``list(plist)`` and ``plist[i]`` normalise the index and ``getattr`` each item (~4 µs an
    item on the development VM, measured; a shared-bottom step read ~16 items), this ~0.5 µs
    for the list."""
    return list(plist._parameters.values())  # type: ignore[arg-type]


def relu_flags(layers: int, last_relu: bool) -> List[bool]:
    """Whether each of ``layers`` layers is followed by its ReLU: every one, the last only
    where ``last_relu`` (else a consumer applies it)."""
    return [True] * (layers - 1) + [last_relu]


def first_layer_map(weights: List[torch.Tensor], biases: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Layer 0 of the experts of :func:`run_experts` on a shared input as one affine map:
    ``(weight [in, E·h], bias [E·h])`` (a copy of the stacked weights, expert after expert)."""
    w0, b0 = weights[0], biases[0]  # [E, in, h], [E, h]
    return w0.permute(1, 0, 2).reshape(w0.shape[1], -1), b0.reshape(-1)


def run_experts(weights: List[torch.Tensor], biases: List[torch.Tensor], x: torch.Tensor,
                first: Optional[torch.Tensor] = None, last_relu: bool = True) -> torch.Tensor:
    """The experts whose layer ``l`` has weights ``weights[l] [E, a, b]`` and biases
    ``biases[l] [E, b]`` on ``x [B, in]`` (shared) or ``[B, E, in]`` (expert e reads ``x[:, e]``)
    -> ``[B, E, out]``, ReLU after every layer (:class:`ExpertBank`'s computation; also the
    experts of several banks on one input at once, their stacked weights concatenated).

    ``first [B, E·h]``: layer 0's output on the shared input (after its ReLU, which a one-layer
    bank's ``last_relu=False`` leaves out), already computed (:func:`first_layer_map` with
    other maps of ``x``, :func:`shared_input_affine`); ``x`` is then not read. ``last_relu=False``: the last layer's output before its ReLU (a consumer
    applies it: :func:`dlrm_mtl.modules.mixture.mix_expert_parts`)."""
    w0, b0 = weights[0], biases[0]  # [E, in, h], [E, h]
    E = w0.shape[0]
    relu = relu_flags(len(weights), last_relu)
    if first is not None:
        if not relu[0] and len(weights) > 1:
            raise ValueError("run_experts: a precomputed first layer of a deeper bank is after its ReLU")
        h = first.view(first.shape[0], E, w0.shape[-1]).transpose(0, 1)  # [E, B, h] (a view)
    elif x.dim() == 2:
        w, b = first_layer_map(weights, biases)
        h = affine_act(x, w, b, relu[0])  # [B, E·h]
        h = h.view(x.shape[0], E, w0.shape[-1]).transpose(0, 1)  # [E, B, h] (a view)
    else:
        h = affine_act(x.transpose(0, 1), w0, b0, relu[0])  # [E, B, h]
    for l in range(1, len(weights)):
        h = affine_act(h, weights[l], biases[l], relu[l])  # [E, B, k]
    return h.transpose(0, 1)  # [B, E, out]
