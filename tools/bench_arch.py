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

``--bound`` adds, per fragment, the best ratio any batched bank could reach in it: the model
with free banks (``FreeExpertBank``: zero-cost stand-ins that record every call) plus the GEMM
floor of exactly the recorded calls; ``loop / (free + floor)`` is printed as ``loop/ideal``.

``--mixture`` times each fragment as shipped (on the CPU with the C kernels every gated sum is
``ExpertMixture``) against the same model with the ATen forms (``mix_experts``' broadcast path
for small gated sums, a batched matmul otherwise) and with every gated sum a batched matmul.

``--bank`` times one ``ExpertBank`` alone instead (no gates, towers, ...) against the loop,
and next to both its *GEMM floor*: the batched bank's matmuls alone on preallocated buffers.
Every implementation of the same experts performs those FLOPs, so ``loop / floor`` bounds the
speed-up any batched bank can reach at those shapes. Minor page faults per step are printed
too (a deterministic count of first touches of fresh memory, which timings on a shared VM
are not). See docs/architectures.md, "The bank alone, and the GEMM floor".

Example::

    .venv/bin/python tools/bench_arch.py --bank --experts 8 16 --batch-sizes 256 1024 4096
    .venv/bin/python tools/bench_arch.py --experts 4 8 16 --batch 1024
    .venv/bin/python tools/bench_arch.py --arch mmoe ple --experts 8 --json bench_arch.json
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

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


def replace_banks(model: nn.Module, make: Callable[[ExpertBank], nn.Module]) -> nn.Module:
    """A deep copy of ``model`` with every ExpertBank ``b`` replaced by ``make(b)``."""
    model = copy.deepcopy(model)
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, ExpertBank):
                setattr(mod, child_name, make(child))
    return model


