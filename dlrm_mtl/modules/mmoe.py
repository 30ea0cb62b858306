"""Multi-gate (and one-gate) mixture of experts."""

from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Optional, Self, Tuple

import torch
from torch import nn

from dlrm_mtl.config import ConfigError, LayerConfig
from dlrm_mtl.modules.expert_bank import ExpertBank, first_layer_map, list_params, run_experts
from dlrm_mtl.modules.gates import GATE_KINDS, make_gate
from dlrm_mtl.modules.layer_output import LayerOutput
from dlrm_mtl.modules.layer_config import LayerDims
from dlrm_mtl.modules.task_input import split_task_input
from dlrm_mtl.modules.mixture import mix_experts
from dlrm_mtl.modules.folded_affine import folded_affine
from dlrm_mtl.modules.shared_affine import shared_input_affine


class MMoELayer(nn.Module):
    """MMoE (Ma et al., KDD 2018, §4.2, eq. 5-6): E shared experts, one softmax gate per task::

        f^k(x) = Σ_i g^k(x)_i f_i(x),   g^k(x) = softmax(W_gk x)

    With ``one_gate=True`` all tasks share one gate: OMoE, the paper's one-gate baseline (§4.1
    eq. 4, §5). ``gate`` picks the gate (see :func:`make_gate`): ``softmax`` (the paper),
    ``noisy`` (Shazeer et al. 2017 eq. 3-5, noise in training only, ``top_k`` 0 = dense) or
    ``topk`` (each row keeps its ``top_k`` experts, the rest weigh exactly 0). Maps ``x [B, d]`` (or ``[T, B, d]``: task k's gate reads ``x[k]``, experts the
    mean, see :func:`split_task_input`) to ``[T, B, d']``; gates ``{"": [B, T, E]}`` (``[B, 1, E]``
    for OMoE).

    Example::

        mmoe = MMoELayer(32, num_tasks=2, num_experts=4, hidden=[], out_dim=16)
        out = mmoe(torch.randn(8, 32))
        out.y.shape, out.gates[""].shape   # [2, 8, 16], [8, 2, 4]
    """

    # the LayerConfig fields from_config reads (``mmoe``; ``omoe``: a named builder in models/arch.py)
    CONFIG_FIELDS: ClassVar[Tuple[str, ...]] = ("num_experts", "gate", "top_k", "noise", "hidden", "out_dim")
    reads_context: ClassVar[bool] = False  # ``context`` (the scenario embeddings) is not read

    @staticmethod
    def gate_args(cfg: LayerConfig, where: str) -> Dict[str, Any]:
        """The gate keywords of ``cfg`` (``gate``, ``top_k``, ``noise``), checked against
        :data:`GATE_KINDS` and ``num_experts``; a bad one is a ConfigError naming its key."""
        if cfg.gate not in GATE_KINDS:
            raise ConfigError(f"{where}: type {cfg.type}: gate {cfg.gate!r} is not one of {list(GATE_KINDS)}", f"{where}.gate")
        if cfg.gate == "topk" and not 1 <= cfg.top_k <= cfg.num_experts:
            raise ConfigError(f"{where}: type {cfg.type}: gate topk needs 1 <= top_k <= num_experts ({cfg.num_experts}), "
                              f"got {cfg.top_k}", f"{where}.top_k")
        if cfg.gate == "noisy" and not 0 <= cfg.top_k <= cfg.num_experts:
            raise ConfigError(f"{where}: type {cfg.type}: top_k must be in [0, num_experts ({cfg.num_experts})], got {cfg.top_k}",
                              f"{where}.top_k")
        return dict(gate=cfg.gate, top_k=cfg.top_k, noise=cfg.noise)

    @classmethod
    def from_config(cls, cfg: LayerConfig, dims: LayerDims, where: str = "layer", one_gate: bool = False) -> Self:
        """The ``mmoe`` task layer of ``cfg`` for ``dims.num_tasks`` tasks (``one_gate``: the
        ``omoe`` variant); a bad gate field is a ConfigError naming ``where``."""
        gate_args = cls.gate_args(cfg, where)
        return cls(dims.in_dim, dims.num_tasks, cfg.num_experts, cfg.hidden, cfg.out_dim, one_gate=one_gate, **gate_args)

    def __init__(
        self,
        in_dim: int,
        num_tasks: int,
        num_experts: int,
        hidden: List[int],
        out_dim: int,
        one_gate: bool = False,
        gate: str = "softmax",
        top_k: int = 0,
        noise: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_tasks, self.one_gate, self.out_dim = num_tasks, one_gate, out_dim
        self.experts = ExpertBank(num_experts, in_dim, hidden, out_dim)
        self.gate = make_gate(gate, in_dim, 1 if one_gate else num_tasks, num_experts, top_k=top_k, noise=noise)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> LayerOutput:
        task_in, shared_in = split_task_input(x, self.num_tasks)
        if self._reads_once(task_in):
            # experts and gates on the one input: their first products as one (shared_input_affine)
            weights, biases = list_params(self.experts.weights), list_params(self.experts.biases)
            maps = [first_layer_map(weights, biases), self.gate.input_map()]
            # the experts and the gate are x's one reader: the lookup's backward may fold into theirs
            first, logits = folded_affine(shared_in, maps, relu=[True]) or shared_input_affine(shared_in, maps, relu=[True])
            e = run_experts(weights, biases, shared_in, first=first)  # [B, E, d']
            g = self.gate.from_logits(logits)  # [B, G, E]
        else:
            e = self.experts(shared_in)  # [B, E, d']
            g = self.gate(shared_in if self.one_gate else task_in)  # [B, G, E]
        y = mix_experts(g, e).transpose(0, 1)  # [G, B, d']
        if self.one_gate:
            y = y.expand(self.num_tasks, *y.shape[1:])
        return LayerOutput(y, {"": g})

    def _reads_once(self, task_in: torch.Tensor) -> bool:
        """Whether the experts and the gates read the same input (one gate, or every task's
        input the shared one) through maps :func:`shared_input_affine` can join: an
        :class:`ExpertBank` of several experts and a gate whose weights follow from its
        logits; in training (autograd on, not traced for export or compilation: the two
        forwards compute the same products, bit for bit with MKL here, so evaluation and
        serving keep the plain modules)."""
        return ((self.one_gate or task_in.stride(0) == 0) and type(self.experts) is ExpertBank
                and self.experts.num_experts > 1 and self.gate.reads_logits_only()
                and torch.is_grad_enabled() and not torch.compiler.is_compiling())


class SharedBottomLayer(nn.Module):
    """Shared-Bottom / hard parameter sharing (Caruana 1997; the MMoE paper's first baseline,
    §5.2, Fig. 1a): one ReLU MLP whose output every task's tower reads. Equals an
    :class:`MMoELayer` with a single expert (its gates are then identically 1).

    Example::

        sb = SharedBottomLayer(32, num_tasks=2, hidden=[64], out_dim=16)
        sb(torch.randn(8, 32)).y.shape   # [2, 8, 16]
    """

    CONFIG_FIELDS: ClassVar[Tuple[str, ...]] = ("hidden", "out_dim")
    reads_context: ClassVar[bool] = False  # ``context`` (the scenario embeddings) is not read

    @classmethod
    def from_config(cls, cfg: LayerConfig, dims: LayerDims, where: str = "layer") -> Self:
        """The ``shared_bottom`` task layer of ``cfg`` for ``dims.num_tasks`` tasks."""
        return cls(dims.in_dim, dims.num_tasks, cfg.hidden, cfg.out_dim)

    def __init__(self, in_dim: int, num_tasks: int, hidden: List[int], out_dim: int) -> None:
        super().__init__()
        self.num_tasks, self.out_dim = num_tasks, out_dim
        self.bottom = ExpertBank(1, in_dim, hidden, out_dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> LayerOutput:
        _, shared_in = split_task_input(x, self.num_tasks)
        # the bank is x's one reader here: its first layer may fold the lookup's backward
        y = (self.bottom(shared_in, fold=True) if type(self.bottom) is ExpertBank
             else self.bottom(shared_in)).squeeze(1)  # [B, d'] (a view: its backward copies nothing)
        return LayerOutput(y.unsqueeze(0).expand(self.num_tasks, *y.shape), shared=y)
