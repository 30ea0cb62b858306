"""Sluice networks: per-task networks whose layers are split into subspaces, mixed across tasks
and subspaces (α), with every layer mixed into the output (β) and orthogonal subspaces."""

from __future__ import annotations

from typing import ClassVar, List, Optional, Self, Tuple

import torch
from torch import nn

from dlrm_mtl.config import ConfigError, LayerConfig
from dlrm_mtl.modules.cross_stitch import cross_stitch_init
from dlrm_mtl.modules.expert_bank import ExpertBank
from dlrm_mtl.modules.layer_output import LayerOutput
from dlrm_mtl.modules.layer_config import LayerDims
from dlrm_mtl.modules.task_input import task_major_input


def subspace_orthogonality(h: torch.Tensor, subspaces: int) -> torch.Tensor:
    """The subspace orthogonality term of one layer, summed over tasks and subspace pairs::

        Σ_t Σ_{i<j} ‖ G_{t,i}ᵀ G_{t,j} / B ‖²_F

    ``h [B, T, d']`` the layer's outputs, ``G_{t,i} [B, d'/m]`` task t's i-th subspace (columns
    ``i·d'/m .. (i+1)·d'/m − 1``) over the batch's B rows. With m = 2 this is the paper's
    ``‖G_{t,1}ᵀ G_{t,2}‖²_F`` (divided by B², see :class:`SluiceLayer`). -> scalar.

    Example::

        subspace_orthogonality(torch.tensor([[[1.0, 0.0, 0.0, 2.0]]]), 2)   # G_1 = [1, 0], G_2 = [0, 2]: 2² = 4
    """
    B, T, D = h.shape
    k = D // subspaces
    G = h.reshape(B, T, subspaces, k)  # [B, T, m, k]
    first, second = torch.triu_indices(subspaces, subspaces, offset=1, device=h.device)  # pairs i < j
    cross = torch.einsum("btpk,btpl->tpkl", G[:, :, first], G[:, :, second]) / B  # G_iᵀ G_j / B: [T, P, k, k]
    return cross.square().sum()


