"""Asymmetric sharing: one bottom network per task, bottoms feeding each other along a DAG of tasks."""

from __future__ import annotations

import heapq
from typing import ClassVar, Dict, List, Optional, Self, Sequence, Tuple

import torch
from torch import nn

from dlrm_mtl.config import ConfigError, LayerConfig
from dlrm_mtl.modules.expert_bank import ExpertBank
from dlrm_mtl.modules.layer_output import LayerOutput
from dlrm_mtl.modules.layer_config import LayerDims
from dlrm_mtl.modules.task_input import split_task_input


def _cycle(num_nodes: int, edges: Sequence[Tuple[int, int]]) -> Optional[List[int]]:
    """One directed cycle of the graph as a node path ``[a, b, ..., a]``, or None (iterative DFS,
    children in edge order)."""
    children: Dict[int, List[int]] = {n: [] for n in range(num_nodes)}
    for p, c in edges:
        children[p].append(c)
    state = [0] * num_nodes  # 0 unseen, 1 on the current path, 2 done
    for root in range(num_nodes):
        if state[root]:
            continue
        path, stack = [root], [iter(children[root])]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            elif state[nxt] == 0:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(children[nxt]))
    return None


def task_dag_order(num_tasks: int, edges: Sequence[Tuple[int, int]]) -> List[int]:
    """The tasks in an order where every parent comes before its children (Kahn's algorithm;
    among the tasks ready at a step, the lowest index first, so the order is deterministic).

    ``edges``: ``(parent, child)`` task indices. Raises ValueError on an index out of range, a
    self-edge, a repeated edge or a cycle (the message names the cycle).

    Example::

        task_dag_order(3, [(2, 0)])   # [1, 2, 0]: 1 and 2 are ready first, 0 waits for 2
    """
    seen = set()
    for p, c in edges:
        if not (0 <= p < num_tasks and 0 <= c < num_tasks):
            raise ValueError(f"edge ({p}, {c}) names a task outside 0..{num_tasks - 1}")
        if p == c:
            raise ValueError(f"edge ({p}, {c}) is a self-edge")
        if (p, c) in seen:
            raise ValueError(f"edge ({p}, {c}) is given twice")
        seen.add((p, c))
    cycle = _cycle(num_tasks, edges)
    if cycle is not None:
        raise ValueError(f"edges form a cycle: {' -> '.join(map(str, cycle))}")
    indegree = [0] * num_tasks
    for _, c in edges:
        indegree[c] += 1
    ready = [t for t in range(num_tasks) if indegree[t] == 0]
    heapq.heapify(ready)
    order: List[int] = []
    while ready:
        t = heapq.heappop(ready)
        order.append(t)
        for p, c in edges:
            if p == t:
                indegree[c] -= 1
                if indegree[c] == 0:
                    heapq.heappush(ready, c)
    return order


def check_task_edges(edges: Sequence[Sequence[str]]) -> None:
    """The edge list of a config on its own (no task names needed): every edge is a
    ``[parent, child]`` pair, no self-edge, no repeated edge, no cycle. Raises ValueError with
    a one-line message naming the offending edge or the cycle."""
    index: Dict[str, int] = {}
    seen = set()
    for e in edges:
        if len(e) != 2:
            raise ValueError(f"an edge is a [parent, child] pair of task names, got {list(e)}")
        p, c = e
        if p == c:
            raise ValueError(f"edge [{p}, {c}] is a self-edge")
        if (p, c) in seen:
            raise ValueError(f"edge [{p}, {c}] is given twice")
        seen.add((p, c))
        index.setdefault(p, len(index))
        index.setdefault(c, len(index))
    names = list(index)
    cycle = _cycle(len(names), [(index[p], index[c]) for p, c in edges])
    if cycle is not None:
        raise ValueError("edges form a cycle: " + " -> ".join(names[i] for i in cycle))


def resolve_task_edges(edges: Sequence[Sequence[str]], task_names: Sequence[str]) -> List[Tuple[int, int]]:
    """``[[parent, child], ...]`` by task name -> ``(parent, child)`` task indices, checked with
    :func:`check_task_edges`; a name that is not in ``task_names`` is a ValueError naming it.

    Example::

        resolve_task_edges([["ctr", "cvr"]], ["ctr", "cvr"])   # [(0, 1)]
    """
    check_task_edges(edges)
    for e in edges:
        for n in e:
            if n not in task_names:
                raise ValueError(f"edge [{e[0]}, {e[1]}]: {n!r} is not a task of the schema {list(task_names)}")
    return [(list(task_names).index(p), list(task_names).index(c)) for p, c in edges]


