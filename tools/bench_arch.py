"""Dense-arch throughput (forward + backward) of every architecture: batched ExpertBank vs a
Python loop over experts, measured side by side.

What is measured
----------------
For each architecture (a ``configs/arch/*.yaml`` fragment, default: all of them), the
``DenseArch`` built from it (dense MLP, interaction, the scenario and task layers, towers) runs
forward + backward on in-memory random inputs shaped like the synthetic data set (4 leaf
scenarios, 2 tasks). Two versions of the *same* model, with the *same* weights:

* ``batched``: dlrm_mtl as it is: every ``ExpertBank`` evaluates its E experts as one
  batched matmul/einsum over stacked weights.
* ``loop``: a deep copy in which every ``ExpertBank`` is replaced by :class:`LoopExpertBank`
  (written here): E independent ``nn.Linear`` + ReLU stacks holding copies of the bank's
  weights, called one after another in a Python loop and stacked — what a straightforward
  implementation does. Everything else (gates, routing, towers) is shared code.

Before timing, both versions' logits are checked to agree (max abs diff printed), so the
ratio compares the same math. Timed steps alternate between the two versions in chunks, so
load on the machine hits both alike. ``ratio = batched samples/s / loop samples/s``.

Expert counts: ``--experts E`` sets ``num_experts = E`` (gate-only designs: MMoE, OMoE, AESM²,
ML-MMoE), ``num_shared = E // 2`` and ``num_specific = E // 2`` per scenario or task (CGC, PLE,
HiNet), so every layer has at least E experts to choose from. Expert MLPs get one hidden layer
(``--hidden``) so the deeper-layer einsum is exercised too.

Example::

    .venv/bin/python tools/bench_arch.py --experts 4 8 16 --batch 1024
    .venv/bin/python tools/bench_arch.py --arch mmoe ple --experts 8 --json bench_arch.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from dlrm_mtl.config import Config
from dlrm_mtl.models.ranking_model import DenseArch
from dlrm_mtl.modules.expert_bank import ExpertBank
from dlrm_mtl.synthetic import synthetic_schema

ARCH_DIR = Path(__file__).resolve().parents[1] / "configs" / "arch"


class LoopExpertBank(nn.Module):
    """The reference: E independent experts (``nn.Linear`` + ReLU stacks), a Python loop over them."""

    def __init__(self, bank: ExpertBank) -> None:
        super().__init__()
        self.num_experts, self.in_dim, self.out_dim = bank.num_experts, bank.in_dim, bank.out_dim
        self.experts = nn.ModuleList()
        for e in range(bank.num_experts):
            layers: List[nn.Module] = []
            for w, b in zip(bank.weights, bank.biases):
                lin = nn.Linear(w.shape[1], w.shape[2])
                with torch.no_grad():
                    lin.weight.copy_(w[e].T)
                    lin.bias.copy_(b[e])
                layers += [lin, nn.ReLU()]
            self.experts.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor, start: int = 0, count: Optional[int] = None) -> torch.Tensor:
        E = self.num_experts - start if count is None else count
        outs = []
        for i in range(E):
            xi = x if x.dim() == 2 else x[:, i]
            outs.append(self.experts[start + i](xi))
        return torch.stack(outs, dim=1)  # [B, E, out]


def to_loop(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every ExpertBank replaced by a LoopExpertBank (same weights)."""
    model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, ExpertBank):
                setattr(mod, child_name, LoopExpertBank(child))
    return model


def scaled_config(fragment: Path, experts: int, hidden: int) -> Config:
    cfg = Config.load([str(fragment)])
    for lc in list(cfg.model.scenario_layers) + list(cfg.model.task_layers):
        lc.num_experts = experts
        lc.num_shared = max(1, experts // 2)
        lc.num_specific = max(1, experts // 2)
        lc.hidden = [hidden] if hidden > 0 else []
        lc.k_specific = min(lc.k_specific, max(1, experts // 4))
        lc.k_shared = min(lc.k_shared, max(1, experts // 4))
    return cfg


def inputs(schema, B: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    F, D = len(schema.sparse), schema.sparse[0].dim
    pooled = torch.randn(B, F, D, generator=g)
    dense = torch.randn(B, len(schema.dense), generator=g)
    scenario = torch.stack([torch.randint(0, l.num_values, (B,), generator=g) for l in schema.scenarios], dim=1)
    return pooled, dense, scenario


def step(model: nn.Module, batch) -> float:
    t = time.perf_counter()
    logits, _, aux = model(*batch)
    loss = logits.sum() + sum(aux.values(), torch.zeros(()))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def bench_one(fragment: Path, experts: int, hidden: int, B: int, steps: int, warmup: int, chunk: int) -> Dict[str, float]:
    schema = synthetic_schema()
    torch.manual_seed(0)
    cfg = scaled_config(fragment, experts, hidden)
    batched = DenseArch(schema, cfg.model)
    loop = to_loop(batched)
    batch = inputs(schema, B)
    batched.eval(), loop.eval()  # no gate noise / BN batch stats for the equality check
    with torch.no_grad():
        diff = float((batched(*batch)[0] - loop(*batch)[0]).abs().max())
    batched.train(), loop.train()
    for m in (batched, loop):
        for _ in range(warmup):
            step(m, batch)
    times: Dict[str, List[float]] = {"batched": [], "loop": []}
    done = 0
    while done < steps:
        n = min(chunk, steps - done)
        for name, m in (("batched", batched), ("loop", loop)):
            for _ in range(n):
                times[name].append(step(m, batch))
        done += n
    out = {"arch": fragment.stem, "experts": experts, "max_abs_diff": diff}
    for name, ts in times.items():
        out[f"{name}_samples_per_s"] = B * len(ts) / sum(ts)
        out[f"{name}_median_ms"] = 1000 * statistics.median(ts)
    out["ratio"] = out["batched_samples_per_s"] / out["loop_samples_per_s"]
    out["ratio_median"] = out["loop_median_ms"] / out["batched_median_ms"]
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="*", default=None, help="names of configs/arch/*.yaml (default: all)")
    p.add_argument("--experts", nargs="+", type=int, default=[4, 8, 16])
    p.add_argument("--hidden", type=int, default=64, help="hidden layer of every expert (0 = one-layer experts)")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--chunk", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    names = a.arch or sorted(f.stem for f in ARCH_DIR.glob("*.yaml"))
    rows = []
    print(f"{'arch':<16}{'E':>4}{'batched/s':>12}{'loop/s':>12}{'ratio':>8}{'ratio(med)':>11}{'max|diff|':>11}")
    for name in names:
        for E in a.experts:
            r = bench_one(ARCH_DIR / f"{name}.yaml", E, a.hidden, a.batch, a.steps, a.warmup, a.chunk)
            rows.append(r)
            print(f"{name:<16}{E:>4}{r['batched_samples_per_s']:>12,.0f}{r['loop_samples_per_s']:>12,.0f}"
                  f"{r['ratio']:>7.2f}x{r['ratio_median']:>10.2f}x{r['max_abs_diff']:>11.1e}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
