"""Data set schema: the single source of truth for tables, scenarios and tasks.

A schema is a YAML file (one per data set). The model (embedding tables, scenario
embeddings, task heads), the loss (task graph, loss spaces) and the metrics
(scenario x task slices, oracle columns) are all built from it.

Example::

    name: synthetic
    row_id: row_id
    sparse:
      - {name: user_id, table: t_user, num_embeddings: 200000, dim: 16}
      - {name: hist_cats, table: t_cat, num_embeddings: 500, dim: 16,
         multi_hot: true, max_len: 8, pooling: mean}
      - {name: hist_items, table: t_item, num_embeddings: 100000, dim: 16,
         sequence: true, max_len: 50}              # unpooled: [B, 50, 16] + mask
      - {name: hist_item_cats, table: t_cat_seq, num_embeddings: 500, dim: 8,
         sequence: true, max_len: 50, aligned_with: hist_items}   # side info per event
    dense:
      - {name: price, transform: log1p}
    scenarios:
      - {name: channel, column: channel, num_values: 2}
      - {name: domain, column: domain, num_values: 2}
    tasks:
      - {name: ctr, label: click, oracle: true_pctr}
      - {name: cvr, label: conversion, parent: ctr, loss_space: entire,
         entire_name: ctcvr, oracle: true_pcvr}
    user_id: user_id          # optional: enables GAUC
    position_bias: {features: [position], tasks: [ctr]}   # optional shallow bias tower
    group_id: request_id      # optional: integer request ids, for loss.ranking

Task graph syntax (see :class:`Task` and docs/tasks.md):

* ``parent: ctr`` chains a task: its head predicts P(task | ctr = 1);
* ``parent: "!dact"`` conditions on the parent being *negative*: P(task | dact = 0, and
  dact's own ancestors positive) -- ESM²'s "buy without a deterministic action" branch;
* ``sum_of: [buy_d, buy_o]`` defines a *derived* task with no head of its own: its
  entire-space probability is the sum of the branches' entire-space probabilities (the
  branches must be mutually exclusive, i.e. split on some task and its negation), e.g.
  ESM²'s pCTCVR = pCTR·[y2·y3 + (1−y2)·y4];
* ``loss_space: none`` gives a task no loss term of its own (ESM²'s branch heads are trained
  only through the derived sum).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union, get_args, get_origin, get_type_hints

import yaml

DENSE_TRANSFORMS = ("none", "log1p")
POOLINGS = ("sum", "mean")
LOSS_SPACES = ("entire", "parent_positive", "none")
TASK_TYPES = ("binary", "regression")
SEQUENCE_KEEPS = ("last", "first")
# TorchRec keeps each collection's tables in an ``nn.ModuleDict`` keyed by table name: a name
# that is already an attribute of one cannot be a key there
RESERVED_TABLE_NAMES = frozenset((
    "T_destination", "add_module", "apply", "bfloat16", "buffers", "call_super_init", "children", "clear",
    "compile", "cpu", "cuda", "double", "dump_patches", "eval", "extra_repr", "float", "forward", "get_buffer",
    "get_extra_state", "get_parameter", "get_submodule", "half", "ipu", "items", "keys", "load_state_dict",
    "modules", "mtia", "named_buffers", "named_children", "named_modules", "named_parameters", "parameters", "pop",
    "register_backward_hook", "register_buffer", "register_forward_hook", "register_forward_pre_hook",
    "register_full_backward_hook", "register_full_backward_pre_hook", "register_load_state_dict_post_hook",
    "register_load_state_dict_pre_hook", "register_module", "register_parameter", "register_state_dict_post_hook",
    "register_state_dict_pre_hook", "requires_grad_", "set_extra_state", "set_submodule", "share_memory",
    "state_dict", "to", "to_empty", "train", "training", "type", "update", "values", "xpu", "zero_grad",
))


class SchemaError(ValueError):
    """A schema file that is malformed or inconsistent."""


@dataclass
class SparseFeature:
    """One categorical feature: a column of int64 ids (single-hot) or list<int64> (multi-hot).

    ``sequence: true`` keeps a list column unpooled (a behaviour sequence, oldest event
    first): it is looked up in TorchRec's ``EmbeddingCollection`` and reaches the model as
    ``[B, max_len, dim]`` padded events plus a ``[B, max_len]`` mask. ``max_len`` is then
    required; ``keep`` says which end of a longer list survives (``last``: the most recent
    events; truncated ids are counted). ``aligned_with`` names another sequence feature whose
    events this one describes (side info: the category or time of each event): its lists must
    have the same length on every row (an error names file, column and row otherwise), it is
    truncated alike and its embeddings are concatenated to that feature's per event.
    Sequence features live in :attr:`Schema.sequence`, not in :attr:`Schema.sparse`. A
    sequence of ``max_len: 1`` may read a scalar id column (e.g. the candidate item, to share
    the history's table as DIN does): each row one event, none where the id is null.
    """

    name: str
    table: str
    num_embeddings: int
    dim: int = 16
    multi_hot: bool = False
    max_len: int = 0  # multi-hot truncation; 0 = keep all
    pooling: str = "sum"
    # False: int ids must lie in [0, num_embeddings). True: int or string raw ids are hashed
    # (stable: FNV-1a for strings, splitmix64 finaliser, modulo num_embeddings).
    hash: bool = False
    column: str = ""  # defaults to name
    sequence: bool = False
    keep: str = "last"  # sequences: which end of an over-long list is kept
    aligned_with: str = ""  # sequences: the sequence feature whose events this one describes

    def __post_init__(self) -> None:
        self.column = self.column or self.name
        if self.sequence:
            self.multi_hot = True


@dataclass
class DenseFeature:
    """One numeric feature, transformed at read time in this order:

    null -> ``default`` (counted; a null without a default is an error), then ``transform``
    (``log1p`` needs values >= 0), then clipping to [``clip_min``, ``clip_max``] (counted),
    then, when ``standardize``, ``(x - mean) / std`` with statistics written into the schema
    by ``dlrm-mtl dense-stats``.
    """

    name: str
    transform: str = "none"
    column: str = ""
    default: Optional[float] = None
    clip_min: Optional[float] = None
    clip_max: Optional[float] = None
    standardize: bool = False
    mean: Optional[float] = None
    std: Optional[float] = None

    def __post_init__(self) -> None:
        self.column = self.column or self.name


@dataclass
class ScenarioLevel:
    """One level of the scenario hierarchy (e.g. channel, then domain): ids in [0, num_values)."""

    name: str
    num_values: int
    column: str = ""
    value_names: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.column = self.column or self.name
        if self.value_names and len(self.value_names) != self.num_values:
            raise SchemaError(f"scenario level {self.name!r}: {len(self.value_names)} value_names for num_values {self.num_values}")
        if "all" in self.value_names:
            raise SchemaError(f"scenario level {self.name!r}: the value name 'all' is reserved for the metrics' overall row")


@dataclass
class Task:
    """A prediction task. ``parent`` chains it (ESMM): its head predicts P(task | parent).

    ``type``: ``binary`` (0/1 label, sigmoid head, BCE) or ``regression`` (real label, e.g. a
    completion ratio; linear head, MSE; it may have a parent, trained on the parent-positive
    rows, but cannot be a parent, a branch or entire-space).

    ``parent``: another task's name, or ``"!name"`` for the negated parent (the task lives on
    rows where that parent is 0 and the parent's ancestors are 1).

    ``loss_space``: ``entire`` trains the chained product against the chained label on every
    impression (ESMM); ``parent_positive`` trains the conditional head only on rows inside its
    conditional space (PLE's sample-space mask, eq. 9); ``none``: no loss term of its own.
    A root task (no parent) always trains on every row with a label.

    ``sum_of``: a derived binary task without a head: entire-space probability = Σ of the
    listed branch tasks' entire-space probabilities (ESM²). Its label must be implied by its
    ``parent`` (e.g. buy ⇒ click). The model still emits a logit column for it (one column per
    task keeps logits, labels and masks aligned); that column is ignored.

    ``oracle`` names a column holding the true conditional probability (synthetic data), used
    to report the oracle AUC. ``weight``: static loss weight w_k of the task's term.
    """

    name: str
    label: str
    type: str = "binary"
    parent: Optional[str] = None
    loss_space: str = "entire"
    entire_name: str = ""  # metric name of the chained (entire-space) prediction
    oracle: Optional[str] = None
    weight: float = 1.0
    sum_of: List[str] = field(default_factory=list)

    @property
    def parent_name(self) -> Optional[str]:
        """The parent task's name without the negation mark."""
        return None if self.parent is None else self.parent.lstrip("!")

    @property
    def parent_negated(self) -> bool:
        return self.parent is not None and self.parent.startswith("!")

    @property
    def derived(self) -> bool:
        return bool(self.sum_of)


@dataclass
class PositionBias:
    """YouTube MMoE §4.4 shallow tower (Zhao et al. 2019): numeric bias ``features`` (columns,
    e.g. the display position) feed a small tower whose output is added to the logits of
    ``tasks`` during training only; serving and evaluation use the main model alone. Bias
    features must not also be dense features of the model.

    ``reference``: bias feature values at which the tower's output is 0 (default 0 for each
    feature), so dropping the tower means predicting as if every item were shown there (e.g.
    ``[1]``: the top position). It also pins the tower's intercept to the main model."""

    features: List[str]
    tasks: List[str]
    reference: List[float] = field(default_factory=list)


@dataclass
class Schema:
    name: str
    sparse: List[SparseFeature]
    dense: List[DenseFeature]
    scenarios: List[ScenarioLevel]
    tasks: List[Task]
    row_id: Optional[str] = None
    weight: Optional[str] = None  # per-row sample weight column (finite, >= 0)
    user_id: Optional[str] = None  # user column (int or string), enables GAUC
    position_bias: Optional[PositionBias] = None
    # request-group column (integer ids, no nulls): rows sharing a value are one request; read
    # as ``Batch.group`` for ``loss.ranking`` (training only)
    group_id: Optional[str] = None
    # unpooled behaviour sequences (``sequence: true`` in the file's ``sparse`` list, moved
    # here on construction): looked up in the EmbeddingCollection
    sequence: List[SparseFeature] = field(default_factory=list)

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        self.sequence = list(self.sequence) + [f for f in self.sparse if f.sequence]
        self.sparse = [f for f in self.sparse if not f.sequence]
        self.validate()

    def validate(self) -> None:
        def dup(names: List[str], what: str) -> None:
            seen = set()
            for n in names:
                if n in seen:
                    raise SchemaError(f"schema {self.name!r}: duplicate {what} {n!r}")
                seen.add(n)

        if not self.sparse:
            raise SchemaError(f"schema {self.name!r}: needs at least one sparse feature that is not a sequence")
        if not self.scenarios:
            raise SchemaError(f"schema {self.name!r}: needs at least one scenario level")
        if not self.tasks:
            raise SchemaError(f"schema {self.name!r}: needs at least one task")
        dup([f.name for f in self.sparse + self.sequence], "sparse feature")
        dup([f.name for f in self.dense], "dense feature")
        dup([s.name for s in self.scenarios], "scenario level")
        dup([t.name for t in self.tasks], "task")
        tables: Dict[str, SparseFeature] = {}
        for f in self.sparse:
            if f.num_embeddings <= 0 or f.dim <= 0:
                raise SchemaError(f"sparse feature {f.name!r}: num_embeddings and dim must be > 0")
            if f.pooling not in POOLINGS:
                raise SchemaError(f"sparse feature {f.name!r}: pooling {f.pooling!r} not in {POOLINGS}")
            other = tables.setdefault(f.table, f)
            if (other.num_embeddings, other.dim, other.pooling) != (f.num_embeddings, f.dim, f.pooling):
                raise SchemaError(
                    f"features {other.name!r} and {f.name!r} share table {f.table!r} "
                    "but disagree on num_embeddings/dim/pooling"
                )
        self._validate_sequences(tables)
        for t in list(tables):
            if t in RESERVED_TABLE_NAMES or "." in t or not t:
                raise SchemaError(f"table name {t!r} cannot be used: TorchRec keys its tables by name in an nn.ModuleDict, "
                                  "which has an attribute of that name (rename the table)")
        for d in self.dense:
            if d.transform not in DENSE_TRANSFORMS:
                raise SchemaError(f"dense feature {d.name!r}: transform {d.transform!r} not in {DENSE_TRANSFORMS}")
            if d.clip_min is not None and d.clip_max is not None and d.clip_min > d.clip_max:
                raise SchemaError(f"dense feature {d.name!r}: clip_min > clip_max")
            if d.standardize and (d.mean is None or not d.std):
                raise SchemaError(
                    f"dense feature {d.name!r}: standardize needs mean and std > 0 "
                    "(compute them with `dlrm-mtl dense-stats`)"
                )
        for s in self.scenarios:
            if s.num_values <= 0:
                raise SchemaError(f"scenario level {s.name!r}: num_values must be > 0")
        names = {t.name for t in self.tasks}
        by_name = {t.name: t for t in self.tasks}
        for t in self.tasks:
            if t.type not in TASK_TYPES:
                raise SchemaError(f"task {t.name!r}: type {t.type!r} not in {TASK_TYPES}")
            if t.loss_space not in LOSS_SPACES:
                raise SchemaError(f"task {t.name!r}: loss_space {t.loss_space!r} not in {LOSS_SPACES}")
            if t.parent is not None and t.parent_name not in names:
                raise SchemaError(f"task {t.name!r}: parent {t.parent!r} is not a task")
        # parents must form a forest (no cycles)
        for t in self.tasks:
            seen, cur = set(), t
            while cur.parent is not None:
                if cur.name in seen:
                    raise SchemaError(f"task {t.name!r}: parent chain has a cycle")
                seen.add(cur.name)
                cur = by_name[cur.parent_name]  # type: ignore[index]
        for t in self.tasks:
            if t.parent is not None:
                p = by_name[t.parent_name]  # type: ignore[index]
                if p.type != "binary":
                    raise SchemaError(f"task {t.name!r}: parent {p.name!r} is a {p.type} task (only binary tasks can be parents)")
                if p.derived:
                    raise SchemaError(f"task {t.name!r}: parent {p.name!r} is a sum_of task (no head to chain on)")
            if t.type == "regression":
                if t.parent is not None and t.loss_space != "parent_positive" and t.loss_space != "none":
                    raise SchemaError(
                        f"task {t.name!r}: a regression task with a parent needs loss_space parent_positive "
                        "(an entire-space product of a regression value is undefined)"
                    )
                if t.sum_of:
                    raise SchemaError(f"task {t.name!r}: sum_of needs a binary task")
            if t.derived:
                self._validate_sum(t, by_name)
        branches = {b for t in self.tasks for b in t.sum_of}
        for b in branches:
            if by_name[b].type != "binary" or by_name[b].derived:
                raise SchemaError(f"task {b!r}: a sum_of branch must be a binary head task")
        if self.position_bias is not None:
            pb = self.position_bias
            if not pb.features or not pb.tasks:
                raise SchemaError("position_bias: needs at least one feature and one task")
            for n in pb.tasks:
                if n not in names:
                    raise SchemaError(f"position_bias: task {n!r} is not a task")
                if by_name[n].derived:
                    raise SchemaError(f"position_bias: task {n!r} is a sum_of task (it has no logit)")
            if pb.reference and len(pb.reference) != len(pb.features):
                raise SchemaError(f"position_bias: reference has {len(pb.reference)} values for {len(pb.features)} features")
            dense_cols = {d.column for d in self.dense}
            both = sorted(set(pb.features) & dense_cols)
            if both:
                raise SchemaError(
                    f"position_bias: feature(s) {both} are also dense features; the model would learn the bias "
                    "itself and the tower would not be dropped at serving"
                )

    def _validate_sequences(self, tables: Dict[str, SparseFeature]) -> None:
        """Sequence features: list columns with ``max_len``, their own tables (the
        EmbeddingCollection's, not shared with pooled features), side info aligned with a
        sequence of the same length and truncation."""
        by_name = {f.name: f for f in self.sequence}
        seq_tables: Dict[str, SparseFeature] = {}
        for f in self.sequence:
            where = f"sparse feature {f.name!r} (sequence)"
            if f.max_len <= 0:
                raise SchemaError(f"{where}: needs max_len > 0 (the padded length of its events)")
            if f.keep not in SEQUENCE_KEEPS:
                raise SchemaError(f"{where}: keep {f.keep!r} not in {SEQUENCE_KEEPS}")
            if f.num_embeddings <= 0 or f.dim <= 0:
                raise SchemaError(f"{where}: num_embeddings and dim must be > 0")
            if f.table in tables:
                raise SchemaError(
                    f"{where}: table {f.table!r} also holds pooled feature {tables[f.table].name!r}; a sequence's table "
                    "lives in the EmbeddingCollection (to share it with a candidate, declare the candidate as a "
                    "sequence feature of max_len 1)")
            other = seq_tables.setdefault(f.table, f)
            if (other.num_embeddings, other.dim) != (f.num_embeddings, f.dim):
                raise SchemaError(f"features {other.name!r} and {f.name!r} share table {f.table!r} but disagree on num_embeddings/dim")
            if f.aligned_with:
                main = by_name.get(f.aligned_with)
                if main is None:
                    raise SchemaError(f"{where}: aligned_with {f.aligned_with!r} is not a sequence feature")
                if main.aligned_with:
                    raise SchemaError(f"{where}: aligned_with {main.name!r}, which is itself aligned with {main.aligned_with!r}")
                if (main.max_len, main.keep) != (f.max_len, f.keep):
                    raise SchemaError(f"{where}: max_len/keep ({f.max_len}, {f.keep}) differ from {main.name!r}'s "
                                      f"({main.max_len}, {main.keep}); aligned side info is truncated with its sequence")
        for t, f in seq_tables.items():
            tables.setdefault(t, f)

    @property
    def sequence_groups(self) -> Dict[str, List[SparseFeature]]:
        """Each main sequence feature's name -> [it, then its aligned side-info features]:
        one group of events, its embeddings concatenated per event."""
        groups: Dict[str, List[SparseFeature]] = {f.name: [f] for f in self.sequence if not f.aligned_with}
        for f in self.sequence:
            if f.aligned_with:
                groups[f.aligned_with].append(f)
        return groups

    def steps(self, task: str) -> List[Tuple[int, bool]]:
        """The conditions defining a head task's entire-space event, from the root down:
        ``(task index, positive)``; e.g. ESM²'s ``buy_o`` (parent ``!dact``, dact's parent ctr)
        -> ``[(ctr, True), (dact, False), (buy_o, True)]``. A sum_of task has none itself."""
        by_name = {t.name: t for t in self.tasks}
        out: List[Tuple[int, bool]] = []
        cur: Optional[Task] = by_name[task]
        positive = True
        while cur is not None:
            if not cur.derived:
                out.append((self.task_index(cur.name), positive))
            positive = not cur.parent_negated
            cur = by_name[cur.parent_name] if cur.parent is not None else None  # type: ignore[index]
        return out[::-1]

    def _validate_sum(self, t: Task, by_name: Dict[str, Task]) -> None:
        for b in t.sum_of:
            if b not in by_name:
                raise SchemaError(f"task {t.name!r}: sum_of names {b!r}, which is not a task")
            if b == t.name:
                raise SchemaError(f"task {t.name!r}: sum_of cannot name itself")
        if len(set(t.sum_of)) != len(t.sum_of) or len(t.sum_of) < 2:
            raise SchemaError(f"task {t.name!r}: sum_of needs two or more distinct branches")
        if t.parent_negated:
            raise SchemaError(f"task {t.name!r}: a sum_of task cannot have a negated parent")
        if t.parent is not None:
            ctx = self.steps(t.parent_name)  # type: ignore[arg-type]
            for b in t.sum_of:
                if self.steps(b)[: len(ctx)] != ctx:
                    raise SchemaError(
                        f"task {t.name!r}: branch {b!r} does not pass through the parent {t.parent!r} "
                        "(each branch's chain must start with the parent's chain)"
                    )
        # mutually exclusive branches: each pair splits on some task (positive in one, negated in the other)
        for i, a in enumerate(t.sum_of):
            for b in t.sum_of[i + 1 :]:
                sa, sb = dict(self.steps(a)), dict(self.steps(b))
                if not any(k in sb and sb[k] != v for k, v in sa.items()):
                    raise SchemaError(
                        f"task {t.name!r}: branches {a!r} and {b!r} are not mutually exclusive (their chains must "
                        "split on a task and its negation, e.g. parent: dact vs parent: \"!dact\"), so their "
                        "probabilities cannot be summed"
                    )

    # ------------------------------------------------------------------ helpers
    @property
    def task_names(self) -> List[str]:
        return [t.name for t in self.tasks]

    def task_index(self, name: str) -> int:
        return self.task_names.index(name)

    def chain(self, task: str) -> List[int]:
        """Indices of the tasks from the root down to ``task`` (inclusive), negations ignored."""
        by_name = {t.name: t for t in self.tasks}
        out = []
        cur: Optional[str] = task
        while cur is not None:
            out.append(self.task_index(cur))
            cur = by_name[cur].parent_name
        return out[::-1]

    def entire_name(self, task: Task) -> str:
        """Metric / loss-term name of a task's entire-space prediction (``ctcvr``)."""
        if task.parent is None:
            return task.name
        if task.entire_name:
            return task.entire_name
        if task.derived:
            return "_".join([self.task_names[i] for i in self.chain(task.parent_name)] + [task.name])  # type: ignore[arg-type]
        return "_".join(("not_" if not pos else "") + self.task_names[i] for i, pos in self.steps(task.name))

    @property
    def num_leaf_scenarios(self) -> int:
        n = 1
        for s in self.scenarios:
            n *= s.num_values
        return n

    def columns(self, with_oracle: bool = True) -> List[str]:
        """Every column a reader must project (in a stable order)."""
        cols: List[str] = []
        for c in (
            [self.row_id] if self.row_id else []
        ) + [f.column for f in self.sparse + self.sequence] + [d.column for d in self.dense] + [
            s.column for s in self.scenarios
        ] + [t.label for t in self.tasks] + ([self.weight] if self.weight else []) + (
            [self.user_id] if self.user_id else []
        ) + (list(self.position_bias.features) if self.position_bias else []) + (
            [self.group_id] if self.group_id else []
        ) + (
            [t.oracle for t in self.tasks if t.oracle] if with_oracle else []
        ):
            if c not in cols:
                cols.append(c)
        return cols

    def training_columns(self) -> List[str]:
        """Columns only training and evaluation read (labels, weight, user, position-bias
        features, oracles): scoring new rows does without them."""
        cols = [t.label for t in self.tasks] + [t.oracle for t in self.tasks if t.oracle]
        cols += ([self.weight] if self.weight else []) + ([self.user_id] if self.user_id else [])
        cols += list(self.position_bias.features) if self.position_bias else []
        cols += [self.group_id] if self.group_id else []
        return cols

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sparse"] += d.pop("sequence")  # one list in the file, as it was written
        for f in d["sparse"]:  # the sequence fields only where used: older schema files stay byte-identical
            if not f["sequence"]:
                for k in ("sequence", "keep", "aligned_with"):
                    del f[k]
            elif not f["aligned_with"]:
                del f["aligned_with"]
        if d["group_id"] is None:  # absent unless declared: older schema files stay byte-identical
            del d["group_id"]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Schema":
        known = {"name", "sparse", "dense", "scenarios", "tasks", "row_id", "weight", "user_id", "position_bias", "group_id"}
        unknown = set(d) - known
        if unknown:
            raise SchemaError(f"unknown schema keys: {sorted(unknown)}")

        def build(kind: type, items: Any, what: str) -> list:
            if items is not None and not isinstance(items, list):
                raise SchemaError(f"{what}: expected a list, got {items!r}")
            return [_typed(kind, item, f"{what}[{i}]") for i, item in enumerate(items or [])]

        for key in ("name", "row_id", "weight", "user_id", "group_id"):
            _check_type(str, d.get(key), key, optional=True)
        return cls(
            name=d.get("name", "unnamed"),
            sparse=build(SparseFeature, d.get("sparse"), "sparse"),
            dense=build(DenseFeature, d.get("dense"), "dense"),
            scenarios=build(ScenarioLevel, d.get("scenarios"), "scenarios"),
            tasks=build(Task, d.get("tasks"), "tasks"),
            row_id=d.get("row_id"),
            weight=d.get("weight"),
            user_id=d.get("user_id"),
            position_bias=cls._position_bias(d.get("position_bias")),
            group_id=d.get("group_id"),
        )

    @staticmethod
    def _position_bias(d: Any) -> Optional[PositionBias]:
        if d is None:
            return None
        if not isinstance(d, dict):
            raise SchemaError(f"position_bias: expected a mapping with features and tasks, got {d!r}")
        return _typed(PositionBias, d, "position_bias")

    @classmethod
    def load(cls, path: str | Path) -> "Schema":
        from dlrm_mtl.config import read_yaml

        d = read_yaml(path, SchemaError, "schema")
        if not isinstance(d, dict):
            raise SchemaError(f"{path}: expected a YAML mapping with sparse/dense/scenarios/tasks, got {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except SchemaError as e:
            raise SchemaError(f"{path}: {e}") from None

    def save(self, path: str | Path) -> None:
        with open(path, "w") as fh:
            yaml.safe_dump(self.to_dict(), fh, sort_keys=False)


def _typed(kind: type, item: Any, where: str) -> Any:
    """``kind(**item)`` from a YAML mapping, each value checked against its field's type first
    (a quoted number or a non-boolean flag names the field instead of failing later)."""
    if not isinstance(item, dict):
        raise SchemaError(f"{where}: expected a mapping, got {item!r}")
    hints = get_type_hints(kind)
    for key, value in item.items():
        if key in hints:
            _check_type(hints[key], value, f"{where}.{key}")
    try:
        return kind(**item)
    except TypeError as e:
        raise SchemaError(f"{where}: {e}") from None


def _check_type(tp: Any, value: Any, where: str, optional: bool = False) -> None:
    """Raises a SchemaError naming ``where`` when ``value`` is not a ``tp`` (int is a float;
    bool is neither an int nor a float)."""
    if get_origin(tp) is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        tp, optional = args[0], True
    if value is None and optional:
        return
    if get_origin(tp) in (list, List):
        if not isinstance(value, list):
            raise SchemaError(f"{where}: expected a list, got {value!r}")
        (arg,) = get_args(tp)
        for i, v in enumerate(value):
            _check_type(arg, v, f"{where}[{i}]")
        return
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is str:
        ok = isinstance(value, str)
    else:
        return
    if not ok:
        expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]
        raise SchemaError(f"{where}: expected {expected}, got {value!r} ({type(value).__name__})")


def scenario_names(schema: Schema) -> List[str]:
    """Names of the leaf scenarios in leaf-id order (mixed radix over the levels)."""
    names = [""]
    for level in schema.scenarios:
        vals = level.value_names or [f"{level.name}{v}" for v in range(level.num_values)]
        names = [f"{a}/{b}" if a else b for a in names for b in vals]
    return names


def leaf_ids(scenario: "torch.Tensor", schema: Schema) -> "torch.Tensor":
    """``[B, L]`` per-level ids -> ``[B]`` leaf ids (mixed radix, first level most significant);
    a torch tensor or a numpy array. The one definition of a leaf id (model routing, metrics,
    data inspection and scenario shares use it)."""
    leaf = scenario[:, 0] * 0
    for i, level in enumerate(schema.scenarios):
        leaf = leaf * level.num_values + scenario[:, i]
    return leaf
