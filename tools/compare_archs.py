"""The architecture comparison on synthetic data: every ``configs/arch/*.yaml`` trained with the
same data, seed, epochs, batch size and learning rates, evaluated against the oracle.

What it does
------------
1. Generates the synthetic data set once (``--rows``, ``--seed``; reused when present).
2. For each architecture runs ``python -m dlrm_mtl train --config configs/demo.yaml --config
   configs/arch/NAME.yaml`` in a fresh process (world size 1, the same budget for everyone:
   ``--epochs`` over the same rows in the same shuffled order).
3. Prints and writes (``--out``, markdown + JSON) one table per metric: AUC per leaf scenario
   and overall for CTR and CTCVR (entire space) and CVR on clicked rows, the oracle AUC row
   (true probabilities: the ceiling), the number of dense parameters and samples/s.

The generator builds in scenario-specific effects that grow as scenarios get smaller (the
small ``app/fund_card`` leaf departs most from the others), so a model that shares
everything should lose there (negative transfer) while scenario-aware ones should not.

Example::

    .venv/bin/python tools/compare_archs.py --rows 1000000 --epochs 2 --out docs/results/synthetic
    .venv/bin/python tools/compare_archs.py --arch shared_bottom hinet --rows 200000 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
ARCH_DIR = ROOT / "configs" / "arch"


def dense_params(cfg_files: List[str], schema_path: Path) -> int:
    from dlrm_mtl.config import Config
    from dlrm_mtl.models.ranking_model import DenseArch
    from dlrm_mtl.schema import Schema

    cfg = Config.load(cfg_files)
    return sum(p.numel() for p in DenseArch(Schema.load(schema_path), cfg.model).parameters())


def table(results: Dict[str, dict], task: str, scenarios: List[str], key: str = "auc") -> str:
    head = "| arch | " + " | ".join(scenarios) + " | dense params | samples/s |"
    sep = "|---" * (len(scenarios) + 3) + "|"
    lines = [f"**{task.upper()} {key.upper()}**", "", head, sep]
    oracle = None
    for name, res in results.items():
        by = {r["scenario"]: r for r in res["metrics"] if r["task"] == task}
        oracle = oracle or by
        best = {s: max(rr["metrics_by"][task][s] for rr in results.values()) for s in scenarios}
        cells = []
        for s in scenarios:
            v = by[s][key]
            cells.append(f"**{v:.4f}**" if abs(v - best[s]) < 5e-5 else f"{v:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {res['dense_params']:,} | {res['samples_per_s']:,.0f} |")
    if oracle and "oracle_auc" in next(iter(oracle.values())):
        lines.append("| *oracle* | " + " | ".join(f"*{oracle[s]['oracle_auc']:.4f}*" for s in scenarios) + " | | |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="*", default=None, help="names of configs/arch/*.yaml (default: all)")
    p.add_argument("--data", default="data/compare")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conflict", type=float, default=0.0,
                   help="SyntheticSpec.small_leaf_conflict: the smallest leaf's preferences oppose the others'")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--runs", default="runs/compare")
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override for every run")
    a = p.parse_args(argv)
    data = Path(a.data)
    if not (data / "schema.yaml").exists():
        from dlrm_mtl.synthetic import SyntheticSpec, generate

        print(f"[compare] generating {a.rows} rows into {data}", flush=True)
        generate(data, rows=a.rows, seed=a.seed, spec=SyntheticSpec(small_leaf_conflict=a.conflict))
    names = a.arch or sorted(f.stem for f in ARCH_DIR.glob("*.yaml"))
    results: Dict[str, dict] = {}
    for name in names:
        cfg_files = [str(ROOT / "configs" / "demo.yaml"), str(ARCH_DIR / f"{name}.yaml")]
        run = Path(a.runs) / name
        cmd = [sys.executable, "-m", "dlrm_mtl", "train"] + [x for f in cfg_files for x in ("--config", f)]
        for ov in [f"data.train={data / 'train'}", f"data.eval={data / 'eval'}", f"train.run_dir={run}",
                   f"train.epochs={a.epochs}", f"data.batch_size={a.batch}", f"train.seed={a.seed}",
                   "train.progress=false", "train.eval_every_epoch=false"] + a.set:
            cmd += ["--set", ov]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"[compare] {name} FAILED:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}", flush=True)
            continue
        res = json.loads((run / "metrics.json").read_text())
        res["dense_params"] = dense_params(cfg_files, data / "schema.yaml")
        res["samples_per_s"] = res["throughput"]["samples_per_s"]
        res["metrics_by"] = {}
        for r in res["metrics"]:
            res["metrics_by"].setdefault(r["task"], {})[r["scenario"]] = r["auc"]
        results[name] = res
        ctr = res["metrics_by"]["ctr"]["all"]
        print(f"[compare] {name:<16} {time.time() - t0:6.0f}s  ctr auc {ctr:.4f}", flush=True)
    if not results:
        return 1
    first = next(iter(results.values()))
    scenarios = [r["scenario"] for r in first["metrics"] if r["task"] == "ctr"]
    tasks = [t for t in first["metrics_by"]]
    md = "\n\n".join(table(results, t, scenarios) for t in tasks)
    cmdline = "tools/compare_archs.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = (f"Produced by `.venv/bin/python {cmdline}` — {a.rows:,} synthetic rows (seed {a.seed}, "
          f"small_leaf_conflict {a.conflict}), "
          f"{a.epochs} epoch(s), batch {a.batch}, world size 1. Bold: best in the column.\n\n" + md)
    print(md)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(md + "\n")
        slim = {n: {k: r[k] for k in ("metrics", "dense_params", "samples_per_s", "throughput", "expert_utilisation") if k in r}
                for n, r in results.items()}
        out.with_suffix(".json").write_text(json.dumps(slim, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
