"""Task weightings from per-task gradients of the last shared layer: GradNorm (Chen et al.,
ICML 2018) and PE-LTR's Pareto-efficient weights (Lin et al., RecSys 2019).

Both read, at every training step, the gradient of each task's loss term L_k with respect to
W, the weights of *the last shared layer* (:func:`shared_layer_path`): ``G [K, P]``, averaged
over the ranks like DDP averages the gradients (one all-reduce of ``[K·P + K]`` values per
step), so every rank computes the same weights. Used by
:class:`dlrm_mtl.losses.EntireSpaceLoss` under ``loss.weighting: gradnorm | pareto``
(docs/tasks.md).

* :class:`GradNormWeighting`: learnable w (Σ w = K), moved by one gradient step on
  GradNorm's L_grad (eq. 1–2) per training step;
* :class:`ParetoWeighting`: ω (Σ ω = 1, ω_k ≥ c_k) solved at every step from the KKT
  conditions (PE-LTR §4, the problem min ‖Σ ω_k ∇L_k‖²; :func:`pareto_weights`).

Example::

    bal = GradNormWeighting(num_terms=2, alpha=1.5, lr=0.025)
    bal.bind(model.dense_arch)                 # W = the last scenario layer's parameters
    w = bal(per_task)                          # [K] this step's weights; w(t+1) kept inside
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from dlrm_mtl.config import ConfigError, LossConfig

PARETO_SOLVERS = ("exact", "pec")


# ---------------------------------------------------------------------------- the shared layer


def shared_layer_path(arch: nn.Module, name: str = "") -> str:
    """The module path (inside the dense arch) of the layer whose weights W the gradients are
    taken on: ``name`` when given (``loss.shared_layer``, e.g. ``scenario_layers.1``,
    ``task_layers.0.levels.0.shared``, ``dense_mlp``), else *the last module whose output every
    task reads*: the last scenario layer; without scenario layers, a leading Shared-Bottom task
    layer; else the dense MLP. The embedding tables are never W: they are sharded and their
    fused optimizer never materialises their gradients. Raises ConfigError (key
    ``loss.shared_layer``) when the module does not exist or has no trainable parameters.

    Example::

        shared_layer_path(DenseArch(schema, ModelConfig()))        # 'scenario_layers.1'
    """
    from dlrm_mtl.modules import SharedBottomLayer

    if not name:
        candidates = ["dense_mlp"]
        scenario = getattr(arch, "scenario_layers", [])
        candidates += [f"scenario_layers.{i}" for i in range(len(scenario))]
        if not len(scenario):
            for j, layer in enumerate(getattr(arch, "task_layers", [])):
                if not isinstance(layer, SharedBottomLayer):
                    break
                candidates.append(f"task_layers.{j}")
        with_weights = [c for c in candidates if _trainable(arch, c)]
        if not with_weights:
            raise ConfigError("loss.shared_layer: this dense arch has no shared layer with weights before the task split "
                              "(no scenario layer, no dense MLP); name one, e.g. task_layers.0", "loss.shared_layer")
        return with_weights[-1]
    try:
        arch.get_submodule(name)
    except AttributeError:
        children = [n for n, _ in arch.named_children()]
        raise ConfigError(f"loss.shared_layer: {name!r} is not a module of the dense arch (its parts: {children})",
                          "loss.shared_layer") from None
    if not _trainable(arch, name):
        raise ConfigError(f"loss.shared_layer: {name!r} has no trainable parameters", "loss.shared_layer")
    return name


def _trainable(arch: nn.Module, path: str) -> bool:
    return any(p.requires_grad for p in arch.get_submodule(path).parameters())


def shared_parameters(arch: nn.Module, path: str) -> List[nn.Parameter]:
    """W: the trainable parameters of ``arch``'s module ``path``, looked up now (DMP
    materialises meta parameters as new tensors, so a list kept from construction would be
    stale)."""
    return [p for p in arch.get_submodule(path).parameters() if p.requires_grad]


def task_gradients(per_task: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``per_task [K]`` (with their autograd graph) -> ``[K, P]``: row k = ∇_W L_k flattened
    (P = the parameters' total size; a parameter L_k does not reach gets zeros). The graph is
    retained for the step's own backward; nothing is written to ``.grad`` (so DDP's gradient
    hooks do not fire).

    Example::

        G = task_gradients(losses, list(layer.parameters()))   # [K, P]
    """
    rows = []
    for k in range(per_task.shape[0]):
        grads = torch.autograd.grad(per_task[k], list(params), retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows)  # [K, P]


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over the ranks of the default process group, in place (the tensor's own
    device: the model's, so NCCL takes it as it is); ``x`` itself in a world of one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


# ---------------------------------------------------------------------------- GradNorm


def gradnorm_update(weights: torch.Tensor, grad_norms: torch.Tensor, losses: torch.Tensor, initial: torch.Tensor,
                    alpha: float, lr: float, min_weight: float = 1e-3) -> Tuple[torch.Tensor, torch.Tensor]:
    """One GradNorm step (Chen et al., ICML 2018, §3.2 and Algorithm 1) on the task weights.

    ``weights [K]`` w(t), ``grad_norms [K]`` ‖∇_W L_k‖₂, ``losses [K]`` L_k(t), ``initial [K]``
    L_k(0) -> ``(w(t+1) [K], L_grad [])``::

        G_k = ‖∇_W w_k L_k‖₂ = w_k ‖∇_W L_k‖₂        Ḡ = mean_k G_k
        L̃_k = L_k(t) / L_k(0)                         r_k = L̃_k / mean_j L̃_j
        L_grad = Σ_k | G_k − Ḡ · r_k^α |                                         (eq. 1–2)
        w ← w − lr · ∂L_grad/∂w,  ∂L_grad/∂w_k = sign(G_k − Ḡ r_k^α) · ‖∇_W L_k‖₂

    with the target Ḡ · r_k^α a constant (no gradient), as in the paper; then w is renormalised
    to Σ w = K (Algorithm 1). Because G_k is linear in w_k the gradient is exact without
    differentiating through ∇_W (no second-order graph). Deviations: plain gradient descent
    with its own learning rate ``lr`` (the paper leaves the optimiser of w open); w is floored
    at ``min_weight`` before renormalising, so a large step cannot make a weight 0 or negative.

    Example::

        w, l_grad = gradnorm_update(torch.ones(2), torch.tensor([0.2, 0.05]), losses, losses0, 1.5, 0.025)
    """
    K = weights.shape[0]
    G = weights * grad_norms  # [K]
    ratio = losses / initial.clamp(min=1e-12)  # [K] L̃
    r = ratio / ratio.mean().clamp(min=1e-12)  # [K] relative inverse training rate
    target = (G.mean() * r.pow(alpha)).detach()  # [K] a constant
    l_grad = (G - target).abs().sum()
    grad = torch.sign(G - target) * grad_norms  # [K] ∂L_grad/∂w
    w = (weights - lr * grad).clamp(min=min_weight)
    return w * (K / w.sum()), l_grad


# ---------------------------------------------------------------------------- PE-LTR


def project_to_simplex(v: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of ``v [K]`` onto {x ≥ 0, Σ x = total} (sort-based, Held et al.
    1974 / Duchi et al. 2008), on the device without host synchronisation; ``total`` ≥ 0."""
    K = v.shape[0]
    u = torch.sort(v, descending=True).values  # [K]
    css = torch.cumsum(u, 0) - total  # [K]
    idx = torch.arange(1, K + 1, device=v.device, dtype=v.dtype)
    rho = (u - css / idx > 0).sum().clamp(min=1)  # the active prefix is contiguous
    theta = css.gather(0, (rho - 1).reshape(1)) / rho.to(v.dtype)
    return (v - theta).clamp(min=0)


def _scaled(gram: torch.Tensor) -> torch.Tensor:
    """``gram`` in float64 divided by its trace: the minimiser of ωᵀAω does not change, the
    solver sees values of order 1 whatever the gradients' scale."""
    A = gram.double()
    return A / A.diagonal().sum().clamp(min=1e-300)


def pareto_two_tasks(gram: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """The closed form for K = 2: ``gram [2, 2]`` = [g_i·g_j], ``bounds [2]`` -> ``ω [2]``::

        min_{ω1 ∈ [c1, 1 − c2]} ‖ω1 g1 + (1 − ω1) g2‖²
        ω1 = clip((g2 − g1)·g2 / ‖g1 − g2‖², c1, 1 − c2),   ω2 = 1 − ω1

    (a convex parabola in ω1; the midpoint of the interval when g1 = g2, where every ω is a
    minimiser)."""
    A, c = _scaled(gram), bounds.double()
    den = A[0, 0] - 2 * A[0, 1] + A[1, 1]
    lo, hi = c[0], 1 - c[1]
    free = (A[1, 1] - A[0, 1]) / torch.where(den > 1e-12, den, torch.ones_like(den))
    w1 = torch.where(den > 1e-12, torch.minimum(torch.maximum(free, lo), hi), (lo + hi) / 2)
    return torch.stack([w1, 1 - w1]).to(gram.dtype)


_SUBSETS: Dict[Tuple[int, str], torch.Tensor] = {}


def _subsets(K: int, device: torch.device) -> torch.Tensor:
    """``[2^K − 1, K]`` bool: every non-empty set of free weights (the others at their bound);
    built once per K and device (no host-to-device copy per step)."""
    key = (K, str(device))
    if key not in _SUBSETS:
        rows = [[bool(b) for b in bits] for bits in itertools.product((0, 1), repeat=K) if any(bits)]
        _SUBSETS[key] = torch.tensor(rows, dtype=torch.bool, device=device)
    return _SUBSETS[key]


def pareto_exact(gram: torch.Tensor, bounds: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    """The exact minimiser of the PE-LTR problem (Lin et al. 2019, §4: the KKT condition
    Σ ω_k ∇L_k = 0 with Σ ω = 1, ω ≥ c, posed as the least-squares problem PECsolver solves)::

        min_ω ‖Σ_k ω_k ∇_θ L_k‖² = ωᵀ A ω   s.t.  Σ_k ω_k = 1,  ω_k ≥ c_k        (A = G Gᵀ)

    by enumerating the active set: for every set F of free weights (the others at their bound
    c_k) the equality-constrained problem's KKT system [A_F· ω + μ = 0, ω_k = c_k off F,
    Σ ω = 1] is solved (pseudo-inverse, batched over all 2^K − 1 sets on the device); the best
    feasible candidate is the minimiser (a convex problem's optimum is the equality-constrained
    optimum of its own active set). Cost 2^K small solves: meant for small K (a handful of tasks).

    ``gram [K, K]``, ``bounds [K]`` (Σ c ≤ 1) -> ``ω [K]``, Σ ω = 1, ω ≥ c.
    """
    K = gram.shape[0]
    A, c = _scaled(gram), bounds.double()
    free = _subsets(K, gram.device)  # [S, K]
    S = free.shape[0]
    eye = torch.eye(K, dtype=A.dtype, device=A.device)
    stat = torch.cat([A, torch.ones(K, 1, dtype=A.dtype, device=A.device)], 1)  # [K, K+1] A ω + μ
    fix = torch.cat([eye, torch.zeros(K, 1, dtype=A.dtype, device=A.device)], 1)  # [K, K+1] ω_k
    top = torch.where(free.unsqueeze(-1), stat.unsqueeze(0), fix.unsqueeze(0))  # [S, K, K+1]
    total = torch.cat([torch.ones(K, dtype=A.dtype, device=A.device), A.new_zeros(1)]).expand(S, 1, K + 1)
    system = torch.cat([top, total], 1)  # [S, K+1, K+1]
    rhs = torch.cat([torch.where(free, torch.zeros_like(c), c.expand(S, K)), A.new_ones(S, 1)], 1)  # [S, K+1]
    w = (torch.linalg.pinv(system) @ rhs.unsqueeze(-1)).squeeze(-1)[:, :K]  # [S, K]
    feasible = (w >= c - tol).all(1) & ((w.sum(1) - 1).abs() <= tol)  # [S]
    objective = torch.einsum("sk,kl,sl->s", w, A, w)  # [S]
    best = torch.where(feasible, objective, torch.full_like(objective, float("inf"))).argmin()
    return _feasible(w[best], c).to(gram.dtype)


def _feasible(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``w`` with rounding removed: ω ≥ c exactly and Σ ω = 1."""
    extra = (w - c).clamp(min=0)  # [K]
    room = 1 - c.sum()
    return c + extra * room / extra.sum().clamp(min=1e-300)


def pec_solver(gram: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """PE-LTR's PECsolver (Lin et al. 2019, Algorithm 2): with ω = ω̂ + c,

    1. the relaxed problem (ω̂ ≥ 0 dropped): its KKT system M [ω̂; μ] = z̃ with
       M = [[GGᵀ, e], [eᵀ, 0]], z̃ = [−GGᵀc, 1 − Σ c], solved as (MᵀM)⁺Mᵀz̃ = M⁺z̃;
    2. the projection step: ω̃ = argmin ‖ω̃ − ω̂‖² s.t. ω̃ ≥ 0, Σ ω̃ = 1 − Σ c (the paper solves
       it as a non-negative least-squares problem; here the closed-form simplex projection),
       ω = ω̃ + c.

    Equal to :func:`pareto_exact` for K = 2 and whenever the relaxed solution is feasible; for
    K ≥ 3 with a bound active the projected point can miss the constrained minimum
    (tests/test_pareto.py shows a case), which is why ``loss.pareto_solver`` defaults to
    ``exact``. ``gram [K, K]``, ``bounds [K]`` -> ``ω [K]``.
    """
    K = gram.shape[0]
    A, c = _scaled(gram), bounds.double()
    e = torch.ones(K, 1, dtype=A.dtype, device=A.device)
    M = torch.cat([torch.cat([A, e], 1), torch.cat([e.t(), A.new_zeros(1, 1)], 1)], 0)  # [K+1, K+1]
    z = torch.cat([-(A @ c), (1 - c.sum()).reshape(1)])  # [K+1]
    relaxed = (torch.linalg.pinv(M) @ z)[:K]  # [K] ω̂
    return (project_to_simplex(relaxed, (1 - c.sum()).clamp(min=0)) + c).to(gram.dtype)


def pareto_weights(gram: torch.Tensor, bounds: torch.Tensor, solver: str = "exact") -> torch.Tensor:
    """ω for ``gram [K, K]`` (= G Gᵀ) and lower bounds ``[K]``: the K = 2 closed form
    (:func:`pareto_two_tasks`), else :func:`pareto_exact` (``exact``) or the paper's
    :func:`pec_solver` (``pec``). K = 1: ω = 1."""
    K = gram.shape[0]
    if K == 1:
        return gram.new_ones(1)
    if K == 2:
        return pareto_two_tasks(gram, bounds)
    return pec_solver(gram, bounds) if solver == "pec" else pareto_exact(gram, bounds)


# ---------------------------------------------------------------------------- the modules


class SharedLayerWeighting(nn.Module):
    """Base of the gradient-based weightings: the binding to the dense arch and the per-task
    gradients of its last shared layer, averaged over the ranks.

    ``weight [K]`` is the weighting's current weight vector (what evaluation uses and
    ``loss_weight/<term>`` shows); ``forward(per_task [K]) -> [K]`` (training only) returns the
    weights of this step, detached. ``last_terms`` holds this step's diagnostics for logging.
    """

    def __init__(self, shared_layer: str = "") -> None:
        super().__init__()
        self.shared_layer = shared_layer
        self.path = ""
        self._arch: Tuple[nn.Module, ...] = ()  # a tuple: not a submodule (no second copy in the state dict)
        self.last_terms: Dict[str, torch.Tensor] = {}

    def bind(self, arch: nn.Module) -> None:
        """Resolves W in ``arch`` (the dense arch; ConfigError when ``loss.shared_layer`` names
        nothing usable) and keeps ``arch`` for the steps."""
        self.path = shared_layer_path(arch, self.shared_layer)
        self._arch = (arch,)

    def gradients(self, per_task: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``per_task [K]`` -> (∇_W L_k ``[K, P]``, L_k ``[K]``), both the mean over the ranks
        (the gradient DDP applies is that mean), detached."""
        if not self._arch:
            raise RuntimeError("loss.weighting gradnorm/pareto: the loss is not bound to a dense arch (EntireSpaceLoss.bind_shared)")
        K = per_task.shape[0]
        G = task_gradients(per_task, shared_parameters(self._arch[0], self.path))  # [K, P]
        flat = mean_over_ranks(torch.cat([G.reshape(-1), per_task.detach().to(G.dtype)]))
        return flat[:-K].view(K, -1), flat[-K:]


class GradNormWeighting(SharedLayerWeighting):
    """GradNorm (Chen et al., ICML 2018): learnable task weights w (``weight [K]``, init 1,
    Σ w = K) moved at every training step by one gradient step on L_grad (eq. 1–2, see
    :func:`gradnorm_update`), with W = the last shared layer (:func:`shared_layer_path`).

    The step's loss uses w(t); w(t+1) is stored for the next step (Algorithm 1). L_k(0) is the
    first training step's loss (``initial``). Both are persistent buffers: a checkpoint
    resumes the weighting exactly. ``last_terms``: ``gradnorm/l_grad``.

    Example::

        gn = GradNormWeighting(2, alpha=1.5, lr=0.025); gn.bind(arch)
        total = (gn(per_task) * per_task).sum()
    """

    def __init__(self, num_terms: int, alpha: float = 1.5, lr: float = 0.025, shared_layer: str = "") -> None:
        super().__init__(shared_layer)
        self.alpha, self.lr = float(alpha), float(lr)
        self.register_buffer("weight", torch.ones(num_terms))
        self.register_buffer("initial", torch.full((num_terms,), float("nan")))  # L_k(0)

    def forward(self, per_task: torch.Tensor) -> torch.Tensor:
        G, losses = self.gradients(per_task)  # [K, P], [K]
        with torch.no_grad():
            unset = torch.isnan(self.initial) | (self.initial <= 0)
            self.initial.copy_(torch.where(unset, losses, self.initial))
            now = self.weight.clone()  # [K] w(t): this step's weights
            new, l_grad = gradnorm_update(now, G.norm(dim=1), losses, self.initial, self.alpha, self.lr)
            self.weight.copy_(new)
        self.last_terms = {"gradnorm/l_grad": l_grad}
        return now


class ParetoWeighting(SharedLayerWeighting):
    """PE-LTR (Lin et al., RecSys 2019): at every training step ω = :func:`pareto_weights` of
    the Gram matrix of the per-task gradients on W (the last shared layer) and the lower
    bounds c (``loss.pareto_bounds``): Σ ω = 1, ω_k ≥ c_k. ``weight [K]`` keeps the last step's
    ω (a feasible start, c + (1 − Σ c)/K, before the first); it is recomputed from scratch at
    every step, so it is not in checkpoints. ``last_terms``: ``pareto/grad_norm`` = ‖Σ ω_k ∇_W
    L_k‖ (0 at a Pareto-stationary point of the bounded problem's relaxation).

    Deviation: the paper takes the gradients of all shared parameters θ; here those of the
    last shared layer (the embedding tables' gradients never materialise — fused optimizer,
    sharded — and the layer's weights are what every task's gradient passes through last).
    """

    def __init__(self, bounds: Sequence[float], solver: str = "exact", shared_layer: str = "") -> None:
        super().__init__(shared_layer)
        if solver not in PARETO_SOLVERS:
            raise ValueError(f"loss.pareto_solver {solver!r}: expected one of {list(PARETO_SOLVERS)}")
        c = torch.tensor([float(b) for b in bounds])
        self.solver = solver
        self.register_buffer("bounds", c, persistent=False)
        self.register_buffer("weight", c + (1 - c.sum()) / len(c), persistent=False)

    def forward(self, per_task: torch.Tensor) -> torch.Tensor:
        G, _ = self.gradients(per_task)  # [K, P]
        with torch.no_grad():
            gram = G.double() @ G.double().t()  # [K, K]
            w = pareto_weights(gram, self.bounds, self.solver).to(self.weight.dtype)
            self.weight.copy_(w)
            self.last_terms = {"pareto/grad_norm": (w.double() @ gram @ w.double()).clamp(min=0).sqrt().float()}
        return w.clone()


def make_balancer(cfg: LossConfig, term_tasks: List[str], tasks: List[str]) -> Optional[SharedLayerWeighting]:
    """The module of ``cfg.weighting`` (``gradnorm`` or ``pareto``; None for the others) for the
    loss terms of tasks ``term_tasks`` (in term order); ``tasks``: every task of the schema."""
    if cfg.weighting == "gradnorm":
        return GradNormWeighting(len(term_tasks), cfg.gradnorm_alpha, cfg.gradnorm_lr, cfg.shared_layer)
    if cfg.weighting != "pareto":
        return None
    unknown = sorted(set(cfg.pareto_bounds) - set(tasks))
    if unknown:
        raise ValueError(f"loss.pareto_bounds: unknown task(s) {unknown}; tasks are {tasks}")
    termless = sorted(set(cfg.pareto_bounds) - set(term_tasks))
    if termless:
        raise ValueError(f"loss.pareto_bounds: task(s) {termless} have no loss term (loss_space: none); bounded terms are {term_tasks}")
    bounds = [float(cfg.pareto_bounds.get(t, 0.0)) for t in term_tasks]
    if any(b < 0 for b in bounds) or sum(bounds) > 1 + 1e-9:
        raise ValueError(f"loss.pareto_bounds: bounds must be >= 0 with a sum <= 1, got {dict(zip(term_tasks, bounds))}")
    return ParetoWeighting(bounds, cfg.pareto_solver, cfg.shared_layer)
