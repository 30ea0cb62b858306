"""The serving model written by ``dlrm-mtl export`` (docs/serving.md): the trained ranking model
without TorchRec, as plain ``torch.nn`` modules that ``torch.export`` can trace.

:class:`ServingModel` maps one request batch to the task graph's predictions and the fused
ranking score::

    inputs  {"<feature>.values": [N_f] int64, "<feature>.offsets": [B+1] int64,   # per sparse feature
             "dense": [B, Fd] float32 (raw values), "scenario": [B, L] int64}
    outputs {"<prediction name>": [B] float32 ..., "score": [B] float32}

It is built from the same schema and model config as training: :class:`EmbeddingBags` (one
``nn.EmbeddingBag`` per schema table) stands in for TorchRec's EmbeddingBagCollection,
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

from typing import Dict, List, Mapping, Optional

import torch
from torch import nn

from dlrm_mtl.config import ModelConfig
from dlrm_mtl.modules.scenario_routing import ROUTINGS
from dlrm_mtl.schema import Schema
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
        weights = weights or {}
        self.tables = nn.ModuleDict()
        for f in schema.sparse:
            if f.table in self.tables:
                continue
            w = weights.get(f.table)
            if w is not None and tuple(w.shape) != (f.num_embeddings, f.dim):
                raise ValueError(f"table {f.table!r}: weight {list(w.shape)}, the schema says [{f.num_embeddings}, {f.dim}]")
            w = w if w is not None else torch.randn(f.num_embeddings, f.dim) / f.dim**0.5
            self.tables[f.table] = nn.EmbeddingBag.from_pretrained(w, freeze=True, mode=f.pooling, include_last_offset=True)
        self.features = [(f.name, f.table, f.num_embeddings) for f in schema.sparse]
        self.check_inputs = check_inputs

    def forward(self, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = []
        for name, table, n in self.features:
            values, offsets = inputs[values_name(name)], inputs[offsets_name(name)]  # [N_f], [B+1]
            if self.check_inputs:
                _check((values >= 0) & (values < n),
                       f"input {values_name(name)!r}: an id outside [0, {n}) (ids of a hash: true feature must be hashed "
                       "as the reader does, see signature.json)")
                _check(offsets[:1] == 0, f"input {offsets_name(name)!r}: offsets[0] must be 0")
                _check(offsets[1:] >= offsets[:-1], f"input {offsets_name(name)!r}: offsets must not decrease")
                _check(offsets[-1:] == values.shape[0],
                       f"input {offsets_name(name)!r}: the last offset must equal the number of ids in {values_name(name)!r}")
            pooled.append(self.tables[table](values, offsets))  # [B, D_f]
        return torch.cat(pooled, dim=1)  # [B, Σ D_f]


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
    """:class:`EmbeddingBags` + :class:`DenseTransform` + ``DenseArch`` (eval) + :class:`Predictions`.

    ``inputs`` (one pair per sparse feature, schema order): ``{"<f>.values": [N_f] int64, "<f>.offsets": [B+1]
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
        check_inputs: in-graph input checks (see the module docstring).

    Example::

        model = ServingModel(schema, cfg.model, {"ctcvr": 1.0}).eval()
        model.dense_arch.load_state_dict(dense_state)
        model(example_inputs(schema))["score"]       # [4]
    """

    def __init__(self, schema: Schema, model_cfg: ModelConfig, fusion: Mapping[str, float],
                 tables: Optional[Mapping[str, torch.Tensor]] = None, check_inputs: bool = True) -> None:
        super().__init__()
        from dlrm_mtl.models.ranking_model import DenseArch  # the training module (its file imports TorchRec)

        self.embeddings = EmbeddingBags(schema, tables, check_inputs)
        self.dense_transform = DenseTransform(schema, check_inputs)
        self.dense_arch = DenseArch(schema, model_cfg)
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
        dense = self.dense_transform(inputs[DENSE])  # [B, Fd]
        logits, _, _ = self.dense_arch(pooled, dense, scenario)  # [B, T]
        return self.predictions(logits)


def example_inputs(schema: Schema, batch: int = 4, ids_per_row: int = 2) -> Dict[str, torch.Tensor]:
    """A valid input batch (id 0 everywhere, dense 1.0, scenario 0): the example ``torch.export``
    traces with. ``batch`` and ``ids_per_row`` should not be 0 or 1 (export specialises those)."""
    out: Dict[str, torch.Tensor] = {}
    for f in schema.sparse:
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
    batch = Dim("batch", min=1)
    shapes: Dict[str, Dict[int, object]] = {}
    for i, f in enumerate(schema.sparse):
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
