"""AESM²: automatic expert selection over scenarios (scenario layers) and over tasks (task layers).

Zou et al., "Automatic Expert Selection for Multi-Scenario and Multi-Task Search", SIGIR 2022
(arXiv 2205.14321), method section: multi-scenario layers stacked per level of the scenario
tree, then multi-task layers; in each layer E experts, one gate per scenario (task), and the
expert selection by KL distance with its two auxiliary losses.

Equation numbers: none are cited, on purpose. The paper's section and equation numbers were
looked for again (stored copy of its LaTeX source, SPIQA ``2205.14321v2.txt``, and its
extracted-paragraph twin), but only their introduction is retrievable; the method section
and its numbered equations are not, so the steps below are cited by subsection name and no
equation number is guessed. Add them once the method text can be read.

What was checked, step by step, is the authors' TensorFlow release (``select_experts``,
``create_gate_masks``, ``scenario_layers``, ``task_layers``, ``cal_KLdis``; read for
understanding, not copied): noise scale, softmax axis, both KL distances, top-K selection,
use of the clean gate for the output, and task-layer inputs match it. Deviations from the
release, each intended, are listed in :func:`select_experts` and the layer docstrings.
"""

from __future__ import annotations

import math
from typing import ClassVar, Dict, List, NamedTuple, Optional, Self, Tuple

import torch
from torch import nn

from dlrm_mtl.config import ConfigError, LayerConfig
from dlrm_mtl.modules.expert_bank import ExpertBank
from dlrm_mtl.modules.gates import SoftmaxGate
from dlrm_mtl.modules.softmax import softmax_last
from dlrm_mtl.modules.layer_output import LayerOutput
from dlrm_mtl.modules.layer_config import LayerDims
from dlrm_mtl.modules.mixture import mix_experts


class ExpertSelection(NamedTuple):
    """Result of :func:`select_experts`.

    Attributes:
        gates: ``[N, E]`` the row's own gate after masking: exactly ``k_sp + k_sh`` non-zeros,
            summing to 1.
        specific: ``[N, k_sp]`` indices of the specific experts (closest first).
        shared: ``[N, k_sh]`` indices of the shared experts (closest first).
        kl_specific: scalar, mean KL(one-hot ‖ P_e) over the rows' specific experts.
        kl_shared: scalar, mean KL(uniform ‖ P_e) over the rows' shared experts.
    """

    gates: torch.Tensor
    specific: torch.Tensor
    shared: torch.Tensor
    kl_specific: torch.Tensor
    kl_shared: torch.Tensor


