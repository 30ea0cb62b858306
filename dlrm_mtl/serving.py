"""The serving model written by ``dlrm-mtl export`` (docs/serving.md): the trained ranking model
without TorchRec, as plain ``torch.nn`` modules that ``torch.export`` can trace.

:class:`ServingModel` maps one request batch to the task graph's predictions and the fused
ranking score::

    inputs  {"<feature>.values": [N_f] int64, "<feature>.offsets": [B+1] int64,   # per sparse feature
             "dense": [B, Fd] float32 (raw values), "scenario": [B, L] int64}
    outputs {"<prediction name>": [B] float32 ..., "score": [B] float32}

It is built from the same schema and model config as training: :class:`EmbeddingBags` (one
``nn.EmbeddingBag`` per schema table) stands in for TorchRec's EmbeddingBagCollection,
:class:`SequenceEvents` (one ``nn.Embedding`` per sequence table) for its EmbeddingCollections
(behaviour sequences, truncated in the graph as the reader truncates them; the training
``SequenceArch`` encodes them),
:class:`DenseTransform` applies the schema's dense transforms the way the reader does,
the training :class:`~dlrm_mtl.models.ranking_model.DenseArch` runs in eval mode (no gate
noise) and :class:`Predictions` turns its logits into named probabilities and the fused score
(:mod:`dlrm_mtl.scoring`). The loss and its position-bias tower are training-only and absent.

Input checks (``check_inputs``) are part of the graph: an id outside its table, a scenario id
outside its level, malformed offsets or a dense value the reader would refuse raise a
RuntimeError naming the input, in the exported program too (``torch._assert_async``; on CUDA
that is a device-side assert, like an out-of-range embedding lookup would be).

Example::

    model = ServingModel(schema, cfg.model, fusion_weights(schema, cfg.predict.fusion)).eval()
    out = model(example_inputs(schema, batch=4))
    out["ctcvr"].shape, out["score"].shape                  # [4], [4]
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from dlrm_mtl.config import ModelConfig
from dlrm_mtl.modules.scenario_routing import ROUTINGS
from dlrm_mtl.schema import Schema, SparseFeature
from dlrm_mtl.scoring import fused_score, named_predictions, prediction_names
from dlrm_mtl.task_graph import TaskGraph

SCORE = "score"  # output name of the fused ranking score
DENSE = "dense"
SCENARIO = "scenario"


def values_name(feature: str) -> str:
    """Input name of a sparse feature's ids: ``<feature>.values``."""
    return f"{feature}.values"


def offsets_name(feature: str) -> str:
    """Input name of a sparse feature's bag offsets: ``<feature>.offsets``."""
    return f"{feature}.offsets"


def output_names(schema: Schema) -> List[str]:
    """The serving model's outputs in order: :func:`~dlrm_mtl.scoring.prediction_names`, then ``score``."""
    names = prediction_names(schema)
    if SCORE in names:
        raise ValueError(f"a task or entire name is {SCORE!r}, the name of the fused score output: rename it in the schema")
    return names + [SCORE]


def _check(ok: torch.Tensor, message: str) -> None:
    """Raises RuntimeError(message) where ``ok`` (a bool tensor) is not all True; kept by torch.export."""
    torch._assert_async(ok.all(), message)


