"""PE-LTR weighting (Lin et al., RecSys 2019; dlrm_mtl/loss_balancing.py): the solvers of
min ‖Σ ω_k ∇L_k‖² s.t. Σ ω = 1, ω_k ≥ c_k against brute force over the bounded simplex and the
K = 2 closed form, the paper's PECsolver (relax, then project), the KKT conditions at the
solution, the per-task gradients against a loop of backward passes, the loss's logged
weights, and the config checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dlrm_mtl.config import Config, ConfigError, LossConfig, ModelConfig, check_values
from dlrm_mtl.loss_balancing import (
    ParetoWeighting,
    pareto_exact,
    pareto_two_tasks,
    pareto_weights,
    pec_solver,
    project_to_simplex,
)

# ---------------------------------------------------------------------------- references


def objective(w: torch.Tensor, A: torch.Tensor) -> float:
    return float(w.double() @ A.double() @ w.double())


def simplex_grid(K: int, c: torch.Tensor, steps: int) -> torch.Tensor:
    """Every ω on a grid of step 1/steps with Σ ω = 1 and ω ≥ c: ``[N, K]`` (brute force)."""
    axes = [torch.arange(steps + 1, dtype=torch.float64) / steps] * (K - 1)
    pts = torch.cartesian_prod(*axes).reshape(-1, K - 1)
    w = torch.cat([pts, 1 - pts.sum(1, keepdim=True)], 1)  # [N, K]
    return w[(w >= c.double() - 1e-12).all(1)]


def brute_force(A: torch.Tensor, c: torch.Tensor, steps: int) -> torch.Tensor:
    w = simplex_grid(A.shape[0], c, steps)
    obj = torch.einsum("nk,kl,nl->n", w, A.double(), w)
    return w[obj.argmin()]


def gram(G: torch.Tensor) -> torch.Tensor:
    return G.double() @ G.double().t()


def random_gradients(K: int, P: int, seed: int) -> torch.Tensor:
    return torch.randn(K, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------- K = 2


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bounds", [(0.0, 0.0), (0.3, 0.2), (0.45, 0.45), (0.7, 0.0)])
def test_two_tasks_closed_form_equals_brute_force_and_both_solvers(seed, bounds):
    """ω1 = clip((g2 − g1)·g2 / ‖g1 − g2‖², c1, 1 − c2): the minimum of the parabola over the
    segment (a 10⁵-point search), and the general solvers agree with it."""
    G = random_gradients(2, 5, seed)
    A, c = gram(G), torch.tensor(bounds, dtype=torch.float64)
    w = pareto_two_tasks(A, c)
    g1, g2 = G[0], G[1]
    hand = float(torch.clamp((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), c[0], 1 - c[1]))
    assert float(w[0]) == pytest.approx(hand, abs=1e-12)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12) and (w >= c - 1e-12).all()
    grid = brute_force(A, c, 100_000)
    assert objective(w, A) <= objective(grid, A) + 1e-12
    assert float(w[0]) == pytest.approx(float(grid[0]), abs=1e-4)
    torch.testing.assert_close(pareto_exact(A, c), w, atol=1e-9, rtol=0)
    torch.testing.assert_close(pec_solver(A, c), w, atol=1e-9, rtol=0)  # K = 2: projection is exact
    torch.testing.assert_close(pareto_weights(A, c), w)


def test_two_tasks_conflicting_gradients_take_the_min_norm_point():
    """g1 = (1, 0), g2 = (−1, 1): ‖ω1 g1 + (1 − ω1) g2‖² = (2ω1 − 1)² + (1 − ω1)² is least at
    ω1 = 3/5; a bound c1 = 0.8 moves it to the bound."""
    G = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    w = pareto_two_tasks(gram(G), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([0.6, 0.4], dtype=torch.float64))
    w = pareto_two_tasks(gram(G), torch.tensor([0.8, 0.0], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([0.8, 0.2], dtype=torch.float64))


# ---------------------------------------------------------------------------- K >= 3

CASES_3 = [(0.0, 0.0, 0.0), (0.1, 0.2, 0.3), (0.5, 0.0, 0.1), (0.2, 0.2, 0.2), (0.0, 0.6, 0.3)]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bounds", CASES_3)
def test_exact_solver_equals_brute_force_three_tasks(seed, bounds):
    G = random_gradients(3, 6, seed) + torch.tensor([1.0, -0.5, 0.2, 0.0, 0.3, -0.1], dtype=torch.float64) * (seed % 2)
    A, c = gram(G), torch.tensor(bounds, dtype=torch.float64)
    w = pareto_exact(A, c)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12) and (w >= c - 1e-12).all()
    grid = brute_force(A, c, 600)
    assert objective(w, A) <= objective(grid, A) + 1e-12  # nothing on the grid is better
    assert objective(grid, A) - objective(w, A) <= 1e-4 * float(A.diagonal().sum())
    torch.testing.assert_close(w, grid, atol=0.01, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_exact_solver_equals_brute_force_four_tasks(seed):
    G = random_gradients(4, 8, 10 + seed)
    c = torch.tensor([0.05, 0.3, 0.0, 0.1], dtype=torch.float64)
    A = gram(G)
    w = pareto_exact(A, c)
    grid = brute_force(A, c, 80)
    assert objective(w, A) <= objective(grid, A) + 1e-12
    torch.testing.assert_close(w, grid, atol=0.03, rtol=0)
    # and no random feasible point does better
    torch.manual_seed(seed)
    pts = torch.distributions.Dirichlet(torch.ones(4, dtype=torch.float64)).sample((5000,))
    pts = c + pts * (1 - c.sum())
    obj = torch.einsum("nk,kl,nl->n", pts, A, pts)
    assert float(obj.min()) >= objective(w, A) - 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_exact_solution_satisfies_the_kkt_conditions(seed):
    """At ω: (Aω)_k + μ = 0 where ω_k > c_k, (Aω)_k + μ ≥ 0 where ω_k = c_k (the KKT conditions
    of the bounded problem, PE-LTR §4), with one μ."""
    G = random_gradients(4, 6, 40 + seed)
    c = torch.tensor([0.2, 0.0, 0.25, 0.05], dtype=torch.float64)
    A = gram(G) / gram(G).diagonal().sum()
    w = pareto_exact(A, c)
    g = A @ w
    free = w > c + 1e-9
    assert free.any()
    mu = -g[free].mean()
    torch.testing.assert_close(g[free] + mu, torch.zeros_like(g[free]), atol=1e-9, rtol=0)
    assert (g[~free] + mu >= -1e-9).all()


def test_pec_solver_equals_exact_when_the_relaxed_solution_is_feasible():
    """Nearly orthogonal gradients of similar size: the relaxed solution is interior, no
    projection happens, Algorithm 2's answer is the exact one."""
    G = torch.eye(3, 5, dtype=torch.float64) * torch.tensor([[1.0], [1.2], [0.9]], dtype=torch.float64)
    c = torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64)
    A = gram(G)
    torch.testing.assert_close(pec_solver(A, c), pareto_exact(A, c), atol=1e-9, rtol=0)
    w = pec_solver(A, c)
    assert (w > c + 0.05).all()  # interior indeed


