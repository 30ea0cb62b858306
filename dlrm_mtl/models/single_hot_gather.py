"""A one-table lookup whose every bag holds one id: a row gather forward, fbgemm's own fused
backward."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _backward_op() -> Any:
    """fbgemm's CPU backward of a row-wise Adagrad lookup: the gradient's scatter and the
    fused row-wise Adagrad update of the touched rows (in place on the weights and state)."""
    return torch.ops.fbgemm.split_embedding_backward_codegen_rowwise_adagrad_unweighted_pt2_wrapper.default


class _Intercept(TorchDispatchMode):
    """Keeps the arguments of the first call of ``op`` under it and skips that call (it returns
    nothing, as the op itself does); every other operator runs."""

    def __init__(self, op: Any) -> None:
        super().__init__()
        self.op = op
        self.call: Optional[Tuple[Tuple[Any, ...], Dict[str, Any]]] = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is self.op and self.call is None:
            self.call = (tuple(args), dict(kwargs or {}))
            return None
        return func(*args, **(kwargs or {}))


class FusedBackward:
    """The call fbgemm's lookup makes in its backward (:func:`_backward_op`), kept with the
    arguments its autograd node passed, and made again for another batch's gradient, ids,
    offsets and learning-rate tensor: every other argument (the weights, the Adagrad state,
    the tables' layout, ``eps``, ``weight_decay``, the kernel's block sizes) is what fbgemm
    itself passes for this kernel.

    :meth:`record` runs the lookup's forward once more, then its backward with a zero gradient
    under a dispatch mode that keeps the backward call's arguments and does not run it: no
    weight, state or counter changes. ``optimizer_args`` is the module's optimizer-argument
    tuple at recording; a module whose tuple was replaced since (new hyperparameters) is
    recorded again (:attr:`optimizer_args` is compared by identity).

    Example::

        backward = FusedBackward.record(lambda: invoke(args, tbe.optimizer_args, momentum),
                                        args.placeholder_autograd_tensor, tbe.optimizer_args)
        backward(grad, indices, offsets, tbe.learning_rate_tensor)   # the update, in place
    """

    def __init__(self, args: Tuple[Any, ...], kwargs: Dict[str, Any], optimizer_args: Any) -> None:
        op = _backward_op()
        names = [a.name for a in op._schema.arguments]
        self.op = op
        self.args: List[Any] = list(args)
        self.kwargs = kwargs
        self.optimizer_args = optimizer_args
        self._at = {n: names.index(n) for n in ("grad_output", "indices", "offsets", "learning_rate_tensor")}
        if any(i >= len(self.args) for i in self._at.values()):
            raise ValueError("fbgemm's backward call was made with keyword arguments this does not replace")
        for i in self._at.values():  # the recording's batch: replaced in every call, not kept alive
            self.args[i] = None

    @classmethod
    def record(cls, forward: Callable[[], torch.Tensor], placeholder: torch.Tensor,
               optimizer_args: Any) -> Optional["FusedBackward"]:
        """The backward call of ``forward()`` (the lookup's kernel call, whose output depends on
        ``placeholder`` through fbgemm's autograd node), or None if it made none (or one with
        the batch's arguments passed by keyword, which this does not replace)."""
        out = forward()
        mode = _Intercept(_backward_op())
        with mode:
            torch.autograd.grad(out, [placeholder], torch.zeros_like(out), allow_unused=True)
        if mode.call is None:
            return None
        try:
            return cls(mode.call[0], mode.call[1], optimizer_args)
        except ValueError:  # a call this cannot re-issue: the kernel's own path
            return None

    def __call__(self, grad: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                 learning_rate_tensor: torch.Tensor) -> None:
        args = list(self.args)
        at = self._at
        args[at["grad_output"]], args[at["indices"]], args[at["offsets"]] = grad, indices, offsets
        args[at["learning_rate_tensor"]] = learning_rate_tensor
        self.op(*args, **self.kwargs)


class SingleHotGather(torch.autograd.Function):
    """``SingleHotGather.apply(placeholder, weights [R, D], ids [F·B], F, B, backward, offsets,
    lr) -> [B, F·D]``: a lookup of one table (one-table ids, feature after feature, as the
    kernel takes them) whose every bag holds exactly one id, so that each output block is one
    row of the table: the forward is one ``index_select`` (batch-major ids, one copy of the
    ``[F, B]`` id matrix), the backward fbgemm's own fused backward call (:class:`FusedBackward`:
    the same gradient scatter and row-wise Adagrad update as the kernel's autograd node, on the
    same ids and offsets). The output is the kernel's sum of a bag of one row, bit for bit
    (tests/test_recorded_lookup.py). ``placeholder`` is fbgemm's autograd anchor (it gets no
    gradient); ``weights`` get none either: the update is in place, in the backward.

    Why: fbgemm's CPU forward of single-id bags is its JIT-compiled pooled sum behind the
    lookup's autograd wrapper; on the census shape (32 features × 1024 rows, profiler self
    time) 245 + 83 µs against the gather's ~185 µs (``index_select`` 82, the ids' transposing
    copy ~75, this function 27), and the step 3-5 % faster (docs/performance.md, "Twelfth round").

    Example::

        out = SingleHotGather.apply(ph, tbe.weights_host.view(-1, 16), ids, 32, 1024, backward, offsets, lr)
    """

    @staticmethod
    def forward(ctx, placeholder: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, F: int, B: int,
                backward: FusedBackward, offsets: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        ctx.ids, ctx.offsets, ctx.backward, ctx.lr = ids, offsets, backward, lr
        D = weights.shape[1]
        # the output is the tensor written, not a view of it: callers modify its columns in place
        # (mean pooling), which autograd forbids on a view made inside a custom function
        out = weights.new_empty(B, F * D)  # [B, F·D]
        torch.index_select(weights, 0, ids.view(F, B).t().reshape(-1), out=out.view(B * F, D))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.backward(grad, ctx.ids, ctx.offsets, ctx.lr)
        return None, None, None, None, None, None, None, None
