"""The gated sum every mixture-of-experts layer ends with."""

from __future__ import annotations

import torch

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

    Small mixtures (``G·E·D < 400`` on CPU, e.g. CGC with 3 experts of width 128 and one gate)
    are computed as a broadcast multiply and a sum over E, which autograd differentiates with
    elementwise kernels; larger ones, and every mixture on an accelerator, are one batched
    matmul. Both compute the same sum (to float rounding).

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
    if gates.device.type == "cpu" and G * E * D < SMALL_MIXTURE:
        return (gates.unsqueeze(-1) * experts.unsqueeze(-3)).sum(-2)  # [..., G, E, D] -> [..., G, D]
    return torch.matmul(gates, experts)
