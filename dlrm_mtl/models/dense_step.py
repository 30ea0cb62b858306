"""The dense half of a training step, eager or replayed as CUDA graphs."""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from dlrm_mtl.step_graph import StepGraph

CUDA_GRAPH_MODES = ("auto", "graph", "eager")
PRECISIONS = ("fp32", "bf16")

Output = Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]


class DenseStep(nn.Module):
    """Dense arch + loss as one call on tensors:

    ``pooled [B, Σ D_f]``, ``dense [B, Fd]``, ``scenario [B, L]``, ``labels [B, T]``,
    ``label_mask [B, T]``, ``weight [B]``, ``bias [B, Fb]`` or None, ``group [B]`` (request
    ids for ``loss.ranking``) or None, ``term_labels, term_rows [B, K]`` (the reader's loss-term
    inputs, ``Batch.term_labels``) or None ->
    ``(loss [], logits [B, T], loss terms {name: []}, gates {name: [B, ...]})``.

    It holds no parameters of its own: ``dense_arch`` and ``loss`` stay registered where they
    are (checkpoints keep their names); this module only decides how they run.

    * ``cuda_graph`` (``auto`` | ``graph`` | ``eager``): in training (grad enabled, the recorded
      shapes), the forward and backward run as a :class:`~dlrm_mtl.step_graph.StepGraph`
      recorded on the first step. ``auto`` captures on CUDA and runs eagerly elsewhere; ``graph``
      also uses the step graph on CPU, where it runs without capture (the CPU twin). Batches
      have one size, so one recording serves a whole run (recorded again if a larger batch
      follows the first, e.g. a run resumed at a short last batch); other shapes (evaluation,
      ``torch.no_grad``, a world of one's short last batch under ``data.last_batch``) run eagerly. Under ``auto`` a function that cannot be captured
      (host synchronisation, data-dependent shapes such as ``routing: gather``) falls back to
      eager with one warning naming the error; under ``graph`` it raises.
    * ``precision`` (``fp32`` | ``bf16``): bf16 autocasts the dense arch; the logits and the
      auxiliary losses return to fp32 before the loss, so the loss and the metrics are fp32.
      Deviation from plain ``torch.autocast`` use: its weight cache is off (a cast weight
      cached across a graph replay would be stale).

    In the graphed step the gates come back detached (they are only logged in training).

    Example::

        step = DenseStep(model.dense_arch, loss, cuda_graph="graph")
        loss_value, logits, terms, gates = step(pooled, dense, scenario, labels, mask, weight, None)
        loss_value.backward()
    """

    def __init__(self, dense_arch: nn.Module, loss: nn.Module, cuda_graph: str = "auto", precision: str = "fp32") -> None:
        super().__init__()
        if cuda_graph not in CUDA_GRAPH_MODES:
            raise ValueError(f"train.cuda_graph {cuda_graph!r}: expected one of {CUDA_GRAPH_MODES}")
        if precision not in PRECISIONS:
            raise ValueError(f"train.precision {precision!r}: expected one of {PRECISIONS}")
        self._parts = (dense_arch, loss)  # a tuple: not registered as submodules
        if hasattr(loss, "bind_shared"):  # gradnorm / pareto read the arch's last shared layer
            loss.bind_shared(dense_arch)
        self.cuda_graph = cuda_graph
        self.precision = precision
        self.graph: Optional[StepGraph] = None
        self.graph_error: Optional[str] = None  # why ``auto`` fell back to eager
        self._names: Tuple[List[str], List[str]] = ([], [])

    # ------------------------------------------------------------------ eager

    def _dense(self, pooled: torch.Tensor, dense: torch.Tensor, scenario: torch.Tensor):
        arch = self._parts[0]
        if self.precision == "fp32":
            return arch(pooled, dense, scenario)
        with torch.autocast(device_type=pooled.device.type, dtype=torch.bfloat16, cache_enabled=False):
            logits, gates, aux = arch(pooled, dense, scenario)
        return logits.float(), gates, {k: v.float() for k, v in aux.items()}

    def eager(self, pooled, dense, scenario, labels, label_mask, weight, bias, group=None, term_labels=None,
              term_rows=None) -> Output:
        logits, gates, aux = self._dense(pooled, dense, scenario)
        # group: read only by a ranking term; term_labels / term_rows: the reader's, or None
        loss, terms = self._parts[1](logits, labels, label_mask, weight, scenario, aux, bias, group,
                                     term_labels=term_labels, term_rows=term_rows)
        return loss, logits, terms, gates

    def _flat(self, *args: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        loss, logits, terms, gates = self.eager(*args)
        self._names = (list(terms), list(gates))
        return (loss, logits, *terms.values(), *(g.detach() for g in gates.values()))

    # ------------------------------------------------------------------ graphed

    def _wants_graph(self, pooled: torch.Tensor) -> bool:
        if not (self.training and torch.is_grad_enabled()) or self.graph_error is not None:
            return False
        if getattr(self._parts[1], "needs_eager", False):  # per-task gradients inside the step
            return False
        return self.cuda_graph == "graph" or (self.cuda_graph == "auto" and pooled.is_cuda)

    def _record(self, args: Tuple[Optional[torch.Tensor], ...]) -> None:
        params = [p for part in self._parts for p in part.parameters()]
        buffers = [b for part in self._parts for b in part.buffers()]
        capture = args[0].is_cuda
        try:
            self.graph = StepGraph(self._flat, args, params, capture=capture, buffers=buffers)
        except Exception as e:  # noqa: BLE001 - any capture failure: eager under auto
            if self.cuda_graph == "graph":
                raise
            self.graph_error = f"{type(e).__name__}: {e}".splitlines()[0]
            warnings.warn(f"train.cuda_graph auto: the dense step could not be captured ({self.graph_error}); it runs eagerly")

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor, scenario: torch.Tensor, labels: torch.Tensor,
                label_mask: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                group: Optional[torch.Tensor] = None, term_labels: Optional[torch.Tensor] = None,
                term_rows: Optional[torch.Tensor] = None) -> Output:
        args = (pooled, dense, scenario, labels, label_mask, weight, bias, group, term_labels, term_rows)
        if self._wants_graph(pooled):
            fits = self.graph is not None and self.graph.matches(args)
            if not fits and (self.graph is None or pooled.shape[0] > self.graph.static_args[0].shape[0]):
                # the first step, or a larger batch after a first short one (a run resumed at an
                # epoch's short last batch under data.last_batch: short): record at this size
                self._record(args)
                fits = self.graph is not None  # recorded from these very arguments
            if fits:
                assert self.graph is not None
                out = self.graph(*args)
                term_names, gate_names = self._names
                t = len(term_names)
                return out[0], out[1], dict(zip(term_names, out[2:2 + t])), dict(zip(gate_names, out[2 + t:]))
        return self.eager(*args)
