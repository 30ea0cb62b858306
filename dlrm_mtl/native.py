"""dlrm_mtl's fused host kernels (``dlrm_mtl/csrc/cpu_kernels.c``), and when they apply.

A CPU training step spends much of its time outside the GEMMs in chains of ATen operators on
``[B, T]``-sized tensors, each paying a dispatch (5-20 µs on the development machine) for a
few µs of arithmetic. The C extension ``dlrm_mtl._cpu_kernels``, built at install time by
``setup.py``, runs such a chain in one pass over the rows (contiguous float32 CPU memory; the
GIL is released; the embedding lookup, its update and the experts' gated sums split over
PyTorch's own OpenMP threads where the build has OpenMP). Each caller keeps its ATen path for
everything else (GPU, float64, a build without a C compiler) and tests compare the two.

``train.native_kernels`` (default true) switches them for the process
(:func:`set_enabled`, called by the training set-up); ``DLRM_MTL_NATIVE=0`` in the
environment keeps them off whatever the configuration says.

Example::

    from dlrm_mtl import native
    native.available()   # True where the extension was built and is enabled
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch.fx._symbolic_trace import is_fx_tracing

_kernels: Optional[ModuleType]
try:
    from dlrm_mtl import _cpu_kernels as _kernels  # type: ignore[attr-defined, no-redef]
except ImportError:  # built without a C compiler, or an install that skipped it
    _kernels = None

_ENV_OFF = os.environ.get("DLRM_MTL_NATIVE", "1") == "0"  # off for the process, whatever the config says
_enabled = not _ENV_OFF


def openmp_runtimes() -> List[str]:
    """The OpenMP runtime libraries mapped into this process (Linux ``/proc/self/maps``; an
    empty list elsewhere). The lookup kernels' threads are PyTorch's own only where this is
    one library: a build of torch that bundles its runtime under another name (or Intel's)
    would give the kernels a second thread pool beside PyTorch's, oversubscribing the cores."""
    import re

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if re.search(r"/lib(g|i|)omp[^/]*\.so", line)}
    except OSError:
        return []
    return sorted(os.path.realpath(p) for p in paths)


if _kernels is not None and len(set(openmp_runtimes())) > 1:
    _kernels.set_one_thread(1)  # a second runtime beside PyTorch's: every kernel on the calling thread

MAX_TERMS = 64  # the kernels' fixed per-row scratch (tasks and loss terms)


def built() -> bool:
    """Whether the C extension was built and imports."""
    return _kernels is not None


def available() -> bool:
    """Whether the kernels are built and enabled."""
    return _kernels is not None and _enabled


def set_enabled(flag: bool) -> None:
    """Switch the kernels on or off for this process (``train.native_kernels``); with
    ``DLRM_MTL_NATIVE=0`` in the environment they stay off."""
    global _enabled
    _enabled = bool(flag) and not _ENV_OFF


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager(*ts: Optional[torch.Tensor]) -> bool:
    """Kernels available, plain host tensors (not the fake or functional subclasses of
    ``torch.export``/``torch.compile``), and no tracer that would record the C call as a
    constant (``torch.jit.trace``, ``torch.fx``)."""
    if _kernels is None or not _enabled:
        return False
    # a loop, not all(<generator>), and ``is_cpu``, not ``device.type`` (which builds a device
    # object: ~1 µs a tensor here): a dozen calls a step
    for t in ts:
        if t is not None and (type(t) not in _PLAIN or not t.is_cpu):
            return False
    return not torch.compiler.is_compiling() and not torch.jit.is_tracing() and not is_fx_tracing()


def _host_f32(*ts: Optional[torch.Tensor]) -> bool:
    return _eager(*ts) and all(t is None or (t.dtype == torch.float32 and t.is_contiguous()) for t in ts)


def term_means_applies(logits: torch.Tensor, y: torch.Tensor, r: torch.Tensor, lam: Optional[torch.Tensor]) -> bool:
    """Whether :func:`term_means_forward` can run on these tensors: kernels available, float32
    on the CPU (``logits`` with any strides, the others contiguous), at most :data:`MAX_TERMS`
    tasks and terms, not traced."""
    return (logits.dim() == 2 and _host_f32(y, r, lam) and _eager(logits) and logits.dtype == torch.float32
            and logits.shape[1] <= MAX_TERMS and y.shape[1] <= MAX_TERMS)