def _table_weight(f: SparseFeature, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The trained weight of ``f``'s table, checked against the schema (random where absent:
    tests, examples)."""
    w = weights.get(f.table)
    if w is not None and tuple(w.shape) != (f.num_embeddings, f.dim):
        raise ValueError(f"table {f.table!r}: weight {list(w.shape)}, the schema says [{f.num_embeddings}, {f.dim}]")
    return w if w is not None else torch.randn(f.num_embeddings, f.dim) / f.dim**0.5


def _frozen_tables(features: Sequence[SparseFeature], weights: Optional[Mapping[str, torch.Tensor]],
                   build: Callable[[SparseFeature, torch.Tensor], nn.Module]) -> nn.ModuleDict:
    """One frozen lookup module per table of ``features`` (the first feature of a shared table
    builds it), from its trained weight (:func:`_table_weight`)."""
    tables = nn.ModuleDict()
    for f in features:
        if f.table not in tables:
            tables[f.table] = build(f, _table_weight(f, weights or {}))
    return tables


def _check_ids(name: str, values: torch.Tensor, offsets: torch.Tensor, n: int) -> None:
    """In-graph checks of one feature's ``values`` / ``offsets`` (ids inside the table, offsets
    from 0, non-decreasing, ending at the number of ids)."""
    _check((values >= 0) & (values < n),
           f"input {values_name(name)!r}: an id outside [0, {n}) (ids of a hash: true feature must be hashed "
           "as the reader does, see signature.json)")
    _check(offsets[:1] == 0, f"input {offsets_name(name)!r}: offsets[0] must be 0")
    _check(offsets[1:] >= offsets[:-1], f"input {offsets_name(name)!r}: offsets must not decrease")
    _check(offsets[-1:] == values.shape[0],
           f"input {offsets_name(name)!r}: the last offset must equal the number of ids in {values_name(name)!r}")


class EmbeddingBags(nn.Module):
    """The sparse arch of serving: one ``nn.EmbeddingBag`` per schema table (features naming
    the same table share it), pooled with the table's ``sum`` or ``mean``; an empty bag pools
    to zeros, as in training.

    ``inputs {"<f>.values": [N_f] int64 ids in [0, num_embeddings), "<f>.offsets": [B+1]
    int64}`` -> pooled ``[B, Σ D_f]``, features in schema order (the layout DenseArch reads).
    Bag ``b`` of feature ``f`` is ``values[offsets[b]:offsets[b + 1]]``; ``offsets[0] == 0``
    and ``offsets[B] == N_f``.

    ``weights``: ``{table: [num_embeddings, dim]}`` used as they are (not copied); tables
    missing from it start random (tests, examples).

    Example::

        bags = EmbeddingBags(schema)
        ids, offs = torch.tensor([3, 7, 7]), torch.tensor([0, 1, 3])   # B = 2: bags [3], [7, 7]
        bags({"user_id.values": ids, "user_id.offsets": offs, ...}).shape   # [2, Σ D_f]
    """

    def __init__(self, schema: Schema, weights: Optional[Mapping[str, torch.Tensor]] = None, check_inputs: bool = True) -> None:
        super().__init__()
        self.tables = _frozen_tables(schema.sparse, weights, lambda f, w: nn.EmbeddingBag.from_pretrained(
            w, freeze=True, mode=f.pooling, include_last_offset=True))
        self.features = [(f.name, f.table, f.num_embeddings) for f in schema.sparse]
        self.check_inputs = check_inputs

    def forward(self, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = []
        for name, table, n in self.features:
            values, offsets = inputs[values_name(name)], inputs[offsets_name(name)]  # [N_f], [B+1]
            if self.check_inputs:
                _check_ids(name, values, offsets, n)
            pooled.append(self.tables[table](values, offsets))  # [B, D_f]
        return torch.cat(pooled, dim=1)  # [B, Σ D_f]


class SequenceEvents(nn.Module):
    """The schema's behaviour sequences (``Schema.sequence``) as training's
    ``SequenceArch.events`` gives them: per group (a sequence and its ``aligned_with`` side
    info) ``[B, max_len, Σ D]`` events, zero-padded, and the ``[B, max_len]`` mask of the real
    ones. Inputs are ``<f>.values`` / ``<f>.offsets`` per sequence feature, events oldest
    first; a longer list is cut in the graph as the reader cuts it (``keep: last``: its most
    recent ``max_len`` events), so callers may pass whole histories.

    With ``check_inputs``: ids inside their table, well-formed offsets, side info with its
    sequence's lengths (else a RuntimeError naming the input).

    Example::

        ev = SequenceEvents(schema)
        ev(inputs)["hist_items"][0].shape    # [B, 20, 32]
    """

    def __init__(self, schema: Schema, weights: Optional[Mapping[str, torch.Tensor]] = None, check_inputs: bool = True) -> None:
        super().__init__()
        self.tables = _frozen_tables(schema.sequence, weights, lambda f, w: nn.Embedding.from_pretrained(w, freeze=True))
        # per group: (name, max_len, keep, [(feature, table, num_embeddings)], main feature first)
        self.groups = [(g, fs[0].max_len, fs[0].keep, [(f.name, f.table, f.num_embeddings) for f in fs])
                       for g, fs in schema.sequence_groups.items()]
        self.check_inputs = check_inputs

    @staticmethod
    def kept_ids(values: torch.Tensor, offsets: torch.Tensor, max_len: int, keep: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``values [N]``, ``offsets [B+1]`` -> ``(ids [B, max_len]`` (0 where padded), ``mask)``:
        each row's first or last ``max_len`` ids, left-aligned."""
        lengths = offsets[1:] - offsets[:-1]  # [B]
        kept = lengths.clamp(max=max_len)
        start = offsets[:-1] + (lengths - kept if keep == "last" else 0)  # [B]
        pos = torch.arange(max_len, device=values.device)
        mask = pos.unsqueeze(0) < kept.unsqueeze(1)  # [B, L]
        idx = torch.where(mask, start.unsqueeze(1) + pos.unsqueeze(0), values.shape[0])  # padding -> the extra 0 below
        return torch.cat([values, values.new_zeros(1)])[idx], mask

    def forward(self, inputs: Dict[str, torch.Tensor]) -> Dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out: Dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for group, max_len, keep, feats in self.groups:
            main_offsets = inputs[offsets_name(feats[0][0])]
            parts: List[torch.Tensor] = []
            mask = None
            for name, table, n in feats:
                values, offsets = inputs[values_name(name)], inputs[offsets_name(name)]  # [N_f], [B+1]
                if self.check_inputs:
                    _check_ids(name, values, offsets, n)
                    if name != feats[0][0]:
                        _check(offsets == main_offsets, f"input {offsets_name(name)!r}: side info must have the lengths of "
                                                        f"its sequence {feats[0][0]!r} on every row")
                ids, m = self.kept_ids(values, offsets, max_len, keep)  # [B, L] x 2
                mask = m if mask is None else mask
                parts.append(self.tables[table](ids) * m.unsqueeze(2).to(torch.float32))  # [B, L, D_f], 0 where padded
            assert mask is not None
            out[group] = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=2), mask)
        return out