class AsymmetricLayer(nn.Module):
    """Asymmetric sharing (Tang et al., PLE, RecSys 2020, §3, fig. 1b): one bottom network per
    task; a task's bottom *also* reads the bottom outputs of its parent tasks along a
    configured DAG of tasks, so one task's representation is shared with another in one
    direction only.

    **How a parent enters its child**: task j's bottom input is its own input concatenated
    with the bottom outputs of its parents, parents in ascending task index::

        h_j = f_j([x_j ; h_p1 ; h_p2 ; ...])      p1 < p2 < ... the parents of j
        y_j = h_j                                   (tasks without parents: h_j = f_j(x_j))

    ``f_j`` is a ReLU MLP ``in_dim + (#parents)·out_dim -> hidden... -> out_dim`` (ReLU after
    every layer, He init, as every expert here). Tasks run in :func:`task_dag_order`, so a
    grandparent reaches a grandchild through the parent's output. Of the combinations the paper
    lists (concatenation, sum-pooling, average-pooling) this is concatenation, at the child's
    bottom *input*, so the child's own network transforms the parent's features: it keeps the
    child's own features and the parent's apart, and the edge is the only difference from
    ``separate`` networks (no edges: T separate bottoms).

    **Gradients flow from child to parent**: ``h_p`` enters ``f_j`` without ``detach()``, so the
    child's loss also trains the parent's bottom (the figure's shared connection is an ordinary
    layer connection); the parent's output never depends on the child's parameters.

    ``x [B, d]`` (every task reads it) or ``[T, B, d]`` (task t reads ``x[t]``) -> ``y [T, B, d']``;
    no gates, no auxiliary loss. ``edges``: ``(parent, child)`` task indices (the config names
    tasks; :func:`resolve_task_edges` maps names to indices).

    Example::

        layer = AsymmetricLayer(32, num_tasks=2, edges=[(0, 1)], hidden=[], out_dim=16)  # ctr -> cvr
        layer(torch.randn(8, 32)).y.shape   # [2, 8, 16]; cvr's bottom read [x ; h_ctr] (48 features)
    """

    CONFIG_FIELDS: ClassVar[Tuple[str, ...]] = ("edges", "hidden", "out_dim")
    reads_context: ClassVar[bool] = False  # ``context`` (the scenario embeddings) is not read

    @classmethod
    def from_config(cls, cfg: LayerConfig, dims: LayerDims, where: str = "layer") -> Self:
        """The ``asymmetric`` task layer of ``cfg``: its ``edges`` name ``dims.task_names``
        (without names, the tasks are "0", "1", ...); an edge list that is not a DAG of those
        names is a ConfigError naming ``where.edges``."""
        try:
            edges = resolve_task_edges(cfg.edges, dims.task_name_list())
        except ValueError as e:
            raise ConfigError(f"{where}.edges: type {cfg.type}: {e}", f"{where}.edges") from None
        return cls(dims.in_dim, dims.num_tasks, edges, cfg.hidden, cfg.out_dim)

    def __init__(self, in_dim: int, num_tasks: int, edges: Sequence[Tuple[int, int]], hidden: List[int], out_dim: int) -> None:
        super().__init__()
        self.num_tasks, self.out_dim = num_tasks, out_dim
        self.edges = [(int(p), int(c)) for p, c in edges]
        self.order = task_dag_order(num_tasks, self.edges)  # parents before children
        self.parents: List[List[int]] = [sorted(p for p, c in self.edges if c == t) for t in range(num_tasks)]
        # one single-expert bank per task (their input widths differ with the parent count)
        self.bottoms = nn.ModuleList(ExpertBank(1, in_dim + len(self.parents[t]) * out_dim, hidden, out_dim) for t in range(num_tasks))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> LayerOutput:
        task_in, _ = split_task_input(x, self.num_tasks)  # [T, B, d]
        outs: List[Optional[torch.Tensor]] = [None] * self.num_tasks
        for t in self.order:
            parts = [task_in[t]] + [outs[p] for p in self.parents[t]]  # x_t, then h_p per parent: [B, d], [B, d']...
            inp = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # [B, d + #parents·d']
            outs[t] = self.bottoms[t](inp).squeeze(1)  # [B, d']
        return LayerOutput(torch.stack(outs))  # type: ignore[arg-type]  # [T, B, d']
