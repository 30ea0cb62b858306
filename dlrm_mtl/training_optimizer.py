"""The training's optimizers as one TorchRec ``CombinedOptimizer`` whose per-step calls skip
torch.optim's per-call Python."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper


def _unwrapped_step(opt: torch.optim.Optimizer) -> Callable[..., Any]:
    """``opt``'s own ``step`` without torch.optim's profiling wrapper (``profile_hook_step``:
    a ``record_function`` range and the step hooks, which :meth:`TrainingOptimizer.step`
    checks for itself)."""
    fn = type(opt).step
    return getattr(fn, "__wrapped__", fn).__get__(opt)


def _has_step_hooks(opt: torch.optim.Optimizer) -> bool:
    return bool(getattr(opt, "_optimizer_step_pre_hooks", None) or getattr(opt, "_optimizer_step_post_hooks", None))


class FusedAdamStep:
    """One step of a ``torch.optim.Adam(fused=True)`` as the two operators it comes down to,
    an ``add_`` on the step counters and ``_fused_adam_``, called with the same arguments
    ``Adam.step`` passes them (so the update is bit-identical, tests/test_training_optimizer.py).
    The counters (one 0-dim tensor per parameter in the state) are kept as views of one
    tensor, which one ``add_`` advances: ``Adam.step``'s ``_foreach_add_`` is one kernel on a
    GPU but a loop of one ``add_`` per parameter on host tensors (12 counters: 33 µs against
    5 µs for the one ``add_``). Counters the state gets anew (a loaded state dict) are packed
    again.

    ``Adam.step`` spends ≈ 0.1 ms of Python per call before those two operators (its
    ``_init_group`` walk over every parameter's state, grouping the tensors by device and
    dtype, the argument checks); this step takes them once its conditions hold and hands
    everything else to ``Adam.step``: the first step (the state does not exist yet), a
    parameter without a gradient, sparse gradients, more than one parameter group or
    device/dtype, a tensor learning rate, and ``amsgrad``, ``maximize``, ``capturable``,
    ``differentiable`` or ``decoupled_weight_decay``.

    Example::

        adam = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        step = FusedAdamStep(adam)
        loss.backward(); step()   # the same update as adam.step()
    """

    def __init__(self, adam: torch.optim.Adam) -> None:
        self.adam = adam
        self.fallback = _unwrapped_step(adam)
        self.direct_steps = 0  # steps that took the two operators (the rest: Adam.step)
        # the parameters' step counters as views of one tensor, which one add_ advances
        self._steps: Optional[torch.Tensor] = None  # [P]
        self._step_views: List[torch.Tensor] = []

    def _step_counters(self, steps: List[torch.Tensor]) -> Optional[torch.Tensor]:
        """One tensor whose elements are ``steps`` (the state's counters, views of it): kept
        while the state holds those views, else built again (the first direct step, a loaded
        state dict); None where the counters are not 0-dim tensors of one dtype and device.
        ``_foreach_add_`` on a host list is a loop of one ``add_`` per parameter."""
        views = self._step_views
        if len(views) == len(steps) and all(a is b for a, b in zip(steps, views)):
            return self._steps
        s0 = steps[0]
        if any(s.dim() != 0 or s.dtype != s0.dtype or s.device != s0.device for s in steps):
            return None
        self._steps = torch.stack(steps)  # [P], the same values
        self._step_views = [self._steps[i] for i in range(len(steps))]
        return self._steps

    def _fast_args(self) -> Optional[Tuple[List[torch.Tensor], List[torch.Tensor], dict]]:
        groups = self.adam.param_groups
        if len(groups) != 1:
            return None
        g = groups[0]
        if not g.get("fused") or g["amsgrad"] or g["maximize"] or g.get("capturable") or g.get("differentiable") \
                or g.get("decoupled_weight_decay") or isinstance(g["lr"], torch.Tensor):
            return None
        params: List[torch.Tensor] = g["params"]
        grads = [p.grad for p in params]
        if not params or any(gr is None or gr.is_sparse for gr in grads):
            return None
        state = self.adam.state
        if len(state) < len(params):  # the first step creates the state
            return None
        p0 = params[0]
        if any(p.device != p0.device or p.dtype != p0.dtype for p in params):
            return None
        return params, grads, g  # type: ignore[return-value]

    @torch.no_grad()
    def __call__(self) -> None:
        args = self._fast_args()
        if args is None:
            self.fallback()
            return
        params, grads, g = args
        state = self.adam.state
        try:
            states = [state[p] for p in params]
            exp_avgs = [s["exp_avg"] for s in states]
            exp_avg_sqs = [s["exp_avg_sq"] for s in states]
            steps = [s["step"] for s in states]
        except KeyError:  # a parameter whose state is not there yet
            self.fallback()
            return
        packed = self._step_counters(steps)
        if packed is None:
            torch._foreach_add_(steps, 1)
        else:
            if steps[0] is not self._step_views[0]:  # packed just now: the state takes the views
                for st, v in zip(states, self._step_views):
                    st["step"] = v
                steps = self._step_views
            packed.add_(1)
        beta1, beta2 = g["betas"]
        torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=g["lr"],
                           beta1=float(beta1), beta2=float(beta2), weight_decay=g["weight_decay"], eps=g["eps"],
                           maximize=False, grad_scale=None, found_inf=None)
        self.direct_steps += 1


class TrainingOptimizer(CombinedOptimizer):
    """``CombinedOptimizer`` (the tables' fused optimizers and the dense ``Adam``) whose
    ``step`` and ``zero_grad`` call the optimizers inside it directly.

    TorchRec nests them three deep (``CombinedOptimizer`` → ``KeyedOptimizerWrapper`` →
    ``Adam``, and the tables' ``EmbeddingFusedOptimizer``), and torch.optim wraps every level's
    ``step`` in a profiling range with hook checks: ≈ 0.3 ms of Python per training step on
    the 2-core CPU, as much as the dense update itself (docs/performance.md, "Sixth round").
    Here one call reaches each optimizer's own ``step`` (the dense ``Adam(fused=True)`` through
    :class:`FusedAdamStep`); ``zero_grad`` sets the dense gradients to ``None`` (what
    ``KeyedOptimizerWrapper.zero_grad`` → ``Adam.zero_grad()`` does) and calls every other
    optimizer's ``zero_grad`` (the tables' hands them the current learning rate).

    State, ``state_dict``, ``param_groups``, checkpoints and the scheduler see a plain
    ``CombinedOptimizer``. Step hooks (an optimizer's own or torch.optim's global ones) or a
    closure take the nested path with every wrapper; optimizers of other kinds have their own
    ``step`` called directly, without the wrappers.

    Example::

        opt = TrainingOptimizer([dmp.fused_optimizer,
                                 KeyedOptimizerWrapper(params, lambda p: torch.optim.Adam(p, fused=True))])
        opt.zero_grad(); loss.backward(); opt.step()
    """

    def __init__(self, optims: List[Any]) -> None:
        super().__init__(optims)
        self._direct_steps: List[Callable[[], Any]] = []
        self._adams: List[torch.optim.Adam] = []  # zero_grad sets their parameters' grads to None
        self._zero_grads: List[KeyedOptimizer] = []  # every other optimizer's zero_grad is called
        self._every: List[torch.optim.Optimizer] = [self]  # every level, for the hook check
        for _, opt in self._optims:
            self._add(opt)

    def _add(self, opt: KeyedOptimizer) -> None:
        self._every.append(opt)
        if isinstance(opt, CombinedOptimizer):
            for _, inner in opt._optims:
                self._add(inner)
            return
        inner = opt._optimizer if isinstance(opt, KeyedOptimizerWrapper) else None
        if inner is not None:
            self._every.append(inner)
        if type(inner) is torch.optim.Adam:  # KeyedOptimizerWrapper.zero_grad calls Adam.zero_grad(): to None
            self._direct_steps.append(FusedAdamStep(inner))
            self._adams.append(inner)
            return
        self._direct_steps.append(_unwrapped_step(inner if inner is not None else opt))
        self._zero_grads.append(opt)

    def _nested(self) -> bool:
        """Whether a hook anywhere asks for torch.optim's own path."""
        return bool(_global_optimizer_pre_hooks or _global_optimizer_post_hooks) or any(map(_has_step_hooks, self._every))

    def step(self, closure: Any = None) -> None:
        if closure is not None or self._nested():
            for _, opt in self._optims:
                opt.step(closure=closure)
            return
        for step in self._direct_steps:
            step()

    step.hooked = True  # type: ignore[attr-defined]  # torch.optim must not wrap it in profile_hook_step

    def zero_grad(self, set_to_none: bool = False) -> None:
        for adam in self._adams:  # read each time: a parameter group added later is included
            for group in adam.param_groups:
                for p in group["params"]:
                    p.grad = None
        for opt in self._zero_grads:
            opt.zero_grad(set_to_none=set_to_none)