def term_means_forward(
    logits: torch.Tensor, y: torch.Tensor, r: torch.Tensor, lam: Optional[torch.Tensor],
    src_task: torch.Tensor, is_entire: torch.Tensor, log_prob: torch.Tensor, negated: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logits [B, T]``, term labels ``y [B, K]``, row weights ``r [B, K]``, ``lam [B]`` or
    None, the terms' ``src_task`` (int64 ``[K]``), ``is_entire`` (bool ``[K]``) and
    ``log_prob`` (``[2T or T, K]``, :class:`dlrm_mtl.losses.TermMatrices`) -> (``per [K]``:
    each term's weighted mean BCE with the weights ``r λ / Σ_b r``; ``D [B, K]``: each term's
    weighted derivative in its source; ``σ(z)``, ``σ(-z)`` ``[B, T]``) for
    :func:`term_means_backward`."""
    assert _kernels is not None
    B, T = logits.shape
    K = y.shape[1]
    per = logits.new_empty(K)
    d = logits.new_empty(B, K)
    sig_pos, sig_neg = logits.new_empty(B, T), logits.new_empty(B, T)
    colsum = torch.empty(K, dtype=torch.float64)
    _kernels.term_means_forward(
        logits.data_ptr(), y.data_ptr(), r.data_ptr(), 0 if lam is None else lam.data_ptr(), B, T, K,
        src_task.data_ptr(), is_entire.data_ptr(), log_prob.data_ptr(), int(negated),
        per.data_ptr(), d.data_ptr(), sig_pos.data_ptr(), sig_neg.data_ptr(), colsum.data_ptr(),
        logits.stride(0), logits.stride(1))
    return per, d, sig_pos, sig_neg


def term_means_backward(d: torch.Tensor, grad: torch.Tensor, grad_map: torch.Tensor, sig_pos: torch.Tensor,
                        sig_neg: torch.Tensor) -> torch.Tensor:
    """``D [B, K]`` and ``σ(±z)`` from :func:`term_means_forward`, the incoming ``grad [K]``
    and ``grad_map [K, 3T]`` (``[S | P₊ | P₋]``) -> ``∂/∂logits [B, T]``."""
    assert _kernels is not None
    B, K = d.shape
    T = sig_pos.shape[1]
    g = grad.to(torch.float32).contiguous()
    out = d.new_empty(B, T)
    _kernels.term_means_backward(d.data_ptr(), g.data_ptr(), grad_map.data_ptr(), sig_pos.data_ptr(),
                                 sig_neg.data_ptr(), B, T, K, out.data_ptr())
    return out


FLOAT_MATH = ("exp", "log1p", "expm1", "log")


def float_math(name: str, x: torch.Tensor) -> torch.Tensor:
    """One of the loss passes' vectorised functions on float32 ``x`` (contiguous, host) -> a new
    tensor: ``exp`` for x ≤ 0 (0 below -87), ``log1p`` for x in [0, 1], ``expm1`` for x ≤ 0,
    ``log`` for a normal x > 0 (outside those ranges the result is unspecified). For tests
    against float64 (``dlrm_mtl/csrc/cpu_kernels.c``)."""
    assert _kernels is not None
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        raise ValueError("float_math: a contiguous float32 CPU tensor")
    out = torch.empty_like(x)
    _kernels.float_math(FLOAT_MATH.index(name), x.data_ptr(), out.data_ptr(), x.numel())
    return out


_INT = (torch.int64, torch.int32)


def shift_applies(indices: torch.Tensor, offsets: torch.Tensor, row_start: torch.Tensor) -> bool:
    """Whether :func:`shift_ids` can run: contiguous int64 host ids, int64/int32 offsets, int64
    ``row_start``, not traced (int32 ids keep the ATen path, whose sum with the int64 row
    starts is int64)."""
    return (_eager(indices, offsets, row_start) and indices.dtype == torch.int64 and offsets.dtype in _INT
            and row_start.dtype == torch.int64 and indices.is_contiguous() and offsets.is_contiguous()
            and row_start.is_contiguous())


def shift_ids(indices: torch.Tensor, offsets: torch.Tensor, row_start: torch.Tensor) -> torch.Tensor:
    """``indices [N]`` of F features' bags, feature after feature (``offsets [F·B + 1]``),
    each plus its feature's ``row_start [F]`` -> ``[N]`` (a new tensor). Offsets that do not
    rise within ``[0, N]`` to ``N`` raise ValueError."""
    assert _kernels is not None
    F = row_start.numel()
    B = (offsets.numel() - 1) // F
    out = torch.empty_like(indices)
    _kernels.shift_ids(indices.data_ptr(), out.data_ptr(), offsets.data_ptr(), row_start.data_ptr(), F, B,
                       int(offsets.dtype == torch.int32), indices.numel())
    return out


def one_table_applies(weights: torch.Tensor, momentum: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,
                      lr: torch.Tensor) -> bool:
    """Whether :func:`pooled_sum` and :func:`rowwise_adagrad_update` can run: contiguous float32
    host table ``[R, D]`` and state ``[R]``, int64 ids and offsets, a float32 learning rate of
    one value, at most 2³¹ − 1 rows (the slots are int32), not traced."""
    return (_host_f32(weights, momentum) and weights.dim() == 2 and momentum.shape == weights.shape[:1]
            and weights.shape[0] < 2**31 - 1 and _eager(ids, offsets, lr) and ids.dtype == offsets.dtype == torch.int64
            and ids.is_contiguous() and offsets.is_contiguous() and lr.dtype == torch.float32 and lr.numel() == 1)


def pooled_sum(weights: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, F: int, B: int,
               single: bool = False, mean: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``weights [R, D]``, ``ids [N]`` of F features' bags of B rows (``offsets [F·B + 1]``)
    -> ``[B, F·D]``: each bag's rows summed in float, in the ids' order. ``single``: every
    bag holds one id (``offsets`` are not read; ``N = F·B``). ``mean``: uint8 ``[F]``, the
    features whose bags are averaged (the sum divided by the bag's length, as
    :func:`dlrm_mtl.models.bag_means.mean_of_bags` divides). ``out``: where to write them, a
    float32 ``[B, F·D]`` with unit column stride (e.g. columns of a wider tensor); returned.
    An id outside ``[0, R)`` raises IndexError; offsets that fall or do not end at N raise
    ValueError. With ids × dim ≥ 32,768 the output's rows are split over PyTorch's threads
    (:func:`openmp_threads`)."""
    assert _kernels is not None
    R, D = weights.shape
    if out is None:
        out = weights.new_empty(B, F * D)
    assert out.shape == (B, F * D) and out.stride(1) == 1 and out.dtype == torch.float32
    _kernels.pooled_sum(weights.data_ptr(), R, D, ids.data_ptr(), offsets.data_ptr(), F, B, out.data_ptr(),
                        int(single), ids.numel(), 0 if mean is None else mean.data_ptr(), out.stride(0))
    return out


def rowwise_adagrad_update(grad: torch.Tensor, weights: torch.Tensor, momentum: torch.Tensor, ids: torch.Tensor,
                           offsets: torch.Tensor, F: int, B: int, lr: torch.Tensor, eps: float,
                           slot: torch.Tensor, single: bool = False, mean: Optional[torch.Tensor] = None) -> None:
    """The backward of :func:`pooled_sum` with exact row-wise Adagrad, in place on ``weights``
    and ``momentum``: ``grad [B, F·D]`` (any row stride), learning rate ``lr`` (a float32
    tensor of one value, read when the update runs), ``slot`` ``[R]`` int32 scratch, all -1
    (left so), ``single`` and ``mean`` as for :func:`pooled_sum` (a mean bag's ids each get the
    bag's gradient divided by its length). With ids × dim ≥ 32,768 and two or more groups
    of features (:func:`lookup_plan`) the groups' rows are updated on PyTorch's threads, each
    row by one thread: the serial result bit for bit. See ``dlrm_mtl/csrc/cpu_kernels.c``."""
    assert _kernels is not None
    R, D = weights.shape
    g = grad if grad.dtype == torch.float32 and grad.stride(1) == 1 else grad.float().contiguous()
    _kernels.rowwise_adagrad_update(g.data_ptr(), g.stride(0), ids.data_ptr(), offsets.data_ptr(), F, B, D, R,
                                    weights.data_ptr(), momentum.data_ptr(), lr.data_ptr(), float(eps),
                                    slot.data_ptr(), int(single), ids.numel(), 0 if mean is None else mean.data_ptr())


def folded_backward(grad: torch.Tensor, fold: Any, weight: torch.Tensor, weight_grad: torch.Tensor, first: int,
                    direct_grad: Optional[torch.Tensor] = None) -> None:
    """The pooled part of :class:`~dlrm_mtl.modules.folded_affine.FoldedInputAffine`'s
    backward: ``grad [B, N]`` (float32, unit column stride) of ``h = x W + b``; ``weight
    [d, N]`` and its gradient ``weight_grad`` (both unit column stride), whose ``F·D`` rows
    from row ``first`` read the pooled columns (those rows of ``weight_grad`` are written); the
    table's exact row-wise Adagrad update, in place, from each touched row's gradient
    ``Σ_f W_f gT_r`` (``fold``: an :class:`~dlrm_mtl.modules.folded_affine.InputFold`). The
    features its plan leaves direct (``fold.plan.direct``) read their ids' gradients from
    ``direct_grad [B, F·D]`` (x's pooled gradient, those columns computed; unit column stride)
    and get no rows of ``weight_grad``. Threads as :func:`rowwise_adagrad_update`. See
    ``dlrm_mtl/csrc/cpu_kernels.c``."""
    assert _kernels is not None
    R, D = fold.weights.shape
    mean, direct = fold.mean, fold.plan.direct
    _kernels.folded_backward(grad.data_ptr(), grad.stride(0), grad.shape[1], fold.ids.data_ptr(), fold.offsets.data_ptr(),
                             fold.F, fold.B, D, R, fold.weights.data_ptr(), fold.momentum.data_ptr(), fold.lr.data_ptr(),
                             float(fold.eps), fold.slot.data_ptr(), int(fold.single), fold.ids.numel(),
                             0 if mean is None else mean.data_ptr(), weight.data_ptr() + 4 * first * weight.stride(0),
                             weight.stride(0), weight_grad.data_ptr() + 4 * first * weight_grad.stride(0),
                             weight_grad.stride(0), 0 if direct is None else direct.data_ptr(),
                             0 if direct_grad is None else direct_grad.data_ptr(),
                             0 if direct_grad is None else direct_grad.stride(0))


def folded_rows_backward(grad: torch.Tensor, scenario: torch.Tensor, level: int, table: torch.Tensor,
                         weight: torch.Tensor, weight_grad: torch.Tensor, first: int) -> torch.Tensor:
    """One scenario level's part of :class:`~dlrm_mtl.modules.folded_affine.FoldedInputAffine`'s
    backward: ``grad [B, N]``, the levels' ids ``scenario [B, ≥ L]`` (int64, any strides; this
    level's in column ``level``), its table ``[V, e]`` (float32 contiguous) and
    the ``e`` rows of ``weight [d, N]`` from row ``first`` that read its columns -> the table's
    gradient ``[V, e]``; those rows of ``weight_grad`` written."""
    assert _kernels is not None
    V, e = table.shape
    out = torch.empty(V, e)
    _kernels.folded_rows_backward(grad.data_ptr(), grad.stride(0), grad.shape[1], scenario.data_ptr() + 8 * level * scenario.stride(1),
                                  scenario.stride(0), grad.shape[0], table.data_ptr(), V, e,
                                  weight.data_ptr() + 4 * first * weight.stride(0), weight.stride(0),
                                  weight_grad.data_ptr() + 4 * first * weight_grad.stride(0), weight_grad.stride(0),
                                  out.data_ptr())
    return out


def lookup_plan(ids: torch.Tensor, offsets: torch.Tensor, F: int, B: int, threads: int,
                single: bool = False) -> Tuple[int, torch.Tensor]:
    """How :func:`rowwise_adagrad_update` splits its work over ``threads`` threads: features
    whose ids' ranges overlap (a table read by several features) form one group, and each
    group goes to one thread (costliest first — a feature costs its ids plus twice the rows it
    may touch — to the least loaded), so every table row is
    summed and updated by one thread in the ids' order — the serial result, bit for bit.
    Returns ``(groups, thread_of)``: the number of groups and each feature's thread (int32
    ``[F]``). With fewer than two groups the update runs on one thread."""
    assert _kernels is not None
    out = torch.empty(F, dtype=torch.int32)
    groups = _kernels.lookup_plan(ids.data_ptr(), offsets.data_ptr(), F, B, int(single), ids.numel(), threads,
                                  out.data_ptr())
    return groups, out


MAX_MIX = 64  # the mixture kernels' experts and gates


def mixture_runs_on(x: torch.Tensor) -> bool:
    """Whether the C mixture will take expert outputs computed from ``x``: the kernels
    available, ``x`` a float32 host tensor, not traced (a layer then leaves its experts' last
    ReLU to the mixture: :func:`dlrm_mtl.modules.mixture.mix_expert_parts`)."""
    return _eager(x) and x.dtype == torch.float32


def mixture_applies(gates: torch.Tensor, parts: Sequence[torch.Tensor]) -> bool:
    """Whether :func:`mixture_forward` and :func:`mixture_backward` can run: float32 host
    ``gates [B, G, E]`` (any strides) and expert parts ``[B, E_k, D]`` (``Σ E_k = E``, unit
    stride along D), the same B, at most :data:`MAX_MIX` gates and experts, not traced."""
    if gates.dim() != 3 or not parts or not _eager(gates, *parts) or gates.dtype != torch.float32:
        return False
    B, G, E = gates.shape
    D = parts[0].shape[-1] if parts[0].dim() == 3 else -1
    return (1 <= G <= MAX_MIX and 1 <= E <= MAX_MIX and sum(p.shape[1] for p in parts if p.dim() == 3) == E
            and all(p.dim() == 3 and p.dtype == torch.float32 and p.shape[0] == B and p.shape[2] == D
                    and (p.stride(2) == 1 or D <= 1) for p in parts))


def _expert_rows(parts: Sequence[torch.Tensor]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Each expert's address at row 0 and its row stride (floats), part after part."""
    ptrs: List[int] = []
    strides: List[int] = []
    for p in parts:
        base, sb, se = p.data_ptr(), p.stride(0), p.stride(1)
        for j in range(p.shape[1]):
            ptrs.append(base + 4 * j * se)
            strides.append(sb)
    return tuple(ptrs), tuple(strides)


def mixture_forward(gates: torch.Tensor, parts: Sequence[torch.Tensor], sizes: Sequence[int],
                    relu: bool = False) -> List[torch.Tensor]:
    """``gates [B, G, E]`` over the experts of ``parts`` (``[B, E_k, D]`` each, their experts in
    order) -> the mixtures ``[B, n, D]`` for each ``n`` of ``sizes`` (``Σ n = G``, gates in
    order; new contiguous tensors): per row ``y[g] = Σ_e gates[g, e] · r(x_e)``, e ascending,
    ``r`` ReLU where ``relu`` (the experts' last ReLU, left to the mixture) else the identity.
    See ``dlrm_mtl/csrc/cpu_kernels.c``."""
    assert _kernels is not None
    B, G, E = gates.shape
    D = parts[0].shape[2]
    outs = [parts[0].new_empty(B, n, D) for n in sizes]
    if B == 0 or D == 0:  # nothing to read (an empty tensor's address may be 0)
        return outs
    xs, xbs = _expert_rows(parts)
    ys, ybs = _expert_rows(outs)
    _kernels.mixture_forward(G, E, D, B, int(relu), gates.data_ptr(), gates.stride(0), gates.stride(1), gates.stride(2),
                             xs, xbs, ys, ybs)
    return outs


def mixture_backward(grads: Sequence[torch.Tensor], gates: torch.Tensor, parts: Sequence[torch.Tensor],
                     relu: bool = False, want_gates: bool = True,
                     want_parts: Optional[Sequence[bool]] = None) -> Tuple[Optional[torch.Tensor], List[Optional[torch.Tensor]]]:
    """The gradients of :func:`mixture_forward` for the incoming ``grads`` (one ``[B, n, D]``
    per output): ``(∂/∂gates [B, G, E]`` (contiguous) or None where not ``want_gates``,
    ``[∂/∂part]``: each in its part's own layout where that is dense (an expert-major view gets
    an expert-major gradient), None where ``want_parts`` says no``)``; with ``relu``, the
    gradient of the pre-activations (0 where a part's value is ≤ 0)."""
    assert _kernels is not None
    B, G, E = gates.shape
    D = parts[0].shape[2]
    want = list(want_parts) if want_parts is not None else [True] * len(parts)
    gys = [g if g.dtype == torch.float32 and (g.stride(2) == 1 or D <= 1) else g.float().contiguous() for g in grads]
    gw = gates.new_empty(B, G, E) if want_gates else None
    gxs: List[Optional[torch.Tensor]] = []
    for p, w in zip(parts, want):
        gx = None
        if w:
            gx = torch.empty_like(p)  # a dense layout is kept (preserve_format)
            if gx.stride(2) != 1 and D > 1:
                gx = p.new_empty(p.shape)
        gxs.append(gx)
    if gw is None and all(g is None for g in gxs):
        return None, gxs
    if B == 0 or D == 0:  # empty sums
        return (None if gw is None else gw.zero_()), [None if g is None else g.zero_() for g in gxs]
    xs, xbs = _expert_rows(parts)
    gyp, gyb = _expert_rows(gys)
    gxp: List[int] = []
    gxb: List[int] = []
    for p, gx in zip(parts, gxs):
        if gx is None:
            gxp += [0] * p.shape[1]
            gxb += [0] * p.shape[1]
        else:
            ptrs, strides = _expert_rows([gx])
            gxp += ptrs
            gxb += strides
    _kernels.mixture_backward(G, E, D, B, int(relu), gates.data_ptr(), gates.stride(0), gates.stride(1), gates.stride(2),
                              xs, xbs, gyp, gyb, 0 if gw is None else gw.data_ptr(), tuple(gxp), tuple(gxb))
    return gw, gxs


def dense_applies(*ts: torch.Tensor) -> bool:
    """Whether the dense passes (:func:`bias_act`, :func:`bias_act_backward`,
    :func:`tower_logits`, :func:`tower_logits_backward`) can run on these tensors: the kernels
    available, float32 host tensors, not traced, no CPU autocast (whose GEMMs would return
    bfloat16)."""
    if not _eager(*ts):
        return False
    for t in ts:
        if t.dtype is not torch.float32:  # dtypes are singletons
            return False
    return not torch.is_autocast_enabled("cpu")


# The wrappers below run a few times a step on every layer: they read each tensor's shape and
# strides once (tuples) and do their arithmetic on those; a tensor method call costs ~0.5-1 µs
# here, and the first version's (one per size and stride) made bias_act_backward's wrapper
# 26-34 µs against the kernel's 2-3 µs on a [64, 128] gradient.
_F32 = torch.float32


def _layout(shape: Sequence[int], stride: Sequence[int]) -> Tuple[int, int, int, int, int]:
    """``(G, group stride, R, row stride, N)`` of a ``[R, N]`` or ``[G, R, N]`` tensor's shape
    and strides (unit stride along N)."""
    if len(shape) == 2:
        return 1, 0, shape[0], stride[0], shape[1]
    return shape[0], stride[0], shape[1], stride[1], shape[2]


def _unit_columns(t: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """``(t, its strides)`` with unit stride along the last dimension (a copy where needed)."""
    st = t.stride()
    if st[-1] != 1 and t.shape[-1] > 1:
        t = t.contiguous()
        st = t.stride()
    return t, st


def _f32(*ts: torch.Tensor) -> None:
    for t in ts:
        if t.dtype is not _F32:
            raise TypeError(f"dlrm_mtl.native: float32 tensors only, got {t.dtype}")


def bias_act(y: torch.Tensor, bias: torch.Tensor, relu: bool) -> torch.Tensor:
    """``y = act(y + bias)`` in place, one pass (act: ReLU where ``relu``, else the identity):
    ``y [R, N]`` with ``bias [N]``, or ``y [G, R, N]`` with ``bias [G, N]`` (group g's own
    bias row); ``y`` with unit stride along N, ``bias`` contiguous. Returns ``y``. See
    ``dlrm_mtl/csrc/cpu_kernels.c``."""
    assert _kernels is not None
    _f32(y, bias)
    shape, st = y.shape, y.stride()
    if st[-1] != 1 and shape[-1] > 1:
        raise ValueError("bias_act: y needs unit stride along its last dimension")
    G, gs, R, ld, N = _layout(shape, st)
    if G * R * N:
        _kernels.bias_act(y.data_ptr(), G, gs, R, ld, N, bias.contiguous().data_ptr(), int(relu))
    return y


def bias_act_backward(grad: torch.Tensor, y: torch.Tensor, relu: bool, want_bias: bool = True,
                      out: Optional[torch.Tensor] = None, bias_out: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The gradients of :func:`bias_act`'s input and bias from ``grad`` (shaped as ``y``, the
    forward's output: ReLU's mask): ``(gp`` (shaped as ``y``; written into ``out`` where given,
    unit stride along N, else a new contiguous tensor), ``Σ_r gp`` per group ``[N]`` or
    ``[G, N]`` (into ``bias_out``, contiguous, where given; None where not ``want_bias``)``)``,
    one pass."""
    assert _kernels is not None
    grad, gst = _unit_columns(grad)
    y, yst = _unit_columns(y)
    shape = y.shape
    gp = y.new_empty(shape) if out is None else out
    _f32(grad, y, gp)
    qst = gp.stride()
    if grad.shape != shape or gp.shape != shape or (qst[-1] != 1 and shape[-1] > 1):
        raise ValueError(f"bias_act_backward: grad {tuple(grad.shape)}, y {tuple(shape)}, out {tuple(gp.shape)}")
    G, ygs, R, yld, N = _layout(shape, yst)
    gb = None
    if want_bias:
        gb = (y.new_empty((N,) if G == 1 and len(shape) == 2 else (G, N))) if bias_out is None else bias_out
    if G * R * N == 0:
        return gp, None if gb is None else gb.zero_()
    _, ggs, _, gld, _ = _layout(shape, gst)
    _, pgs, _, pld, _ = _layout(shape, qst)
    _kernels.bias_act_backward(grad.data_ptr(), ggs, gld, y.data_ptr(), ygs, yld, gp.data_ptr(), pgs, pld,
                               G, R, N, 0 if gb is None else gb.data_ptr(), int(relu))
    return gp, gb


def _tower_layout(shape: Sequence[int], stride: Sequence[int], T: int) -> Tuple[int, int, int, int]:
    """``(B, K, tower stride, row stride)`` of the towers' hidden activations (shape, strides)."""
    if len(shape) == 2:
        return shape[0], shape[1] // T, shape[1] // T, stride[0]
    return shape[1], shape[2], stride[0], stride[1]


def tower_logits(h: torch.Tensor, T: int, weight: torch.Tensor, bias: torch.Tensor,
                 hidden_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The towers' logit layer on their last hidden activations ``h``, ``[B, T·K]`` (tower t's
    columns ``t·K .. (t+1)·K``) or ``[T, B, K]`` (unit stride along K): ``z [B, T]`` with
    ``z[b, t] = <h_bt, weight[t]> + bias[t]`` (``weight [T, K]``, ``bias [T]``, contiguous).
    With ``hidden_bias`` (``[T, K]`` or ``[T·K]``, contiguous) ``h`` is the hidden layer's
    product and first becomes ``ReLU(h + hidden_bias)`` in place, in the same pass
    (:func:`bias_act`'s arithmetic)."""
    assert _kernels is not None
    _f32(h, weight, bias)
    shape, st = h.shape, h.stride()
    B, K, ts, sb = _tower_layout(shape, st, T)
    if st[-1] != 1 or not weight.is_contiguous() or not bias.is_contiguous():
        raise ValueError("tower_logits: h needs unit stride along K, the weights and biases contiguous")
    hb = 0
    if hidden_bias is not None:
        _f32(hidden_bias)
        if not hidden_bias.is_contiguous() or hidden_bias.numel() != T * K:
            raise ValueError("tower_logits: the hidden bias must be contiguous, T·K values")
        hb = hidden_bias.data_ptr()
    z = h.new_empty(B, T)
    if B * T:
        _kernels.tower_logits(h.data_ptr(), ts, sb, T, K, B, hb, weight.data_ptr(), bias.data_ptr(), z.data_ptr())
    return z


def tower_logits_backward(grad: torch.Tensor, h: torch.Tensor, T: int, weight: torch.Tensor
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`tower_logits`'s backward joined with the last hidden layer's ReLU backward, one
    pass over ``h``: from ``grad = ∂L/∂z [B, T]`` -> ``(gp`` (``∂L`` by the hidden layer's
    pre-activations, laid out as ``h``, which must be contiguous), ``∂L/∂weight [T, K]``,
    ``∂L/∂bias [T]``, the hidden layer's bias gradient ``Σ_b gp [T, K])``."""
    assert _kernels is not None
    grad = grad.contiguous()
    _f32(grad, h, weight)
    shape = h.shape
    B, K, ts, sb = _tower_layout(shape, h.stride(), T)
    if not h.is_contiguous() or not weight.is_contiguous() or grad.shape != (B, T):
        raise ValueError(f"tower_logits_backward: grad {tuple(grad.shape)} for h {tuple(shape)} and {T} towers")
    gp = h.new_empty(shape)
    gw, gc, gh = h.new_empty(T, K), h.new_empty(T), h.new_empty(T, K)  # (one buffer's three views cost more)
    if B == 0 or K == 0:
        return gp.zero_(), gw.zero_(), gc.zero_(), gh.zero_()
    _kernels.tower_logits_backward(grad.data_ptr(), h.data_ptr(), ts, sb, T, K, B, weight.data_ptr(), gp.data_ptr(),
                                   gw.data_ptr(), gc.data_ptr(), gh.data_ptr())
    return gp, gw, gc, gh


def openmp_threads() -> int:
    """The team :func:`pooled_sum` and :func:`rowwise_adagrad_update` run on from this thread
    (``torch.get_num_threads()``: PyTorch's own libgomp team), or 0 where the extension was
    built without OpenMP (every kernel then runs on the calling thread)."""
    assert _kernels is not None
    return int(_kernels.openmp_threads())


def table_rows_applies(weight: torch.Tensor, ids: torch.Tensor) -> bool:
    """Whether :func:`table_rows` and :func:`rows_by_id` can run: a contiguous float32 host
    table ``[V, e]``, int64 ids ``[B]`` (any stride), not traced."""
    return (_host_f32(weight) and weight.dim() == 2 and _eager(ids) and ids.dtype == torch.int64 and ids.dim() == 1)


def table_rows(weight: torch.Tensor, ids: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, e]``: row ``ids[b]`` of ``weight [V, e]`` for each b (``index_select``'s rows; a
    table of one row: that row for every id, as its expand reads it); an id outside ``[0, V)``
    raises IndexError. ``out``: where to write them (float32 ``[B, e]``, unit column stride);
    returned. See ``dlrm_mtl/csrc/cpu_kernels.c``."""
    assert _kernels is not None
    V, e = weight.shape
    if out is None:
        out = weight.new_empty(ids.shape[0], e)
    assert out.shape == (ids.shape[0], e) and out.stride(1) == 1 and out.dtype == torch.float32
    _kernels.table_rows(weight.data_ptr(), V, e, ids.data_ptr(), ids.stride(0), ids.shape[0], out.data_ptr(),
                        out.stride(0))
    return out


def rows_by_id(grad: torch.Tensor, ids: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``[V, e]``: the rows of ``grad [B, e]`` (unit column stride, any row stride) summed by
    ``ids [B]``, in float, rows in order — ``index_add``'s sums, bit for bit (a table of one
    row: every row summed, ids not read)."""
    assert _kernels is not None
    g = grad if grad.dtype == torch.float32 and grad.stride(1) == 1 else grad.float().contiguous()
    out = g.new_empty(num_rows, g.shape[1])
    _kernels.rows_by_id(g.data_ptr(), g.stride(0), g.shape[0], ids.data_ptr(), ids.stride(0), out.data_ptr(),
                        num_rows, g.shape[1])
    return out


def kjt_single_run(matrix: Any, start: int, n: int, B: int, pos: int, values: Any, lengths: Any, ends: Any) -> None:
    """A batch's KJT arrays for a run of m single-hot keys: ``matrix [m, rows]`` (int64, each
    row contiguous) rows ``[start, start + n)`` written to ``values[pos : pos + m·n]`` key after
    key, ``lengths [m, B]`` (int32: 1, then 0 for padding) and ``ends [m·B]`` (int64: each
    bag's end in ``values``). numpy arrays; ``lengths`` and ``ends`` views of the batch's."""
    assert _kernels is not None
    m, ld = matrix.shape[0], matrix.strides[0] // 8
    _kernels.kjt_single_run(matrix, ld, m, start, n, B, pos, values, lengths, ends)  # numpy arrays: their buffers


def kjt_multi_key(lens: Any, offs: Any, vals: Any, start: int, n: int, B: int, pos: int, values: Any, lengths: Any,
                  ends: Any) -> None:
    """A batch's KJT arrays for one multi-hot key: the buffer's rows ``[start, start + n)``
    (``lens`` int32, ``offs`` int64 ``[rows + 1]``, ``vals`` int64) -> their ids at
    ``values[pos:]``, ``lengths [B]`` (0 for padding) and ``ends [B]`` (each bag's end in
    ``values``)."""
    assert _kernels is not None
    _kernels.kjt_multi_key(lens, offs, vals, start, n, B, pos, values, lengths, ends)  # numpy arrays: their buffers


def _take_threads() -> int:
    """The shuffle's threads: PyTorch's intra-op count on the main thread (between steps, the
    cores are the step's), one on a reader thread (whose OpenMP team would be a pool of its own)."""
    import threading

    return torch.get_num_threads() if threading.current_thread() is threading.main_thread() else 1


def take_applies(*arrays: Any) -> bool:
    """Whether :func:`take_rows` gathers these numpy arrays in C: the kernels available and
    every array C-contiguous (None skipped)."""
    if _kernels is None or not _enabled:
        return False
    for a in arrays:
        if a is not None and not a.flags.c_contiguous:
            return False
    return True


def take_rows(items: Sequence[Tuple[Any, int]], idx: Any, rows: int) -> List[Any]:
    """``np.take(a, idx, axis)`` for each ``(a, axis)``: C-contiguous numpy arrays of ``rows``
    rows along ``axis`` (0, or 1 of a 2-D ``[m, rows]`` matrix: the single-hot ids), ``idx``
    int64 (each in ``[0, rows)``: IndexError otherwise), one pass in C over the rows split
    over the threads (:func:`take_applies`; the same bytes as numpy's). The reader's shuffle."""
    import numpy as np

    assert _kernels is not None
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    n = len(idx)
    outs: List[Any] = []
    spec: List[Any] = []
    for a, axis in items:
        if a.shape[axis] != rows:
            raise ValueError(f"take_rows: an array of {a.shape[axis]} rows along axis {axis}, expected {rows}")
        if axis == 0:
            out = np.empty((n,) + a.shape[1:], dtype=a.dtype)
            rb = a.itemsize * int(np.prod(a.shape[1:], dtype=np.int64))  # a row's bytes (C-contiguous)
            if rb:  # a zero-width column has nothing to gather
                spec += (a, rb, out, rb, rb)
        else:
            out = np.empty((a.shape[0], n), dtype=a.dtype)
            for j in range(a.shape[0]):
                spec += (a[j], a.itemsize, out[j], a.itemsize, a.itemsize)
        outs.append(out)
    if n:
        _kernels.take_rows(idx, n, rows, _take_threads(), *spec)
    return outs


def take_lists(lens: Any, offs: Any, vals: Any, idx: Any) -> Tuple[Any, Any, Any]:
    """Rows ``idx`` of a list column (``lens`` int32 ``[rows]``, ``offs`` int64 ``[rows + 1]``,
    ``vals`` int64): ``(lens[idx], their offsets, the rows' values in the new order)``, the
    values gathered in C (the reader's shuffle of a multi-hot feature)."""
    import numpy as np

    assert _kernels is not None
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    rows = len(lens)
    lens_c, offs_c, vals_c = (np.ascontiguousarray(lens, dtype=np.int32), np.ascontiguousarray(offs, dtype=np.int64),
                              np.ascontiguousarray(vals, dtype=np.int64))
    n = len(idx)
    if n and (int(idx.min()) < 0 or int(idx.max()) >= rows):
        raise IndexError(f"take_lists: indices outside [0, {rows})")
    new_lens = lens_c[idx] if n else np.zeros(0, np.int32)
    new_offs = np.zeros(n + 1, np.int64)
    np.cumsum(new_lens, out=new_offs[1:])
    out = np.empty(int(new_offs[-1]), np.int64)
    if n:
        _kernels.take_lists(idx, n, rows, _take_threads(), lens_c, offs_c, vals_c, new_offs, out)
    return new_lens, new_offs, out


def metric_pairs(rows: torch.Tensor, views: torch.Tensor, leaf: torch.Tensor, S: int, y: torch.Tensor, p: torch.Tensor,
                 ll: torch.Tensor, bins: torch.Tensor, obins: Optional[torch.Tensor], sums: torch.Tensor, hist: torch.Tensor,
                 ohist: Optional[torch.Tensor], num_bins: int) -> None:
    """An evaluation batch's binary views into the metrics' running sums and AUC histograms,
    in place (:class:`dlrm_mtl.metrics.MetricAccumulator`): ``rows [N, V]`` bool, ``views``
    int64 (the binary views, in order), ``leaf [N]`` int64, ``y``/``p``/``ll [N, V]`` float64
    (label, probability, log loss), ``bins``/``obins [N, V]`` int64 histogram bins (the
    prediction's and the oracle's), ``sums [V, S, 8]`` float64, ``hist``/``ohist`` int64
    ``[V·S·2·num_bins]``. See ``dlrm_mtl/csrc/cpu_kernels.c``."""
    assert _kernels is not None
    ints = (views, leaf, bins, hist) + tuple(t for t in (obins, ohist) if t is not None)
    if rows.dtype != torch.bool or any(t.dtype != torch.float64 for t in (y, p, ll, sums)) \
            or any(t.dtype != torch.int64 for t in ints):
        raise TypeError("metric_pairs: bool rows, float64 values and sums, int64 views, leaves, bins and histograms")
    N, V = rows.shape
    rows_u8 = rows.contiguous().view(torch.uint8)
    y, p, ll, bins = y.contiguous(), p.contiguous(), ll.contiguous(), bins.contiguous()
    views, leaf = views.contiguous(), leaf.contiguous()
    if obins is not None:
        obins = obins.contiguous()
    for t in (sums, hist) + (() if ohist is None else (ohist,)):
        if not t.is_contiguous():
            raise ValueError("metric_pairs: the sums and histograms must be contiguous")
    if obins is not None and ohist is None:
        raise ValueError("metric_pairs: oracle bins without an oracle histogram")
    _kernels.metric_pairs(N, V, rows_u8.data_ptr(), views.data_ptr(), views.numel(), leaf.data_ptr(), S, y.data_ptr(),
                          p.data_ptr(), ll.data_ptr(), bins.data_ptr(), 0 if obins is None else obins.data_ptr(),
                          sums.data_ptr(), hist.data_ptr(), 0 if ohist is None else ohist.data_ptr(), num_bins)


def hist_aucs(hist: Any) -> Optional[Any]:
    """``hist`` int64 ``[V, S, 2, BINS]`` (numpy; per view and leaf scenario, negatives then
    positives) -> float64 ``[V, S + 1, 2]``: per view, the "all" slice (every leaf summed)
    then each leaf, (AUC, its maximum error), as ``dlrm_mtl.metrics.histogram_auc`` computes
    them, in one pass over the bins; None where the kernels are off or a slice holds too many
    rows for its 64-bit sums (the caller takes numpy's path). See ``cpu_kernels.c``."""
    import numpy as np

    if not available():
        return None
    h = np.ascontiguousarray(hist, dtype=np.int64)
    V, S, two, bins = h.shape
    if two != 2:
        raise ValueError(f"hist_aucs: [V, S, 2, BINS] histograms, got {h.shape}")
    out = np.empty((V, S + 1, 2), np.float64)
    return out if _kernels.hist_aucs(h, V, S, bins, out) else None  # type: ignore[union-attr]