def select_experts(
    logits: torch.Tensor, target: torch.Tensor, k_specific: int, k_shared: int, noise_std: float = 0.0
) -> ExpertSelection:
    """AESM²'s expert selection for N rows with G gates over E experts (method section, "expert selection").

    1. In training (``noise_std > 0``) Gaussian noise ``N(0, noise_std²)`` is added to the
       logits ``[N, G, E]`` used for the selection.
    2. ``P = softmax over the G axis``: column ``P[:, :, e]`` is expert e's distribution over
       the G scenarios (tasks).
    3. ``KL_sp[e] = KL(onehot(target) ‖ P_e) = −log P[target, e]`` and
       ``KL_sh[e] = KL(uniform ‖ P_e) = −log G − mean_g log P[g, e]``.
    4. The ``k_specific`` experts with the smallest ``KL_sp`` are the row's specific experts;
       then the ``k_shared`` experts with the smallest ``KL_sh`` *among the others* are its
       shared experts (no expert is both). Ties go to the lower expert index (stable sort).
    5. The row's own gate ``logits[target]`` (noiseless, as in the authors' release: the noise
       explores the selection, the output mixes with the clean gate) is masked to −∞ outside
       the selected experts and softmaxed over E.
    6. Auxiliary losses: the mean of ``KL_sp`` over the selected specific experts and of
       ``KL_sh`` over the selected shared experts (they pull specific experts' distributions
       towards one scenario and shared ones towards uniform; differentiable in the logits).

    Deviations from the authors' release (the paper's equations could not be read; see the
    module docstring):

    * Step 4: the release picks the specific and the shared top-K independently, so one
      expert can be both (its mask entry is then 2, doubling its logit) and fewer than
      ``k_sp + k_sh`` experts are used; here the shared experts are chosen among the others,
      so exactly ``k_sp + k_sh`` distinct experts are used, and ``kl_shared`` averages over
      those (it can differ from the release's mean over the unrestricted top-K).
    * Step 5: the release masks by *multiplying* the logits by ``-1e9`` outside the
      selection, which for a negative logit gives ``+1e9`` and hands that unselected expert
      almost all the weight; here the logits are set to ``-inf`` outside the selection,
      which is what the release's own comment says the mask is for (weight → 0).
    * Step 3: ``KL_sp`` is computed exactly as ``−log P[target, e]`` from ``log_softmax``; the
      release smooths both distributions by ``1e-9`` (≈ ``−log(P + 1e-9)``, same ranking).

    Args:
        logits: ``[N, G, E]`` gate logits (without noise).
        target: ``[N]`` long, the row's scenario (task) id in ``[0, G)``.
        k_specific, k_shared: experts selected per row, ``k_specific + k_shared <= E``.
        noise_std: standard deviation of the selection noise (0 in eval).

    Example::

        sel = select_experts(torch.randn(8, 3, 5), torch.randint(0, 3, (8,)), 1, 2)
        sel.gates.shape, (sel.gates > 0).sum(-1)   # [8, 5], all 3
    """
    N, G, E = logits.shape
    if k_specific < 0 or k_shared < 0 or not 1 <= k_specific + k_shared <= E:
        raise ValueError(f"AESM² needs 1 <= k_specific + k_shared <= num_experts ({E}), got {k_specific} + {k_shared}")
    noisy = logits + noise_std * torch.randn_like(logits) if noise_std > 0 else logits  # [N, G, E]
    log_p = torch.log_softmax(noisy, dim=1)  # [N, G, E], each expert's distribution over G
    rows = torch.arange(N, device=logits.device)
    kl_sp = -log_p[rows, target]  # [N, E]
    kl_sh = -math.log(G) - log_p.mean(dim=1)  # [N, E]
    order_sp = torch.sort(kl_sp.detach(), dim=1, stable=True).indices  # [N, E]
    specific = order_sp[:, :k_specific]  # [N, k_sp]
    taken = torch.zeros(N, E, dtype=torch.bool, device=logits.device).scatter(1, specific, True)
    order_sh = torch.sort(kl_sh.detach().masked_fill(taken, float("inf")), dim=1, stable=True).indices
    shared = order_sh[:, :k_shared]  # [N, k_sh]
    selected = taken.scatter(1, shared, True)  # [N, E]
    own = logits[rows, target]  # [N, E]
    gates = softmax_last(own.masked_fill(~selected, float("-inf")))  # [N, E]
    zero = logits.new_zeros(())
    kl_specific = kl_sp.gather(1, specific).mean() if k_specific else zero
    kl_shared = kl_sh.gather(1, shared).mean() if k_shared else zero
    return ExpertSelection(gates, specific, shared, kl_specific, kl_shared)


def _check(num_experts: int, k_specific: int, k_shared: int) -> None:
    if k_specific < 0 or k_shared < 0 or not 1 <= k_specific + k_shared <= num_experts:
        raise ValueError(
            f"AESM² needs 1 <= k_specific + k_shared <= num_experts, got {k_specific} + {k_shared} with {num_experts} experts"
        )


