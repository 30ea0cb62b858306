"""Tests for dlrm_mtl.metrics: auc, logloss, scenario_names, leaf_ids, MetricAccumulator, format_table."""

from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_mtl.data.batch import Batch
from dlrm_mtl.metrics import MetricAccumulator, auc, format_table, leaf_ids, logloss, scenario_names
from dlrm_mtl.schema import DenseFeature, ScenarioLevel, Schema, SparseFeature, Task

# ---------------------------------------------------------------------------- references


def brute_auc(labels, scores) -> float:
    """P(score_pos > score_neg) over all (pos, neg) pairs, ties 1/2."""
    labels = [bool(v) for v in labels]
    scores = [float(s) for s in scores]
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    total = 0.0
    for p in pos:
        for n in neg:
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(pos) * len(neg))


def manual_logloss(labels, probs) -> float:
    if len(labels) == 0:
        return float("nan")
    out = 0.0
    for y, p in zip(labels, probs):
        p = min(max(float(p), 1e-7), 1 - 1e-7)
        out += -(y * math.log(p) + (1 - y) * math.log(1 - p))
    return out / len(labels)


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# ---------------------------------------------------------------------------- auc / logloss


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_auc_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 150
    scores = np.round(rng.random(n), 1)  # ~11 distinct values: many ties
    labels = (rng.random(n) < 0.3 + 0.4 * scores).astype(np.int64)
    assert len(np.unique(scores)) < 15
    assert abs(auc(labels, scores) - brute_auc(labels, scores)) < 1e-12


@pytest.mark.parametrize("seed", [10, 11])
def test_auc_matches_brute_force_float32_and_bool_labels(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random(80), 1).astype(np.float32)
    labels = rng.random(80) < 0.5
    assert abs(auc(labels, scores) - brute_auc(labels, scores)) < 1e-12


def test_auc_hand_values():
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auc(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.3, 0.4])) == 0.0
    assert auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    # pos {0.3, 0.5}, neg {0.3, 0.1}: pairs (0.3,0.3)=.5 (0.3,0.1)=1 (0.5,0.3)=1 (0.5,0.1)=1 -> 3.5/4
    assert auc(np.array([1, 1, 0, 0]), np.array([0.3, 0.5, 0.3, 0.1])) == 0.875


def test_auc_all_ties_and_unsorted_input():
    rng = np.random.default_rng(3)
    labels = rng.random(40) < 0.5
    assert auc(labels, np.zeros(40)) == 0.5
    scores = rng.permutation(np.repeat([0.2, 0.7, 0.4], 10))
    labels = rng.random(30) < 0.5
    assert abs(auc(labels, scores) - brute_auc(labels, scores)) < 1e-12


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0, 0], []])
def test_auc_nan_when_one_class_missing(labels):
    scores = np.linspace(0, 1, len(labels))
    assert math.isnan(auc(np.array(labels), scores))


