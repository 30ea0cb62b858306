"""The training batch: a TorchRec ``Pipelineable`` so TrainPipelineSparseDist can move it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

if TYPE_CHECKING:
    from dlrm_mtl.data.batch_buffers import BatchStorage


# the Batch fields that hold a tensor / a KJT (or None): what moving, pinning or packing a batch maps
TENSOR_FIELDS = ("dense", "scenario", "labels", "label_mask", "row_id", "weight", "oracle", "bias", "user", "group",
                 "term_labels", "term_rows")
KJT_FIELDS = ("sparse", "sequence")


@dataclass
class Batch(Pipelineable):
    """One batch of B impressions.

    Attributes:
        sparse: KJT with one key per schema sparse feature (schema order), stride B.
        dense: ``[B, Fd]`` float32, transforms already applied.
        scenario: ``[B, L]`` int64, one id per scenario level.
        labels: ``[B, T]`` float32, 0 where the label is null (see ``label_mask``).
        label_mask: ``[B, T]`` bool, False where the label is null or the row is padding.
        row_id: ``[B]`` int64 (-1 for padding rows), for exactly-once accounting.
        oracle: ``[B, T]`` float32 true conditional probabilities, when the data has them.
        weight: ``[B]`` float32 per-row weight; 0 marks a padding row.
        bias: ``[B, Fb]`` float32 position-bias features (schema ``position_bias``), or None.
        user: ``[B]`` int64 user ids (schema ``user_id``; strings hashed), or None; for GAUC.
        group: ``[B]`` int64 request-group ids (schema ``group_id``; -1 on padding rows), or
            None; for ``loss.ranking``.
        sequence: KJT with one key per schema sequence feature (schema order), stride B: the
            events of each row, oldest first, at most ``max_len``; None without sequences.
        term_labels: ``[B, K]`` float32, each loss term's label (the task's own, or 1 where
            every step of an entire-space chain holds), from ``labels`` and ``label_mask`` by
            :class:`dlrm_mtl.losses.TermInputs` (the numpy twin of
            :meth:`dlrm_mtl.losses.TermMatrices.inputs`); None unless the stream was given the
            loss's terms (``ParquetStream.set_loss_terms``). The loss then reads it instead of
            deriving it every step.
        term_rows: ``[B, K]`` float32, the row weight where the row is in the term's sample
            space, else 0 (0 on padding rows); with ``term_labels``.
        real_rows: the number of real rows (``row_id >= 0``), counted on the host by the
            reader that cut the batch (None where the batch was built otherwise): the training
            loop adds it up without an operator on the device per step.
        storage: set when the tensors are views of one host buffer (``BatchBuffers.pack``):
            ``to(device)`` then copies that buffer once instead of each tensor.
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    scenario: torch.Tensor
    labels: torch.Tensor
    label_mask: torch.Tensor
    row_id: torch.Tensor
    weight: torch.Tensor
    oracle: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    user: Optional[torch.Tensor] = None
    group: Optional[torch.Tensor] = None
    sequence: Optional[KeyedJaggedTensor] = None
    term_labels: Optional[torch.Tensor] = None
    term_rows: Optional[torch.Tensor] = None
    real_rows: Optional[int] = None
    storage: Optional["BatchStorage"] = field(default=None, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return self.dense.shape[0]

    @property
    def real(self) -> torch.Tensor:
        """``[B]`` bool: the batch's real rows (padding rows have ``row_id = -1``)."""
        return self.row_id >= 0

    @property
    def num_real_rows(self) -> int:
        return int(self.real.sum())

    def _map(self, tensor_fn: Callable[[torch.Tensor], torch.Tensor],
             kjt_fn: Callable[[KeyedJaggedTensor], KeyedJaggedTensor]) -> "Batch":
        """A batch with every tensor field (:data:`TENSOR_FIELDS`) and KJT field
        (:data:`KJT_FIELDS`) mapped, None kept; ``real_rows`` carried along, ``storage`` dropped."""
        changes = {name: None if (t := getattr(self, name)) is None else tensor_fn(t) for name in TENSOR_FIELDS}
        changes.update({name: None if (k := getattr(self, name)) is None else kjt_fn(k) for name in KJT_FIELDS})
        return dataclasses.replace(self, storage=None, **changes)

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        if self.storage is not None and self.storage.buffer.device != torch.device(device):
            from dlrm_mtl.data.batch_buffers import copy_packed

            return copy_packed(self, torch.device(device), non_blocking)  # one copy of the whole buffer
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking),
                         lambda k: k.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for name in TENSOR_FIELDS + KJT_FIELDS:
            x = getattr(self, name)
            if x is not None:
                x.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory(), lambda k: k.pin_memory())
