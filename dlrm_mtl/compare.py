"""``dlrm-mtl compare RUN_A RUN_B``: per scenario × task differences of two runs' metrics.

The *MTL gain* (PLE, Tang et al. 2020, eq. 11) of run A (e.g. a multi-task model) over run B
(e.g. a single-task baseline) is ``M_A − M_B`` for metrics where higher is better (AUC,
GAUC) and ``M_B − M_A`` for metrics where lower is better (log loss, NE, MSE, MAE): a
positive gain always means A is better.

Example::

    dlrm-mtl compare runs/ple runs/single_task
    rows = compare_runs("runs/ple", "runs/single_task")
    rows[0]  # {"scenario": "all", "task": "ctr", "metric": "auc", "a": 0.78, "b": 0.77, "diff": 0.01, "gain": 0.01}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Tuple, Union

HIGHER_IS_BETTER = ("auc", "gauc")
LOWER_IS_BETTER = ("logloss", "ne", "mse", "mae")


def load_metrics(run: Union[str, Path]) -> List[Dict[str, object]]:
    """The metric rows of a run directory (``metrics.json`` inside it) or a metrics.json file."""
    p = Path(run)
    if p.is_dir():
        p = p / "metrics.json"
    if not p.exists():
        raise FileNotFoundError(f"{p}: not found (did the run or `dlrm-mtl evaluate` finish?)")
    data = json.loads(p.read_text())
    rows = data.get("metrics") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{p}: no 'metrics' list (not a dlrm_mtl metrics.json)")
    return rows


def _num(x: object) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else float("nan")


def compare_runs(run_a: Union[str, Path], run_b: Union[str, Path]) -> List[Dict[str, object]]:
    """One row per (scenario, task, metric) present in both runs, in run A's order."""
    a_rows = load_metrics(run_a)
    b_idx: Dict[Tuple[str, str], Dict[str, object]] = {(str(r["scenario"]), str(r["task"])): r for r in load_metrics(run_b)}
    out: List[Dict[str, object]] = []
    for ra in a_rows:
        key = (str(ra["scenario"]), str(ra["task"]))
        rb = b_idx.get(key)
        if rb is None:
            continue
        for metric in HIGHER_IS_BETTER + LOWER_IS_BETTER:
            if metric not in ra or metric not in rb:
                continue
            a, b = _num(ra[metric]), _num(rb[metric])
            diff = a - b
            gain = diff if metric in HIGHER_IS_BETTER else -diff
            out.append({"scenario": key[0], "task": key[1], "metric": metric, "a": a, "b": b, "diff": diff, "gain": gain,
                        "count_a": ra.get("count"), "count_b": rb.get("count")})
    return out


def different_data(rows: List[Dict[str, object]]) -> List[str]:
    """The slices whose evaluation row counts differ between the two runs: metrics measured on
    different data do not compare (a gain there says nothing about the models)."""
    seen: Dict[Tuple[str, str], str] = {}
    for r in rows:
        a, b = r.get("count_a"), r.get("count_b")
        if a is not None and b is not None and a != b:
            seen.setdefault((str(r["scenario"]), str(r["task"])), f"{r['scenario']}/{r['task']}: {a} vs {b} rows")
    return list(seen.values())


def format_comparison(rows: List[Dict[str, object]], name_a: str = "A", name_b: str = "B") -> str:
    def f(x: object) -> str:
        v = _num(x)
        return f"{'n/a':>9}" if math.isnan(v) else f"{v:>9.4f}"

    head = f"{'scenario':<24} {'task':<8} {'metric':<8} {'A':>9} {'B':>9} {'A-B':>9} {'gain':>9}"
    lines = [f"A = {name_a}", f"B = {name_b}", "gain = MTL gain (PLE eq. 11): positive when A is better", ""]
    differ = different_data(rows)
    if differ:
        lines += [f"WARNING: the two runs were evaluated on different data ({len(differ)} slice(s) differ in rows, e.g. "
                  + "; ".join(differ[:3]) + "): their differences are not model differences", ""]
    lines += [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (str(r["task"]), r["scenario"] != "all", str(r["scenario"]), str(r["metric"]))):
        lines.append(f"{str(r['scenario']):<24} {str(r['task']):<8} {str(r['metric']):<8} {f(r['a'])} {f(r['b'])} {f(r['diff'])} {f(r['gain'])}")
    if not rows:
        lines.append("(no scenario x task in common)")
    return "\n".join(lines)
