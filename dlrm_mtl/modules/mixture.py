"""The gated sum every mixture-of-experts layer ends with."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

from dlrm_mtl import native

# PyTorch's CPU bmm hands a batch of matrices whose contraction x rows x cols product is below
# 400 to a scalar fallback kernel instead of BLAS (measured here: a [1024, 1, 3] x [1024, 3, 128]
# bmm, forward + backward, takes 4.1 ms at one thread, the broadcast form below 0.5-0.7 ms).
# All three matmuls of a mixture (forward and both gradients) have the same product G·E·D.
SMALL_MIXTURE = 400


def mix_experts(gates: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """``out[..., g, :] = Σ_e gates[..., g, e] · experts[..., e, :]``.

    The combination step of MMoE (Ma et al. 2018, eq. 5: f^k(x) = Σ_i g^k(x)_i f_i(x)),
    CGC/PLE (Tang et al. 2020, eq. 2: g^k(x) = w^k(x) S^k(x)), HiNet's SEI and SAN, HMoE and
    AESM²: G gates' weights over E expert outputs of width D, per row. Leading (batch)
    dimensions broadcast.

    On the CPU with dlrm_mtl's C kernels (float32 ``[B, G, E]`` gates and ``[B, E, D]``
    experts, the layers' case) it is :class:`ExpertMixture`: one pass over each row forward and
    one backward. Otherwise small mixtures (``G·E·D < 400`` on CPU, e.g. CGC with 3 experts of
    width 128 and one gate) are a broadcast multiply and a sum over E, which autograd
    differentiates with elementwise kernels; larger ones, and every mixture on an accelerator,
    are one batched matmul. All compute the same sum (to float rounding).

    Args:
        gates: ``[..., G, E]``.
        experts: ``[..., E, D]``.

    Returns:
        ``[..., G, D]``.

    Example::

        g = torch.softmax(torch.randn(8, 2, 4), dim=-1)   # [B, G, E]
        e = torch.randn(8, 4, 16)                          # [B, E, D]
        mix_experts(g, e).shape                            # [8, 2, 16]
    """
    G, E, D = gates.shape[-2], gates.shape[-1], experts.shape[-1]
    if experts.shape[-2] != E:
        raise ValueError(f"{E} gate weights per row for {experts.shape[-2]} experts")
    if native.mixture_applies(gates, [experts]):
        return ExpertMixture.apply(gates, (G,), False, experts)
    if gates.is_cpu and G * E * D < SMALL_MIXTURE:
        return (gates.unsqueeze(-1) * experts.unsqueeze(-3)).sum(-2)  # [..., G, E, D] -> [..., G, D]
    return torch.matmul(gates, experts)


def mix_expert_parts(gates: torch.Tensor, parts: Sequence[torch.Tensor], sizes: Sequence[int],
                     relu: bool = False) -> List[torch.Tensor]:
    """:func:`mix_experts` over the experts of several banks (``parts [B, E_k, D]``, their
    experts in order: the expert axis of their concatenation), its ``[B, G, D]`` output split
    into ``sizes`` along G (``Σ sizes = G``) for different consumers.

    On the CPU with the C kernels (:class:`ExpertMixture`) the parts are read where they lie and
    each output block is a tensor of its own, so neither the parts' concatenation nor, in the
    backward, the concatenation of the blocks' gradients is made. ``relu``: the parts are their
    experts' pre-activations, which only this mixture reads, and the experts' last ReLU is
    applied here — inside the kernel's passes, with its backward (call it only where
    :func:`dlrm_mtl.native.mixture_runs_on` says the kernel will run; elsewhere the layer keeps
    its ReLU, and this falls back to ReLU, ``cat``, :func:`mix_experts` and ``split``).

    Example::

        g = torch.softmax(torch.randn(8, 3, 4), -1)                 # [B, G, E]: 2 task gates + a shared one
        a, b = torch.randn(8, 2, 16), torch.randn(8, 2, 16)        # two banks' outputs
        task, shared = mix_expert_parts(g, [a, b], [2, 1])         # [8, 2, 16], [8, 1, 16]
    """
    if native.mixture_applies(gates, parts):
        out = ExpertMixture.apply(gates, tuple(sizes), relu, *parts)
        return [out] if isinstance(out, torch.Tensor) else list(out)
    experts = parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=1)  # [B, E, D]
    if relu:
        experts = torch.relu(experts)
    y = mix_experts(gates, experts)  # [B, G, D]
    return [y] if len(sizes) == 1 else list(y.split(list(sizes), dim=1))


class ExpertMixture(torch.autograd.Function):
    """``ExpertMixture.apply(gates [B, G, E], sizes, relu, *parts [B, E_k, D]) -> [B, n, D]`` per
    ``n`` of ``sizes`` (one tensor where ``sizes`` has one entry): :func:`mix_expert_parts` (and
    :func:`mix_experts`) as two C passes over the rows (:func:`dlrm_mtl.native.mixture_forward`
    / :func:`~dlrm_mtl.native.mixture_backward`).

    PyTorch computes a mixture and both of its gradients as batched matmuls of B tiny
    matrices — per row a ``[G, E] x [E, D]``, ``[G, D] x [D, E]`` and ``[E, G] x [G, D]`` — which
    its CPU ``bmm`` runs either in a scalar fallback or as one small BLAS call per matrix: in
    MovieLens PLE's step (B = 2048, G ≤ 3, E ≤ 4, D = 64) its six mixture bmms took ~3 ms of a
    ~20 ms profiled step, one of them 2 ms (docs/performance.md, nineteenth round). Here each
    row's few kB stay in L1 and the rows are split over PyTorch's threads; the banks' outputs
    are read where they lie, the output blocks are tensors of their own, and with ``relu`` the
    experts' last ReLU and its backward happen inside the same passes. The same sums as the
    bmm (to float rounding; the dot products of the gates' gradient in 16 explicit partial
    sums), bit for bit the same whatever the thread count. Each part's gradient has the part's
    own layout (an expert-major ``[E, B, D]`` view gets an expert-major gradient). Not twice
    differentiable.
    """

    @staticmethod
    def forward(ctx, gates: torch.Tensor, sizes: Tuple[int, ...], relu: bool, *parts: torch.Tensor):
        ctx.save_for_backward(gates, *parts)
        ctx.relu = relu
        outs = native.mixture_forward(gates, parts, sizes, relu)
        return outs[0] if len(outs) == 1 else tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        gates, *parts = ctx.saved_tensors
        gw, gxs = native.mixture_backward(grads, gates, parts, ctx.relu, ctx.needs_input_grad[0],
                                          ctx.needs_input_grad[3:])
        return (gw, None, None, *gxs)
