"""Per scenario × task evaluation metrics, exact across ranks, in bounded memory.

Reported per (scenario, task view) and for ``all`` scenarios (``leaf scenario`` rows merge
into ``all`` by summing their statistics):

* binary views: ``auc`` (ROC AUC, ties 1/2), ``auc_max_error`` (its bound, below),
  ``oracle_auc`` (same AUC of the true probability, when the data carries it), ``logloss``,
  ``ne`` (normalised entropy: logloss / H(positive rate), He et al. 2014), ``calibration``
  (Σ prediction / Σ label), ``positive_rate``, ``count`` (rows), ``positives``, and
  ``gauc`` / ``gauc_users`` / ``gauc_skipped_users`` when the schema declares ``user_id``;
* regression views: ``mse``, ``mae``, ``label_mean``, ``pred_mean``, ``count`` and
  ``oracle_mse`` (MSE of the true value) when the data carries it.

Views of a task (``TaskGraph.metric_views``, :class:`dlrm_mtl.task_graph.TaskView`): a root
task on every row with a label (``ctr``); a chained task's conditional prediction on its
conditional space (``cvr`` on clicked rows) and its entire-space prediction on every row
(``ctcvr``); a regression task on its space.

How the merge is exact and memory bounded:

* counts and sums (rows, positives, Σp, Σ logloss, Σ(p−y)², Σ|p−y|) are float64/int sums per
  (view, leaf scenario), all-reduced: distributed values equal single-process values (up to
  float64 summation order, ~1e-15 relative);
* AUC: a fixed histogram per (view, leaf, label) over the prediction's *logit*, clamped to
  [−16, 16] in bins of width 1/1024 (32,768 bins; probabilities below σ(−16) ≈ 1.1e-7 or
  above 1 − 1.1e-7 share the end bins). Integer counts merge exactly across ranks, so the
  distributed AUC equals the single-process AUC bit for bit. Pairs inside one bin count
  1/2, like exact ties; the only error is for pairs whose logits differ by < 1/1024 but fall
  in one bin, bounded by ``auc_max_error`` = ½ Σ_b n1_b n0_b / (N1 N0), reported per row
  (typically ≈ 1e-4 or less; 0 when all predictions sit in distinct bins). Memory:
  V views × S leaves × 2 × 32,768 int64 (≈ 0.5 MB per view and leaf), independent of rows;
* GAUC (impression-weighted mean of per-user AUC; users whose rows in the slice carry only
  one class are skipped and counted in ``gauc_skipped_users``): needs the rows grouped by
  user. Each rank keeps (user, leaf, prediction, label) of its rows for the binary views;
  ``compute`` routes every user to rank hash(user) mod world size (one gather per rank), so
  each rank holds only its users' rows, computes their exact per-user AUCs and the weighted
  sums are all-reduced. This is exact, and its memory is O(eval rows / world size) — the one
  part that grows with the evaluation set (≈ 24 bytes per row and binary view).

Example::

    acc = MetricAccumulator(schema)
    for batch in eval_stream:
        acc.update(batch, logits)
    rows = acc.compute()   # [{"scenario": "home/hot_card", "task": "ctr", "auc": ..., ...}, ...]
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from dlrm_mtl import native
from dlrm_mtl.collectives import all_reduce_host
from dlrm_mtl.data.batch import Batch
from dlrm_mtl.schema import Schema, leaf_ids, scenario_names  # noqa: F401 (re-exported)
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


AUC_LOGIT_RANGE = 16.0  # logits are clamped to [-16, 16] for the AUC histogram
AUC_BINS_PER_UNIT = 1024  # bin width 1/1024 in logit
AUC_BINS = int(2 * AUC_LOGIT_RANGE * AUC_BINS_PER_UNIT)


def logit_bins(z: torch.Tensor) -> torch.Tensor:
    """``[N]`` logits (float64) -> ``[N]`` int64 histogram bins in [0, AUC_BINS), monotone in z."""
    b = torch.floor((z.clamp(-AUC_LOGIT_RANGE, AUC_LOGIT_RANGE) + AUC_LOGIT_RANGE) * AUC_BINS_PER_UNIT)
    return b.to(torch.int64).clamp(0, AUC_BINS - 1)


def histogram_auc(h1: np.ndarray, h0: np.ndarray) -> Tuple[float, float]:
    """AUC and its maximum error from per-bin positive/negative counts (ascending bins).

    AUC = Σ_b n1_b (N0_below_b + ½ n0_b) / (N1 N0); the exact AUC lies within
    ½ Σ_b n1_b n0_b / (N1 N0) of it (pairs sharing a bin). NaN when a class is missing."""
    h1 = np.asarray(h1, dtype=np.float64)
    h0 = np.asarray(h0, dtype=np.float64)
    n1, n0 = h1.sum(), h0.sum()
    if n1 == 0 or n0 == 0:
        return float("nan"), float("nan")
    below = np.cumsum(h0) - h0
    return float((h1 * (below + 0.5 * h0)).sum() / (n1 * n0)), float(0.5 * (h1 * h0).sum() / (n1 * n0))


def histogram_aucs(h: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`histogram_auc` of many histograms at once: ``h [..., 2, BINS]`` (negatives,
    positives) -> ``(auc [...], max error [...])``, the same arithmetic along the last axis
    (NaN where a class is missing). An evaluation's slices (views × scenarios, 32,768 bins
    each) in one pass instead of a numpy call chain per slice."""
    h = np.asarray(h, dtype=np.float64)
    h0, h1 = h[..., 0, :], h[..., 1, :]
    n1, n0 = h1.sum(-1), h0.sum(-1)
    below = np.cumsum(h0, axis=-1) - h0
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (h1 * (below + 0.5 * h0)).sum(-1) / (n1 * n0)
        err = 0.5 * (h1 * h0).sum(-1) / (n1 * n0)
    missing = (n1 == 0) | (n0 == 0)
    auc[missing] = np.nan
    err[missing] = np.nan
    return auc, err


