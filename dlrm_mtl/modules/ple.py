"""Progressive Layered Extraction: CGC extraction networks, stacked."""

from __future__ import annotations

from typing import ClassVar, Dict, List, Optional, Self, Tuple

import torch
from torch import nn

from dlrm_mtl import native
from dlrm_mtl.config import LayerConfig
from dlrm_mtl.modules.expert_bank import ExpertBank, first_layer_map, list_params, relu_flags, run_experts
from dlrm_mtl.modules.folded_affine import foldable, folded_affine
from dlrm_mtl.modules.gates import SoftmaxGate
from dlrm_mtl.modules.layer_output import LayerOutput
from dlrm_mtl.modules.layer_config import LayerDims
from dlrm_mtl.modules.task_input import split_task_input
from dlrm_mtl.modules.mixture import mix_expert_parts


class ExtractionNetwork(nn.Module):
    """One extraction network of PLE (Tang et al., RecSys 2020, §4.3, Fig. 5).

    Task k's gate reads task k's input and mixes the shared experts and task k's own experts
    only (CGC, eq. 2-4)::

        g^k(x) = w^k(x_k) · S^k(x),   w^k(x_k) = softmax(W_g^k x_k),
        S^k = [E_(k,1) .. E_(k,m_k), E_(s,1) .. E_(s,m_s)]

    Shared experts read the shared input and task k's experts read task k's input. With
    ``shared_gate`` (every level of PLE but the last, eq. 5) a further gate on the shared input
    mixes *all* experts into the next level's shared input.

    ``task_in [T, B, d]``, ``shared_in [B, d]`` -> ``task_out [T, B, d']``, ``shared_out [B, d']``
    (or None) and the gates ``{"task": [B, T, E_sh + E_sp], "shared": [B, 1, E_sh + T·E_sp]}``.
    Shared experts come first in every gate's expert axis.

    Computation (same sums as eq. 2, to float rounding): every expert's output sits once in one
    pool ``[B, E_sh + T·E_sp, d']``; each task's gate weights are spread over that pool with 0
    on the other tasks' experts (:meth:`spread`), and all T task mixtures plus the shared one are
    a single product ``[B, T (+1), E_all] x [B, E_all, d']``. Where every task reads the shared
    input (level 0) the shared and task experts run as one bank over their concatenated weights,
    which writes the pool at once. On the CPU with the C kernels that product is
    :func:`~dlrm_mtl.modules.mixture.mix_expert_parts`: it reads the banks' outputs where they
    lie (no ``cat`` of the pool), writes the task and shared mixtures as tensors of their own
    (no ``cat`` of their gradients) and applies the experts' last ReLU and its backward in its
    own passes (the banks skip it) — the same values to float rounding. Building each task's expert set
    ``S^k`` instead (a ``[B, T, E, d']`` copy, then a broadcast product and a sum) made PLE's
    mixtures cost more than its expert layers on CPU (``docs/performance.md``).
    """

    def __init__(
        self, in_dim: int, num_tasks: int, num_shared: int, num_specific: int, hidden: List[int], out_dim: int, shared_gate: bool
    ) -> None:
        super().__init__()
        if num_shared + num_specific <= 0:
            raise ValueError("an extraction network needs at least one expert per task")
        if shared_gate and num_shared <= 0:
            raise ValueError("PLE's shared gate needs shared experts (num_shared > 0)")
        self.num_tasks, self.num_shared, self.num_specific, self.out_dim = num_tasks, num_shared, num_specific, out_dim
        self.shared = ExpertBank(num_shared, in_dim, hidden, out_dim) if num_shared else None
        self.specific = ExpertBank(num_tasks * num_specific, in_dim, hidden, out_dim) if num_specific else None
        # both kinds of expert on one shared input are computed as one bank (same layer sizes);
        # two experts in all (one task) keep their banks' single-expert addmm path
        self._fuse_pool = bool(self.shared is not None and self.specific is not None
                               and self.shared.num_experts + self.specific.num_experts > 2)
        # one expert per task (the separate-network baseline): nothing to gate
        self.task_gate = SoftmaxGate(in_dim, num_tasks, num_shared + num_specific) if num_shared + num_specific > 1 else None
        self.shared_gate = SoftmaxGate(in_dim, 1, num_shared + num_tasks * num_specific) if shared_gate else None

    def forward(self, task_in: torch.Tensor, shared_in: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        T, B, _ = task_in.shape
        # every task reads the shared input (level 0: task_in is its stride-0 expand): the task
        # experts and gates read shared_in itself, one addmm each over all of them (indexing the
        # expand would make its backward fill and sum a [T, B, d] gradient)
        same = task_in.stride(0) == 0
        # the C mixture takes the banks' outputs where they lie, and their last ReLU with its
        # backward (mix_expert_parts); elsewhere the banks apply it and the pool is one tensor
        fused = self._mixes_in_c(shared_in)
        relu = not fused
        pool: List[torch.Tensor] = []  # parts of [B, E_all, d']: shared experts, then each task's own
        # on the lookup's own input, the experts' first layer and the gates' logits as one map
        # whose backward folds the lookup's (the level is x's one reader)
        folded = self._folded_first(shared_in, relu) if same else None
        if folded is not None:
            pool.append(folded[0])  # [B, E_sh + T·E_sp, d']
        elif same and self._fuses_pool():
            # shared and task experts on the one input: one bank's computation over their
            # concatenated weights writes the whole pool (no cat of the two outputs)
            pool.append(run_experts([torch.cat([a, b]) for a, b in zip(list_params(self.shared.weights), list_params(self.specific.weights))],
                                    [torch.cat([a, b]) for a, b in zip(list_params(self.shared.biases), list_params(self.specific.biases))],
                                    shared_in, last_relu=relu))  # [B, E_sh + T·E_sp, d']
        else:
            kw = {} if relu else {"last_relu": False}
            if self.shared is not None:
                pool.append(self.shared(shared_in, **kw))  # [B, E_sh, d']
            if self.specific is not None:
                if same:
                    pool.append(self.specific(shared_in, **kw))  # [B, T·E_sp, d']
                else:  # one expert per task reads task_in as it is (a view; repeat_interleave would copy it)
                    sp_in = task_in.transpose(0, 1)  # [B, T, d]
                    if self.num_specific > 1:
                        sp_in = sp_in.repeat_interleave(self.num_specific, dim=1)  # [B, T·E_sp, d]
                    pool.append(self.specific(sp_in, **kw))  # [B, T·E_sp, d']
        gate_in = shared_in if same else task_in
        gates: Dict[str, torch.Tensor] = {}
        if self.task_gate is not None:
            gates["task"] = self.task_gate(gate_in) if folded is None else self.task_gate.from_logits(folded[1])  # [B, T, E_sh + E_sp]
            weights = self.spread(gates["task"])  # [B, T, E_all]
        elif self.num_shared == 0:  # one expert per task, nothing shared: each task's own output
            gates["task"] = task_in.new_ones(B, T, 1)
            experts = pool[0] if len(pool) == 1 else torch.cat(pool, dim=1)  # [B, E_all, d'] (after ReLU: not fused)
            return experts.transpose(0, 1), None, gates  # [T, B, d']
        else:  # one shared expert and no task experts: every task gets it
            gates["task"] = task_in.new_ones(B, T, 1)
            weights = gates["task"]
        sizes = [T]
        if self.shared_gate is not None:
            gates["shared"] = self.shared_gate(shared_in) if folded is None else self.shared_gate.from_logits(folded[2])  # [B, 1, E_all]
            weights = torch.cat([weights, gates["shared"]], dim=1)  # [B, T + 1, E_all]
            sizes.append(1)
        # every task's and the shared mixture at once, [B, T, d'] (and [B, 1, d']): output blocks
        # of their own (a split's backward would be one cat of the two gradients; a slice and a
        # select each fill a zero [B, T + 1, d'] gradient, which autograd then adds)
        mixed = mix_expert_parts(weights, pool, sizes, relu=fused)
        if self.shared_gate is None:
            return mixed[0].transpose(0, 1), None, gates  # [T, B, d']
        return mixed[0].transpose(0, 1), mixed[1].squeeze(1), gates  # [T, B, d'], [B, d']

    def _folded_first(self, x: torch.Tensor, relu: bool) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """On the world-of-one lookup's ``x`` (its :class:`~dlrm_mtl.modules.folded_affine.InputFold`),
        for a level whose banks run as one: ``(pool [B, E_all, d'], task gate logits, shared
        gate logits)`` from one :func:`~dlrm_mtl.modules.folded_affine.folded_affine` of the
        experts' first layer and the gates' maps (a gate that is absent: an empty logits
        tensor); None where the fold does not apply (the separate products then run)."""
        if foldable(x) is None or not self._fuses_pool():  # (evaluation: no concatenations made twice)
            return None
        gate_maps = [g for g in (self.task_gate, self.shared_gate) if g is not None]
        if not all(type(g) is SoftmaxGate for g in gate_maps):
            return None
        assert self.shared is not None and self.specific is not None
        weights = [torch.cat([a, b]) for a, b in zip(list_params(self.shared.weights), list_params(self.specific.weights))]
        biases = [torch.cat([a, b]) for a, b in zip(list_params(self.shared.biases), list_params(self.specific.biases))]
        maps = [first_layer_map(weights, biases)] + [g.input_map() for g in gate_maps]
        outs = folded_affine(x, maps, relu=[relu_flags(len(weights), relu)[0]])
        if outs is None:
            return None
        part = run_experts(weights, biases, x, first=outs[0], last_relu=relu)
        rest = iter(outs[1:])
        empty = x.new_empty(0)
        task = next(rest) if self.task_gate is not None else empty
        shared = next(rest) if self.shared_gate is not None else empty
        return part, task, shared

    def _mixes_in_c(self, shared_in: torch.Tensor) -> bool:
        """Whether this forward leaves the banks' last ReLU to the C mixture: the kernels run on
        the input (:func:`dlrm_mtl.native.mixture_runs_on`), the banks are :class:`ExpertBank`
        (not a stand-in such as the benchmarks' loop), and the pool is mixed (not handed on as
        it is: one expert per task and nothing shared)."""
        banks = [b for b in (self.shared, self.specific) if b is not None]
        return (native.mixture_runs_on(shared_in) and all(type(b) is ExpertBank for b in banks)
                and not (self.task_gate is None and self.num_shared == 0))

    def _fuses_pool(self) -> bool:
        """Whether a shared-input level runs both banks as one (:func:`run_experts` reads their
        weights: only for :class:`ExpertBank` itself, not a stand-in such as the benchmarks'
        loop or cost-free banks)."""
        return self._fuse_pool and type(self.shared) is ExpertBank and type(self.specific) is ExpertBank

    def spread(self, task_gates: torch.Tensor) -> torch.Tensor:
        """Task gates over their own experts ``[B, T, E_sh + E_sp]`` -> the same weights over the
        whole pool ``[B, T, E_sh + T·E_sp]``, 0 on the other tasks' experts, so that every
        task's mixture (eq. 2) and the shared gate's are one product over one expert tensor
        instead of a ``[B, T, E, d']`` copy of each task's expert set."""
        if self.num_specific == 0:
            return task_gates
        if self.num_shared == 0:
            return self._own_blocks(task_gates)  # [B, T, T·E_sp]
        # one split (its backward one cat), not two slices (each a zero-filled gradient)
        shared, own = task_gates.split([self.num_shared, self.num_specific], dim=-1)  # [B, T, E_sh], [B, T, E_sp]
        return torch.cat([shared, self._own_blocks(own)], dim=-1)

    def _own_blocks(self, own: torch.Tensor) -> torch.Tensor:
        """``own [B, T, E_sp]`` -> ``[B, T, T·E_sp]``: task t's weights in block t, 0 elsewhere.
        A ``diag_embed`` (zeros and one strided copy; its backward reads the diagonal back), not
        a product with an identity block: that broadcast multiply and its backward's multiply
        and sum took 0.41 against 0.19 ms for MovieLens PLE's ``[2048, 2, 1]`` on the 2-core VM,
        for the same values bit for bit."""
        B, T, E = own.shape
        return torch.diag_embed(own.transpose(1, 2), dim1=1, dim2=2).reshape(B, T, T * E)  # [B, T, T, E_sp] -> [B, T, T·E_sp]


class PLELayer(nn.Module):
    """PLE (Tang et al., RecSys 2020, §4.3, eq. 5-6): ``levels`` stacked extraction networks;
    every level but the last keeps a shared stream through its shared gate. ``levels=1`` is CGC
    (§4.2, eq. 1-4); ``num_shared=0, num_specific=1, levels=1`` is one separate network per task
    (the single-task baseline, with the embeddings and the layers below still shared).

    Maps ``x [B, d]`` (or ``[T, B, d]``, see :func:`split_task_input`) to ``[T, B, d']``; gates
    are named ``level{l}/task`` ``[B, T, E]`` and ``level{l}/shared`` ``[B, 1, E_all]``.

    Example::

        ple = PLELayer(32, num_tasks=2, num_shared=2, num_specific=1, hidden=[], out_dim=16, levels=2)
        out = ple(torch.randn(8, 32))
        out.y.shape, out.gates["level0/shared"].shape, out.gates["level1/task"].shape
        # [2, 8, 16], [8, 1, 4], [8, 2, 3]
    """

    # the LayerConfig fields from_config reads (``ple``; ``cgc`` and ``separate``: named builders in models/arch.py)
    CONFIG_FIELDS: ClassVar[Tuple[str, ...]] = ("num_shared", "num_specific", "levels", "hidden", "out_dim")
    reads_context: ClassVar[bool] = False  # ``context`` (the scenario embeddings) is not read

    @classmethod
    def from_config(cls, cfg: LayerConfig, dims: LayerDims, where: str = "layer") -> Self:
        """The ``ple`` task layer of ``cfg`` (``levels`` extraction networks) for ``dims.num_tasks`` tasks."""
        return cls(dims.in_dim, dims.num_tasks, cfg.num_shared, cfg.num_specific, cfg.hidden, cfg.out_dim, levels=cfg.levels)

    def __init__(
        self, in_dim: int, num_tasks: int, num_shared: int, num_specific: int, hidden: List[int], out_dim: int, levels: int = 1
    ) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"PLE needs levels >= 1, got {levels}")
        self.num_tasks = num_tasks
        self.levels = nn.ModuleList(
            ExtractionNetwork(in_dim if l == 0 else out_dim, num_tasks, num_shared, num_specific, hidden, out_dim, shared_gate=l < levels - 1)
            for l in range(levels)
        )
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> LayerOutput:
        task_in, shared_in = split_task_input(x, self.num_tasks)
        gates: Dict[str, torch.Tensor] = {}
        for l, net in enumerate(self.levels):
            task_in, shared_out, g = net(task_in, shared_in)
            gates.update({f"level{l}/{k}": v for k, v in g.items()})
            if shared_out is not None:
                shared_in = shared_out
        return LayerOutput(task_in, gates)
