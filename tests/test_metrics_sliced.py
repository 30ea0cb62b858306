"""Issue 4 metrics: histogram AUC (and its error bound), NE, calibration, positive rate, GAUC,
regression MSE/MAE and ESM² views, against straightforward references written here; and the
2-process merge on uneven shards, compared with the values on the gathered data."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_mtl.data.batch import Batch
from dlrm_mtl.metrics import (MetricAccumulator, format_table, grouped_auc, histogram_auc, histogram_aucs, logit_bins,
                              scenario_names)
from dlrm_mtl.schema import DenseFeature, ScenarioLevel, Schema, SparseFeature, Task

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------- references


def pair_auc(labels, scores) -> float:
    """P(score_pos > score_neg) over all pairs, ties 1/2."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def ref_logloss(y, p) -> float:
    out = 0.0
    for yy, pp in zip(y, p):
        pp = min(max(pp, 1e-7), 1 - 1e-7)
        out -= yy * math.log(pp) + (1 - yy) * math.log(1 - pp)
    return out / len(y) if y else float("nan")


def ref_ne(y, p) -> float:
    r = sum(y) / len(y)
    if r in (0, 1):
        return float("nan")
    return ref_logloss(y, p) / -(r * math.log(r) + (1 - r) * math.log(1 - r))


def ref_gauc(users, y, p):
    by: Dict[int, list] = {}
    for u, yy, pp in zip(users, y, p):
        by.setdefault(u, []).append((yy, pp))
    num = den = 0.0
    skipped = 0
    for rows in by.values():
        ys = [a for a, _ in rows]
        if 0 < sum(ys) < len(ys):
            num += len(rows) * pair_auc(ys, [b for _, b in rows])
            den += len(rows)
        else:
            skipped += 1
    return (num / den if den else float("nan")), skipped


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# ---------------------------------------------------------------------------- fixtures


def make_schema() -> Schema:
    return Schema(
        name="m",
        sparse=[SparseFeature(name="u", table="t_u", num_embeddings=10, dim=4)],
        dense=[DenseFeature(name="price")],
        scenarios=[ScenarioLevel("ch", 2, value_names=["a", "b"]), ScenarioLevel("dom", 2, value_names=["x", "y"])],
        tasks=[
            Task("ctr", "click", oracle="o_ctr"),
            Task("cvr", "conv", parent="ctr", entire_name="ctcvr", oracle="o_cvr"),
            Task("vcr", "ratio", type="regression", parent="ctr", loss_space="parent_positive", oracle="o_vcr"),
        ],
        user_id="uid",
    )