def normalized_entropy(mean_logloss: float, positive_rate: float) -> float:
    """NE = logloss / H(positive rate) (He et al. 2014); NaN when the slice has one class."""
    p = positive_rate
    if not 0 < p < 1 or math.isnan(mean_logloss):
        return float("nan")
    return mean_logloss / -(p * math.log(p) + (1 - p) * math.log1p(-p))


def grouped_auc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Exact AUC per group (ties 1/2): returns ``(rows per group, auc per group)`` for the
    groups holding both classes (others are dropped). Vectorised: one lexsort."""
    if groups.size == 0:
        return np.zeros(0), np.zeros(0)
    order = np.lexsort((scores, groups))
    g, s, y = groups[order], scores[order], labels[order].astype(np.float64)
    pos = np.arange(g.size)
    new_g = np.r_[True, g[1:] != g[:-1]]
    gid = np.cumsum(new_g) - 1
    gstart = pos[new_g][gid]
    new_run = new_g | np.r_[True, s[1:] != s[:-1]]
    run_id = np.cumsum(new_run) - 1
    run_start = pos[new_run][run_id]
    run_len = np.bincount(run_id)[run_id]
    mid = (run_start - gstart + 1) + (run_len - 1) / 2.0  # 1-based midrank within the group
    n = np.bincount(gid).astype(np.float64)
    n1 = np.bincount(gid, weights=y)
    n0 = n - n1
    r1 = np.bincount(gid, weights=mid * y)
    ok = (n1 > 0) & (n0 > 0)
    return n[ok], (r1[ok] - n1[ok] * (n1[ok] + 1) / 2.0) / (n1[ok] * n0[ok])


# per (view, leaf) sums, in this order
_SUMS = ("count", "positives", "sum_pred", "sum_logloss", "sum_sq", "sum_abs", "sum_label", "sum_oracle_sq")


class MetricAccumulator:
    """Collects sufficient statistics on one rank; ``compute()`` merges all ranks exactly.

    See the module docstring for the metrics and the memory/error guarantees.

    Example::

        acc = MetricAccumulator(schema)
        for batch in eval_stream:
            acc.update(batch, logits)
        rows = acc.compute()   # [{"scenario": "home/hot_card", "task": "ctr", "auc": ..., ...}, ...]
    """

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.graph = TaskGraph(schema)
        self.views = self.graph.metric_views
        self.S = schema.num_leaf_scenarios
        V = len(self.views)
        self.sums = torch.zeros(V, self.S, len(_SUMS), dtype=torch.float64)
        self.hist = torch.zeros(V * self.S * 2 * AUC_BINS, dtype=torch.int64)
        self.oracle_hist: Optional[torch.Tensor] = None
        self.has_oracle = False
        self.rows = 0
        self._regression = [v for v, view in enumerate(self.views) if view.regression]
        self._binary = torch.tensor([v for v, view in enumerate(self.views) if not view.regression], dtype=torch.int64)
        # GAUC: per binary view, (user, leaf, score, label) of the rows in its space
        self.user_parts: List[Dict[str, np.ndarray]] = []

    @torch.no_grad()
    def update(self, batch: Batch, logits: torch.Tensor) -> None:
        g = self.graph
        real = batch.real.cpu()
        z = logits.detach().cpu().double()[real]  # [N, T]
        labels = batch.labels.cpu().double()[real]
        mask = batch.label_mask.cpu()[real]
        leaf = leaf_ids(batch.scenario.cpu()[real], self.schema)  # [N]
        N = int(real.sum())
        if N == 0:
            return
        self.rows += N
        vt = g.view_tensors(self.views, z, labels, mask)  # [N, V] each
        oracle = None
        if batch.oracle is not None:
            self.has_oracle = True
            if self.oracle_hist is None:
                self.oracle_hist = torch.zeros_like(self.hist)
            oracle = self._oracle(batch.oracle.cpu().double()[real])  # [N, V]
        user = batch.user.cpu()[real].numpy() if (batch.user is not None and self.schema.user_id) else None
        S = self.S
        for v in self._regression:
            m = vt.rows[:, v]
            pred, y, lf = vt.pred[:, v][m], vt.label[:, v][m], leaf[m]
            stats = [torch.ones_like(y), torch.zeros_like(y), pred, torch.zeros_like(y), (pred - y) ** 2,
                     (pred - y).abs(), y, torch.zeros_like(y)]
            if oracle is not None:
                stats[7] = (oracle[:, v][m] - y) ** 2
            self._add_sums(v * S + lf, stats)
        if self._binary.numel() == 0:
            return
        if user is None and native.available():
            self._add_binary_native(vt, leaf, oracle)
            return
        # every binary view at once: its (view, row) pairs view after view, rows in order — each
        # (view, leaf) sum and histogram bin receives the rows in the order a loop over the views
        # would add them
        j, n = vt.rows[:, self._binary].t().nonzero(as_tuple=True)  # [M] each
        v_of = self._binary[j]  # [M] view index of each pair
        pred, y, lf = vt.pred[n, v_of], vt.label[n, v_of], leaf[n]
        p = pred.exp()
        pc_ = p.clamp(1e-7, 1 - 1e-7)
        ll = -(y * pc_.log() + (1 - y) * torch.log1p(-pc_))
        zz = pred - vt.neg[n, v_of]  # logit of the prediction, exact in log space
        yi = y.to(torch.int64)
        zeros = torch.zeros_like(y)
        slot = v_of * S + lf  # [M] (view, leaf)
        self._add_sums(slot, [torch.ones_like(y), y, p, ll, zeros, zeros, y, zeros])
        base = (slot * 2 + yi) * AUC_BINS
        ones = torch.ones_like(base)
        self.hist.index_add_(0, base + logit_bins(zz), ones)
        if oracle is not None and self.oracle_hist is not None:
            o = oracle[n, v_of]
            self.oracle_hist.index_add_(0, base + logit_bins(torch.log(o) - torch.log1p(-o)), ones)
        if user is not None:
            nn_ = n.numpy()
            self.user_parts.append({
                "view": v_of.numpy().astype(np.int16), "user": user[nn_], "leaf": lf.numpy().astype(np.int32),
                "score": zz.numpy(), "label": yi.numpy().astype(np.int8),
            })

    def _add_binary_native(self, vt: Any, leaf: torch.Tensor, oracle: Optional[torch.Tensor]) -> None:
        """The binary views' pairs added in one C pass (``native.metric_pairs``): the additions
        of the operator path below in its order, and the same histogram counts, without its
        gathers of the (view, row) pairs and ``index_add_`` calls (~1 ms per 4,096-row batch).
        The element-wise values are taken on the whole ``[N, V]`` matrices (the regression
        columns' are not read); ATen computes a vector's tail with its scalar functions, so a
        probability or log loss may differ from the operator path's in the last bit."""
        p = vt.pred.exp()  # [N, V]
        pc_ = p.clamp(1e-7, 1 - 1e-7)
        ll = -(vt.label * pc_.log() + (1 - vt.label) * torch.log1p(-pc_))
        bins = logit_bins(vt.pred - vt.neg)  # logit of the prediction, exact in log space
        obins = None
        if oracle is not None and self.oracle_hist is not None:
            obins = logit_bins(torch.log(oracle) - torch.log1p(-oracle))
        native.metric_pairs(vt.rows, self._binary, leaf, self.S, vt.label, p, ll, bins, obins, self.sums, self.hist,
                            self.oracle_hist if obins is not None else None, AUC_BINS)

    def _oracle(self, o: torch.Tensor) -> torch.Tensor:
        """``[N, T]`` true conditional probabilities (or regression means) -> ``[N, V]`` the
        true value of each view's prediction: an entire-space view multiplies in its context
        (P(ancestor) or 1 − P(ancestor) for a negated one), every other view is the column."""
        cols = []
        for view in self.views:
            p = o[:, view.task]
            if view.prediction == "entire":
                for j, s in self.graph.context[view.task]:
                    p = p * (o[:, j] if s else 1 - o[:, j])
            cols.append(p)
        return torch.stack(cols, dim=1)

    def _add_sums(self, slot: torch.Tensor, stats: List[torch.Tensor]) -> None:
        """Adds row n's ``stats[k][n]`` (the :data:`_SUMS`, in order) to the sums of its
        ``slot[n]`` = view · S + leaf, rows in order."""
        self.sums.view(-1, len(_SUMS)).index_add_(0, slot, torch.stack(stats, dim=1))  # [M, K]

    # ------------------------------------------------------------------ merge
    def _gauc_sums(self) -> torch.Tensor:
        """``[V, S + 1, 4]``: Σ n_u·AUC_u, Σ n_u, users, skipped users (slice 0 = all)."""
        V, S = len(self.views), self.S
        out = torch.zeros(V, S + 1, 4, dtype=torch.float64)
        keys = ("view", "user", "leaf", "score", "label")
        local = {k: np.concatenate([p[k] for p in self.user_parts]) if self.user_parts else np.zeros(0) for k in keys}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from dlrm_mtl.data.stream import hash_ids

            W, rank = dist.get_world_size(), dist.get_rank()
            dest = hash_ids(local["user"].astype(np.int64), W) if local["user"].size else np.zeros(0, np.int64)
            mine = None
            for dst in range(W):
                part = {k: a[dest == dst] for k, a in local.items()}
                got: Optional[List[Any]] = [None] * W if rank == dst else None
                dist.gather_object(part, got, dst=dst)
                if rank == dst:
                    mine = got
            assert mine is not None
            local = {k: np.concatenate([m[k] for m in mine]) for k in keys}
        if local["user"].size:
            view = local["view"].astype(np.int64)
            user = local["user"].astype(np.int64)
            leaf = local["leaf"].astype(np.int64)
            for v in range(V):
                sel_v = view == v
                for sl in range(S + 1):
                    sel = sel_v if sl == 0 else sel_v & (leaf == sl - 1)
                    if not sel.any():
                        continue
                    n, a = grouped_auc(user[sel], local["label"][sel], local["score"][sel])
                    total_users = np.unique(user[sel]).size
                    out[v, sl] = torch.tensor([(n * a).sum(), n.sum(), n.size, total_users - n.size], dtype=torch.float64)
        return all_reduce_host(out)

    def compute(self) -> List[Dict[str, object]]:
        rows_total = int(all_reduce_host(torch.tensor([self.rows], dtype=torch.int64))[0])
        if rows_total == 0:
            return []
        has_oracle = bool(int(all_reduce_host(torch.tensor([int(self.has_oracle)], dtype=torch.int64))[0]))
        sums = all_reduce_host(self.sums.clone())
        hist = all_reduce_host(self.hist.clone()).view(len(self.views), self.S, 2, AUC_BINS).numpy()
        ohist = None
        if has_oracle:
            oh = self.oracle_hist if self.oracle_hist is not None else torch.zeros_like(self.hist)
            ohist = all_reduce_host(oh.clone()).view(len(self.views), self.S, 2, AUC_BINS).numpy()
        with_gauc = self.schema.user_id is not None
        gauc = self._gauc_sums() if with_gauc else None
        names = scenario_names(self.schema)
        # every view's and slice's (AUC, error): [V, S + 1, 2] ("all", then each leaf), one C
        # pass over the bins, else numpy's per view (the regression views' stay unread)
        table, otable = native.hist_aucs(hist), None if ohist is None else native.hist_aucs(ohist)
        out: List[Dict[str, object]] = []
        for v, view in enumerate(self.views):
            aucs = oaucs = None
            if not view.regression:
                aucs = (table[v, :, 0], table[v, :, 1]) if table is not None else \
                    histogram_aucs(np.concatenate([hist[v].sum(0, keepdims=True), hist[v]]))
                if ohist is not None:
                    oaucs = (otable[v, :, 0], otable[v, :, 1]) if otable is not None else \
                        histogram_aucs(np.concatenate([ohist[v].sum(0, keepdims=True), ohist[v]]))
            for sl, sname in enumerate(["all"] + names):
                st = (sums[v].sum(0) if sl == 0 else sums[v, sl - 1]).tolist()
                s = dict(zip(_SUMS, st))
                n = s["count"]
                nan = float("nan")
                row: Dict[str, object] = {"scenario": sname, "task": view.name, "count": int(round(n))}
                if view.regression:
                    row.update(
                        type="regression",
                        mse=s["sum_sq"] / n if n else nan,
                        mae=s["sum_abs"] / n if n else nan,
                        label_mean=s["sum_label"] / n if n else nan,
                        pred_mean=s["sum_pred"] / n if n else nan,
                    )
                    if has_oracle:
                        row["oracle_mse"] = s["sum_oracle_sq"] / n if n else nan
                else:
                    assert aucs is not None
                    pos = s["positives"]
                    a, err = float(aucs[0][sl]), float(aucs[1][sl])
                    ll = s["sum_logloss"] / n if n else nan
                    rate = pos / n if n else nan
                    row.update(
                        positives=int(round(pos)),
                        positive_rate=rate,
                        auc=a,
                        auc_max_error=err,
                        logloss=ll,
                        ne=normalized_entropy(ll, rate) if n else nan,
                        calibration=s["sum_pred"] / pos if pos > 0 else nan,
                    )
                    if oaucs is not None:
                        row["oracle_auc"], row["oracle_auc_max_error"] = float(oaucs[0][sl]), float(oaucs[1][sl])
                    if gauc is not None:
                        num, den, users, skipped = gauc[v, sl].tolist()
                        row.update(gauc=num / den if den > 0 else nan, gauc_users=int(users), gauc_skipped_users=int(skipped))
                out.append(row)
        return out


def format_table(rows: Sequence[Dict[str, object]]) -> str:
    """A readable scenario × task table (binary views, then regression views)."""

    def f(x: object, w: int, p: int = 4) -> str:
        return f"{'n/a':>{w}}" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:>{w}.{p}f}"

    binary = [r for r in rows if r.get("type") != "regression"]
    regression = [r for r in rows if r.get("type") == "regression"]
    has_gauc = any("gauc" in r for r in binary)
    tw = max([8] + [len(str(r["task"])) for r in rows])  # task column width
    head = (f"{'scenario':<24} {'task':<{tw}} {'auc':>7} {'oracle':>7} {'gap':>7} " + (f"{'gauc':>7} " if has_gauc else "")
            + f"{'logloss':>8} {'ne':>6} {'calib':>6} {'rows':>9} {'pos':>7}")
    lines = [head, "-" * len(head)]
    key = lambda r: (str(r["task"]), r["scenario"] != "all", str(r["scenario"]))  # noqa: E731
    for r in sorted(binary, key=key):
        oracle = r.get("oracle_auc")
        gap = (oracle - r["auc"]) if oracle is not None else None  # type: ignore[operator]
        lines.append(
            f"{str(r['scenario']):<24} {str(r['task']):<{tw}} {f(r['auc'], 7)} {f(oracle, 7)} {f(gap, 7)} "
            + (f"{f(r.get('gauc'), 7)} " if has_gauc else "")
            + f"{f(r['logloss'], 8)} {f(r.get('ne'), 6, 3)} {f(r['calibration'], 6, 3)} {r['count']:>9} {r['positives']:>7}"
        )
    if regression:
        has_o = any("oracle_mse" in r for r in regression)
        h2 = f"{'scenario':<24} {'task':<{tw}} {'mse':>9} " + (f"{'oracle':>9} " if has_o else "") + f"{'mae':>9} {'label':>8} {'pred':>8} {'rows':>9}"
        lines += ["", h2, "-" * len(h2)]
        for r in sorted(regression, key=key):
            lines.append(
                f"{str(r['scenario']):<24} {str(r['task']):<{tw}} {f(r['mse'], 9, 5)} " + (f"{f(r.get('oracle_mse'), 9, 5)} " if has_o else "")
                + f"{f(r['mae'], 9, 5)} {f(r['label_mean'], 8)} {f(r['pred_mean'], 8)} {r['count']:>9}"
            )
    return "\n".join(lines)