class DenseTransform(nn.Module):
    """The schema's dense transforms, in the reader's order (``RowGroupConverter.convert`` in
    ``dlrm_mtl/data/stream.py``): a missing value (NaN here) becomes the feature's ``default``,
    then ``transform`` (``log1p``), then clipping to [``clip_min``, ``clip_max``], then
    ``(x - mean) / std`` where ``standardize`` is set; all in float32.

    ``raw [B, Fd]`` float32, columns in schema order -> ``[B, Fd]`` as the model was trained on.

    With ``check_inputs`` it refuses what the reader refuses: NaN in a feature without a
    default, an infinite value, ``log1p`` of a negative value.

    Example::

        t = DenseTransform(schema)                  # price: log1p, quality: none, ...
        t(torch.tensor([[0.0, 1.0, 0.5, 2.0]]))     # [[0.0, 0.6931, 0.5, 2.0]]
    """

    def __init__(self, schema: Schema, check_inputs: bool = True) -> None:
        super().__init__()
        dense = schema.dense
        inf = float("inf")

        def column(values: List[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32).reshape(1, len(dense))  # [1, Fd]

        self.register_buffer("has_default", column([float(d.default is not None) for d in dense]).bool(), persistent=False)
        self.register_buffer("default", column([d.default if d.default is not None else 0.0 for d in dense]), persistent=False)
        self.register_buffer("log1p", column([float(d.transform == "log1p") for d in dense]).bool(), persistent=False)
        self.register_buffer("lo", column([-inf if d.clip_min is None else d.clip_min for d in dense]), persistent=False)
        self.register_buffer("hi", column([inf if d.clip_max is None else d.clip_max for d in dense]), persistent=False)
        self.register_buffer("mean", column([d.mean if d.standardize else 0.0 for d in dense]), persistent=False)
        self.register_buffer("std", column([d.std if d.standardize else 1.0 for d in dense]), persistent=False)
        self.names = [d.name for d in dense]
        self.defaults = [d.default is not None for d in dense]
        self.logs = [d.transform == "log1p" for d in dense]
        self.check_inputs = check_inputs

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        x = torch.where(torch.isnan(raw) & self.has_default, self.default, raw)  # [B, Fd]
        if self.check_inputs:
            for j, name in enumerate(self.names):
                what = "an infinite value" if self.defaults[j] else "NaN (a missing value: the schema declares no default) or an infinite value"
                _check(torch.isfinite(x[:, j]), f"input 'dense', column {j} ({name!r}): {what}")
                if self.logs[j]:
                    _check(x[:, j] >= 0, f"input 'dense', column {j} ({name!r}): log1p of a negative value")
        x = torch.where(self.log1p, torch.log1p(x), x)  # other columns' log1p is computed and dropped
        x = torch.minimum(torch.maximum(x, self.lo), self.hi)
        return (x - self.mean) / self.std


class Predictions(nn.Module):
    """Logits of the task heads -> the task graph's predictions by name and the fused score
    (:mod:`dlrm_mtl.scoring`: :func:`~dlrm_mtl.scoring.named_predictions`,
    :func:`~dlrm_mtl.scoring.fused_score`). ``TaskGraph`` loops only over the schema's fixed
    structure, so the graph traces as it is.

    ``logits [B, T]`` -> ``{name: [B]}`` in :func:`output_names` order (``score`` last).

    Example::

        head = Predictions(schema, {"ctr": 1.0, "ctcvr": 2.0})
        head(torch.randn(8, 2))          # {"ctr": [8], "cvr": [8], "ctcvr": [8], "score": [8]}
    """

    def __init__(self, schema: Schema, fusion: Mapping[str, float]) -> None:
        super().__init__()
        self.graph = TaskGraph(schema)
        self.fusion = dict(fusion)
        self.names = output_names(schema)

    def forward(self, logits: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = named_predictions(self.graph, logits)
        out[SCORE] = fused_score(out, self.fusion)
        return out


class ServingModel(nn.Module):
    """:class:`EmbeddingBags` (+ :class:`SequenceEvents` and the training ``SequenceArch`` with
    behaviour sequences) + :class:`DenseTransform` + ``DenseArch`` (eval) + :class:`Predictions`.

    ``inputs`` (one pair per sparse and per sequence feature, schema order): ``{"<f>.values": [N_f] int64, "<f>.offsets": [B+1]
    int64, "dense": [B, Fd] float32 raw, "scenario": [B, L] int64}`` ->
    ``{prediction name: [B], "score": [B]}``.

    Scenario layers that route rows by scenario run their static formulation (every scenario's
    experts on every row, then the row's own picked; equal to the grouped one, see
    tests/test_scenario_routing.py): it has no data-dependent shapes, so ``torch.export``
    traces it whatever device it is exported on.

    Args:
        schema, model_cfg: as training built the model.
        fusion: the fused score's weights (:func:`~dlrm_mtl.scoring.fusion_weights`).
        tables: ``{table: weight}`` (see :class:`EmbeddingBags`).
        sequence_tables: ``{table: weight}`` of the sequence features (see :class:`SequenceEvents`).
        check_inputs: in-graph input checks (see the module docstring).

    Example::

        model = ServingModel(schema, cfg.model, {"ctcvr": 1.0}).eval()
        model.dense_arch.load_state_dict(dense_state)
        model(example_inputs(schema))["score"]       # [4]
    """

    def __init__(self, schema: Schema, model_cfg: ModelConfig, fusion: Mapping[str, float],
                 tables: Optional[Mapping[str, torch.Tensor]] = None, check_inputs: bool = True,
                 sequence_tables: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        super().__init__()
        from dlrm_mtl.models.ranking_model import DenseArch  # the training module (its file imports TorchRec)
        from dlrm_mtl.models.sequence_arch import SequenceArch

        self.embeddings = EmbeddingBags(schema, tables, check_inputs)
        self.dense_transform = DenseTransform(schema, check_inputs)
        self.sequence_events: Optional[SequenceEvents] = None
        self.sequence_arch: Optional[SequenceArch] = None
        if schema.sequence:  # behaviour sequences: their events, then the training encoders
            self.sequence_events = SequenceEvents(schema, sequence_tables, check_inputs)
            self.sequence_arch = SequenceArch(schema, model_cfg.sequence_encoders)
        self.dense_arch = DenseArch(schema, model_cfg, self.sequence_arch.out_dims if self.sequence_arch is not None else ())
        for m in self.dense_arch.modules():
            if getattr(m, "routing", None) in ROUTINGS:
                m.routing = "static"
        self.predictions = Predictions(schema, fusion)
        self.levels = [(lvl.name, lvl.num_values) for lvl in schema.scenarios]
        self.check_inputs = check_inputs

    def forward(self, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        scenario = inputs[SCENARIO]  # [B, L]
        if self.check_inputs:
            for i, (name, n) in enumerate(self.levels):
                _check((scenario[:, i] >= 0) & (scenario[:, i] < n), f"input 'scenario', column {i} ({name!r}): an id outside [0, {n})")
        pooled = self.embeddings(inputs)  # [B, Σ D_f]
        if self.sequence_events is not None and self.sequence_arch is not None:
            encoded = self.sequence_arch.encode(pooled, self.sequence_events(inputs))  # [B, Σ out_g]
            pooled = torch.cat([pooled, encoded], dim=1)
        dense = self.dense_transform(inputs[DENSE])  # [B, Fd]
        logits, _, _ = self.dense_arch(pooled, dense, scenario)  # [B, T]
        return self.predictions(logits)


class UnrolledLSTM(nn.Module):
    """A one-layer, batch-first, unidirectional ``nn.LSTM`` (DUPN's encoder) as explicit steps
    over its L (static) positions, with the same weights: the same outputs (PyTorch's gate
    order i, f, g, o), and no batch-size guard in ``torch.export`` (the fused LSTM kernel's
    trace adds ``batch != 1``, which would refuse single-row requests).

    ``x [B, L, in]`` -> ``(y [B, L, H], (h [1, B, H], c [1, B, H]))``, as ``nn.LSTM``.

    Example::

        lstm = nn.LSTM(8, 16, batch_first=True)
        y, _ = UnrolledLSTM(lstm)(torch.randn(3, 5, 8))   # == lstm(x)[0]
    """

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        if lstm.num_layers != 1 or lstm.bidirectional or not lstm.batch_first or lstm.proj_size:
            raise ValueError("UnrolledLSTM takes a one-layer, batch-first, unidirectional LSTM without projection")
        self.w_ih, self.w_hh = lstm.weight_ih_l0.detach(), lstm.weight_hh_l0.detach()  # [4H, in], [4H, H]
        self.b = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach() if lstm.bias else torch.zeros(4 * lstm.hidden_size)
        self.hidden = lstm.hidden_size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, L, _ = x.shape
        xi = x @ self.w_ih.T + self.b  # [B, L, 4H]: the input's part of every step at once
        h = x.new_zeros(B, self.hidden)
        c = x.new_zeros(B, self.hidden)
        out: List[torch.Tensor] = []
        for t in range(L):
            i, f, g, o = (xi[:, t] + h @ self.w_hh.T).chunk(4, dim=1)  # [B, H] each
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            out.append(h)
        return torch.stack(out, dim=1), (h.unsqueeze(0), c.unsqueeze(0))


def _unroll_lstms(model: nn.Module) -> None:
    """Every ``nn.LSTM`` inside ``model`` replaced by its :class:`UnrolledLSTM` (same weights)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LSTM):
                setattr(parent, name, UnrolledLSTM(child))


def example_inputs(schema: Schema, batch: int = 4, ids_per_row: int = 2) -> Dict[str, torch.Tensor]:
    """A valid input batch (id 0 everywhere, dense 1.0, scenario 0): the example ``torch.export``
    traces with. ``batch`` and ``ids_per_row`` should not be 0 or 1 (export specialises those)."""
    out: Dict[str, torch.Tensor] = {}
    for f in schema.sparse + schema.sequence:
        out[values_name(f.name)] = torch.zeros(batch * ids_per_row, dtype=torch.int64)
        out[offsets_name(f.name)] = torch.arange(0, batch * ids_per_row + 1, ids_per_row, dtype=torch.int64)
    out[DENSE] = torch.ones(batch, len(schema.dense), dtype=torch.float32)
    out[SCENARIO] = torch.zeros(batch, len(schema.scenarios), dtype=torch.int64)
    return out


def export_serving_model(model: ServingModel, schema: Schema) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` (in eval mode, no grad) with a dynamic batch size and a
    dynamic number of ids per feature. Inputs are matched by name, so a caller's dict may be
    in any order."""
    from torch.export import Dim

    model.eval()
    _unroll_lstms(model)  # the fused LSTM's trace would refuse a batch of one row
    batch = Dim("batch", min=1)
    shapes: Dict[str, Dict[int, object]] = {}
    for i, f in enumerate(schema.sparse + schema.sequence):
        shapes[values_name(f.name)] = {0: Dim(f"ids_{i}", min=0)}
        shapes[offsets_name(f.name)] = {0: batch + 1}
    shapes[DENSE] = {0: batch}
    shapes[SCENARIO] = {0: batch}
    example = example_inputs(schema)
    with torch.no_grad(), _size_oblivious():
        return torch.export.export(model, (example,), dynamic_shapes=(shapes,), strict=False)


def _size_oblivious():
    """torch's ``backed_size_oblivious`` during the export: without it the embedding bags'
    output layout checks add a ``batch >= 2`` guard and a batch of one row is refused (the
    0/1 specialisation, see the torch.export docs). Sizes are then traced as if never 1, which
    changes no result here: no dimension of the batch is ever broadcast."""
    import contextlib

    from torch.fx.experimental import _config

    if not hasattr(_config, "backed_size_oblivious"):
        return contextlib.nullcontext()
    return _config.patch(backed_size_oblivious=True)
