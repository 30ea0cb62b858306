"""Run the architecture comparison of a public data set and write its results table.

For each architecture fragment ``datasets/<name>/configs/<arch>.yaml`` and each seed, runs
``dlrm-mtl train --config base.yaml --config <arch>.yaml`` (one process, or ``torchrun``
with ``--nproc``), then writes ``OUT/results.md`` (AUC per scenario × task, one column per
architecture, mean ± std over seeds; the best mean per row in bold) and ``OUT/results.json``.
The arch ``default`` trains ``base.yaml`` alone (the framework's default model).

Example (from the repository root; ``datasets/<name>/run_comparison.sh`` wraps this)::

    python -m dlrm_mtl.datasets.compare --dataset aliexpress --data data/aliexpress \\
        --archs shared_bottom,mmoe,ple,hinet,aesm --seeds 0,1,2 --out runs/aliexpress
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

Metrics = List[Dict[str, object]]  # the "metrics" rows of a run's metrics.json
# each run is its own job: rendezvous variables of a surrounding process are not inherited
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def run_subprocess(cmd: List[str]) -> int:
    """Run one training command as its own job (rendezvous variables not inherited)."""
    return subprocess.run(cmd, env={k: v for k, v in os.environ.items() if k not in DIST_ENV}).returncode


def train_command(configs_dir: Path, arch: str, data: Path, run_dir: Path, seed: int, eval_split: str,
                  overrides: Sequence[str] = (), nproc: int = 1) -> List[str]:
    """The ``dlrm-mtl train`` command line of one (architecture, seed) run."""
    launcher = [sys.executable, "-m", "dlrm_mtl"] if nproc <= 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "dlrm_mtl"]
    cmd = launcher + ["train", "--config", str(configs_dir / "base.yaml")]
    if arch != "default":
        cmd += ["--config", str(configs_dir / f"{arch}.yaml")]
    for kv in (f"data.train={data / 'train'}", f"data.eval={data / eval_split}", f"data.schema={data / 'schema.yaml'}",
               f"train.run_dir={run_dir}", f"train.seed={seed}", "train.progress=false", *overrides):
        cmd += ["--set", kv]
    return cmd


def _mean_std(xs: List[float]) -> Tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def summarise(runs: Dict[str, List[Metrics]], metric: str = "auc") -> Dict[Tuple[str, str], Dict[str, Tuple[float, float, int]]]:
    """(scenario, task) -> arch -> (mean, std over seeds, number of seeds) of ``metric``."""
    out: Dict[Tuple[str, str], Dict[str, Tuple[float, float, int]]] = {}
    for arch, seeds in runs.items():
        per_key: Dict[Tuple[str, str], List[float]] = {}
        for rows in seeds:
            for r in rows:
                v = r.get(metric)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    per_key.setdefault((str(r["scenario"]), str(r["task"])), []).append(float(v))
        for key, xs in per_key.items():
            m, s = _mean_std(xs)
            out.setdefault(key, {})[arch] = (m, s, len(xs))
    return out


def results_table(runs: Dict[str, List[Metrics]], metric: str = "auc", higher_is_better: bool = True) -> str:
    """A Markdown table: one row per (task, scenario) ('all' first), one column per arch."""
    table = summarise(runs, metric)
    archs = list(runs)
    lines = [f"| task | scenario | " + " | ".join(archs) + " |", "|---|---|" + "---:|" * len(archs)]
    for task, scenario in sorted({(t, s) for s, t in table}, key=lambda k: (k[0], k[1] != "all", k[1])):
        cells = table[(scenario, task)]
        best = (max if higher_is_better else min)((v[0] for v in cells.values()), default=None)
        row = []
        for a in archs:
            if a not in cells:
                row.append("–")
                continue
            m, s, n = cells[a]
            txt = f"{m:.4f}" + (f" ± {s:.4f}" if n > 1 else "")
            row.append(f"**{txt}**" if m == best and len(cells) > 1 else txt)
        lines.append(f"| {task} | {scenario} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def run_comparison(dataset: str, data: Path, out: Path, archs: Sequence[str], seeds: Sequence[int],
                   configs_dir: Optional[Path] = None, eval_split: str = "", overrides: Sequence[str] = (),
                   nproc: int = 1, dry_run: bool = False,
                   runner: Callable[[List[str]], int] = run_subprocess) -> Dict[str, List[Metrics]]:
    """Train every (arch, seed), then write ``out/results.md`` and ``out/results.json``.
    ``runner`` executes one command line and returns its exit status."""
    configs_dir = configs_dir or Path("datasets") / dataset.replace("-", "_") / "configs"
    if not eval_split:
        eval_split = "eval" if (data / "eval").exists() and not (data / "test").exists() else "test"
    runs: Dict[str, List[Metrics]] = {}
    for arch in archs:
        if arch != "default" and not (configs_dir / f"{arch}.yaml").exists():
            raise FileNotFoundError(f"{configs_dir / (arch + '.yaml')}: no such architecture fragment")
        for seed in seeds:
            run_dir = out / arch / f"seed{seed}"
            cmd = train_command(configs_dir, arch, data, run_dir, seed, eval_split, overrides, nproc)
            print("+ " + " ".join(cmd), flush=True)
            if dry_run:
                continue
            rc = runner(cmd)
            if rc != 0:
                raise RuntimeError(f"{arch} seed {seed}: training failed (exit {rc}); see the log above")
            runs.setdefault(arch, []).append(json.loads((run_dir / "metrics.json").read_text())["metrics"])
    if not dry_run:
        out.mkdir(parents=True, exist_ok=True)
        md = (f"# {dataset}: AUC per task and scenario on `{data / eval_split}`\n\n"
              f"Seeds {list(seeds)}; mean ± std over seeds; best mean per row in bold.\n\n" + results_table(runs)
              + "\n## Log loss\n\n" + results_table(runs, "logloss", higher_is_better=False))
        (out / "results.md").write_text(md)
        (out / "results.json").write_text(json.dumps(
            {"dataset": dataset, "data": str(data), "seeds": list(seeds), "runs": runs}, indent=1))
        print(md)
    return runs


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlrm_mtl.datasets.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="folder name under datasets/ (e.g. aliexpress, census_income)")
    p.add_argument("--data", required=True, type=Path, help="the converted data set (train/, eval/ or test/, schema.yaml)")
    p.add_argument("--out", required=True, type=Path, help="runs and results.md go here")
    p.add_argument("--archs", default="", help="comma-separated fragments (default: datasets/<name>/ARCHS)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--configs", type=Path, default=None, help="default: datasets/<name>/configs")
    p.add_argument("--eval-split", default="", help="eval or test (default: test if present)")
    p.add_argument("--nproc", type=int, default=1, help="workers per run (torchrun)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    folder = Path("datasets") / args.dataset.replace("-", "_")
    archs = [a for a in args.archs.split(",") if a] or (folder / "ARCHS").read_text().split()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    run_comparison(args.dataset, args.data, args.out, archs, seeds, args.configs, args.eval_split, args.set,
                   args.nproc, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
