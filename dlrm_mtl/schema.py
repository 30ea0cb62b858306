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
    dense:
      - {name: price, transform: log1p}
    scenarios:
      - {name: channel, column: channel, num_values: 2}
      - {name: domain, column: domain, num_values: 2}
    tasks:
      - {name: ctr, label: click, oracle: true_pctr}
      - {name: cvr, label: conversion, parent: ctr, loss_space: entire,
         entire_name: ctcvr, oracle: true_pcvr}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

DENSE_TRANSFORMS = ("none", "log1p")
POOLINGS = ("sum", "mean")
LOSS_SPACES = ("entire", "parent_positive")
TASK_TYPES = ("binary",)


class SchemaError(ValueError):
    """A schema file that is malformed or inconsistent."""


@dataclass
class SparseFeature:
    """One categorical feature: a column of int64 ids (single-hot) or list<int64> (multi-hot)."""

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

    def __post_init__(self) -> None:
        self.column = self.column or self.name


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


@dataclass
class Task:
    """A prediction task. ``parent`` chains it (ESMM): its head predicts P(task | parent).

    ``loss_space``: ``entire`` trains the chained product against the chained label on every
    impression (ESMM); ``parent_positive`` trains the conditional head only on rows whose
    parent label is 1 (PLE's sample-space mask). ``oracle`` names a column holding the true
    conditional probability (synthetic data), used to report the oracle AUC.
    """

    name: str
    label: str
    type: str = "binary"
    parent: Optional[str] = None
    loss_space: str = "entire"
    entire_name: str = ""  # metric name of the chained (entire-space) prediction
    oracle: Optional[str] = None
    weight: float = 1.0


@dataclass
class Schema:
    name: str
    sparse: List[SparseFeature]
    dense: List[DenseFeature]
    scenarios: List[ScenarioLevel]
    tasks: List[Task]
    row_id: Optional[str] = None
    weight: Optional[str] = None

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def dup(names: List[str], what: str) -> None:
            seen = set()
            for n in names:
                if n in seen:
                    raise SchemaError(f"schema {self.name!r}: duplicate {what} {n!r}")
                seen.add(n)

        if not self.sparse:
            raise SchemaError(f"schema {self.name!r}: needs at least one sparse feature")
        if not self.scenarios:
            raise SchemaError(f"schema {self.name!r}: needs at least one scenario level")
        if not self.tasks:
            raise SchemaError(f"schema {self.name!r}: needs at least one task")
        dup([f.name for f in self.sparse], "sparse feature")
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
        for t in self.tasks:
            if t.type not in TASK_TYPES:
                raise SchemaError(f"task {t.name!r}: type {t.type!r} not in {TASK_TYPES}")
            if t.loss_space not in LOSS_SPACES:
                raise SchemaError(f"task {t.name!r}: loss_space {t.loss_space!r} not in {LOSS_SPACES}")
            if t.parent is not None and t.parent not in names:
                raise SchemaError(f"task {t.name!r}: parent {t.parent!r} is not a task")
        # parents must form a forest (no cycles)
        by_name = {t.name: t for t in self.tasks}
        for t in self.tasks:
            seen, cur = set(), t
            while cur.parent is not None:
                if cur.name in seen:
                    raise SchemaError(f"task {t.name!r}: parent chain has a cycle")
                seen.add(cur.name)
                cur = by_name[cur.parent]

    # ------------------------------------------------------------------ helpers
    @property
    def task_names(self) -> List[str]:
        return [t.name for t in self.tasks]

    def task_index(self, name: str) -> int:
        return self.task_names.index(name)

    def chain(self, task: str) -> List[int]:
        """Indices of the tasks from the root down to ``task`` (inclusive)."""
        by_name = {t.name: t for t in self.tasks}
        out = []
        cur: Optional[str] = task
        while cur is not None:
            out.append(self.task_index(cur))
            cur = by_name[cur].parent
        return out[::-1]

    def entire_name(self, task: Task) -> str:
        if task.parent is None:
            return task.name
        return task.entire_name or "_".join(self.task_names[i] for i in self.chain(task.name))

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
        ) + [f.column for f in self.sparse] + [d.column for d in self.dense] + [
            s.column for s in self.scenarios
        ] + [t.label for t in self.tasks] + ([self.weight] if self.weight else []) + (
            [t.oracle for t in self.tasks if t.oracle] if with_oracle else []
        ):
            if c not in cols:
                cols.append(c)
        return cols

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Schema":
        known = {"name", "sparse", "dense", "scenarios", "tasks", "row_id", "weight"}
        unknown = set(d) - known
        if unknown:
            raise SchemaError(f"unknown schema keys: {sorted(unknown)}")

        def build(kind: type, items: Any, what: str) -> list:
            out = []
            for i, item in enumerate(items or []):
                try:
                    out.append(kind(**item))
                except TypeError as e:
                    raise SchemaError(f"{what}[{i}]: {e}") from None
            return out

        return cls(
            name=d.get("name", "unnamed"),
            sparse=build(SparseFeature, d.get("sparse"), "sparse"),
            dense=build(DenseFeature, d.get("dense"), "dense"),
            scenarios=build(ScenarioLevel, d.get("scenarios"), "scenarios"),
            tasks=build(Task, d.get("tasks"), "tasks"),
            row_id=d.get("row_id"),
            weight=d.get("weight"),
        )

    @classmethod
    def load(cls, path: str | Path) -> "Schema":
        with open(path) as fh:
            d = yaml.safe_load(fh)
        if not isinstance(d, dict):
            raise SchemaError(f"{path}: expected a YAML mapping with sparse/dense/scenarios/tasks, got {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except SchemaError as e:
            raise SchemaError(f"{path}: {e}") from None

    def save(self, path: str | Path) -> None:
        with open(path, "w") as fh:
            yaml.safe_dump(self.to_dict(), fh, sort_keys=False)
