"""The multi-scenario multi-task ranking model (README: Architecture in one paragraph)."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm_mtl.config import ConfigError, LayerConfig, ModelConfig
from dlrm_mtl.data.batch import Batch
from dlrm_mtl.losses import EntireSpaceLoss
from dlrm_mtl.models.arch import build_scenario_layer, build_task_layer
from dlrm_mtl.models.bag_means import mean_of_bags, mean_spans
from dlrm_mtl.models.dense_step import DenseStep
from dlrm_mtl.models.local_lookup import LocalPooledLookup
from dlrm_mtl.models.deepmcp import DeepMCP, with_auxiliary
from dlrm_mtl.models.input_frame import InputFrame
from dlrm_mtl.models.scenario_rows import scenario_rows
from dlrm_mtl.models.sequence_arch import Events, SequenceArch, sequence_configs
from dlrm_mtl.modules import MLP, ConcatInteraction, DotInteraction, LayerOutput, TaskTowers
from dlrm_mtl.modules.heads import build_heads
from dlrm_mtl.schema import Schema, leaf_ids

# True while torch.fx symbolically traces a forward (TorchRec's pipelines trace
# TrainModule.forward to find the sharded modules' inputs); is_fx_tracing where a torch lacks
# is_fx_symbolic_tracing
_fx_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", None) or torch.fx._symbolic_trace.is_fx_tracing


# one call in an fx trace of this module's forwards (TorchRec's pipeline): fx.wrap patches the
# name in the globals of the module that calls it
torch.fx.wrap("with_auxiliary")
# TorchRec's pipelines trace the model and see this as one call
torch.fx.wrap("mean_of_bags")


def embedding_configs(schema: Schema) -> List[EmbeddingBagConfig]:
    """One EmbeddingBagConfig per schema table (features sharing a table share its rows), all
    sum-pooled: the schema's mean pooling is applied after the lookup (:func:`mean_of_bags`),
    so every table of one kind shares one fbgemm kernel."""
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
            pooling=PoolingType.SUM,
        )
    return list(tables.values())


class DenseArch(nn.Module):
    """Everything after the embedding lookup: dense MLP, interaction, the stacked scenario
    layers, the stacked task layers and one tower per task.

    ``pooled [B, F, D]`` or ``[B, Σ D_f]`` (schema order, then the sequence encoders'
    outputs of widths ``sequence_dims``) — or, from a lookup handed :meth:`input_frame`, the
    whole input ``x [B, d]`` (told apart by its width) —, ``dense [B, Fd]``, ``scenario [B, L]``
    -> logits ``[B, T]``, the gate
    weights of every layer by name (``scenario{i}/{level}/...``, ``task{j}/...``; for
    expert-utilisation logging) and the auxiliary losses, each already multiplied by its
    layer's ``aux_weight`` (``aux/scenario{i}/{level}/{name}``).

    A scenario layer with ``level: each`` expands to one layer per scenario level; ``leaf``
    routes by the combined id of all levels. With no task layers the towers read the last
    scenario representation directly. ``model.heads`` picks what replaces the independent
    towers (``self.towers``): a task-relation head (DBMTL, AITM, NMTR) whose gates and aux
    losses are collected as ``heads/...`` and ``aux/heads/...``.
    """

    def __init__(self, schema: Schema, cfg: ModelConfig, sequence_dims: Sequence[int] = ()) -> None:
        super().__init__()
        dims = [f.dim for f in schema.sparse] + list(sequence_dims)
        F = len(dims)
        T = len(schema.tasks)
        e = cfg.scenario_emb_dim
        self.num_tasks = T
        self.interaction: nn.Module
        if cfg.interaction == "dot":
            if len(set(dims)) != 1:
                raise ConfigError(f"model.interaction dot needs one embedding dim for all features (and sequence encoder "
                                  f"outputs {list(sequence_dims)}), got {sorted(set(dims))} (use concat)", "model.interaction")
            D = dims[0]
            self.dense_mlp = MLP(len(schema.dense), list(cfg.dense_arch) + [D])
            self.interaction = DotInteraction(F, D)
            self.pooled_shape: Tuple[int, ...] = (F, D)
        elif cfg.interaction == "concat":
            self.dense_mlp = MLP(len(schema.dense), list(cfg.dense_arch)) if cfg.dense_arch else nn.Identity()
            dense_dim = cfg.dense_arch[-1] if cfg.dense_arch else len(schema.dense)
            self.interaction = ConcatInteraction(dense_dim, sum(dims))
            self.pooled_shape = (sum(dims),)
        else:
            raise ConfigError(f"model.interaction {cfg.interaction!r}: expected dot or concat", "model.interaction")
        self.scenario_emb = nn.ModuleList(nn.Embedding(l.num_values, e) for l in schema.scenarios)
        level_names = [l.name for l in schema.scenarios]
        sizes = [l.num_values for l in schema.scenarios]
        # the scenario embeddings are gate inputs *and* part of x: experts can then
        # model scenario-dependent effects of the features, not only be weighted by scenario
        d = self.interaction.out_dim + len(sizes) * e
        self.input_dim = d  # x's width: [dense part | pooled | scenario embeddings]
        self.scenario_layers = nn.ModuleList()
        self.layer_levels: List[int] = []  # level index per scenario layer; -1 = leaf
        self.scenario_layer_names: List[str] = []
        for i, lc in enumerate(cfg.scenario_layers):
            where = f"model.scenario_layers[{i}]"
            if lc.level == "each":
                levels = list(range(len(sizes)))
            elif lc.level in ("", "leaf"):
                levels = [0 if lc.level == "" else -1]
            elif lc.level in level_names:
                levels = [level_names.index(lc.level)]
            else:
                raise ConfigError(f"{where}: level {lc.level!r} is not a scenario level of the schema {level_names} (or each, leaf)",
                                  f"{where}.level")
            for lvl in levels:
                n = math.prod(sizes) if lvl < 0 else sizes[lvl]
                emb_dim = e * len(sizes) if lvl < 0 else e
                layer = build_scenario_layer(lc, d, n, emb_dim, T, where=where)
                self.scenario_layer_names.append(f"scenario{len(self.scenario_layers)}/{'leaf' if lvl < 0 else level_names[lvl]}")
                self.scenario_layers.append(layer)
                self.layer_levels.append(lvl)
                self._aux_weights_of(layer, lc)
                d = layer.out_dim
        self.schema = schema
        self.task_layers = nn.ModuleList()
        for j, lc in enumerate(cfg.task_layers):
            layer = build_task_layer(lc, d, T, len(sizes) * e, where=f"model.task_layers[{j}]", task_names=schema.task_names)
            self.task_layers.append(layer)
            self._aux_weights_of(layer, lc)
            d = layer.out_dim
        # the heads: TaskTowers for `towers` (the default, unchanged), else a task-relation
        # head returning a LayerOutput (dlrm_mtl/modules/heads/)
        self.towers = build_heads(cfg.heads, schema, d, list(cfg.tower))
        # whether anything reads the scenario rows beside x: every scenario layer (its gate
        # input), a task layer that says so (``reads_context``; one that does not say is taken
        # to read them)
        self.reads_scenario_rows = len(self.scenario_layers) > 0 or any(
            getattr(layer, "reads_context", True) for layer in self.task_layers)

    def input_frame(self, dense: torch.Tensor, scenario: torch.Tensor) -> Optional[InputFrame]:
        """What ``x`` holds beside the pooled embeddings, for a lookup that can write ``x`` whole
        (:class:`~dlrm_mtl.models.input_frame.InputFrame`): the concat interaction on the raw
        dense features (no dense MLP: nothing of ``x`` before the lookup needs a forward of its
        own); None otherwise."""
        if not isinstance(self.interaction, ConcatInteraction) or not isinstance(self.dense_mlp, nn.Identity):
            return None
        return InputFrame(dense, scenario, [emb.weight for emb in self.scenario_emb])

    @staticmethod
    def _aux_weights_of(layer: nn.Module, lc: LayerConfig) -> None:
        layer.aux_weight = lc.aux_weight  # type: ignore[assignment]

    def forward(
        self, pooled: torch.Tensor, dense: torch.Tensor, scenario: torch.Tensor
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        concat = isinstance(self.interaction, ConcatInteraction)
        # [B, d]: the lookup wrote x whole (an InputFrame's; or no dense part and no levels)
        whole = concat and pooled.dim() == 2 and pooled.shape[1] == self.input_dim
        # the levels' rows as tensors of their own where x is built here or a layer reads them
        embs = [scenario_rows(emb.weight, scenario[:, i]) for i, emb in enumerate(self.scenario_emb)] \
            if self.reads_scenario_rows or not whole else []  # L x [B, e]
        context = (torch.cat(embs, dim=1) if len(embs) > 1 else embs[0]) if embs else None  # [B, L·e]
        if concat:
            if whole:
                x = pooled  # [B, d]
            else:  # one cat of dense, pooled and scenarios
                x = torch.cat([self.dense_mlp(dense), pooled.reshape(pooled.shape[0], -1)] + embs, dim=1)  # [B, d]
        else:
            pooled = pooled.reshape(pooled.shape[0], *self.pooled_shape)  # [B, F, D]
            x = torch.cat([self.interaction(self.dense_mlp(dense), pooled)] + embs, dim=1)  # [B, d]
        gates: Dict[str, torch.Tensor] = {}
        aux: Dict[str, torch.Tensor] = {}
        offset: Optional[torch.Tensor] = None  # [B, T]

        def collect(name: str, layer: nn.Module, out: LayerOutput) -> None:
            nonlocal offset
            for k, g in out.gates.items():
                gates[f"{name}/{k}" if k else name] = g
            for k, a in out.aux.items():
                aux[f"aux/{name}/{k}"] = a * layer.aux_weight
            if out.logit_offset is not None:
                offset = out.logit_offset if offset is None else offset + out.logit_offset

        for name, lvl, layer in zip(self.scenario_layer_names, self.layer_levels, self.scenario_layers):
            if lvl < 0:
                out = layer(x, leaf_ids(scenario, self.schema), context)
            else:
                out = layer(x, scenario[:, lvl], embs[lvl])
            collect(name, layer, out)
            x = out.y  # [B, d']
        shared: Optional[torch.Tensor] = x  # [B, d]: what every task reads, while it is one tensor
        for j, layer in enumerate(self.task_layers):
            out = layer(x, context)
            collect(f"task{j}", layer, out)
            x = out.y  # [T, B, d']
            shared = out.shared  # Shared-Bottom: y is an expand of this [B, d']
        if shared is not None and isinstance(self.towers, TaskTowers):
            x = shared  # the towers' shared-input path reads it directly
        elif x.dim() == 2:
            x = x.unsqueeze(0).expand(self.num_tasks, *x.shape)
        head = self.towers(x)  # [B, T], or a LayerOutput from a task-relation head
        if isinstance(head, LayerOutput):
            collect("heads", self.towers, head)
            head = head.y
        logits = head  # [B, T]
        if offset is not None:
            logits = logits + offset
        return logits, gates, aux


@torch.fx.wrap
def pooled_in_order(kt: KeyedTensor, names: List[str]) -> torch.Tensor:
    """``[B, Σ D_f]``: the pooled embeddings of ``names``, in that order. The KeyedTensor's own
    column order depends on the sharding plan; when it already is ``names``' order (the usual
    case) its values are returned as they are, otherwise the columns are gathered by key.
    fx-wrapped: TorchRec's pipelines trace the model and see this as one call."""
    if kt.keys() == names:
        return kt.values()
    by_key = kt.to_dict()
    return torch.cat([by_key[n] for n in names], dim=1)