def test_logloss_matches_manual():
    rng = np.random.default_rng(7)
    y = (rng.random(50) < 0.4).astype(np.float32)
    p = rng.random(50)
    assert logloss(y, p) == pytest.approx(manual_logloss(y, p), rel=1e-12)
    # hand values
    assert logloss(np.array([1.0, 0.0]), np.array([0.8, 0.3])) == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2, rel=1e-12)
    # clipping keeps p in (0, 1)
    assert math.isfinite(logloss(np.array([1.0, 0.0]), np.array([0.0, 1.0])))
    assert logloss(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(-math.log(1e-7), rel=1e-6)
    assert math.isnan(logloss(np.array([]), np.array([])))


# ---------------------------------------------------------------------------- scenario naming


def make_schema(value_names: bool = True, oracle: bool = True) -> Schema:
    return Schema(
        name="t",
        sparse=[SparseFeature(name="user_id", table="t_user", num_embeddings=100, dim=4)],
        dense=[DenseFeature(name="price")],
        scenarios=[
            ScenarioLevel(name="channel", num_values=2, value_names=["home", "search"] if value_names else []),
            ScenarioLevel(name="domain", num_values=3, value_names=["hot_card", "feed", "video"] if value_names else []),
        ],
        tasks=[
            Task(name="ctr", label="click", oracle="true_pctr" if oracle else None),
            Task(name="cvr", label="conversion", parent="ctr", loss_space="entire", entire_name="ctcvr",
                 oracle="true_pcvr" if oracle else None),
        ],
    )


def test_scenario_names_with_value_names_mixed_radix():
    assert scenario_names(make_schema()) == [
        "home/hot_card",
        "home/feed",
        "home/video",
        "search/hot_card",
        "search/feed",
        "search/video",
    ]


def test_scenario_names_without_value_names():
    assert scenario_names(make_schema(value_names=False)) == [
        "channel0/domain0",
        "channel0/domain1",
        "channel0/domain2",
        "channel1/domain0",
        "channel1/domain1",
        "channel1/domain2",
    ]


def test_scenario_names_single_level():
    schema = Schema(
        name="t",
        sparse=[SparseFeature(name="u", table="u", num_embeddings=3)],
        dense=[],
        scenarios=[ScenarioLevel(name="page", num_values=3)],
        tasks=[Task(name="ctr", label="click")],
    )
    assert scenario_names(schema) == ["page0", "page1", "page2"]


def test_leaf_ids_mixed_radix_and_consistent_with_names():
    schema = make_schema()
    scen = torch.tensor([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])
    leaf = leaf_ids(scen, schema)
    assert leaf.tolist() == [0, 1, 2, 3, 4, 5]
    names = scenario_names(schema)
    ch, dom = schema.scenarios[0].value_names, schema.scenarios[1].value_names
    for (c, d), l in zip(scen.tolist(), leaf.tolist()):
        assert names[l] == f"{ch[c]}/{dom[d]}"
    assert leaf_ids(torch.tensor([[1, 2], [1, 0]]), schema).tolist() == [5, 3]


# ---------------------------------------------------------------------------- MetricAccumulator


def make_batch(scenario, labels, logits_unused=None, row_id=None, mask=None, oracle=None) -> Batch:
    B = len(scenario)
    labels_t = torch.tensor(labels, dtype=torch.float32)
    return Batch(
        sparse=KeyedJaggedTensor.from_lengths_sync(
            keys=["user_id"], values=torch.arange(B, dtype=torch.int64), lengths=torch.ones(B, dtype=torch.int32)
        ),
        dense=torch.zeros(B, 1),
        scenario=torch.tensor(scenario, dtype=torch.int64),
        labels=labels_t,
        label_mask=torch.ones(B, 2, dtype=torch.bool) if mask is None else torch.tensor(mask, dtype=torch.bool),
        row_id=torch.arange(B, dtype=torch.int64) if row_id is None else torch.tensor(row_id, dtype=torch.int64),
        weight=torch.ones(B) if row_id is None else (torch.tensor(row_id) >= 0).float(),
        oracle=None if oracle is None else torch.tensor(oracle, dtype=torch.float32),
    )


def random_batches(seed: int, n_batches: int = 3, B: int = 24, with_oracle: bool = True, with_nulls: bool = False):
    rng = np.random.default_rng(seed)
    batches, logits_list = [], []
    for k in range(n_batches):
        scen = np.stack([rng.integers(0, 2, B), rng.integers(0, 3, B)], axis=1)
        click = (rng.random(B) < 0.5).astype(np.float32)
        conv = ((rng.random(B) < 0.5) & (click == 1)).astype(np.float32)
        labels = np.stack([click, conv], axis=1)
        logits = np.round(rng.normal(size=(B, 2)), 1).astype(np.float32)  # ties too
        row_id = np.arange(B) + 1000 * k
        row_id[-3:] = -1  # padding rows
        labels[-3:] = np.array([1.0, 1.0])  # garbage in padding rows: must be ignored
        mask = np.ones((B, 2), dtype=bool)
        if with_nulls:
            mask[rng.random(B) < 0.15, 0] = False
            mask[rng.random(B) < 0.15, 1] = False
        oracle = rng.random((B, 2)).astype(np.float32) if with_oracle else None
        batches.append(
            make_batch(scen.tolist(), labels.tolist(), row_id=row_id.tolist(), mask=mask.tolist(),
                       oracle=None if oracle is None else oracle.tolist())
        )
        logits_list.append(torch.tensor(logits))
    return batches, logits_list


def expected_rows(schema: Schema, batches: List[Batch], logits_list: List[torch.Tensor]):
    """Per (scenario, task) expected metrics from a row-by-row Python loop."""
    names = scenario_names(schema)
    recs = []
    for b, lg in zip(batches, logits_list):
        for i in range(b.batch_size):
            if int(b.row_id[i]) < 0:
                continue
            c, d = b.scenario[i].tolist()
            y0, y1 = b.labels[i].tolist()
            m0, m1 = b.label_mask[i].tolist()
            z0, z1 = lg[i].tolist()
            o = None if b.oracle is None else b.oracle[i].tolist()
            recs.append(dict(leaf=names[c * 3 + d], y0=y0, y1=y1, m0=m0, m1=m1, p0=sig(z0), p1=sig(z1), o=o))
    out = {}
    for sname in ["all"] + names:
        rs = [r for r in recs if sname == "all" or r["leaf"] == sname]
        views = {
            "ctr": [(r["y0"], r["p0"], None if r["o"] is None else r["o"][0]) for r in rs if r["m0"]],
            "cvr": [(r["y1"], r["p1"], None if r["o"] is None else r["o"][1]) for r in rs if r["m0"] and r["m1"] and r["y0"] == 1],
            "ctcvr": [
                (r["y0"] * r["y1"], r["p0"] * r["p1"], None if r["o"] is None else r["o"][0] * r["o"][1])
                for r in rs
                if r["m0"] and r["m1"]
            ],
        }
        for task, v in views.items():
            ys = [a for a, _, _ in v]
            ps = [p for _, p, _ in v]
            row = {
                "count": len(v),
                "positives": int(sum(ys)),
                "auc": brute_auc(ys, ps),
                "logloss": manual_logloss(ys, ps),
                "calibration": sum(ps) / sum(ys) if sum(ys) > 0 else float("nan"),
            }
            if v and v[0][2] is not None:
                row["oracle_auc"] = brute_auc(ys, [o for _, _, o in v])
            out[(sname, task)] = row
    return out


def approx_eq(a, b, tol=1e-5) -> bool:
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return abs(a - b) <= tol * max(1.0, abs(b))


@pytest.mark.parametrize("with_nulls", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_metric_accumulator_matches_row_loop(seed, with_nulls):
    schema = make_schema()
    batches, logits_list = random_batches(seed, with_nulls=with_nulls)
    acc = MetricAccumulator(schema)
    for b, lg in zip(batches, logits_list):
        acc.update(b, lg)
    rows = acc.compute()
    exp = expected_rows(schema, batches, logits_list)
    got = {(r["scenario"], r["task"]): r for r in rows}
    assert set(got) == set(exp)
    assert len(rows) == len(exp) == 3 * 7
    for key, e in exp.items():
        r = got[key]
        assert r["count"] == e["count"], key
        assert r["positives"] == e["positives"], key
        for m in ("logloss", "calibration"):
            assert approx_eq(r[m], e[m]), (key, m, r[m], e[m])
        # histogram AUC: within its reported bound of the pairwise AUC; exact for the
        # conditional views, whose logits lie on a 0.1 grid (equal logits = exact ties)
        for m in ("auc", "oracle_auc"):
            if math.isnan(e[m]):
                assert math.isnan(r[m]), (key, m)
                continue
            assert abs(r[m] - e[m]) <= r[m + "_max_error"] + 1e-12, (key, m, r[m], e[m], r[m + "_max_error"])
        if key[1] in ("ctr", "cvr") and not math.isnan(e["auc"]):
            assert abs(r["auc"] - e["auc"]) < 1e-12, key


def test_metric_accumulator_hand_built_batch():
    """Small batch with values checked by hand: slices, padding and the cvr/ctcvr spaces."""
    schema = make_schema()
    # rows: scenario, [click, conv], [ctr logit, cvr logit]
    scen = [[0, 0], [0, 0], [0, 0], [0, 0], [1, 2], [1, 2], [0, 0]]
    labels = [[1, 1], [1, 0], [0, 0], [0, 0], [1, 0], [0, 0], [1, 1]]
    logits = torch.tensor([[2.0, 1.0], [1.0, 0.5], [-1.0, 0.0], [0.5, 3.0], [0.0, -1.0], [-2.0, 0.0], [9.0, 9.0]])
    row_id = [0, 1, 2, 3, 4, 5, -1]  # last row is padding
    oracle = [[0.9, 0.8], [0.7, 0.2], [0.1, 0.5], [0.3, 0.9], [0.6, 0.1], [0.2, 0.3], [0.5, 0.5]]
    acc = MetricAccumulator(schema)
    acc.update(make_batch(scen, labels, row_id=row_id, oracle=oracle), logits)
    rows = {(r["scenario"], r["task"]): r for r in acc.compute()}

    r = rows[("all", "ctr")]
    assert (r["count"], r["positives"]) == (6, 3)
    # ctr pos logits {2, 1, 0}, neg {-1, 0.5, -2}: pairs won: 2->3, 1->3, 0->2 (beats -1, -2) = 8/9
    assert r["auc"] == pytest.approx(8 / 9)
    # oracle ctr: pos {0.9, 0.7, 0.6}, neg {0.1, 0.3, 0.2} -> 1.0
    assert r["oracle_auc"] == pytest.approx(1.0)

    r = rows[("home/hot_card", "ctr")]
    assert (r["count"], r["positives"]) == (4, 2)
    assert r["auc"] == pytest.approx(1.0)  # pos {2, 1} vs neg {-1, 0.5}

    # cvr only on clicked rows: rows 0, 1, 4 (labels 1, 0, 0)
    r = rows[("all", "cvr")]
    assert (r["count"], r["positives"]) == (3, 1)
    assert r["auc"] == pytest.approx(1.0)  # pos {1.0} vs neg {0.5, -1.0}
    assert r["logloss"] == pytest.approx(manual_logloss([1, 0, 0], [sig(1.0), sig(0.5), sig(-1.0)]), rel=1e-6)
    assert r["calibration"] == pytest.approx(sig(1.0) + sig(0.5) + sig(-1.0), rel=1e-6)

    # ctcvr on every real row, label click*conv
    r = rows[("all", "ctcvr")]
    assert (r["count"], r["positives"]) == (6, 1)
    p = [sig(a) * sig(b) for a, b in logits[:6].tolist()]
    y = [1, 0, 0, 0, 0, 0]
    assert r["auc"] == pytest.approx(brute_auc(y, p))
    assert r["logloss"] == pytest.approx(manual_logloss(y, p), rel=1e-6)
    assert r["oracle_auc"] == pytest.approx(brute_auc(y, [a * b for a, b in oracle[:6]]))

    # slice search/video: rows 4, 5 -> ctr count 2 (one positive), cvr: row 4 only (no positive) -> NaN auc
    r = rows[("search/video", "ctr")]
    assert (r["count"], r["positives"]) == (2, 1)
    r = rows[("search/video", "cvr")]
    assert (r["count"], r["positives"]) == (1, 0)
    assert math.isnan(r["auc"]) and math.isnan(r["calibration"])
    # empty slice
    r = rows[("home/feed", "ctr")]
    assert r["count"] == 0 and r["positives"] == 0 and math.isnan(r["auc"]) and math.isnan(r["logloss"])


def test_metric_accumulator_without_oracle_has_no_oracle_auc():
    schema = make_schema(oracle=False)
    batches, logits_list = random_batches(5, n_batches=2, with_oracle=False)
    acc = MetricAccumulator(schema)
    for b, lg in zip(batches, logits_list):
        acc.update(b, lg)
    rows = acc.compute()
    assert rows and all("oracle_auc" not in r for r in rows)
    table = format_table(rows)
    assert "n/a" in table


def test_metric_accumulator_padding_rows_ignored():
    """Adding padding rows with arbitrary content changes nothing."""
    schema = make_schema()
    scen = [[0, 0], [0, 1], [1, 0], [1, 1]]
    labels = [[1, 0], [0, 0], [1, 1], [0, 0]]
    logits = torch.tensor([[0.3, 0.1], [-0.2, 0.4], [0.8, -0.5], [0.1, 0.2]])
    a = MetricAccumulator(schema)
    a.update(make_batch(scen, labels), logits)
    b = MetricAccumulator(schema)
    b.update(
        make_batch(scen + [[0, 0], [1, 1]], labels + [[1, 1], [1, 1]], row_id=[0, 1, 2, 3, -1, -1]),
        torch.cat([logits, torch.tensor([[5.0, 5.0], [-5.0, -5.0]])]),
    )
    ra, rb = a.compute(), b.compute()
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            assert approx_eq(x[k], y[k]) if isinstance(x[k], float) else x[k] == y[k], (x, y, k)


def test_metric_accumulator_empty_compute():
    assert MetricAccumulator(make_schema()).compute() == []


def test_format_table_contains_every_scenario_and_task():
    schema = make_schema()
    batches, logits_list = random_batches(3)
    acc = MetricAccumulator(schema)
    for b, lg in zip(batches, logits_list):
        acc.update(b, lg)
    rows = acc.compute()
    table = format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    for name in ["all"] + scenario_names(schema):
        for task in ("ctr", "cvr", "ctcvr"):
            assert any(line.split()[:2] == [name, task] for line in lines[2:]), (name, task)
    # row counts printed
    r = next(r for r in rows if r["scenario"] == "all" and r["task"] == "ctr")
    line = next(line for line in lines[2:] if line.split()[:2] == ["all", "ctr"])
    assert line.split()[-2:] == [str(r["count"]), str(r["positives"])]
    assert f"{r['auc']:.4f}" in line