def test_pec_projection_can_miss_the_constrained_minimum_for_three_tasks():
    """Why ``loss.pareto_solver`` defaults to exact: for K = 3 with a bound active, projecting
    the relaxed solution onto the bounded simplex is feasible but not the minimiser."""
    G = torch.tensor([[0.66, 0.27, 0.06, 0.62, -0.45], [-0.17, -1.52, 0.38, -1.03, -0.56],
                      [-0.89, -0.06, -0.2, -0.97, 0.42]], dtype=torch.float64)
    A, c = gram(G), torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    pec, exact = pec_solver(A, c), pareto_exact(A, c)
    assert float(pec.sum()) == pytest.approx(1.0) and (pec >= c - 1e-12).all()
    assert objective(pec, A) > objective(exact, A) * 1.03
    assert objective(exact, A) <= objective(brute_force(A, c, 600), A) + 1e-12
    torch.testing.assert_close(pareto_weights(A, c, "pec"), pec)
    torch.testing.assert_close(pareto_weights(A, c, "exact"), exact)


@pytest.mark.parametrize("seed", range(4))
def test_simplex_projection_against_bisection(seed):
    v = torch.randn(5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.7
    total = torch.tensor(0.6, dtype=torch.float64)
    x = project_to_simplex(v, total)
    lo, hi = float(v.min()) - 1, float(v.max())  # θ with Σ max(v − θ, 0) = total, by bisection
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float((v - mid).clamp(min=0).sum()) > float(total) else (lo, mid)
    torch.testing.assert_close(x, (v - lo).clamp(min=0), atol=1e-9, rtol=0)
    assert float(project_to_simplex(v, torch.tensor(0.0, dtype=torch.float64)).abs().sum()) == 0.0


# ---------------------------------------------------------------------------- on a model


class TinyShared(nn.Module):
    """shared Linear (3 -> 4) + ReLU, then one linear head per task."""

    def __init__(self, K: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(3, 4)
        self.heads = nn.Linear(4, K)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self.heads(torch.relu(self.shared(x)))  # [B, K]
        return nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none").mean(0)  # [K]


def loop_gradients(model: TinyShared, losses: torch.Tensor) -> torch.Tensor:
    """∇_W L_k by K separate backward passes into .grad (an independent path to G)."""
    rows = []
    for k in range(losses.shape[0]):
        model.zero_grad()
        losses[k].backward(retain_graph=True)
        rows.append(torch.cat([model.shared.weight.grad.reshape(-1), model.shared.bias.grad.reshape(-1)]))
    model.zero_grad()
    return torch.stack(rows)


@pytest.mark.parametrize("K, bounds", [(2, [0.2, 0.3]), (3, [0.1, 0.1, 0.4])])
def test_weights_on_a_model_equal_the_solver_on_loop_gradients(K, bounds):
    model = TinyShared(K)
    bal = ParetoWeighting(bounds, shared_layer="shared")
    bal.bind(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, generator=g), (torch.rand(16, K, generator=g) < 0.4).float()
    losses = model.losses(x, y)
    w = bal(losses)
    A = gram(loop_gradients(model, losses))
    torch.testing.assert_close(w.double(), pareto_weights(A, torch.tensor(bounds, dtype=torch.float64)), atol=1e-5, rtol=0)
    assert (w >= torch.tensor(bounds) - 1e-6).all() and float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(bal.last_terms["pareto/grad_norm"]) == pytest.approx(objective(w, A) ** 0.5, rel=1e-4)


def _synthetic_loss(weighting: str, **kw):
    from dlrm_mtl.losses import EntireSpaceLoss
    from dlrm_mtl.models.dense_step import DenseStep
    from dlrm_mtl.models.ranking_model import DenseArch
    from dlrm_mtl.synthetic import synthetic_schema

    schema = synthetic_schema()
    torch.manual_seed(0)
    model = ModelConfig(dense_arch=[8], scenario_emb_dim=4, tower=[8])
    model.scenario_layers[0].out_dim = 16
    model.task_layers[0].out_dim = 8
    arch = DenseArch(schema, model)
    loss = EntireSpaceLoss(schema, LossConfig(weighting=weighting, **kw))
    return schema, arch, loss, DenseStep(arch, loss, cuda_graph="eager")


def _batch(schema, seed: int, B: int = 64):
    g = torch.Generator().manual_seed(seed)
    width = sum(f.dim for f in schema.sparse)
    labels = (torch.rand(B, 2, generator=g) < 0.3).float()
    labels[:, 1] *= labels[:, 0]
    scenario = torch.stack([torch.randint(0, lv.num_values, (B,), generator=g) for lv in schema.scenarios], 1)
    return (torch.randn(B, width, generator=g), torch.randn(B, len(schema.dense), generator=g), scenario, labels,
            torch.ones(B, 2, dtype=torch.bool), torch.ones(B), None)


def test_entire_space_loss_uses_and_logs_the_pareto_weights():
    """The step's total is Σ ω_k L_k with ω from the per-term gradients of the last scenario
    layer; loss_weight/<term> shows ω; ω ≥ c; evaluation neither recomputes nor moves ω."""
    schema, arch, loss, step = _synthetic_loss("pareto", pareto_bounds={"ctr": 0.3, "cvr": 0.25})
    assert loss.balancer is not None and loss.balancer.path == f"scenario_layers.{len(arch.scenario_layers) - 1}"
    assert loss.needs_eager and "balancer.weight" not in loss.state_dict()  # nothing to resume: ω is per step
    layer = arch.get_submodule(loss.balancer.path)
    for seed in range(3):
        args = _batch(schema, seed)
        total, _, terms, _ = step(*args)
        logits, _, _ = arch(*args[:3])
        L = loss.per_task(logits, args[3], args[4], args[5], args[2])
        rows = []
        for k in range(2):
            grads = torch.autograd.grad(L[k], list(layer.parameters()), retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        ref = pareto_two_tasks(gram(torch.stack(rows)), torch.tensor([0.3, 0.25], dtype=torch.float64)).float()
        w = torch.stack([terms[f"loss_weight/{n}"] for n in loss.term_names])
        torch.testing.assert_close(w, ref, atol=1e-5, rtol=0)
        assert (w >= torch.tensor([0.3, 0.25]) - 1e-6).all()
        torch.testing.assert_close(total, (w * L).sum(), atol=1e-5, rtol=1e-5)
        total.backward()
    before = loss.balancer.weight.clone()
    loss.eval()
    with torch.no_grad():
        _, _, terms, _ = step(*_batch(schema, 9))
    assert torch.equal(loss.balancer.weight, before)
    torch.testing.assert_close(torch.stack([terms[f"loss_weight/{n}"] for n in loss.term_names]), before)


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, key, words", [
    (["loss.weighting=pareto", "loss.pareto_bounds={ctr: 0.7, cvr: 0.4}"], "loss.pareto_bounds", "sum to <= 1"),
    (["loss.weighting=pareto", "loss.pareto_bounds={ctr: -0.1}"], "loss.pareto_bounds.ctr", ">= 0"),
    (["loss.weighting=pareto", "loss.pareto_solver=newton"], "loss.pareto_solver", "'newton'"),
    (["loss.weighting=pareto", "train.cuda_graph=graph"], "train.cuda_graph", "pareto"),
])
def test_config_values_are_checked(overrides, key, words):
    from dlrm_mtl.synthetic import synthetic_schema

    cfg = Config.load(None, overrides)
    with pytest.raises(ConfigError) as e:
        check_values(cfg, synthetic_schema())
    assert e.value.key == key and words in str(e.value) and "\n" not in str(e.value)


def test_bounds_of_unknown_or_termless_tasks_are_refused(synthetic_small):
    from dlrm_mtl.config import check
    from dlrm_mtl.schema import Schema

    schema = Schema.load(synthetic_small / "schema.yaml")
    cfg = Config.load(None, [f"data.train={synthetic_small / 'train'}", "loss.weighting=pareto", "loss.pareto_bounds={ctcvr: 0.2}"])
    with pytest.raises(ConfigError) as e:
        check(cfg, schema)
    assert e.value.key == "loss.pareto_bounds" and "unknown task(s) ['ctcvr']" in str(e.value)
    cfg = Config.load(None, [f"data.train={synthetic_small / 'train'}", "loss.weighting=pareto", "loss.pareto_bounds={ctr: 0.2}"])
    check(cfg, schema)  # a known task: accepted
    from dlrm_mtl.loss_balancing import make_balancer

    with pytest.raises(ValueError, match=r"loss.pareto_bounds: task\(s\) \['buy_d'\] have no loss term"):
        make_balancer(LossConfig(weighting="pareto", pareto_bounds={"buy_d": 0.1}), ["ctr", "cvr"], ["ctr", "cvr", "buy_d"])


def test_pareto_config_example_composes_with_the_demo(synthetic_small):
    from pathlib import Path

    from dlrm_mtl.config import check
    from dlrm_mtl.schema import Schema

    root = Path(__file__).resolve().parents[1]
    cfg = Config.load([str(root / "configs/demo.yaml"), str(root / "configs/pareto.yaml")], [f"data.train={synthetic_small / 'train'}"])
    assert cfg.loss.weighting == "pareto" and sum(cfg.loss.pareto_bounds.values()) <= 1
    check(cfg, Schema.load(synthetic_small / "schema.yaml"))

