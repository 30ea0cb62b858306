"""One table-batched fbgemm kernel call per step, without the per-call Python of its module."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_mtl import native
from dlrm_mtl.models.bag_means import mean_of_bags
from dlrm_mtl.models.input_frame import InputFrame
from dlrm_mtl.models.one_table_lookup import OneTableInputRows, OneTableLookup
from dlrm_mtl.modules.folded_affine import FoldPlan, InputFold, fold_plan
from dlrm_mtl.models.single_hot_gather import FusedBackward, SingleHotGather

# the fbgemm_gpu release whose SplitTableBatchedEmbeddingBagsCodegen.forward this replays
# (its side effects are listed in RecordedLookup's docstring); any other falls back
_FBGEMM_SERIES = "1.8."


def _legacy_sse_is_slow() -> bool:
    """Whether this CPU pays for legacy-SSE instructions run amid AVX code: Intel's do (a state
    transition per switch, ~114 ns measured on this project's Intel VM; its size differs
    between Intel generations), AMD's do not."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return "GenuineIntel" in line
    except OSError:
        pass
    return False


# RecordedLookup.one_table's default: the kernel's backward through fbgemm's shared-table path
ONE_TABLE_BACKWARD = _legacy_sse_is_slow()


class RecordedLookup:
    """``kjt -> [B, Σ D]`` for one TorchRec batched embedding kernel (``BaseBatchedEmbeddingBag``
    around fbgemm's ``SplitTableBatchedEmbeddingBagsCodegen``) training with exact row-wise
    Adagrad on the CPU: the same kernel call, with the module's per-call Python replaced by
    the arguments it built on the first call.

    fbgemm's ``forward`` rebuilds on every call a 30-field ``CommonArgs`` and a ``Momentum``
    from the module's attributes, runs input preparation, prefetch and cache bookkeeping that
    are no-ops for tables in host memory without a cache, and only then calls
    ``lookup_rowwise_adagrad.invoke``: ~0.17 ms of the ~0.44 ms the lookup takes per step on
    the MovieLens shape (docs/performance.md, "Eighth round"). This records the arguments of
    that ``invoke`` once (by calling the module with ``invoke`` watched) and afterwards calls
    ``invoke`` itself with the batch's ``indices`` and ``offsets``, the module's current
    ``learning_rate_tensor`` and ``optimizer_args`` (a schedule changes them), and the
    forward's side effects done by hand, so that the module's state after a step is what its
    own forward leaves:

    * ``iter_cpu`` is synced from ``iter`` when it is 0 (a loaded checkpoint), then both +1;
    * ``step`` +1 and ``timestep`` +1 (its prefetch, which returns at once without a cache);
    * ``_indices``/``_offsets`` are the batch's; ``lxu_cache_locations`` the empty one.

    The weights, the optimizer state and the fused update in the backward are the module's own
    tensors and kernels, so training is bit for bit the module's (tests/test_recorded_lookup.py).

    ``one_table`` (``sharding.cpu_backward``; default :data:`ONE_TABLE_BACKWARD`: on Intel
    CPUs) calls the kernel as if its tables were one table read by all its features: ids
    shifted by their table's first row, and the tables' offsets into the weights and the
    Adagrad state zeroed (they are the same flat tensors). fbgemm's CPU backward then takes its
    path for a table shared by several features, compiled C++, instead of its JIT-compiled
    row-wise Adagrad, which runs four legacy-SSE instructions per updated row amid AVX code: on
    Intel each switch costs a state transition, ~0.45 µs per row (the MovieLens kernel's
    backward 1.99 against 0.52 ms, docs/performance.md, "Ninth round"). The forward reads the
    same rows (the same output, bit for bit); the update is the same row-wise Adagrad, to float
    rounding (its sum of squares is added up in another order). It applies where all the
    kernel's features have one dim and the tables lie back to back in feature order, as
    TorchRec builds them; ids must be in range (``sharding.bounds_check: none`` already assumes
    so: a wrong id would read a neighbouring table's row rather than fail the kernel's own
    range check). The recording call runs through the same layout (a run resumed in a new
    process records again and must train bit for bit like the run it continues).

    Where ``train.native_kernels`` is on (:mod:`dlrm_mtl.native`) and the optimizer is plain
    row-wise Adagrad, every one-table call runs as :class:`OneTableLookup`: the pooled sum and
    the update in C, bit for bit fbgemm's shared-table path, without its sort of every id
    (docs/performance.md, "Fifteenth round") — the recording one too, whose kernel call is held
    back while the module's forward records it ("Seventeenth round"). Otherwise:

    a one-table call whose every bag holds exactly one id (single-hot features without nulls:
    offsets 0, 1, 2, ...) is looked up as a row gather with fbgemm's own backward call
    (:class:`SingleHotGather`, :class:`FusedBackward`): the same output and the same update,
    bit for bit, at a little over half the forward's cost (fbgemm's CPU forward of one-id bags
    is its pooled-sum kernel behind an autograd wrapper).

    It applies (:meth:`of` returns None otherwise) only where that replay is complete:
    fbgemm_gpu ``1.8.*``; a ``SplitTableBatchedEmbeddingBagsCodegen`` on the CPU with
    ``EXACT_ROWWISE_ADAGRAD`` and none of its counter or global-weight-decay variants, no
    cache, no bounds check (``sharding.bounds_check: none``), no stats reporter, input
    reporting, debug printing, input multiplexer or write-back hook. A call it cannot replay
    goes to the module itself (per-sample weights, variable batch sizes per feature, ids or
    offsets of another dtype than the kernel's, forward hooks, a raw-id tracker, a pending
    prefetch), and so does the first call after the module's weights or optimizer state were
    replaced by other tensors (it then records again). If a recording does not match what
    the replay assumes, the module is used for good.

    Example::

        lookup = RecordedLookup.of(emb) or emb   # emb: a BaseBatchedEmbeddingBag of the sharded EBC
        pooled = lookup(kjt)                     # [B, Σ D] of the kernel's tables
    """

    def __init__(self, emb: nn.Module, one_table: bool = False) -> None:
        import fbgemm_gpu.split_embedding_codegen_lookup_invokers.lookup_rowwise_adagrad as invoker

        self.one_table = one_table  # asked for; _row_start says whether the recording allows it
        self._row_start: Optional[torch.Tensor] = None  # [F] each feature's table's first row, one_table
        # one_table: each id's shift [N] by the batch's ids per feature (host counts), see _shift
        self._shifts: Dict[Tuple[int, ...], torch.Tensor] = {}
        self._last_counts: Optional[Tuple[int, ...]] = None  # the previous call's, not kept yet
        self.emb = emb
        self.tbe = emb._emb_module
        self._invoker = invoker
        self._invoke = invoker.invoke
        self._common: Any = None  # CommonArgs of the recorded call
        self._momentum: Any = None  # Momentum of the recorded call
        self._kwargs: Dict[str, Any] = {}
        self.disabled = False  # a recording did not match: the module from then on
        self.replays = 0  # calls served by the replay (tests, logs)
        self.gathers = 0  # of which single-id bags, through SingleHotGather (tests, logs)
        self._dim = 0  # one_table: the tables' one embedding dim
        self._backward: Optional[FusedBackward] = None  # one_table: the kernel's backward call (_gather)
        self._gather_off = False  # the kernel's backward made no call to record: no gathers
        # the last offsets found to give every bag one id, with its version (_single_hot)
        self._single_offsets: Optional[Tuple[torch.Tensor, int]] = None
        # one-table calls through the C kernels (OneTableLookup, _native_applies)
        self._native_checked: Any = None  # the optimizer-argument tuple last checked
        self._native_plain = False  # ... and whether it is plain row-wise Adagrad
        self._slot: Optional[torch.Tensor] = None  # [R] int32 scratch of the C backward
        self._fold_plans: Dict[int, FoldPlan] = {}  # by batch rows: which features a first map folds
        self._table_rows: Optional[List[int]] = None  # each feature's table's rows (the fold plans')
        self.native_calls = 0  # calls served by OneTableLookup (tests, logs)
        self.input_rows_calls = 0  # of which OneTableInputRows: the dense arch's whole input
        # the schema's mean pooling as spans of this kernel's output, (feature, start, end) (set
        # by LocalPooledLookup): every call returns those bags averaged, in the C call's own
        # passes where it runs, else by mean_of_bags on the kernel's sums
        self.mean_spans: List[Tuple[str, int, int]] = []
        self._means: Dict[Tuple[str, ...], Optional[torch.Tensor]] = {}

    @classmethod
    def of(cls, emb: nn.Module, one_table: Optional[bool] = None) -> Optional["RecordedLookup"]:
        """The replay of ``emb``'s kernel, or None where it does not apply (class docstring);
        ``one_table`` None: :data:`ONE_TABLE_BACKWARD`."""
        try:
            import fbgemm_gpu
            from fbgemm_gpu.split_embedding_configs import EmbOptimType
            from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode
            from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen
        except ImportError:
            return None
        if not str(getattr(fbgemm_gpu, "__version__", "")).startswith(_FBGEMM_SERIES):
            return None
        tbe = getattr(emb, "_emb_module", None)
        if type(tbe) is not SplitTableBatchedEmbeddingBagsCodegen:
            return None
        stats = getattr(tbe, "_debug_print_input_stats", None)
        ok = (
            tbe.use_cpu and not tbe.use_mtia
            and tbe.optimizer == EmbOptimType.EXACT_ROWWISE_ADAGRAD
            and not tbe._used_rowwise_adagrad_with_counter
            and not tbe._used_rowwise_adagrad_with_global_weight_decay
            and tbe.bounds_check_mode_int == BoundsCheckMode.NONE.value
            and tbe.lxu_cache_weights.numel() == 0
            and tbe.stats_reporter is None
            and tbe._report_input_params is None
            and tbe.tbe_input_multiplexer is None
            and not tbe.use_writeback_bwd_prehook
            and not tbe.is_nobag
            and not getattr(tbe, "gather_uvm_cache_stats", False)
            and not getattr(tbe, "enable_raw_embedding_streaming", False)
            and getattr(stats, "__name__", "") == "_debug_print_input_stats_factory_null"
            and tbe.embedding_table_index_type == torch.int64
            and getattr(emb, "_embedding_table_index_type", None) == torch.int64
            and getattr(emb, "_embedding_table_offset_type", None) == torch.int64
        )
        return cls(emb, ONE_TABLE_BACKWARD if one_table is None else one_table) if ok else None

    def _replayable(self, kjt: KeyedJaggedTensor) -> bool:
        emb, tbe = self.emb, self.tbe
        g = nn.modules.module
        return not (
            self.disabled
            or kjt.weights_or_none() is not None
            or kjt.variable_stride_per_key()
            or kjt.values().dtype != torch.int64
            or kjt.offsets().dtype != torch.int64
            or emb._forward_pre_hooks or emb._forward_hooks or tbe._forward_pre_hooks or tbe._forward_hooks
            or g._global_forward_pre_hooks or g._global_forward_hooks
            or getattr(emb, "_raw_id_tracker_wrapper", None) is not None
            or tbe.timesteps_prefetched
            or tbe.lxu_cache_locations_list
            or torch.compiler.is_compiling()
        )

    def _record(self, kjt: KeyedJaggedTensor, frame: Optional[InputFrame] = None) -> Tuple[torch.Tensor, bool]:
        """The module's own call, with the arguments of its kernel call kept (and checked), and
        whether its mean-pooled bags are averaged. Where the C kernels will serve the recorded
        call (the one-table layout, :meth:`_native_applies`), the module's forward runs with its
        kernel call held back, and the call then runs as :class:`OneTableLookup` (with
        ``frame``, :class:`OneTableInputRows`): the first step's lookup does not go through
        fbgemm's forward and backward (bit for bit the same training, tests/test_native.py)."""
        seen: Dict[str, Any] = {}
        invoke = self._invoke
        tbe = self.tbe

        def watch(*args: Any, **kwargs: Any) -> torch.Tensor:
            seen["args"], seen["kwargs"] = args, kwargs
            if self.one_table and len(args) == 3:
                # this call too through the one-table layout, so that every step's update takes
                # the same path (a run resumed in a new process records again; it must train
                # like the run it continues)
                layout = self._one_table_layout(args[0], args[2])
                if layout is not None:
                    seen["layout"] = layout
                    common, momentum, row_start = layout
                    ids = self._shifted(args[0].indices, args[0].offsets, row_start)
                    call = (common._replace(indices=ids, offsets=args[0].offsets), args[1], momentum)
                    D = int(common.D_offsets[1]) - int(common.D_offsets[0])
                    if native.available() and self._native_applies(ids, args[0].offsets, tbe.weights_host.view(-1, D)):
                        seen["held"] = (call, kwargs)  # run by the C kernels once the recording is checked
                        F = common.D_offsets.numel() - 1
                        return tbe.weights_host.new_empty((args[0].offsets.numel() - 1) // F, int(common.D_offsets[-1]))
                    return invoke(*call, **kwargs)
            return invoke(*args, **kwargs)

        self._invoker.invoke = watch
        try:
            out = self.emb(kjt)
        finally:
            self._invoker.invoke = invoke
        held = seen.get("held")
        args = seen.get("args", ())
        if len(args) != 3 or set(seen["kwargs"]) - {"mixed_D"}:
            self.disabled = True
            return (out if held is None else invoke(*held[0], **held[1])), False
        common, optimizer_args, momentum = args
        vbe = common.vbe_metadata
        if not (
            common.indices is kjt.values() and common.offsets is kjt.offsets()
            and common.indice_weights is None and common.feature_requires_grad is None
            and vbe.B_offsets is None and vbe.vbe_output is None
            and common.lxu_cache_locations is tbe.lxu_cache_locations_empty
            and common.uvm_cache_stats is None
            and common.host_weights is tbe.weights_host
            and common.learning_rate_tensor is tbe.learning_rate_tensor
            and optimizer_args is tbe.optimizer_args
            and momentum.host is tbe.momentum1_host
        ):
            self.disabled = True
            return (out if held is None else invoke(*held[0], **held[1])), False
        # drop the batch from the recording (it holds no other per-call tensor)
        self._common = common._replace(indices=None, offsets=None)
        self._momentum = momentum
        self._kwargs = dict(seen["kwargs"])
        self._row_start = None
        self._shifts, self._last_counts = {}, None
        self._fold_plans, self._table_rows = {}, None
        self._backward, self._single_offsets, self._gather_off = None, None, False
        layout = seen.get("layout")
        if layout is not None:  # the call above ran as one table: so do the replays
            self._common = layout[0]._replace(indices=None, offsets=None)
            self._momentum, self._row_start = layout[1], layout[2]
            self._dim = int(self._common.D_offsets[1]) - int(self._common.D_offsets[0])
        if held is not None:  # the module's forward is done (its bookkeeping included): the C call
            call = held[0][0]
            args = self._common._replace(indices=call.indices, offsets=call.offsets,
                                         learning_rate_tensor=tbe.learning_rate_tensor)
            return self._native(args, tbe.weights_host.view(-1, self._dim), self._mean_flags(kjt.keys()), frame), True
        return out, False

    @staticmethod
    def _one_table_layout(common: Any, momentum: Any) -> Optional[Tuple[Any, Any, torch.Tensor]]:
        """``common`` and ``momentum`` rewritten for ``one_table`` (class docstring), with each
        feature's table's first row ``[F]``; None where the layout does not allow it: every
        feature one dim ``D``, each feature's offset into the weights its table's first row ×
        ``D`` and into the row-wise Adagrad state its first row, all in host memory."""
        dims = common.D_offsets.diff()  # [F]
        first_row = common.hash_size_cumsum[:-1]  # [F] the first row of each feature's table
        if dims.numel() < 2 or not bool((dims == dims[0]).all()):
            return None
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation

        D = int(dims[0])
        host = EmbeddingLocation.HOST.value
        if not (
            torch.equal(common.weights_offsets, first_row * D)
            and torch.equal(momentum.offsets, first_row)
            and bool((common.weights_placements == host).all())
            and bool((momentum.placements == host).all())
        ):
            return None
        one = common._replace(
            weights_offsets=torch.zeros_like(common.weights_offsets),
            # one table: no feature starts a new one; its size is the tables' rows
            hash_size_cumsum=torch.cat([torch.zeros_like(first_row), common.hash_size_cumsum[-1:]]),
        )
        return one, momentum._replace(offsets=torch.zeros_like(momentum.offsets)), first_row.clone()

    @staticmethod
    def _shifted(indices: torch.Tensor, offsets: torch.Tensor, row_start: torch.Tensor) -> torch.Tensor:
        """``indices [N]`` (feature after feature, ``offsets [F·B + 1]``), each shifted by its
        feature's table's first row: the ids of the one table. On the host one C pass
        (:func:`dlrm_mtl.native.shift_ids`) instead of four operators (~150 µs at the
        MovieLens shape's batch of 2,048, docs/performance.md)."""
        if native.shift_applies(indices, offsets, row_start):
            return native.shift_ids(indices, offsets, row_start)
        B = (offsets.numel() - 1) // row_start.numel()
        bounds = offsets[::B]  # [F + 1] where each feature's ids start
        return indices + torch.repeat_interleave(row_start, bounds.diff(), output_size=indices.numel())

    # _shift keeps the shifts of this many distinct per-feature counts (a run of single-hot
    # features has two: full batches and the short last one)
    SHIFTS_KEPT = 8

    def _shift(self, kjt: KeyedJaggedTensor, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """:meth:`_shifted` for the recorded layout, one ``add`` per call where the batch
        carries its ids per feature on the host (``length_per_key``: the reader's batches do):
        each id's shift ``[N]`` depends on those counts only, so it is built (with numpy, no
        operator) and kept once the same counts come twice in a row — single-hot features give
        the same counts in every full batch. Counts seen once (multi-hot features change them
        from batch to batch), or no host counts: :meth:`_shifted` (four operators; measured:
        building a shift for every batch was no faster)."""
        row_start = self._row_start
        assert row_start is not None
        per_key: Optional[List[int]] = kjt.length_per_key_or_none()
        if per_key is None or len(per_key) != row_start.numel():
            return self._shifted(indices, offsets, row_start)
        key = tuple(per_key)
        shift = self._shifts.get(key)
        if shift is None or shift.dtype != indices.dtype:
            repeated, self._last_counts = key == self._last_counts, key
            if not repeated:  # counts that change every batch (multi-hot features): no keeping
                return self._shifted(indices, offsets, row_start)
            if len(self._shifts) >= self.SHIFTS_KEPT:
                self._shifts.pop(next(iter(self._shifts)))  # the oldest
            shift = torch.from_numpy(np.repeat(row_start.numpy(), per_key)).to(indices.dtype)  # [N]
            self._shifts[key] = shift
        return indices + shift

    def __call__(self, kjt: KeyedJaggedTensor, frame: Optional[InputFrame] = None) -> torch.Tensor:
        """``[B, Σ D]``: the kernel's pooled bags, those of :attr:`mean_spans` averaged; with a
        ``frame``, where the C call runs, the dense arch's whole input ``[B, frame.width(Σ D)]``
        (:class:`~dlrm_mtl.models.one_table_lookup.OneTableInputRows`)."""
        out, averaged = self._lookup(kjt, frame)
        if averaged or not self.mean_spans:
            return out
        return mean_of_bags(out, kjt, self.mean_spans)

    def _lookup(self, kjt: KeyedJaggedTensor, frame: Optional[InputFrame] = None) -> Tuple[torch.Tensor, bool]:
        """The kernel's call ``[B, Σ D]`` (with ``frame``, the C call's whole input), and whether
        its mean-pooled bags are averaged (the C call's) or summed (every other)."""
        if not self._replayable(kjt):
            return self.emb(kjt), False
        tbe = self.tbe
        common = self._common
        if common is None or tbe.weights_host is not common.host_weights or tbe.momentum1_host is not self._momentum.host:
            return self._record(kjt, frame)
        indices, offsets = kjt.values(), kjt.offsets()  # [N] ids, [T·B + 1]
        # the forward's bookkeeping (class docstring), in its order
        tbe._indices, tbe._offsets = indices, offsets
        tbe.step += 1
        tbe.timestep += 1
        tbe.lxu_cache_locations = tbe.lxu_cache_locations_empty
        if tbe.iter_cpu.item() == 0:  # host tables: iter and iter_cpu are both on the CPU
            tbe.iter_cpu.fill_(tbe.iter.item())
        tbe.iter_cpu.add_(1)
        tbe.iter.add_(1)
        self.replays += 1
        ids = indices if self._row_start is None else self._shift(kjt, indices, offsets)
        args = common._replace(indices=ids, offsets=offsets, learning_rate_tensor=tbe.learning_rate_tensor)
        if self._row_start is not None and native.available():  # (no operator where they are off)
            table = tbe.weights_host.view(-1, self._dim)  # [R, D]: the one table
            if self._native_applies(ids, offsets, table):
                mean = self._mean_flags(kjt.keys())
                return self._native(args, table, mean, frame), True
        if self._row_start is not None and not self._gather_off and self._single_hot(ids, offsets):
            out = self._gather(args)
            if out is not None:
                return out, False
        return self._invoke(args, tbe.optimizer_args, self._momentum, **self._kwargs), False  # [B, Σ D]

    def _native_applies(self, ids: torch.Tensor, offsets: torch.Tensor, table: torch.Tensor) -> bool:
        """Whether the one-table call can run as :class:`OneTableLookup` (the C kernels,
        ``train.native_kernels``): plain row-wise Adagrad (no weight decay, clipping or max
        norm; checked once per optimizer-argument tuple) on a float32 host ``table [R, D]``."""
        tbe = self.tbe
        o = tbe.optimizer_args
        if self._native_checked is not o:
            self._native_checked = o
            self._native_plain = (float(o.weight_decay) == 0.0 and not o.gradient_clipping and float(o.max_norm) == 0.0)
        return self._native_plain and native.one_table_applies(
            table, tbe.momentum1_host, ids, offsets, tbe.learning_rate_tensor)

    def _mean_flags(self, keys: List[str]) -> Optional[torch.Tensor]:
        """uint8 ``[F]``: which of the call's features (``keys``, the kernel's order) are in
        :attr:`mean_spans`; None where none is (kept per key order)."""
        if not self.mean_spans:
            return None
        key = tuple(keys)
        if key not in self._means:
            averaged = {n for n, _, _ in self.mean_spans}
            flags = [k in averaged for k in keys]
            self._means[key] = torch.tensor(flags, dtype=torch.uint8) if any(flags) else None
        return self._means[key]

    def _native(self, args: Any, weights: torch.Tensor, mean: Optional[torch.Tensor] = None,
                frame: Optional[InputFrame] = None) -> torch.Tensor:
        """The one-table call through :class:`OneTableLookup` on ``weights [R, D]`` (the one
        table): fbgemm's pooled sum and exact row-wise Adagrad backward as one C pass each, bit
        for bit; the features ``mean`` flags averaged in the same passes. With a ``frame`` the
        C kernels can write, :class:`OneTableInputRows`: the dense arch's whole input."""
        tbe = self.tbe
        if self._slot is None or self._slot.numel() != weights.shape[0]:
            self._slot = torch.full((weights.shape[0],), -1, dtype=torch.int32)
        F = self._row_start.numel()  # type: ignore[union-attr]
        B = (args.offsets.numel() - 1) // F
        self.native_calls += 1
        call = (args.placeholder_autograd_tensor, weights, tbe.momentum1_host, args.indices, args.offsets, F, B,
                tbe.learning_rate_tensor, float(tbe.optimizer_args.eps), self._slot,
                self._single_hot(args.indices, args.offsets), mean)
        if frame is not None and frame.host_ready(B):
            self.input_rows_calls += 1
            plan = self._fold_plans.get(B)
            if plan is None:  # once per batch size (the table sizes read once: a host read of _row_start)
                if len(self._fold_plans) >= self.SHIFTS_KEPT:
                    self._fold_plans.pop(next(iter(self._fold_plans)))
                if self._table_rows is None or len(self._table_rows) != F:
                    starts = self._row_start.tolist()  # type: ignore[union-attr]
                    bounds = sorted(set(starts)) + [weights.shape[0]]
                    self._table_rows = [bounds[bounds.index(s) + 1] - s for s in starts]
                plan = self._fold_plans[B] = fold_plan(self._table_rows, B)
            fold = InputFold(weights, tbe.momentum1_host, args.indices, args.offsets, F, B, tbe.learning_rate_tensor,
                             call[8], self._slot, call[10], mean, frame.front, frame.scenario, frame.tables,
                             plan)
            x = OneTableInputRows.apply(*call, fold, frame.front, frame.scenario, *frame.tables)  # [B, d]
            x.input_fold = fold  # for the dense arch's first map (FoldedInputAffine)
            return x
        return OneTableLookup.apply(*call)  # [B, F·D]

    def _single_hot(self, ids: torch.Tensor, offsets: torch.Tensor) -> bool:
        """Whether every bag of the call holds exactly one id (``offsets`` 0, 1, 2, ...): checked
        on the host once per offsets tensor (the reader's single-hot batches of a buffer share
        one) and kept while that tensor is unmodified (its version counter)."""
        if ids.numel() != offsets.numel() - 1:
            return False
        seen = self._single_offsets
        if seen is not None and seen[0] is offsets and seen[1] == offsets._version:
            return True
        if offsets.device.type != "cpu" or not np.array_equal(offsets.numpy(), np.arange(offsets.numel())):
            return False
        self._single_offsets = (offsets, offsets._version)
        return True

    def _gather(self, args: Any) -> Optional[torch.Tensor]:
        """A one-table call whose every bag holds one id, as :class:`SingleHotGather` (a row
        gather; in training, fbgemm's own backward call, recorded on the first such call and
        again after the optimizer arguments change). None where fbgemm's backward made no call
        to record (the kernel is then called as always)."""
        tbe = self.tbe
        row_start = self._row_start
        assert row_start is not None
        F = row_start.numel()
        B = (args.offsets.numel() - 1) // F
        weights = tbe.weights_host.view(-1, self._dim)  # [R, D]: the one table
        backward: Optional[FusedBackward] = None
        if torch.is_grad_enabled():
            backward = self._backward
            if backward is None or backward.optimizer_args is not tbe.optimizer_args:
                backward = self._backward = FusedBackward.record(
                    lambda: self._invoke(args, tbe.optimizer_args, self._momentum, **self._kwargs),
                    args.placeholder_autograd_tensor, tbe.optimizer_args)
                if backward is None:
                    self._gather_off = True
                    return None
        self.gathers += 1
        return SingleHotGather.apply(args.placeholder_autograd_tensor, weights, args.indices, F, B, backward, args.offsets,
                                     tbe.learning_rate_tensor)  # [B, F·D]
