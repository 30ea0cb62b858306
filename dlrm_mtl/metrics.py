"""Per scenario × task evaluation metrics, exact across ranks (design §5).

Each rank accumulates its evaluation rows (predictions, labels, masks, scenario, oracle) as
small numpy arrays; ``compute`` gathers them to every rank and computes exact metrics on the
union, so distributed values equal single-process values on the same rows. Memory is
O(eval rows × tasks) per rank: fine for held-out splits of a few million rows; issue 4
replaces it with a bounded-memory histogram AUC for larger ones.

Reported per (scenario, task) and for ``all`` scenarios:

* ``auc``: exact ROC AUC with ties counted one half (Mann-Whitney U by midranks);
* ``oracle_auc``: the same AUC of the true probability, when the data carries it;
* ``logloss``, ``calibration`` (Σ prediction / Σ label), ``count`` (rows), ``positives``.

Task slices: a root task (``ctr``) on every row; a chained task's conditional head (``cvr``)
on rows whose ancestors are all positive (clicked rows); its entire-space product (``ctcvr``)
on every row.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from dlrm_mtl.data.batch import Batch
from dlrm_mtl.schema import Schema
from dlrm_mtl.task_graph import TaskGraph


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC; ties in ``scores`` count 1/2. NaN when one class is missing."""
    labels = np.asarray(labels).astype(bool)
    n1 = int(labels.sum())
    n0 = labels.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = np.asarray(scores)[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # midranks for tied runs
    boundaries = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [s.size]])
    mid = (starts + ends + 1) / 2.0  # 1-based average rank of each run
    ranks[order] = np.repeat(mid, ends - starts)
    return float((ranks[labels].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean()) if y.size else float("nan")


def scenario_names(schema: Schema) -> List[str]:
    """Names of the leaf scenarios in leaf-id order (mixed radix over the levels)."""
    names = [""]
    for level in schema.scenarios:
        vals = level.value_names or [f"{level.name}{v}" for v in range(level.num_values)]
        names = [f"{a}/{b}" if a else b for a in names for b in vals]
    return names


def leaf_ids(scenario: torch.Tensor, schema: Schema) -> torch.Tensor:
    """``[B, L]`` per-level ids -> ``[B]`` leaf ids."""
    leaf = torch.zeros_like(scenario[:, 0])
    for i, level in enumerate(schema.scenarios):
        leaf = leaf * level.num_values + scenario[:, i]
    return leaf


class MetricAccumulator:
    """Collects evaluation rows on one rank; ``compute()`` merges all ranks exactly.

    Example::

        acc = MetricAccumulator(schema)
        for batch in eval_stream:
            acc.update(batch, logits)
        rows = acc.compute()   # [{"scenario": "home/hot_card", "task": "ctr", "auc": ..., ...}, ...]
    """

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.graph = TaskGraph(schema)
        self.parts: List[Dict[str, np.ndarray]] = []

    @torch.no_grad()
    def update(self, batch: Batch, logits: torch.Tensor) -> None:
        real = (batch.row_id >= 0).cpu()
        logits = logits.detach().float().cpu()[real]
        labels = batch.labels.cpu()[real]
        mask = batch.label_mask.cpu()[real]
        part = {
            "leaf": leaf_ids(batch.scenario.cpu()[real], self.schema).numpy(),
            "cond_p": torch.sigmoid(logits).numpy(),
            "entire_p": self.graph.entire_log_prob(logits).exp().numpy(),
            "labels": labels.numpy(),
            "mask": mask.numpy(),
            "chained_y": self.graph.chained(labels).numpy(),
            "chained_mask": self.graph.chained(mask, "all").numpy(),
            "in_parent": (self.graph.parent_positive(labels, mask) & mask).numpy(),
        }
        if batch.oracle is not None:
            oracle = batch.oracle.cpu()[real].double()
            part["oracle_cond"] = oracle.numpy()
            part["oracle_entire"] = torch.stack([oracle[:, c].prod(dim=1) for c in self.graph.chains], dim=1).numpy()
        self.parts.append(part)

    def _merged(self) -> Dict[str, np.ndarray]:
        keys = self.parts[0].keys() if self.parts else []
        local = {k: np.concatenate([p[k] for p in self.parts]) for k in keys}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: List[Optional[Dict[str, np.ndarray]]] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
            gathered = [g for g in gathered if g]
            keys = gathered[0].keys() if gathered else []
            return {k: np.concatenate([g[k] for g in gathered]) for k in keys}
        return local

    def compute(self) -> List[Dict[str, object]]:
        d = self._merged()
        if not d:
            return []
        names = scenario_names(self.schema)
        slices = [("all", np.ones(d["leaf"].shape[0], dtype=bool))] + [(n, d["leaf"] == i) for i, n in enumerate(names)]
        rows: List[Dict[str, object]] = []
        has_oracle = "oracle_cond" in d
        for i, task in enumerate(self.schema.tasks):
            views = []
            if task.parent is None:
                views.append((task.name, d["cond_p"][:, i], d["labels"][:, i], d["mask"][:, i], "oracle_cond"))
            else:
                views.append((task.name, d["cond_p"][:, i], d["labels"][:, i], d["in_parent"][:, i], "oracle_cond"))
                views.append((self.graph.entire_names[i], d["entire_p"][:, i], d["chained_y"][:, i], d["chained_mask"][:, i], "oracle_entire"))
            for name, p, y, m, okey in views:
                for sname, sm in slices:
                    sel = sm & m
                    yy, pp = y[sel], p[sel]
                    row: Dict[str, object] = {
                        "scenario": sname,
                        "task": name,
                        "count": int(sel.sum()),
                        "positives": int(yy.sum()),
                        "auc": auc(yy, pp),
                        "logloss": logloss(yy, pp),
                        "calibration": float(pp.sum() / yy.sum()) if yy.sum() > 0 else float("nan"),
                    }
                    if has_oracle:
                        row["oracle_auc"] = auc(yy, d[okey][:, i][sel])
                    rows.append(row)
        return rows


def format_table(rows: Sequence[Dict[str, object]]) -> str:
    """A readable scenario × task table."""
    head = f"{'scenario':<24} {'task':<8} {'auc':>7} {'oracle':>7} {'gap':>7} {'logloss':>8} {'calib':>6} {'rows':>9} {'pos':>7}"
    lines = [head, "-" * len(head)]

    def f(x: object, w: int, p: int = 4) -> str:
        return f"{'n/a':>{w}}" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:>{w}.{p}f}"

    for r in sorted(rows, key=lambda r: (str(r["task"]), r["scenario"] != "all", str(r["scenario"]))):
        oracle = r.get("oracle_auc")
        gap = (oracle - r["auc"]) if oracle is not None else None  # type: ignore[operator]
        lines.append(
            f"{str(r['scenario']):<24} {str(r['task']):<8} {f(r['auc'], 7)} {f(oracle, 7)} {f(gap, 7)} "
            f"{f(r['logloss'], 8)} {f(r['calibration'], 6, 3)} {r['count']:>9} {r['positives']:>7}"
        )
    return "\n".join(lines)