class MultiScenarioMultiTaskModel(nn.Module):
    """EmbeddingBagCollection (sharded under DMP) + :class:`DenseArch`; with schema sequence
    features also an EmbeddingCollection (sharded by the same planner) whose events
    :class:`SequenceArch` encodes into vectors that join the pooled embeddings.

    Pooled embeddings are read *by key* from the KeyedTensor (its column order depends on the
    sharding plan) into ``[B, Σ D_f]`` in schema order (see :func:`pooled_in_order`).

    Example::

        model = MultiScenarioMultiTaskModel(schema, ModelConfig(), device=torch.device("cpu"))
        logits, gates, aux = model(batch.sparse, batch.dense, batch.scenario)   # [B, T]
    """

    def __init__(self, schema: Schema, cfg: ModelConfig, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.feature_names = [f.name for f in schema.sparse]
        self.ebc = EmbeddingBagCollection(tables=embedding_configs(schema), device=device)
        self.mean_spans = mean_spans(schema)  # the mean-pooled features' columns (summed by the kernels)
        # one EmbeddingCollection per embedding dim of the sequence tables (TorchRec's
        # collection holds one dim); each reads its own features of the batch's sequence KJT
        self.sequence_tables = nn.ModuleDict({f"dim{d}": EmbeddingCollection(tables=c, device=device)
                                              for d, c in sequence_configs(schema).items()})
        self.sequence_arch: Optional[SequenceArch] = None
        if schema.sequence:
            self.sequence_arch = SequenceArch(schema, cfg.sequence_encoders)
        elif cfg.sequence_encoders:
            raise ConfigError(f"model.sequence_encoders: the schema has no sequence features (sequence: true) to encode "
                              f"{sorted(cfg.sequence_encoders)}", "model.sequence_encoders")
        self.dense_arch = DenseArch(schema, cfg, self.sequence_arch.out_dims if self.sequence_arch is not None else ())
        # DeepMCP's matching and correlation subnets: training-only auxiliary losses
        self.deepmcp: Optional[DeepMCP] = DeepMCP(schema, cfg.deepmcp) if cfg.deepmcp.task else None
        # set by shard_model in a world of one (a plain object: not part of the state dict)
        self.local_lookup: Optional[LocalPooledLookup] = None

    def embed(self, sparse: KeyedJaggedTensor, sequence: Optional[KeyedJaggedTensor] = None,
              frame: Optional[InputFrame] = None) -> Tuple[torch.Tensor, Events]:
        """``([B, Σ D_f (+ Σ out_g)]``, the sequence groups' padded events``)``: the pooled
        embeddings in schema order — through :class:`LocalPooledLookup` when sharding set one
        (a world of one) and the batch's features come in the order it was built for, else
        through the (sharded) collection — then, with sequence features, their encoded vectors.
        With a ``frame`` (no sequence features), the local lookup may return the dense arch's
        whole input ``x [B, d]`` instead of ``[B, Σ D_f]`` (:meth:`DenseArch.input_frame`)."""
        lookup = self.local_lookup
        if lookup is not None and lookup.accepts(sparse.keys()):
            # the mean-pooled features averaged there (LocalPooledLookup)
            pooled = lookup(sparse, frame if self.sequence_arch is None else None)
        else:
            pooled = mean_of_bags(pooled_in_order(self.ebc(sparse), self.feature_names), sparse, self.mean_spans)
        if self.sequence_arch is None:
            return pooled, {}
        if sequence is None:
            raise ValueError("the schema has sequence features but the batch carries none (Batch.sequence is None)")
        # indexing, not unpacking: TorchRec's pipeline traces this with SequenceArch as a leaf
        out = self.sequence_arch(pooled, [collection(sequence) for collection in self.sequence_tables.values()])
        return torch.cat([pooled, out[0]], dim=1), out[1]

    def pooled(self, sparse: KeyedJaggedTensor, sequence: Optional[KeyedJaggedTensor] = None) -> torch.Tensor:
        """``[B, Σ D_f (+ Σ out_g)]``: the first part of :meth:`embed`."""
        return self.embed(sparse, sequence)[0]

    def forward(
        self, sparse: KeyedJaggedTensor, dense: torch.Tensor, scenario: torch.Tensor,
        sequence: Optional[KeyedJaggedTensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        return self.dense_arch(self.pooled(sparse, sequence), dense, scenario)


class TrainModule(nn.Module):
    """Model + loss, in the shape TorchRec's train pipelines expect: ``batch -> (loss, output)``.

    ``output`` is ``(logits [B, T] detached, loss terms, gates, number of real rows)``; gates
    may carry grad, so detach them before keeping them beyond the step. The model's auxiliary
    losses (already weighted per layer) go to the loss, which adds them to the total and logs
    each as its own term.

    The dense arch and the loss run through :class:`DenseStep` (``cuda_graph``, ``precision``:
    ``train.cuda_graph`` and ``train.precision``), which owns no parameters: the state dict
    is ``model.*`` and ``loss.*`` either way.
    """

    def __init__(self, model: MultiScenarioMultiTaskModel, loss: EntireSpaceLoss, cuda_graph: str = "auto",
                 precision: str = "fp32") -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.dense_step = DenseStep(model.dense_arch, loss, cuda_graph=cuda_graph, precision=precision)

    def forward(self, batch: Batch):
        # Indexing instead of tuple unpacking: TorchRec's train pipelines fx-trace this forward
        # (the sharded tables are traced through, DenseStep is a leaf module) and a Proxy
        # cannot be unpacked.
        model = self.model
        # a world of one's C lookup may write the dense arch's whole input (x [B, d]) instead of
        # the pooled part; DeepMCP reads the pooled embeddings themselves
        frame = model.dense_arch.input_frame(batch.dense, batch.scenario) \
            if model.local_lookup is not None and model.deepmcp is None and not _fx_tracing() else None
        pooled, events = model.embed(batch.sparse, batch.sequence, frame)  # [B, Σ D_f (+ Σ out_g)] or x [B, d]
        out = self.dense_step(pooled, batch.dense, batch.scenario, batch.labels, batch.label_mask, batch.weight, batch.bias,
                              batch.group, batch.term_labels, batch.term_rows)
        if self.model.deepmcp is not None:  # the matching and correlation subnets' losses
            out = with_auxiliary(out, self.model.deepmcp(pooled, events, batch.labels, batch.label_mask, batch.weight))
        # the reader's host count where the batch has one (no operator), else [] on the device,
        # read on log steps only; while fx traces this forward, the tensor (an attribute of the
        # traced batch is a Proxy)
        real_rows = batch.real_rows if not _fx_tracing() and batch.real_rows is not None else batch.real.sum()
        return out[0], (out[1].detach(), out[2], out[3], real_rows)