def make_batches(seed: int, n_batches: int, B: int = 40, pad_last: int = 5) -> List[tuple]:
    """Random batches with ties (logits on a 0.1 grid), null labels, padding rows, users."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_batches):
        scen = np.stack([rng.integers(0, 2, B), rng.integers(0, 2, B)], axis=1)
        z = np.round(rng.normal(size=(B, 3)), 1)
        click = (rng.random(B) < sig(0.0) * (1 + 0.5 * np.tanh(z[:, 0]))).astype(np.float32)
        conv = ((rng.random(B) < 0.4 + 0.2 * np.tanh(z[:, 1])) & (click == 1)).astype(np.float32)
        ratio = np.round(rng.random(B), 2).astype(np.float32)
        labels = np.stack([click, conv, ratio], axis=1)
        mask = np.ones((B, 3), dtype=bool)
        mask[rng.random(B) < 0.1, 1] = False
        mask[click == 0, 2] = False
        row_id = np.arange(B) + 1000 * (seed * 100 + k)
        if pad_last and k == n_batches - 1:
            row_id[-pad_last:] = -1
            mask[-pad_last:] = False
        users = rng.integers(0, 9, B)
        oracle = rng.random((B, 3)).astype(np.float32)
        batch = Batch(
            sparse=KeyedJaggedTensor.from_lengths_sync(keys=["u"], values=torch.zeros(B, dtype=torch.int64), lengths=torch.ones(B, dtype=torch.int32)),
            dense=torch.zeros(B, 1),
            scenario=torch.tensor(scen),
            labels=torch.tensor(labels),
            label_mask=torch.tensor(mask),
            row_id=torch.tensor(row_id),
            weight=torch.tensor((row_id >= 0).astype(np.float32)),
            oracle=torch.tensor(oracle),
            user=torch.tensor(users),
        )
        out.append((batch, torch.tensor(z, dtype=torch.float32)))
    return out


def records(batches) -> List[dict]:
    recs = []
    names = scenario_names(make_schema())
    for b, z in batches:
        for i in range(b.batch_size):
            if int(b.row_id[i]) < 0:
                continue
            c, d = b.scenario[i].tolist()
            recs.append(dict(leaf=names[c * 2 + d], y=b.labels[i].tolist(), m=b.label_mask[i].tolist(), z=z[i].tolist(),
                             o=b.oracle[i].tolist(), u=int(b.user[i])))
    return recs


def reference_rows(recs) -> Dict[tuple, dict]:
    out = {}
    for sname in ["all"] + scenario_names(make_schema()):
        rs = [r for r in recs if sname == "all" or r["leaf"] == sname]
        views = {
            "ctr": [(r["y"][0], sig(r["z"][0]), r["o"][0], r["u"]) for r in rs if r["m"][0]],
            "cvr": [(r["y"][1], sig(r["z"][1]), r["o"][1], r["u"]) for r in rs if r["m"][0] and r["y"][0] == 1 and r["m"][1]],
            "ctcvr": [(r["y"][0] * r["y"][1], sig(r["z"][0]) * sig(r["z"][1]), r["o"][0] * r["o"][1], r["u"])
                      for r in rs if r["m"][0] and r["m"][1]],
        }
        for task, v in views.items():
            y = [a[0] for a in v]
            p = [a[1] for a in v]
            g, skipped = ref_gauc([a[3] for a in v], y, p)
            out[(sname, task)] = dict(
                count=len(v), positives=int(sum(y)), auc=pair_auc(y, p), oracle_auc=pair_auc(y, [a[2] for a in v]),
                logloss=ref_logloss(y, p) if v else float("nan"), ne=ref_ne(y, p) if v else float("nan"),
                calibration=sum(p) / sum(y) if sum(y) else float("nan"), positive_rate=sum(y) / len(y) if v else float("nan"),
                gauc=g, gauc_skipped_users=skipped,
            )
        reg = [(r["y"][2], r["z"][2], r["o"][2]) for r in rs if r["m"][0] and r["y"][0] == 1 and r["m"][2]]
        n = len(reg)
        out[(sname, "vcr")] = dict(
            count=n,
            mse=sum((p - y) ** 2 for y, p, _ in reg) / n if n else float("nan"),
            mae=sum(abs(p - y) for y, p, _ in reg) / n if n else float("nan"),
            oracle_mse=sum((o - y) ** 2 for y, _, o in reg) / n if n else float("nan"),
            label_mean=sum(y for y, _, _ in reg) / n if n else float("nan"),
        )
    return out


def close(a, b, tol=1e-6) -> bool:
    if isinstance(b, float) and math.isnan(b):
        return isinstance(a, float) and math.isnan(a)
    return abs(a - b) <= tol * max(1.0, abs(b))


def check_against_reference(rows, ref):
    got = {(r["scenario"], r["task"]): r for r in rows}
    assert set(got) == set(ref)
    for key, e in ref.items():
        r = got[key]
        for k, v in e.items():
            if k in ("auc", "oracle_auc"):
                if math.isnan(v):
                    assert math.isnan(r[k]), (key, k)
                else:
                    # the histogram AUC lies within its bound; the conditional views (logits on a
                    # 0.1 grid) are exact
                    assert abs(r[k] - v) <= r[k + "_max_error"] + 1e-12, (key, k, r[k], v)
                    if k == "auc" and key[1] in ("ctr", "cvr"):
                        assert abs(r[k] - v) < 1e-12, (key, r[k], v)
            else:
                assert close(r[k], v), (key, k, r[k], v)


# ---------------------------------------------------------------------------- unit references


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_auc_within_bound_and_exact_on_distinct_bins(seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, 300)
    y = (rng.random(300) < 1 / (1 + np.exp(-z))).astype(int)
    bins = logit_bins(torch.tensor(z)).numpy()
    h1 = np.bincount(bins[y == 1], minlength=32768)
    h0 = np.bincount(bins[y == 0], minlength=32768)
    a, err = histogram_auc(h1, h0)
    exact = pair_auc(y.tolist(), z.tolist())
    assert abs(a - exact) <= err + 1e-12
    if len(np.unique(bins)) == len(z):  # all in distinct bins: no error at all
        assert err == 0 and abs(a - exact) < 1e-12
    # coarse scores (many exact ties) are exact too: ties count 1/2 in both
    zc = np.round(z, 1)
    bc = logit_bins(torch.tensor(zc)).numpy()
    a2, _ = histogram_auc(np.bincount(bc[y == 1], minlength=32768), np.bincount(bc[y == 0], minlength=32768))
    assert abs(a2 - pair_auc(y.tolist(), zc.tolist())) < 1e-12


def test_histogram_aucs_of_many_slices_equal_each_slice_s_bit_for_bit():
    """``compute`` takes every slice's AUC of a view in one pass (``histogram_aucs``): the same
    bits as :func:`histogram_auc` slice by slice, NaN where a slice lacks a class."""
    rng = np.random.default_rng(7)
    h = rng.integers(0, 5, (4, 2, 32768)) * (rng.random((4, 2, 32768)) < 0.1)
    h[2, 1] = 0  # no positives
    h[3, 0] = 0  # no negatives
    auc, err = histogram_aucs(h)
    for i in range(4):
        a, e = histogram_auc(h[i, 1], h[i, 0])
        if i >= 2:
            assert np.isnan(a) and np.isnan(auc[i]) and np.isnan(err[i])
        else:
            assert a == auc[i] and e == err[i]


def test_the_c_histogram_aucs_equal_numpy_s_bit_for_bit():
    """``compute``'s C pass (``native.hist_aucs``: exact integer sums, one pass over the bins)
    gives every view's "all" slice (the leaves summed) and each leaf's AUC and error bound as
    the float64 numpy path does, NaN for a slice without a class; negative counts raise."""
    from dlrm_mtl import native

    if not native.available():
        pytest.skip("the C kernels are off")
    rng = np.random.default_rng(8)
    h = rng.integers(0, 400, (3, 4, 2, 32768)) * (rng.random((3, 4, 2, 32768)) < 0.3)
    h[1, 2, 1] = 0  # a leaf without positives
    h[2, :, 0] = 0  # a view without negatives anywhere
    table = native.hist_aucs(h)
    assert table.shape == (3, 5, 2)
    for v in range(3):
        auc, err = histogram_aucs(np.concatenate([h[v].sum(0, keepdims=True), h[v]]))
        np.testing.assert_array_equal(table[v, :, 0], auc)
        np.testing.assert_array_equal(table[v, :, 1], err)
    assert np.isnan(table[1, 3]).all() and np.isnan(table[2]).all() and not np.isnan(table[0]).any()
    h[0, 0, 0, 5] = -1
    with pytest.raises(ValueError, match="negative"):
        native.hist_aucs(h)


def _without_users(batches):
    for b, _ in batches:
        b.user = None
    return batches


@pytest.mark.parametrize("native_on", [True, False])
def test_metrics_without_users_match_the_references_on_both_paths(native_on, monkeypatch):
    """Without a user id (no GAUC) the binary views are added by one C pass
    (``native.metric_pairs``) or by the operator path: both match the references."""
    from dataclasses import replace

    from dlrm_mtl import native

    monkeypatch.setattr(native, "_enabled", native_on)
    batches = make_batches(5, 4)
    recs = records(batches)
    acc = MetricAccumulator(replace(make_schema(), user_id=None))
    for b, z in _without_users(batches):
        acc.update(b, z)
    ref = {k: {m: v for m, v in e.items() if not m.startswith("gauc")} for k, e in reference_rows(recs).items()}
    check_against_reference(acc.compute(), ref)


def test_the_c_metric_pass_adds_what_the_operator_path_adds(monkeypatch):
    """The same histogram counts (the AUCs' and the oracle's) and the same sums — in the same
    order; the element-wise values may differ in the last bit between the two (ATen computes a
    vector's tail with its scalar functions)."""
    from dataclasses import replace

    from dlrm_mtl import native

    schema = replace(make_schema(), user_id=None)
    accs = []
    for on in (True, False):
        monkeypatch.setattr(native, "_enabled", on)
        acc = MetricAccumulator(schema)
        for b, z in _without_users(make_batches(11, 3, B=300)):
            acc.update(b, z)
        accs.append(acc)
    c, ops = accs
    assert c.hist.sum() > 0 and torch.equal(c.hist, ops.hist) and torch.equal(c.oracle_hist, ops.oracle_hist)
    torch.testing.assert_close(c.sums, ops.sums, rtol=1e-14, atol=0)
    b, z = _without_users(make_batches(11, 1, B=8, pad_last=0))[0]
    b.labels[:, 0] = 2.0  # not a binary label
    monkeypatch.setattr(native, "_enabled", True)
    before = c.hist.clone()
    with pytest.raises(ValueError, match="not a binary label"):
        c.update(b, z)
    assert torch.equal(c.hist, before)


def test_grouped_auc_matches_per_group_pairs():
    rng = np.random.default_rng(4)
    g = rng.integers(0, 12, 200)
    s = np.round(rng.random(200), 1)
    y = (rng.random(200) < 0.4).astype(int)
    n, a = grouped_auc(g, y, s)
    ref = []
    for u in sorted(set(g.tolist())):
        m = g == u
        if 0 < y[m].sum() < m.sum():
            ref.append((m.sum(), pair_auc(y[m].tolist(), s[m].tolist())))
    assert n.tolist() == [r[0] for r in ref]
    assert a == pytest.approx([r[1] for r in ref], abs=1e-12)


def test_single_process_matches_reference():
    batches = make_batches(0, 4)
    acc = MetricAccumulator(make_schema())
    for b, z in batches:
        acc.update(b, z)
    rows = acc.compute()
    check_against_reference(rows, reference_rows(records(batches)))
    # GAUC skips users with one class and says so
    r = next(r for r in rows if r["scenario"] == "all" and r["task"] == "cvr")
    assert r["gauc_skipped_users"] > 0 and r["gauc_users"] > 0
    table = format_table(rows)
    assert "gauc" in table and "mse" in table and "vcr" in table


def test_esm2_views_and_oracle():
    schema = Schema(
        name="e", sparse=[SparseFeature(name="u", table="t", num_embeddings=3, dim=4)], dense=[],
        scenarios=[ScenarioLevel("s", 1)],
        tasks=[Task("ctr", "click", oracle="a"), Task("dact", "d", parent="ctr", oracle="b"),
               Task("buy_d", "buy", parent="dact", loss_space="none", oracle="c"),
               Task("buy_o", "buy", parent="!dact", loss_space="none", oracle="d"),
               Task("cvr", "buy", parent="ctr", entire_name="ctcvr", sum_of=["buy_d", "buy_o"], oracle="e")],
    )
    rng = np.random.default_rng(9)
    B = 60
    z = torch.tensor(np.round(rng.normal(size=(B, 5)), 2), dtype=torch.float32)
    click = rng.random(B) < 0.6
    d = click & (rng.random(B) < 0.5)
    buy = click & (rng.random(B) < 0.4)
    lab = np.stack([click, d, buy, buy, buy], axis=1).astype(np.float32)
    o = rng.random((B, 5)).astype(np.float32)
    batch = Batch(
        sparse=KeyedJaggedTensor.from_lengths_sync(keys=["u"], values=torch.zeros(B, dtype=torch.int64), lengths=torch.ones(B, dtype=torch.int32)),
        dense=torch.zeros(B, 0), scenario=torch.zeros(B, 1, dtype=torch.int64), labels=torch.tensor(lab),
        label_mask=torch.ones(B, 5, dtype=torch.bool), row_id=torch.arange(B), weight=torch.ones(B), oracle=torch.tensor(o),
    )
    acc = MetricAccumulator(schema)
    acc.update(batch, z)
    rows = {(r["scenario"], r["task"]): r for r in acc.compute()}
    zz = z.double().numpy()
    s = 1 / (1 + np.exp(-zz))
    mix = s[:, 1] * s[:, 2] + (1 - s[:, 1]) * s[:, 3]
    r = rows[("all", "cvr")]  # conditional mixture on clicked rows
    assert r["count"] == int(click.sum())
    assert abs(r["auc"] - pair_auc(buy[click].tolist(), mix[click].tolist())) <= r["auc_max_error"] + 1e-12
    assert r["calibration"] == pytest.approx(mix[click].sum() / buy[click].sum(), rel=1e-9)
    r = rows[("all", "ctcvr")]
    p = s[:, 0] * mix
    assert r["logloss"] == pytest.approx(ref_logloss(buy.astype(float).tolist(), p.tolist()), rel=1e-9)
    # oracle of the sum_of task's entire space: o_ctr · o_cvr
    assert abs(r["oracle_auc"] - pair_auc(buy.tolist(), (o[:, 0].astype(float) * o[:, 4]).tolist())) <= r["oracle_auc_max_error"] + 1e-12
    r = rows[("all", "buy_o")]  # clicked rows without the action
    sel = click & ~d
    assert r["count"] == int(sel.sum())
    assert r["positives"] == int(buy[sel].sum())
    r = rows[("all", "ctr_not_dact_buy_o")]
    assert r["calibration"] == pytest.approx((s[:, 0] * (1 - s[:, 1]) * s[:, 3]).sum() / (click & ~d & buy).sum(), rel=1e-9)


# ---------------------------------------------------------------------------- 2 processes

WORKER = r'''
import json, os, sys
sys.path.insert(0, sys.argv[4])
sys.path.insert(0, sys.argv[5])
import torch.distributed as dist
rank, world, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + out + ".store", rank=rank, world_size=world)
from test_metrics_sliced import make_batches, make_schema
from dlrm_mtl.metrics import MetricAccumulator
# uneven shards: rank 0 three batches, rank 1 one batch and then a whole padding batch
batches = make_batches(0, 4)
mine = batches[:3] if rank == 0 else batches[3:]
acc = MetricAccumulator(make_schema())
for b, z in mine:
    acc.update(b, z)
if rank == 1:
    pad = make_batches(99, 1, pad_last=40)
    acc.update(*pad[0])
rows = acc.compute()
with open(f"{out}.{rank}.json", "w") as fh:
    json.dump(rows, fh)
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_two_processes_uneven_shards_equal_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = str(tmp_path / "res")
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), "2", out, str(ROOT), str(ROOT / "tests")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    for p in procs:
        stdout, _ = p.communicate(timeout=240)
        assert p.returncode == 0, stdout[-3000:]
    r0 = json.loads(Path(out + ".0.json").read_text())
    r1 = json.loads(Path(out + ".1.json").read_text())
    assert r0 == r1  # every rank gets the merged metrics
    batches = make_batches(0, 4)
    acc = MetricAccumulator(make_schema())
    for b, z in batches:
        acc.update(b, z)
    single = acc.compute()
    assert len(single) == len(r0)
    for a, b in zip(single, r0):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float):
                assert close(b[k], a[k], 1e-12), (a["scenario"], a["task"], k, a[k], b[k])
            else:
                assert a[k] == b[k], (a["scenario"], a["task"], k)
    check_against_reference(r0, reference_rows(records(batches)))