def to_loop(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every ExpertBank replaced by a LoopExpertBank (same weights)."""
    return replace_banks(model, LoopExpertBank)


def scaled_config(fragment: Path, experts: int, hidden: int) -> Config:
    """The fragment with ``experts`` experts and one hidden layer, set only on the fields each
    layer's type reads (a type refuses fields it does not read)."""
    from dlrm_mtl.models.arch import LAYER_FIELDS

    cfg = Config.load([str(fragment)])
    for kind, layers in (("scenario", cfg.model.scenario_layers), ("task", cfg.model.task_layers)):
        for lc in layers:
            values = dict(num_experts=experts, num_shared=max(1, experts // 2), num_specific=max(1, experts // 2),
                          hidden=[hidden] if hidden > 0 else [], k_specific=min(lc.k_specific, max(1, experts // 4)),
                          k_shared=min(lc.k_shared, max(1, experts // 4)))
            for k, v in values.items():
                if k in LAYER_FIELDS[kind][lc.type]:
                    setattr(lc, k, v)
    return cfg


def inputs(schema, B: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    F, D = len(schema.sparse), schema.sparse[0].dim
    pooled = torch.randn(B, F, D, generator=g)
    dense = torch.randn(B, len(schema.dense), generator=g)
    scenario = torch.stack([torch.randint(0, l.num_values, (B,), generator=g) for l in schema.scenarios], dim=1)
    return pooled, dense, scenario


def step(model: nn.Module, batch) -> None:
    """One forward + backward of a dense arch on ``batch``."""
    logits, _, aux = model(*batch)
    loss = logits.sum() + sum(aux.values(), torch.zeros(()))
    loss.backward()
    model.zero_grad(set_to_none=True)


def time_alternating(cases: Dict[str, Callable[[], None]], steps: int, warmup: int, chunk: int) -> Dict[str, Dict[str, float]]:
    """Runs every case ``warmup`` times, then ``steps`` timed times each, alternating between
    the cases in chunks of ``chunk`` (so load on the machine hits all of them alike).

    Returns per case: ``median_ms``, ``steps_per_s`` (steps / summed seconds: multiply by
    the batch for samples/s) and ``page_faults`` (minor faults per step: first touches of fresh
    memory, a count that noise on the machine does not move).
    """
    for f in cases.values():
        for _ in range(warmup):
            f()
    times: Dict[str, List[float]] = {k: [] for k in cases}
    faults = {k: 0 for k in cases}
    done = 0
    while done < steps:
        n = min(chunk, steps - done)
        for k, f in cases.items():
            for _ in range(n):
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
                faults[k] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        done += n
    return {k: {"median_ms": 1000 * statistics.median(ts), "steps_per_s": len(ts) / sum(ts),
                "page_faults": faults[k] / len(ts)} for k, ts in times.items()}


def bench_one(fragment: Path, experts: int, hidden: int, B: int, steps: int, warmup: int, chunk: int,
              bound: bool = False) -> Dict[str, float]:
    schema = synthetic_schema()
    torch.manual_seed(0)
    cfg = scaled_config(fragment, experts, hidden)
    batched = DenseArch(schema, cfg.model)
    loop = to_loop(batched)
    batch = inputs(schema, B)
    models = {"batched": batched, "loop": loop}
    floor_ops: List = []
    if bound:
        models["free"] = to_free(batched)
        floor_ops = gemm_floor_ops(models["free"], batch)
    batched.eval(), loop.eval()  # no gate noise / BN batch stats for the equality check
    with torch.no_grad():
        diff = float((batched(*batch)[0] - loop(*batch)[0]).abs().max())
    for m in models.values():
        m.train()

    cases: Dict[str, Callable[[], None]] = {name: (lambda m=m: step(m, batch)) for name, m in models.items()}
    if bound:
        cases["floor"] = lambda: [op() for op in floor_ops]
    out = {"arch": fragment.stem, "experts": experts, "max_abs_diff": diff}
    for name, r in time_alternating(cases, steps, warmup, chunk).items():
        out[f"{name}_samples_per_s"] = B * r["steps_per_s"]
        out[f"{name}_median_ms"] = r["median_ms"]
    out["ratio"] = out["batched_samples_per_s"] / out["loop_samples_per_s"]
    out["ratio_median"] = out["loop_median_ms"] / out["batched_median_ms"]
    if bound:
        # the best any batched bank could do in this dense arch: everything but the banks as
        # measured (banks free), plus the banks' GEMMs alone
        out["ideal_median_ms"] = out["free_median_ms"] + out["floor_median_ms"]
        out["max_ratio"] = out["loop_median_ms"] / out["ideal_median_ms"]
    return out


def bank_gemms(bank: ExpertBank, B: int, count: Optional[int] = None, per_expert: bool = False) -> List:
    """The matmuls one forward + backward of ``bank`` on ``B`` rows performs.

    As closures over preallocated operands and outputs (``out=``), so timing them measures the
    GEMMs alone: no allocation, no elementwise pass, no dispatch of anything else. Forward:
    layer 0 ``[B, in] x [in, E*h]`` (``per_expert``: ``[E, B, in] x [E, in, h]``, expert e on
    its own input) and one ``[E, B, h] x [E, h, k]`` per deeper layer. Backward per layer: the
    weight gradient and the input gradient (the bank's input needs a gradient). ``count``:
    experts evaluated (default all).
    """
    E = bank.num_experts if count is None else count
    sizes = [bank.in_dim] + [w.shape[2] for w in bank.weights]
    ops = []
    if per_expert:
        layers = list(zip(sizes[:-1], sizes[1:]))
    else:  # layer 0: forward, weight grad, input grad on the concatenated weights
        x, w0 = torch.randn(B, sizes[0]), torch.randn(sizes[0], E * sizes[1])
        g0 = torch.randn(B, E * sizes[1])
        o_f, o_w, o_i = torch.empty(B, E * sizes[1]), torch.empty(sizes[0], E * sizes[1]), torch.empty(B, sizes[0])
        ops += [lambda: torch.mm(x, w0, out=o_f), lambda: torch.mm(x.T, g0, out=o_w), lambda: torch.mm(g0, w0.T, out=o_i)]
        layers = list(zip(sizes[1:-1], sizes[2:]))
    for a, b in layers:
        h, w, g = torch.randn(E, B, a), torch.randn(E, a, b), torch.randn(E, B, b)
        f, dw, di = torch.empty(E, B, b), torch.empty(E, a, b), torch.empty(E, B, a)
        ops += [lambda h=h, w=w, f=f: torch.bmm(h, w, out=f),
                lambda h=h, g=g, dw=dw: torch.bmm(h.transpose(1, 2), g, out=dw),
                lambda g=g, w=w, di=di: torch.bmm(g, w.transpose(1, 2), out=di)]
    return ops


class _FreeExperts(torch.autograd.Function):
    """Stands in for a bank's compute at no cost: the output is a slice of a preallocated
    zero buffer and the input's gradient a fresh zero tensor (a memset of ``[B, in]``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, buf: torch.Tensor, B: int, E: int, D: int) -> torch.Tensor:
        ctx.x_shape = x.shape
        return buf[: B * E * D].view(B, E, D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.new_zeros(ctx.x_shape), None, None, None, None


class FreeExpertBank(nn.Module):
    """An ExpertBank whose experts cost nothing (see :class:`_FreeExperts`); it records the
    shape of every call (rows, experts, per-expert input) so the bank's GEMM floor can be
    timed for exactly the calls the model makes."""

    def __init__(self, bank: ExpertBank) -> None:
        super().__init__()
        self.bank = bank
        self.calls: List[tuple] = []
        self.recording = False
        self.buf = torch.zeros(0)

    def forward(self, x: torch.Tensor, start: int = 0, count: Optional[int] = None) -> torch.Tensor:
        E = self.bank.num_experts - start if count is None else count
        B, D = x.shape[0], self.bank.out_dim
        if self.recording:
            self.calls.append((B, E, x.dim() == 3))
        if self.buf.numel() < B * E * D:
            self.buf = torch.zeros(B * E * D)
        return _FreeExperts.apply(x, self.buf, B, E, D)


def to_free(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every ExpertBank replaced by a FreeExpertBank."""
    return replace_banks(model, FreeExpertBank)


def gemm_floor_ops(free: nn.Module, batch) -> List:
    """The GEMM floor of every bank call one step of ``free`` (a :func:`to_free` model) makes."""
    banks = [m for m in free.modules() if isinstance(m, FreeExpertBank)]
    for b in banks:
        b.recording, b.calls = True, []
    with torch.no_grad():
        free(*batch)
    ops = []
    for b in banks:
        b.recording = False
        for rows, E, per_expert in b.calls:
            ops += bank_gemms(b.bank, rows, E, per_expert)
    return ops


def bench_bank(B: int, E: int, hidden: List[int], in_dim: int, out_dim: int, steps: int, warmup: int, chunk: int) -> Dict[str, float]:
    """One ``ExpertBank`` alone (forward + backward) vs ``LoopExpertBank``, and the GEMM floor.

    ``floor`` is the time of the batched bank's matmuls alone (:func:`bank_gemms`). Any
    implementation of the same experts performs these FLOPs, so ``loop / floor`` bounds the
    ratio a batched bank could reach at these shapes if everything but its GEMMs cost nothing.
    """
    torch.manual_seed(0)
    bank = ExpertBank(E, in_dim, hidden, out_dim)
    loop = LoopExpertBank(bank)
    x = torch.randn(B, in_dim, requires_grad=True)
    gy = torch.randn(B, E, out_dim)
    flops = 0
    sizes = [in_dim] + list(hidden) + [out_dim]
    for a, b in zip(sizes[:-1], sizes[1:]):
        flops += 3 * 2 * B * E * a * b  # forward, weight grad, input grad
    with torch.no_grad():
        diff = float((bank(x) - loop(x)).abs().max())

    def fwd_bwd(m: nn.Module) -> None:
        (m(x) * gy).sum().backward()
        m.zero_grad(set_to_none=True)
        x.grad = None

    gemms = bank_gemms(bank, B)
    cases = {"batched": lambda: fwd_bwd(bank), "loop": lambda: fwd_bwd(loop), "floor": lambda: [op() for op in gemms]}
    out: Dict[str, float] = {"batch": B, "experts": E, "hidden": list(hidden), "max_abs_diff": diff}
    for k, r in time_alternating(cases, steps, warmup, chunk).items():
        out[f"{k}_ms"] = r["median_ms"]
        out[f"{k}_page_faults"] = r["page_faults"]
    out["floor_gflops"] = flops / (out["floor_ms"] / 1000) / 1e9
    out["ratio"] = out["loop_ms"] / out["batched_ms"]
    out["max_ratio"] = out["loop_ms"] / out["floor_ms"]
    return out


def bench_mixture(fragment: Optional[Path], B: int, steps: int, warmup: int, chunk: int) -> Dict[str, float]:
    """The dense arch of ``fragment`` as shipped (``None``: the default config) — on the CPU
    with the C kernels every mixture is ``ExpertMixture`` — against the same model with the
    ATen forms (the C mixture off: ``mix_experts``' broadcast path for small mixtures, a
    batched matmul otherwise) and with every mixture a batched matmul (the C mixture off and
    ``SMALL_MIXTURE = 0``): same weights, same inputs, alternating."""
    import contextlib

    from dlrm_mtl.modules import mixture

    schema = synthetic_schema()
    torch.manual_seed(0)
    cfg = Config.load([str(fragment)]) if fragment else Config()
    model = DenseArch(schema, cfg.model)
    batch = inputs(schema, B)

    @contextlib.contextmanager
    def forms(c_mixture: bool, threshold: int):
        applies, runs_on, before = mixture.native.mixture_applies, mixture.native.mixture_runs_on, mixture.SMALL_MIXTURE
        if not c_mixture:
            mixture.native.mixture_applies = lambda gates, parts: False
            mixture.native.mixture_runs_on = lambda x: False
        mixture.SMALL_MIXTURE = threshold
        try:
            yield
        finally:
            mixture.native.mixture_applies, mixture.native.mixture_runs_on, mixture.SMALL_MIXTURE = applies, runs_on, before

    def run(c_mixture: bool, threshold: int) -> Callable[[], None]:
        def go() -> None:
            with forms(c_mixture, threshold):
                step(model, batch)
        return go

    threshold = mixture.SMALL_MIXTURE
    cases = {"mixture": lambda: step(model, batch), "aten": run(False, threshold), "bmm": run(False, 0)}
    model.eval()
    with torch.no_grad():
        a = model(*batch)[0]
        diffs = []
        for c, t in ((False, threshold), (False, 0)):
            with forms(c, t):
                diffs.append(float((a - model(*batch)[0]).abs().max()))
    model.train()
    out = {"arch": fragment.stem if fragment else "default", "max_abs_diff": max(diffs)}
    for k, r in time_alternating(cases, steps, warmup, chunk).items():
        out[f"{k}_median_ms"] = r["median_ms"]
    out["ratio"] = out["bmm_median_ms"] / out["mixture_median_ms"]
    out["aten_ratio"] = out["aten_median_ms"] / out["mixture_median_ms"]
    return out


def main_mixture(a: argparse.Namespace) -> int:
    names = a.arch or ["default"] + sorted(f.stem for f in ARCH_DIR.glob("*.yaml"))
    print(f"dense arch as configured, batch {a.batch}, {torch.get_num_threads()} threads: median ms per step "
          "(as shipped: the C mixture where the kernels are built; ATen forms; bmm only)")
    print(f"{'arch':<16}{'shipped':>10}{'ATen':>9}{'bmm only':>10}{'vs ATen':>9}{'vs bmm':>8}{'max|diff|':>11}")
    rows = []
    for name in names:
        r = bench_mixture(None if name == "default" else ARCH_DIR / f"{name}.yaml", a.batch, a.steps, a.warmup, a.chunk)
        rows.append(r)
        print(f"{name:<16}{r['mixture_median_ms']:>10.2f}{r['aten_median_ms']:>9.2f}{r['bmm_median_ms']:>10.2f}"
              f"{r['aten_ratio']:>8.2f}x{r['ratio']:>7.2f}x{r['max_abs_diff']:>11.1e}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


def main_bank(a: argparse.Namespace) -> int:
    rows = []
    print("ExpertBank alone, forward + backward, median ms per step (in_dim %d, out_dim %d)" % (a.bank_in, a.bank_out))
    print(f"{'batch':>6}{'E':>4}{'hidden':>8}{'batched':>9}{'loop':>9}{'ratio':>8}{'floor':>9}{'GFLOP/s':>9}{'loop/floor':>11}"
          f"{'faults b/l':>13}{'max|diff|':>11}")
    for B in a.batch_sizes:
        for E in a.experts:
            for hid in a.bank_hidden:
                hidden = [hid] if hid > 0 else []
                r = bench_bank(B, E, hidden, a.bank_in, a.bank_out, a.steps, a.warmup, a.chunk)
                rows.append(r)
                print(f"{B:>6}{E:>4}{hid:>8}{r['batched_ms']:>9.2f}{r['loop_ms']:>9.2f}{r['ratio']:>7.2f}x"
                      f"{r['floor_ms']:>9.2f}{r['floor_gflops']:>9.0f}{r['max_ratio']:>10.2f}x"
                      f"{r['batched_page_faults']:>7.0f}/{r['loop_page_faults']:<5.0f}{r['max_abs_diff']:>11.1e}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


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
    p.add_argument("--bank", action="store_true",
                   help="time one ExpertBank alone (no gates, towers, ...) against the loop and its GEMM floor")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[256, 1024, 4096], help="--bank: batch sizes")
    p.add_argument("--bank-hidden", nargs="+", type=int, default=[0, 64], help="--bank: expert hidden sizes (0 = one layer)")
    p.add_argument("--bank-in", type=int, default=149, help="--bank: input width (149 = the synthetic task-layer input)")
    p.add_argument("--bank-out", type=int, default=64)
    p.add_argument("--bound", action="store_true",
                   help="also time the dense arch with free banks plus every bank call's GEMM floor: "
                        "loop / (free + floor) bounds the ratio any batched bank could reach")
    p.add_argument("--mixture", action="store_true",
                   help="each fragment as shipped (the C mixture where the kernels are built) vs the ATen forms vs a batched matmul for every mixture")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.bank:
        return main_bank(a)
    if a.mixture:
        return main_mixture(a)
    names = a.arch or sorted(f.stem for f in ARCH_DIR.glob("*.yaml"))
    rows = []
    extra = f"{'free ms':>9}{'floor ms':>9}{'loop/ideal':>11}" if a.bound else ""
    print(f"{'arch':<16}{'E':>4}{'batched/s':>12}{'loop/s':>12}{'ratio':>8}{'ratio(med)':>11}{extra}{'max|diff|':>11}")
    for name in names:
        for E in a.experts:
            r = bench_one(ARCH_DIR / f"{name}.yaml", E, a.hidden, a.batch, a.steps, a.warmup, a.chunk, a.bound)
            rows.append(r)
            extra = (f"{r['free_median_ms']:>9.2f}{r['floor_median_ms']:>9.2f}{r['max_ratio']:>10.2f}x" if a.bound else "")
            print(f"{name:<16}{E:>4}{r['batched_samples_per_s']:>12,.0f}{r['loop_samples_per_s']:>12,.0f}"
                  f"{r['ratio']:>7.2f}x{r['ratio_median']:>10.2f}x{extra}{r['max_abs_diff']:>11.1e}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