class SluiceLayer(nn.Module):
    """Sluice network (Ruder, Bingel, Augenstein, Søgaard, "Latent Multi-Task Architecture
    Learning", AAAI 2019; arXiv 1705.08142) as a task layer for T tasks.

    Per task a network of ``levels`` layers (task t's layer l: a ReLU MLP
    ``hidden... -> out_dim``; the T networks of a level are one :class:`ExpertBank`). Every
    layer's output ``h_{t,l} [B, d']`` is split into ``m = subspaces`` subspaces
    ``G_{t,l,i} [B, d'/m]``, and:

    * **α, sharing subspaces** (eq. 2 — the α matrix over all tasks' subspaces, written for T
      tasks): after every layer a learnable ``[T·m, T·m]`` α mixes every subspace of every
      task into every subspace of every task::

          h̃_{t,l,i} = Σ_{s,j} α_l[(t,i), (s,j)] · G_{s,l,j}      (rows and columns ordered (t, i), t major)

      and ``h̃_{t,l}`` is task t's input to layer l+1.
    * **β, mixture of layers** (eq. 4): task t's output is a learnable mix of its α-mixed
      layer outputs, ``y_t = Σ_l β_{t,l} · h̃_{t,l}`` (``β [T, levels]``, unconstrained).
    * **Subspace orthogonality** (eq. 3): ``L_c = Σ_t Σ_l Σ_{i<j} ‖G_{t,l,i}ᵀ G_{t,l,j}‖²_F``
      on the layers' outputs before α, returned as ``aux["orthogonality"]`` (unweighted;
      ``DenseArch`` multiplies it by the layer's ``aux_weight`` and the loss adds it).

    Initialisation: α **identity-dominant** — 0.9 on the diagonal, ``0.1 / (T·m − 1)``
    elsewhere (rows sum to 1; the same rule as :func:`cross_stitch_init`, so training starts
    near T separate networks with every subspace keeping itself); β uniform ``1 / levels``
    (the authors' release's default for its layer-stitch units).

    Deviations: (1) the orthogonality term is taken on the batch's activations and divided by
    B² (``G_iᵀ G_j / B`` is a mean over rows), so its weight does not depend on the batch size;
    the authors' release penalises the subspace blocks of its LSTM weight matrices instead.
    (2) The paper's λ loss weights (its item (c)) are not part of the layer: task weighting is
    the ``loss:`` section's (static, uncertainty, DWA). (3) Every layer of every task is a
    ReLU MLP (the paper's are BiLSTMs over tokens). Equation numbers are those of the AAAI /
    arXiv v3 text as recalled (the text could not be re-read where this was written).

    ``x [B, d]`` (every task starts from it) or ``[T, B, d]`` -> ``y [T, B, d']``; no gates;
    ``aux = {"orthogonality": scalar}``. ``levels = 1`` is one α-mixed layer (β = [1]).

    Example::

        layer = SluiceLayer(32, num_tasks=2, hidden=[], out_dim=16, levels=3, subspaces=2)
        out = layer(torch.randn(8, 32))
        out.y.shape, layer.alpha[0].shape, layer.beta.shape, out.aux["orthogonality"].shape
        # [2, 8, 16], [4, 4], [2, 3], []
    """

    # the LayerConfig fields it reads (``aux_weight``: the weight of its orthogonality aux loss, applied by the dense arch)
    CONFIG_FIELDS: ClassVar[Tuple[str, ...]] = ("levels", "subspaces", "aux_weight", "hidden", "out_dim")
    reads_context: ClassVar[bool] = False  # ``context`` (the scenario embeddings) is not read

    @classmethod
    def from_config(cls, cfg: LayerConfig, dims: LayerDims, where: str = "layer") -> Self:
        """The ``sluice`` task layer of ``cfg`` for ``dims.num_tasks`` tasks; an ``out_dim``
        that ``subspaces`` does not divide is a ConfigError naming ``where.subspaces``."""
        if cfg.out_dim % cfg.subspaces:
            raise ConfigError(f"{where}.subspaces: type {cfg.type}: out_dim ({cfg.out_dim}) must be a multiple of subspaces "
                              f"({cfg.subspaces})", f"{where}.subspaces")
        return cls(dims.in_dim, dims.num_tasks, cfg.hidden, cfg.out_dim, levels=cfg.levels, subspaces=cfg.subspaces)

    def __init__(self, in_dim: int, num_tasks: int, hidden: List[int], out_dim: int, levels: int = 2, subspaces: int = 2) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"sluice needs levels >= 1, got {levels}")
        if subspaces < 1 or out_dim % subspaces:
            raise ValueError(f"sluice: out_dim ({out_dim}) must be a multiple of subspaces ({subspaces})")
        self.num_tasks, self.out_dim, self.subspaces = num_tasks, out_dim, subspaces
        self.nets = nn.ModuleList(ExpertBank(num_tasks, in_dim if l == 0 else out_dim, hidden, out_dim) for l in range(levels))
        self.alpha = nn.ParameterList(nn.Parameter(cross_stitch_init(num_tasks * subspaces)) for _ in range(levels))  # [T·m, T·m]
        self.beta = nn.Parameter(torch.full((num_tasks, levels), 1.0 / levels))  # [T, L]

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> LayerOutput:
        T, m = self.num_tasks, self.subspaces
        h = task_major_input(x, T)  # [B, d] (shared) or [B, T, d]
        B = h.shape[0]
        mixed: List[torch.Tensor] = []
        orthogonality = h.new_zeros(())
        for net, alpha in zip(self.nets, self.alpha):
            out = net(h)  # task t's layer on task t's input: [B, T, d']
            orthogonality = orthogonality + subspace_orthogonality(out, m)  # eq. 3, before mixing
            split = out.reshape(B, T * m, self.out_dim // m)  # G_{t,i} in (t, i) order: [B, T·m, d'/m]
            h = torch.matmul(alpha, split).reshape(B, T, self.out_dim)  # eq. 2: [B, T, d']
            mixed.append(h)
        y = torch.einsum("tl,lbtd->tbd", self.beta, torch.stack(mixed))  # eq. 4: [T, B, d']
        return LayerOutput(y, aux={"orthogonality": orthogonality})
