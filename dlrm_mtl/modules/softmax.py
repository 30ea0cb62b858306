"""Softmax over a short last axis (gates, attention over a few inputs), vectorised across the rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# softmax_last: the column blocks of the leading-axis layout are padded to a multiple of this
# many floats, more than any CPU vector width, so that every column is in a full vector lane
_LANES = 64


def _vector_floats() -> int:
    """Floats per vector in PyTorch's CPU kernels (16 with AVX-512, else 8): its softmax over a
    last axis at least this long is vectorised along that axis (measured, ``[2048, 2, E]``
    forward + backward with AVX-512: E = 15 803 µs, E = 16 92 µs; with AVX2: E = 7 396 µs,
    E = 8 62 µs)."""
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


# softmax_last: axes longer than this take torch.softmax over the last axis as it is
SMALL_AXIS = _vector_floats() - 1


def softmax_last(x: torch.Tensor) -> torch.Tensor:
    """``softmax(x, dim=-1)`` for ``x [N, ..., E]``, computed on the CPU for a short last axis
    (E ≤ ``SMALL_AXIS``, 15 with AVX-512, else 7: every gate here, HiNet's SAN, AESM²'s
    selection, DUPN's attention over a short sequence) over the *leading* axis of an
    ``[E, N', ...]`` copy.

    PyTorch's CPU softmax over a last axis shorter than its vector width runs a row at a time (``[2048, 2,
    3]``: ~145 µs forward, ~140 µs backward); over the leading axis it vectorises across the
    rows (~10 µs each way) and the one transposing copy costs about as much again. The rows
    are padded to a multiple of ``_LANES`` so that every row is computed in a full vector
    lane: a vectorised ``exp`` rounds its scalar tail differently from its lanes, and without
    the padding which rows fall in the tail would depend on the batch size (a row's weights
    then move by ~6e-8 with the batch it comes in; tests/test_arch.py holds every row bit for
    bit independent of its batch). The result is copied back to a contiguous ``[N, ..., E]``
    (the mixtures' batched products read it faster so); its values equal ``torch.softmax``'s
    to float rounding (~3e-8). Other devices and longer axes: ``torch.softmax(x, dim=-1)``
    itself, and so is a symbolic batch size (``torch.export`` with a dynamic batch axis),
    where the padding would guard the exported program on ``N % _LANES``.

    Example::

        w = softmax_last(torch.randn(8, 2, 3))   # [8, 2, 3], sums to 1 over the last axis
    """
    n = x.shape[0]
    if (not x.is_cpu or x.shape[-1] > SMALL_AXIS or x.dim() < 2 or x.numel() == 0
            or not isinstance(n, int)):  # a symbolic batch (torch.export): no guard on N % _LANES
        return torch.softmax(x, dim=-1)
    pad = -n % _LANES
    moved = x.movedim(-1, 0)  # [E, N, ...] (a view)
    # one copy into the contiguous [E, N + pad, ...] layout: F.pad pads axis 1 (its last pair)
    y = F.pad(moved, [0, 0] * (moved.dim() - 2) + [0, pad]) if pad else moved.contiguous()
    return torch.softmax(y, dim=0)[:, :n].movedim(0, -1).contiguous()  # [N, ..., E]
