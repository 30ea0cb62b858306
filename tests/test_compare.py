"""dlrm-mtl compare: per scenario × task differences and PLE eq. 11's MTL gain."""

import json

import pytest

from dlrm_mtl.cli import main
from dlrm_mtl.compare import compare_runs


def _write(d, rows):
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(json.dumps({"metrics": rows, "throughput": {}}))
    return d


A = [
    {"scenario": "all", "task": "ctr", "auc": 0.80, "gauc": 0.70, "logloss": 0.30, "ne": 0.90, "count": 10},
    {"scenario": "home", "task": "ctr", "auc": 0.75, "logloss": 0.35, "count": 4},
    {"scenario": "all", "task": "vcr", "type": "regression", "mse": 0.050, "mae": 0.20, "count": 5},
    {"scenario": "all", "task": "only_in_a", "auc": 0.6, "count": 1},
]
B = [
    {"scenario": "all", "task": "ctr", "auc": 0.78, "gauc": 0.71, "logloss": 0.32, "ne": 0.95, "count": 10},
    {"scenario": "home", "task": "ctr", "auc": 0.77, "logloss": 0.33, "count": 4},
    {"scenario": "all", "task": "vcr", "type": "regression", "mse": 0.060, "mae": 0.18, "count": 5},
]


def test_compare_differences_and_gain_signs(tmp_path):
    rows = compare_runs(_write(tmp_path / "a", A), _write(tmp_path / "b", B) / "metrics.json")
    got = {(r["scenario"], r["task"], r["metric"]): r for r in rows}
    assert ("all", "only_in_a", "auc") not in got  # only pairs present in both runs
    for (s, t, m), r in got.items():
        a = next(x for x in A if (x["scenario"], x["task"]) == (s, t))[m]
        b = next(x for x in B if (x["scenario"], x["task"]) == (s, t))[m]
        assert r["a"] == a and r["b"] == b and r["diff"] == pytest.approx(a - b)
        # PLE eq. 11: M_mtl − M_single where higher is better, sign-flipped where lower is better
        expect = (a - b) if m in ("auc", "gauc") else (b - a)
        assert r["gain"] == pytest.approx(expect)
    assert got[("all", "ctr", "auc")]["gain"] == pytest.approx(0.02)
    assert got[("all", "ctr", "logloss")]["gain"] == pytest.approx(0.02)  # A's loss is lower: a gain
    assert got[("all", "vcr", "mse")]["gain"] == pytest.approx(0.01)
    assert got[("all", "vcr", "mae")]["gain"] == pytest.approx(-0.02)
    assert got[("home", "ctr", "auc")]["gain"] == pytest.approx(-0.02)
    assert len(rows) == 4 + 2 + 2


def test_compare_cli(tmp_path, capsys):
    assert main(["compare", str(_write(tmp_path / "a", A)), str(_write(tmp_path / "b", B))]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.split()[:3] == ["all", "ctr", "auc"])
    assert line.split()[-4:] == ["0.8000", "0.7800", "0.0200", "0.0200"]
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["compare", "--json", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 8


def test_runs_evaluated_on_different_data_are_flagged(tmp_path, capsys):
    other = [dict(r, count=r["count"] * 3) if r["scenario"] == "home" else r for r in B]
    assert main(["compare", str(_write(tmp_path / "a", A)), str(_write(tmp_path / "b", other))]) == 0
    out = capsys.readouterr().out
    assert "WARNING: the two runs were evaluated on different data (1 slice(s)" in out and "home/ctr: 4 vs 12 rows" in out
    assert main(["compare", str(tmp_path / "a"), str(_write(tmp_path / "c", B))]) == 0
    assert "WARNING" not in capsys.readouterr().out  # same rows: no warning
