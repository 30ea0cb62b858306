"""The multi-scenario multi-task ranking model (design §3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_mtl.config import ModelConfig
from dlrm_mtl.data.batch import Batch
from dlrm_mtl.losses import EntireSpaceLoss
from dlrm_mtl.modules import MLP, CGCLayer, DotInteraction, ScenarioLayer
from dlrm_mtl.schema import Schema


def embedding_configs(schema: Schema) -> List[EmbeddingBagConfig]:
    """One EmbeddingBagConfig per schema table (features sharing a table share its rows)."""
    tables: Dict[str, EmbeddingBagConfig] = {}
    for f in schema.sparse:
        if f.table in tables:
            tables[f.table].feature_names.append(f.name)
            continue
        tables[f.table] = EmbeddingBagConfig(
            name=f.table,
            embedding_dim=f.dim,
            num_embeddings=f.num_embeddings,
            feature_names=[f.name],
            pooling=PoolingType.MEAN if f.pooling == "mean" else PoolingType.SUM,
        )
    return list(tables.values())


class DenseArch(nn.Module):
    """Everything after the embedding lookup: dense MLP, interaction, scenario layers (one per
    scenario level, stacked), a CGC task layer and one tower per task.

    ``pooled [B, F, D]``, ``dense [B, Fd]``, ``scenario [B, L]`` -> logits ``[B, T]`` and the
    gate weights of every layer (for expert-utilisation logging).
    """

    def __init__(self, schema: Schema, cfg: ModelConfig) -> None:
        super().__init__()
        dims = {f.dim for f in schema.sparse}
        if len(dims) != 1:
            raise ValueError(f"the dot interaction needs one embedding dim for all features, got {sorted(dims)}")
        (D,) = dims
        F = len(schema.sparse)
        self.dense_mlp = MLP(len(schema.dense), list(cfg.dense_arch) + [D])
        self.interaction = DotInteraction(F, D)
        self.scenario_emb = nn.ModuleList(nn.Embedding(l.num_values, cfg.scenario_emb_dim) for l in schema.scenarios)
        self.scenario_layers = nn.ModuleList()
        # the scenario embeddings are gate inputs *and* part of x (design §3): experts can then
        # model scenario-dependent effects of the features, not only be weighted by scenario
        d = self.interaction.out_dim + len(schema.scenarios) * cfg.scenario_emb_dim
        sl = cfg.scenario_layer
        for level in schema.scenarios:
            layer = ScenarioLayer(d, level.num_values, cfg.scenario_emb_dim, sl.num_shared, sl.num_specific, sl.hidden, sl.out_dim)
            self.scenario_layers.append(layer)
            d = layer.out_dim
        tl = cfg.task_layer
        T = len(schema.tasks)
        self.task_layer = CGCLayer(d, T, tl.num_shared, tl.num_specific, tl.hidden, tl.out_dim)
        self.towers = nn.ModuleList(nn.Sequential(MLP(tl.out_dim, list(cfg.tower)), nn.Linear(cfg.tower[-1] if cfg.tower else tl.out_dim, 1)) for _ in range(T))
        self.level_names = [l.name for l in schema.scenarios]

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor, scenario: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        embs = [emb(scenario[:, i]) for i, emb in enumerate(self.scenario_emb)]  # L x [B, e]
        x = torch.cat([self.interaction(self.dense_mlp(dense), pooled)] + embs, dim=1)  # [B, d]
        gates: Dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.scenario_layers):
            x, g = layer(x, scenario[:, i], embs[i])  # [B, d'], [B, E]
            gates[f"scenario/{self.level_names[i]}"] = g
        y, g = self.task_layer(x)  # [T, B, d'], [B, T, E]
        gates["task/cgc"] = g
        logits = torch.cat([tower(y[t]) for t, tower in enumerate(self.towers)], dim=1)  # [B, T]
        return logits, gates


class MultiScenarioMultiTaskModel(nn.Module):
    """EmbeddingBagCollection (sharded under DMP) + :class:`DenseArch`.

    Pooled embeddings are read *by key* from the KeyedTensor (its column order depends on the
    sharding plan, stack-notes) and stacked in schema order into ``[B, F, D]``.

    Example::

        model = MultiScenarioMultiTaskModel(schema, ModelConfig(), device=torch.device("cpu"))
        logits, gates = model(batch.sparse, batch.dense, batch.scenario)   # [B, T]
    """

    def __init__(self, schema: Schema, cfg: ModelConfig, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.feature_names = [f.name for f in schema.sparse]
        self.ebc = EmbeddingBagCollection(tables=embedding_configs(schema), device=device)
        self.dense_arch = DenseArch(schema, cfg)

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor, scenario: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        kt = self.ebc(sparse).to_dict()
        pooled = torch.stack([kt[name] for name in self.feature_names], dim=1)  # [B, F, D]
        return self.dense_arch(pooled, dense, scenario)


class TrainModule(nn.Module):
    """Model + loss, in the shape TorchRec's train pipelines expect: ``batch -> (loss, output)``.

    ``output`` is ``(logits [B, T] detached, loss terms, gates, number of real rows)``; gates
    may carry grad, so detach them before keeping them beyond the step.
    """

    def __init__(self, model: MultiScenarioMultiTaskModel, loss: EntireSpaceLoss) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: Batch):
        # Indexing instead of tuple unpacking: TorchRec's train pipelines fx-trace this forward
        # (the dense arch and the loss are leaf modules there) and a Proxy cannot be unpacked.
        out = self.model(batch.sparse, batch.dense, batch.scenario)
        loss = self.loss(out[0], batch.labels, batch.label_mask, batch.weight, batch.scenario, {}, batch.bias)
        real_rows = (batch.row_id >= 0).sum()
        return loss[0], (out[0].detach(), loss[1], out[1], real_rows)
