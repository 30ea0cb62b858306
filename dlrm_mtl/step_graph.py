"""A function's forward and backward recorded once and replayed on static buffers (CUDA graphs).

A training step of the dense arch launches hundreds of small kernels; on a GPU the host cannot
launch them as fast as the device runs them. :class:`StepGraph` records ``fn``'s forward and
its backward (gradients of the inputs that require grad and of ``params``) as two CUDA graphs
and replays each with one launch. Inputs are copied into static buffers before a replay;
outputs and gradients are the graph's own static buffers.

With ``capture=False`` (CPU, or CUDA without capture) the *same* object runs: inputs are
copied into the same static buffers, the "replay" re-runs ``fn`` on them and
``torch.autograd.grad`` gives the same gradients. That is the CPU twin the tests compare with
an eager step (tests/test_step_graph.py), so everything but the capture itself is exercised
without a GPU.

The algorithm is that of ``torch.cuda.make_graphed_callables`` (warm-up on a side stream,
forward captured, then ``autograd.grad`` of its outputs captured into the same memory pool),
written out so that it has the capture-free twin, restores the buffers the warm-up touched
(running statistics, step counters) and accepts ``None`` inputs.

Requirements of ``fn`` on CUDA (what makes a function capturable): fixed shapes, no host
synchronisation (``.item()``, ``nonzero``, boolean indexing, ``.tolist()``), no CPU tensors
created from data. Scenario routing on CUDA is static-shape for that reason
(:func:`dlrm_mtl.modules.scenario_routing.static_routing`).

Example::

    g = StepGraph(fn, (x, y), list(module.parameters()), capture=x.is_cuda)
    out = g(x2, y2)          # tuple of tensors; differentiable w.r.t. x2 and the parameters
    out[0].backward()
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

Tensors = Tuple[torch.Tensor, ...]


class StepGraph:
    """``fn(*args) -> tuple of tensors`` as a recorded forward + backward.

    Args:
        fn: the function; its outputs that require grad are differentiated.
        args: sample inputs (``None`` allowed); their shapes and dtypes are the static shapes.
            Inputs with ``requires_grad`` get gradients.
        params: parameters ``fn`` reads; their gradients are accumulated into ``.grad`` as
            an eager backward would.
        capture: record CUDA graphs (all tensors on one CUDA device) or run the capture-free
            twin.
        buffers: module buffers to restore after the CUDA warm-up iterations.
        warmup: eager iterations on a side stream before capture (cuBLAS workspaces, autograd
            and allocator state).
    """

    def __init__(
        self,
        fn: Callable[..., Tensors],
        args: Sequence[Optional[torch.Tensor]],
        params: Sequence[nn.Parameter],
        capture: bool,
        buffers: Sequence[torch.Tensor] = (),
        warmup: int = 3,
    ) -> None:
        self.fn = fn
        self.capture = capture
        self.params = [p for p in params if p.requires_grad]
        if capture and len({p.dtype for p in self.params}) > 1:
            raise ValueError("StepGraph: parameters of one dtype expected (their gradients share one buffer)")
        self.static_args: List[Optional[torch.Tensor]] = [
            None if a is None else a.detach().clone().requires_grad_(a.requires_grad) for a in args
        ]
        self.grad_arg_idx = [i for i, a in enumerate(self.static_args) if a is not None and a.requires_grad]
        self._grad_inputs: List[torch.Tensor] = [self.static_args[i] for i in self.grad_arg_idx] + self.params  # type: ignore[misc]
        self.replays = 0
        self._live: Tensors = ()  # the twin's outputs of the latest forward (with their autograd graph)
        self.static_out: List[torch.Tensor] = []
        self.diff_idx: List[int] = []
        if capture:
            self._record(buffers, warmup)

    # ------------------------------------------------------------------ recording

    def _run_forward(self) -> Tensors:
        with torch.enable_grad():
            out = self.fn(*self.static_args)
        if not isinstance(out, tuple) or not all(isinstance(o, torch.Tensor) for o in out):
            raise TypeError("StepGraph: fn must return a tuple of tensors")
        return out

    def _grads(self, outs: Sequence[torch.Tensor], grad_outs: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        return list(torch.autograd.grad(list(outs), self._grad_inputs, grad_outputs=list(grad_outs), allow_unused=True))

    def _record(self, buffers: Sequence[torch.Tensor], warmup: int) -> None:
        saved = [b.detach().clone() for b in buffers]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                outs = self._run_forward()
                diff = [o for o in outs if o.requires_grad]
                self._grads(diff, [torch.ones_like(o) for o in diff])
            del outs, diff
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
        self.pool = torch.cuda.graph_pool_handle()
        self.fwd_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.fwd_graph, pool=self.pool, capture_error_mode="thread_local"):
            outs = self._run_forward()
        self.diff_idx = [i for i, o in enumerate(outs) if o.requires_grad]
        self.static_grad_out = [torch.empty_like(outs[i]) for i in self.diff_idx]
        self.bwd_graph = torch.cuda.CUDAGraph()
        n = len(self.grad_arg_idx)
        with torch.cuda.graph(self.bwd_graph, pool=self.pool, capture_error_mode="thread_local"):
            grads = self._grads([outs[i] for i in self.diff_idx], self.static_grad_out)
            # the parameters' gradients leave through one flat buffer that is cloned after each
            # replay (one kernel): a gradient handed to autograd may become ``p.grad`` itself,
            # and an in-place ``zero_grad`` (TorchRec's optimizers) plus the next replay would
            # then add the buffer to itself
            kept = [(k, g.shape) for k, g in enumerate(grads[n:]) if g is not None]
            flat = torch.cat([grads[n + k].reshape(-1) for k, _ in kept]) if kept else None
        self.static_grad_args = grads[:n]
        self._param_grad_layout = kept
        self.static_param_grads = flat
        self.static_out = [o.detach() for o in outs]

    # ------------------------------------------------------------------ replay

    def matches(self, args: Sequence[Optional[torch.Tensor]]) -> bool:
        """Whether ``args`` have the recorded shapes, dtypes, devices and grad flags."""
        if len(args) != len(self.static_args):
            return False
        for a, s in zip(args, self.static_args):
            if (a is None) != (s is None):
                return False
            if a is not None and (a.shape != s.shape or a.dtype != s.dtype or a.device != s.device or a.requires_grad != s.requires_grad):
                return False
        return True

    def forward_replay(self, args: Sequence[Optional[torch.Tensor]]) -> Tensors:
        with torch.no_grad():
            for a, s in zip(args, self.static_args):
                if a is not None and a.data_ptr() != s.data_ptr():
                    s.copy_(a)
        self.replays += 1
        if self.capture:
            self.fwd_graph.replay()
            return tuple(self.static_out)
        self._live = self._run_forward()
        if not self.static_out:  # first call: the twin's static outputs
            self.static_out = [o.detach().clone() for o in self._live]
            self.diff_idx = [i for i, o in enumerate(self._live) if o.requires_grad]
        else:
            with torch.no_grad():
                for s, o in zip(self.static_out, self._live):
                    s.copy_(o)
        return tuple(self.static_out)

    def backward_replay(self, grad_outs: Sequence[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
        """Gradients of the grad inputs then the params, from the grads of the outputs."""
        grads = [torch.zeros_like(self.static_out[i]) if g is None else g for i, g in zip(self.diff_idx, grad_outs)]
        if not self.capture:
            return self._grads([self._live[i] for i in self.diff_idx], grads)
        with torch.no_grad():
            for s, g in zip(self.static_grad_out, grads):
                s.copy_(g)
        self.bwd_graph.replay()
        param_grads: List[Optional[torch.Tensor]] = [None] * len(self.params)
        if self.static_param_grads is not None:
            parts = self.static_param_grads.clone().split([s.numel() for _, s in self._param_grad_layout])
            for (k, shape), part in zip(self._param_grad_layout, parts):
                param_grads[k] = part.view(shape)
        return list(self.static_grad_args) + param_grads

    def __call__(self, *args: Optional[torch.Tensor]) -> Tensors:
        if not self.matches(args):
            raise ValueError("StepGraph: inputs differ from the recorded shapes/dtypes (check matches() first)")
        flat = [a for a in args] + self.params
        return _Replay.apply(self, len(args), *flat)


class _Replay(torch.autograd.Function):
    """Autograd node of a :class:`StepGraph` replay: outputs that require grad are
    differentiable, the rest are marked non-differentiable."""

    @staticmethod
    def forward(ctx, graph: StepGraph, num_args: int, *flat: Optional[torch.Tensor]) -> Tensors:  # type: ignore[override]
        ctx.graph, ctx.num_args = graph, num_args
        out = graph.forward_replay(flat[:num_args])
        out = tuple(o.detach() for o in out)
        ctx.mark_non_differentiable(*[o for i, o in enumerate(out) if i not in graph.diff_idx])
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_out: Optional[torch.Tensor]):  # type: ignore[override]
        graph: StepGraph = ctx.graph
        grads = graph.backward_replay([grad_out[i] for i in graph.diff_idx])
        arg_grads: List[Optional[torch.Tensor]] = [None] * ctx.num_args
        for k, i in enumerate(graph.grad_arg_idx):
            arg_grads[i] = grads[k]
        param_grads = grads[len(graph.grad_arg_idx):]
        return (None, None, *arg_grads, *param_grads)
