"""The pooled embedding lookup of a world of one, straight through the sharded tables' kernels."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_mtl.models.bag_means import mean_of_bags
from dlrm_mtl.models.input_frame import InputFrame
from dlrm_mtl.models.recorded_lookup import RecordedLookup


class LocalPooledLookup:
    """``kjt -> [B, Σ D_f]`` (pooled embeddings in ``feature_names`` order) for a sharded
    EmbeddingBagCollection whose every table lives whole on this, the only, rank.

    In a world of one, TorchRec's ``ShardedEmbeddingBagCollection.forward`` permutes the batch
    into its sharding's feature order, runs a splits "all-to-all" and a values "all-to-all"
    over one rank, looks up each group of tables, and sends the pooled result through an
    output "all-to-all" and a ``KeyedTensor``, with an awaitable at every stage: about 1.2-1.8
    ms of host work per step on the benchmarks, against ~0.1 ms per fbgemm kernel call
    (docs/performance.md). This calls the same table-batched fbgemm modules (the sharded
    module's own, so the weights, the fused optimizer applied in backward, its state and every
    checkpoint are the same objects) on the batch directly: one split per table group, one
    kernel per group, and when there are several groups one ``split`` of each group's output
    into its column runs and one ``cat`` of the runs in schema order (whose backward is a
    ``cat`` per group, not a zero-filled gradient per slice). A batch whose features come in
    the kernels' order (:attr:`kernel_keys`: the reader builds them so, see
    ``ParquetStream.set_sparse_order``) needs no permute; one in ``batch_keys`` order is
    permuted first. Each kernel is called through a :class:`RecordedLookup` where that
    applies (fbgemm 1.8, tables in host memory trained with row-wise Adagrad: the CPU path),
    which skips the kernel module's own per-call Python; :attr:`calls` are those callables,
    :attr:`modules` the kernel modules.

    The output is the schema's pooling: the mean-pooled features (``mean_spans``) averaged
    over their bags, group by group — a :class:`RecordedLookup` returns its group's pooling
    (averaged in the C lookup's own passes where it runs there,
    :class:`~dlrm_mtl.models.one_table_lookup.OneTableLookup`, else by
    :func:`~dlrm_mtl.models.bag_means.mean_of_bags`), a kernel module's sums are divided here.

    It holds references, not modules: the sharded collection stays the owner (state dicts and
    optimizer keys are unchanged). :meth:`of` returns None for anything it does not cover
    (several ranks, feature processors, variable batch sizes, a kernel other than a
    table-batched one); the caller then uses the sharded module as before.

    Example::

        lookup = LocalPooledLookup.of(dmp.module.model.ebc, ["user_id", "item_id"], batch.sparse.keys())
        pooled = lookup(batch.sparse)   # [B, D_user + D_item]
    """

    def __init__(self, modules: List[nn.Module], group_features: List[List[str]], dims: Dict[str, int],
                 batch_keys: List[str], feature_names: List[str], one_table: Optional[bool] = None,
                 mean_spans: Sequence[Tuple[str, int, int]] = ()) -> None:
        order = [n for names in group_features for n in names]
        if sorted(order) != sorted(batch_keys):
            raise ValueError(f"the tables' features {order} are not the batch's {batch_keys}")
        self.modules = modules
        # what each kernel is called through: its replay, or the module itself
        self.calls = [RecordedLookup.of(m, one_table) or m for m in modules]
        self.batch_keys = list(batch_keys)
        self.kernel_keys = order  # the groups' features, group after group
        perm = [self.batch_keys.index(n) for n in order]
        self.perm: Optional[List[int]] = None if perm == list(range(len(perm))) else perm
        self.splits = [len(names) for names in group_features]
        # where each feature's columns are in its group's output: (group, first column)
        where: Dict[str, Tuple[int, int]] = {}
        for g, names in enumerate(group_features):
            at = 0
            for n in names:
                where[n] = (g, at)
                at += dims[n]
        # the output in feature_names order as runs of adjacent columns of one group's output:
        # (group, start, end); one run is a group's output as it is
        runs: List[List[int]] = []
        for n in feature_names:
            g, start = where[n]
            if runs and runs[-1][0] == g and runs[-1][2] == start:
                runs[-1][2] += dims[n]
            else:
                runs.append([g, start, start + dims[n]])
        self.runs = [tuple(r) for r in runs]
        # the schema's mean pooling (bag_means.mean_spans) as spans of each group's output: every
        # group's call returns its group's schema pooling (a RecordedLookup applies its own,
        # in its C call's passes where that runs; a kernel module's sums are divided here)
        self.mean_spans = list(mean_spans)
        self.group_spans: List[List[Tuple[str, int, int]]] = [[] for _ in group_features]
        for n, start, end in self.mean_spans:
            g, at = where[n]
            self.group_spans[g].append((n, at, at + end - start))
        for call, spans in zip(self.calls, self.group_spans):
            if isinstance(call, RecordedLookup):
                call.mean_spans = spans
        # each group's output cut into its runs (they cover its columns), and where each run
        # goes in the output
        self.run_sizes: List[List[int]] = []
        index: Dict[Tuple[int, int], int] = {}
        for g in range(len(group_features)):
            mine = sorted((a, b) for gg, a, b in self.runs if gg == g)
            for a, _ in mine:
                index[(g, a)] = len(index)
            self.run_sizes.append([b - a for a, b in mine])
        self.run_order = [index[(g, a)] for g, a, _ in self.runs]

    def accepts(self, keys: List[str]) -> bool:
        """Whether a batch with these sparse keys (in this order) can be looked up here."""
        return keys == self.kernel_keys or keys == self.batch_keys

    @classmethod
    def of(cls, sharded_ebc: nn.Module, feature_names: List[str], batch_keys: List[str],
           one_table: Optional[bool] = None, mean_spans: Sequence[Tuple[str, int, int]] = ()) -> Optional["LocalPooledLookup"]:
        """The lookup for ``sharded_ebc`` (a ShardedEmbeddingBagCollection) in a world of one,
        or None when it does not apply (see the class docstring). ``one_table``: each
        :class:`RecordedLookup`'s (None: its default); ``mean_spans``: the mean-pooled
        features' columns (:func:`~dlrm_mtl.models.bag_means.mean_spans`), averaged here."""
        from torchrec.distributed.batched_embedding_kernel import BaseBatchedEmbeddingBag
        from torchrec.distributed.embedding_lookup import GroupedPooledEmbeddingsLookup

        if not torch.distributed.is_initialized() or torch.distributed.get_world_size() != 1:
            return None
        lookups = getattr(sharded_ebc, "_lookups", None)
        if not lookups or getattr(sharded_ebc, "_is_weighted", False):
            return None
        modules: List[nn.Module] = []
        group_features: List[List[str]] = []
        dims: Dict[str, int] = {}
        for lookup in lookups:
            if type(lookup) is not GroupedPooledEmbeddingsLookup or getattr(lookup, "_feature_processor", None) is not None:
                return None
            for emb in lookup._emb_modules:
                if not isinstance(emb, BaseBatchedEmbeddingBag):
                    return None
                for table in emb.config.embedding_tables:
                    if table.local_cols != table.embedding_dim or table.local_rows != table.num_embeddings:
                        return None  # a table split into column or row shards
                    for n in table.feature_names:
                        dims[n] = table.embedding_dim
                modules.append(emb)
                group_features.append(list(emb.config.feature_names()))
        if sorted(dims) != sorted(feature_names):
            return None
        try:
            return cls(modules, group_features, dims, batch_keys, feature_names, one_table, mean_spans)
        except ValueError:
            return None

    def __call__(self, kjt: KeyedJaggedTensor, frame: Optional[InputFrame] = None) -> torch.Tensor:
        """``[B, Σ D_f]``; with a ``frame`` (:class:`~dlrm_mtl.models.input_frame.InputFrame`), where
        one group's C call serves the whole lookup, possibly the dense arch's whole input
        ``[B, frame.width(Σ D_f)]`` instead (the caller tells them apart by width)."""
        if kjt.variable_stride_per_key():
            raise ValueError("LocalPooledLookup: variable batch sizes per feature are not supported")
        if self.perm is not None and kjt.keys() != self.kernel_keys:
            kjt = kjt.permute(self.perm)
        parts = kjt.split(self.splits) if len(self.splits) > 1 else [kjt]
        if frame is not None and len(self.runs) == 1 and isinstance(self.calls[0], RecordedLookup):
            return self.calls[0](parts[0], frame)  # one group in feature_names order: x, or [B, Σ D_f]
        outs: List[torch.Tensor] = []
        for call, part, spans in zip(self.calls, parts, self.group_spans):
            out = call(part)  # [B, Σ D] of the group; a RecordedLookup's has the schema's pooling
            if spans and not isinstance(call, RecordedLookup):
                out = mean_of_bags(out, part, spans)  # the kernel module's sums: divided here
            outs.append(out)
        if len(self.runs) == 1:
            pooled = outs[0]  # [B, Σ D_f]: one group, already in feature_names order
        else:  # one copy: the groups' column runs, in feature_names order
            pieces = [p for out, sizes in zip(outs, self.run_sizes) for p in out.split(sizes, dim=1)]
            pooled = torch.cat([pieces[i] for i in self.run_order], dim=1)  # [B, Σ D_f]
        return pooled
