"""Collectives on small host tensors (counters, metric sums, flags), on any backend."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _multi_rank() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_host(x: torch.Tensor) -> torch.Tensor:
    """Sum of a host tensor over ranks, returned on the host (NCCL only takes CUDA tensors, so
    under NCCL it goes to the GPU and back). A world of one returns ``x`` itself."""
    if not _multi_rank():
        return x
    y = x.to("cuda") if dist.get_backend() == "nccl" else x
    dist.all_reduce(y)
    return y.cpu()


def broadcast_host(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s host tensor on every rank (via the GPU under NCCL)."""
    if not _multi_rank():
        return x
    y = x.to("cuda") if dist.get_backend() == "nccl" else x
    dist.broadcast(y, src=src)
    return y.cpu()