class _AESMLayer(nn.Module):
    """What both AESM² layers share: E experts in one bank, G gates over them on a gate input
    of ``gate_dim`` features, and the selection of :func:`select_experts` with noise of
    standard deviation ``noise · E`` in training only."""

    # the LayerConfig fields both AESM² layers read (``aux_weight``: the weight of their KL aux
    # losses, applied by the dense arch)
    CONFIG_FIELDS: ClassVar[Tuple[str, ...]] = ("num_experts", "k_specific", "k_shared", "noise", "aux_weight", "hidden", "out_dim")

    @staticmethod
    def check_selection(cfg: LayerConfig, where: str) -> None:
        """``1 <= k_specific + k_shared <= num_experts``, else a ConfigError naming ``where.k_specific``."""
        if not 1 <= cfg.k_specific + cfg.k_shared <= cfg.num_experts:
            raise ConfigError(
                f"{where}: type {cfg.type} needs 1 <= k_specific + k_shared <= num_experts ({cfg.num_experts}), "
                f"got {cfg.k_specific} + {cfg.k_shared}",
                f"{where}.k_specific",
            )

    def __init__(self, in_dim: int, gate_dim: int, num_gates: int, num_experts: int, k_specific: int,
                 k_shared: int, hidden: List[int], out_dim: int, noise: float) -> None:
        super().__init__()
        _check(num_experts, k_specific, k_shared)
        self.num_experts = num_experts
        self.k_specific, self.k_shared, self.noise, self.out_dim = k_specific, k_shared, noise, out_dim
        self.experts = ExpertBank(num_experts, in_dim, hidden, out_dim)
        self.gate = SoftmaxGate(gate_dim, num_gates, num_experts)

    def select(self, logits: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``logits [N, G, E]``, ``target [N]`` -> gates ``[N, E]``, aux ``{"kl_specific", "kl_shared"}``."""
        noise_std = self.noise * self.num_experts if self.training else 0.0
        sel = select_experts(logits, target, self.k_specific, self.k_shared, noise_std)
        return sel.gates, {"kl_specific": sel.kl_specific, "kl_shared": sel.kl_shared}


class AESMScenarioLayer(_AESMLayer):
    """AESM² multi-scenario layer (Zou et al. 2022, "multi-scenario layer"; equation numbers not
    available, see the module docstring): E experts, one gate
    per scenario of the layer's level (G = S) on ``x ⊕ e_s``, and the expert selection of
    :func:`select_experts` against the row's scenario::

        y = Σ_{e ∈ specific(x) ∪ shared(x)} g_{s,e}(x ⊕ e_s) · expert_e(x)

    The selection noise has standard deviation ``noise · E`` in training and is off in eval:
    the authors' release multiplies its noise scale by the number of experts, so ``noise`` is
    the per-expert factor. All E experts run
    as one batched bank call (the selection is per row, so grouping rows by expert would need
    a gather per expert; at the E of this family the dense bank is cheaper).

    Gate input: ``e_s`` is whatever the caller passes; the model passes the layer's own level
    embedding. The release's gate at tree depth i > 0 is meant to see the embeddings of all
    levels up to i. Deviation, kept: the model concatenates every level's embedding into the
    input of the first layer only, so a deeper layer's gate sees the other levels only
    through ``x`` (the previous layer's output), not as raw embeddings.

    ``x [B, d]``, ``scenario [B]`` long, ``scenario_emb [B, e]`` -> ``y [B, d']``, gates
    ``{"": [B, E]}`` (exactly ``k_specific + k_shared`` non-zeros per row), aux
    ``{"kl_specific", "kl_shared"}`` (unweighted).

    Example::

        layer = AESMScenarioLayer(32, num_scenarios=3, emb_dim=8, num_experts=6, k_specific=1,
                                  k_shared=2, hidden=[], out_dim=16)
        out = layer(torch.randn(8, 32), torch.randint(0, 3, (8,)), torch.randn(8, 8))
        out.y.shape, out.gates[""].shape, sorted(out.aux)   # [8, 16], [8, 6], ['kl_shared', 'kl_specific']
    """

    @classmethod
    def from_config(cls, cfg: LayerConfig, dims: LayerDims, where: str = "layer") -> Self:
        """The ``aesm`` scenario layer of ``cfg`` over ``dims.num_scenarios`` scenarios; a
        selection size out of range is a ConfigError naming ``where`` (the layer's key)."""
        cls.check_selection(cfg, where)
        return cls(dims.in_dim, dims.num_scenarios, dims.emb_dim, cfg.num_experts, cfg.k_specific, cfg.k_shared, cfg.hidden,
                   cfg.out_dim, noise=cfg.noise)

    def __init__(
        self,
        in_dim: int,
        num_scenarios: int,
        emb_dim: int,
        num_experts: int,
        k_specific: int,
        k_shared: int,
        hidden: List[int],
        out_dim: int,
        noise: float = 0.0,
    ) -> None:
        super().__init__(in_dim, in_dim + emb_dim, num_scenarios, num_experts, k_specific, k_shared, hidden, out_dim, noise)
        self.num_scenarios = num_scenarios

    def forward(self, x: torch.Tensor, scenario: torch.Tensor, scenario_emb: torch.Tensor) -> LayerOutput:
        experts = self.experts(x)  # [B, E, d']
        logits = self.gate.logits(torch.cat([x, scenario_emb], dim=1))  # [B, S, E]
        gates, aux = self.select(logits, scenario)  # [B, E]
        y = mix_experts(gates.unsqueeze(1), experts).squeeze(1)  # [B, d']
        return LayerOutput(y, {"": gates}, aux)


class AESMTaskLayer(_AESMLayer):
    """AESM² multi-task layer (Zou et al. 2022, "multi-task layer"; equation numbers not
    available, see the module docstring): E experts shared by the T
    tasks, one gate per task (G = T); task t's gate input is its representation ⊕ the scenario
    context (all levels' scenario embeddings) ⊕ a learnable task indicator embedding, and the
    selection of :func:`select_experts` runs against the one-hot task vector: for task t,
    every one of the T gates is evaluated on task t's input, giving ``[B, T, E]`` logits whose
    softmax over the T axis is each expert's distribution over tasks.

    On ``x [B, d]`` the experts run once and every task mixes the same outputs; on
    ``x [T, B, d]`` (stacked after another task layer) expert e runs on each task's input,
    as in the authors' release (T·B rows through the bank, still one batched call).
    Noise: standard deviation ``noise · E`` in training, none in eval (see
    :class:`AESMScenarioLayer`).

    ``x [B, d]`` or ``[T, B, d]``, ``context [B, c]`` -> ``y [T, B, d']``, gates ``{"": [B, T, E]}``,
    aux ``{"kl_specific", "kl_shared"}`` (means over tasks and rows).

    Example::

        layer = AESMTaskLayer(32, num_tasks=2, context_dim=16, num_experts=4, k_specific=1,
                              k_shared=1, hidden=[], out_dim=16, task_emb_dim=4)
        out = layer(torch.randn(8, 32), torch.randn(8, 16))
        out.y.shape, out.gates[""].shape   # [2, 8, 16], [8, 2, 4]
    """

    CONFIG_FIELDS: ClassVar[Tuple[str, ...]] = ("task_emb_dim",) + _AESMLayer.CONFIG_FIELDS
    reads_context: ClassVar[bool] = True  # its gates read the scenario embeddings (``context``)

    @classmethod
    def from_config(cls, cfg: LayerConfig, dims: LayerDims, where: str = "layer") -> Self:
        """The ``aesm`` task layer of ``cfg`` for ``dims.num_tasks`` tasks, gated on a context
        of ``dims.context_dim``; a selection size out of range is a ConfigError naming ``where``."""
        cls.check_selection(cfg, where)
        return cls(dims.in_dim, dims.num_tasks, dims.context_dim, cfg.num_experts, cfg.k_specific, cfg.k_shared, cfg.hidden,
                   cfg.out_dim, noise=cfg.noise, task_emb_dim=cfg.task_emb_dim)

    def __init__(
        self,
        in_dim: int,
        num_tasks: int,
        context_dim: int,
        num_experts: int,
        k_specific: int,
        k_shared: int,
        hidden: List[int],
        out_dim: int,
        noise: float = 0.0,
        task_emb_dim: int = 8,
    ) -> None:
        super().__init__(in_dim, in_dim + context_dim + task_emb_dim, num_tasks, num_experts, k_specific, k_shared,
                         hidden, out_dim, noise)
        self.num_tasks = num_tasks
        self.task_emb = nn.Parameter(torch.randn(num_tasks, task_emb_dim) * 0.1)  # [T, te]

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> LayerOutput:
        T, E = self.num_tasks, self.num_experts
        B = x.shape[-2]
        if x.dim() == 2:
            experts = self.experts(x).unsqueeze(0)  # [1, B, E, d'] (same for every task)
            task_in = x.unsqueeze(0).expand(T, *x.shape)  # [T, B, d]
        else:
            if x.shape[0] != T:
                raise ValueError(f"task layer input has {x.shape[0]} task rows, expected {T}")
            experts = self.experts(x.reshape(T * B, -1)).view(T, B, E, -1)  # [T, B, E, d']
            task_in = x
        parts = [task_in]
        if context is not None:
            parts.append(context.unsqueeze(0).expand(T, *context.shape))  # [T, B, c]
        parts.append(self.task_emb.unsqueeze(1).expand(T, B, -1))  # [T, B, te]
        gate_in = torch.cat(parts, dim=-1)  # [T, B, d + c + te]
        # every gate g on every task t's input: [T, B, G=T, E]
        logits = torch.einsum("tbi,gie->tbge", gate_in, self.gate.weight) + self.gate.bias
        target = torch.arange(T, device=x.device).repeat_interleave(B)  # [T·B]: row (t, b) -> task t
        gates, aux = self.select(logits.reshape(T * B, T, E), target)
        gates = gates.view(T, B, E)  # [T, B, E]
        y = mix_experts(gates.unsqueeze(-2), experts).squeeze(-2)  # [T, B, d']
        return LayerOutput(y, {"": gates.transpose(0, 1)}, aux)
