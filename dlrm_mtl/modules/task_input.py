"""How task layers read their input."""

from __future__ import annotations

from typing import Tuple

import torch


def split_task_input(x: torch.Tensor, num_tasks: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A task layer's input -> (per-task inputs ``[T, B, d]``, shared input ``[B, d]``).

    After a scenario layer the input is one representation ``[B, d]``, seen by every task.
    After another task layer it is ``[T, B, d]``: task t's gates and specific experts read
    ``x[t]``, shared experts read the mean over tasks (a layer that keeps a separate shared
    stream, such as PLE, stacks its levels internally instead).
    """
    if x.dim() == 2:
        return x.unsqueeze(0).expand(num_tasks, *x.shape), x
    if x.shape[0] != num_tasks:
        raise ValueError(f"task layer input has {x.shape[0]} task rows, expected {num_tasks}")
    return x, x.mean(dim=0)


def task_major_input(x: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """A task layer's input for an :class:`ExpertBank` with one expert per task (Cross-Stitch,
    sluice): ``[B, d]`` as it is (every task's expert reads it: the bank's one ``addmm``) or
    ``[T, B, d]`` -> ``[B, T, d]`` (expert t reads ``x[t]``)."""
    if x.dim() == 2:
        return x
    if x.shape[0] != num_tasks:
        raise ValueError(f"task layer input has {x.shape[0]} task rows, expected {num_tasks}")
    return x.transpose(0, 1)
