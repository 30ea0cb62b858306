"""Batches packed into one host buffer each, so that a batch reaches the GPU in one copy.

A ``Batch`` holds a dozen tensors (the sparse KJT's values and lengths, dense features,
scenario ids, labels, masks, row ids, weights, ...). Copied one by one, each is its own
host-to-device transfer; pinned one by one (``Tensor.pin_memory()``), each allocates
page-locked memory per batch.

``BatchBuffers`` keeps a ring of host buffers (page-locked on GPU machines) that are
allocated once and reused. ``pack`` copies a batch's tensors into one buffer (with numpy:
single-threaded, no OpenMP team on the reader thread), each at a 64-byte aligned offset, and
returns a ``Batch`` whose tensors are views of it, with a ``BatchStorage`` attached.
``Batch.to(device)`` then sends the whole buffer in one copy and rebuilds the batch as views
of the device buffer (``copy_packed``); the KJTs keep their host-side metadata (lengths per
key, offsets per key), so nothing reads device values back. ``data.pin_memory`` turns it on
for the reader thread. It is off by default: measured on an H100, the training loop was
fastest with pageable batches copied per tensor, although one copy per step made the step
alone 25 % faster (docs/performance.md, "GPU, third round").

A buffer is reused only when (a) no ``Batch`` refers to its storage any more and (b) the copy
that read it, if any, has finished (a CUDA event recorded right after the copy was enqueued).
Until then ``pack`` takes another buffer, or allocates one: a batch held longer (a queue, a
pipeline's look-ahead) never has its memory overwritten, and the ring grows to the number of
batches alive at once.

Example::

    buffers = BatchBuffers(pin=torch.cuda.is_available())
    packed = buffers.pack(batch)                 # host: one buffer, tensors are views of it
    on_gpu = packed.to(torch.device("cuda"), non_blocking=True)   # one copy
"""

from __future__ import annotations

import inspect
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_mtl.data.batch import KJT_FIELDS, TENSOR_FIELDS

if TYPE_CHECKING:
    from dlrm_mtl.data.batch import Batch

ALIGN = 64  # bytes: every tensor starts at a multiple of this (any dtype's alignment)
_KJT_TENSORS = ("values", "weights", "lengths", "offsets")


@dataclass(frozen=True)
class Place:
    """Where one tensor lies in a buffer: ``buffer[offset : offset + nbytes]`` viewed as ``dtype``."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: Tuple[int, ...]

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass(eq=False)
class BatchStorage:
    """The buffer a packed ``Batch``'s tensors are views of, and each tensor's ``Place`` in it,
    keyed ``"dense"``, ``"sparse.values"``, ... ``on_copy(stream)`` runs right after a copy of
    the buffer was enqueued on ``stream`` (the ring records its event there)."""

    buffer: torch.Tensor  # [N] uint8
    places: Dict[str, Place]
    on_copy: Optional[Callable[[Optional[torch.cuda.Stream]], None]] = field(default=None, repr=False)


def _tensors(batch: "Batch") -> Dict[str, torch.Tensor]:
    """Every tensor of ``batch`` by name (``"sparse.values"``, ``"dense"``, ...), None fields left out."""
    out: Dict[str, torch.Tensor] = {}
    for name in KJT_FIELDS:
        kjt = getattr(batch, name)
        if kjt is None:
            continue
        if kjt._inverse_indices is not None:  # not produced by the reader; not packed
            raise ValueError(f"Batch.{name}: a KJT with inverse indices is not packed")
        for part in _KJT_TENSORS:
            t = getattr(kjt, f"_{part}")
            if t is not None:
                out[f"{name}.{part}"] = t
    for name in TENSOR_FIELDS:
        t = getattr(batch, name)
        if t is not None:
            out[name] = t
    return out


def layout(tensors: Dict[str, torch.Tensor]) -> Tuple[Dict[str, Place], int]:
    """Each tensor's ``Place`` (in the given order, 64-byte aligned) and the bytes they need."""
    places: Dict[str, Place] = {}
    end = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        places[name] = Place(end, nbytes, t.dtype, tuple(t.shape))
        end += -(-nbytes // ALIGN) * ALIGN
    return places, end


_KJT_ARGS = [p for p in inspect.signature(KeyedJaggedTensor.__init__).parameters if p != "self"]


def _kjt_with(kjt: KeyedJaggedTensor, tensors: Dict[str, Optional[torch.Tensor]]) -> KeyedJaggedTensor:
    """A KJT like ``kjt`` (keys, stride and every cached per-key list, as ``KeyedJaggedTensor.to``
    passes them) with its values / weights / lengths / offsets replaced by ``tensors``."""
    kwargs: Dict[str, Any] = {}
    for arg in _KJT_ARGS:
        if arg in _KJT_TENSORS:
            kwargs[arg] = tensors.get(arg)
        elif arg == "stride_per_key_per_rank":
            kwargs[arg] = kjt._stride_per_key_per_rank if kjt.variable_stride_per_key() else None
        elif hasattr(kjt, f"_{arg}"):
            kwargs[arg] = getattr(kjt, f"_{arg}")
    return KeyedJaggedTensor(**kwargs)


def rebuild(batch: "Batch", buffer: torch.Tensor, places: Dict[str, Place],
            storage: Optional[BatchStorage] = None) -> "Batch":
    """``batch`` with every tensor replaced by its view of ``buffer`` (host or device)."""
    from dlrm_mtl.data.batch import Batch

    views = {name: place.view(buffer) for name, place in places.items()}
    kwargs: Dict[str, Any] = {}
    for name in KJT_FIELDS:
        kjt = getattr(batch, name)
        kwargs[name] = None if kjt is None else _kjt_with(kjt, {p: views.get(f"{name}.{p}") for p in _KJT_TENSORS})
    for name in TENSOR_FIELDS:
        kwargs[name] = views.get(name)
    return Batch(**kwargs, real_rows=batch.real_rows, storage=storage)


def copy_packed(batch: "Batch", device: torch.device, non_blocking: bool = False) -> "Batch":
    """A packed ``batch`` on ``device``: its buffer copied once, the tensors views of the copy."""
    storage = batch.storage
    assert storage is not None
    buffer = storage.buffer.to(device, non_blocking=non_blocking)
    if storage.on_copy is not None and buffer.device != storage.buffer.device:
        storage.on_copy(torch.cuda.current_stream(buffer.device) if buffer.device.type == "cuda" else None)
    return rebuild(batch, buffer, storage.places)


class _Slot:
    """One buffer of the ring: reusable once its batch is gone and its last copy finished."""

    def __init__(self, nbytes: int, pin: bool) -> None:
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.storage: Optional[weakref.ReferenceType] = None  # the packed batch's storage, while alive
        self.event: Optional[Any] = None  # recorded after the last copy of the buffer was enqueued

    def free(self) -> bool:
        if self.storage is not None and self.storage() is not None:
            return False  # a Batch still refers to it (queued, or held by its consumer)
        return self.event is None or bool(self.event.query())


class BatchBuffers:
    """A growing ring of reusable host buffers that batches are packed into (see module doc).

    Args:
        pin: page-locked buffers (GPU training: the copy to the device is asynchronous).
        make_event: the event recorded after a copy (default ``torch.cuda.Event``; tests pass a
            stand-in with ``record(stream)`` and ``query()``).
    """

    def __init__(self, pin: bool = False, make_event: Optional[Callable[[], Any]] = None) -> None:
        self.pin = pin
        self.make_event = make_event or torch.cuda.Event
        self.slots: List[_Slot] = []
        self._next = 0
        self._lock = threading.Lock()  # pack (reader thread) vs on_copy (training thread)

    def _take(self, nbytes: int) -> _Slot:
        with self._lock:
            n = len(self.slots)
            for k in range(n):
                slot = self.slots[(self._next + k) % n]
                if slot.free() and slot.buffer.numel() >= nbytes:
                    self._next = (self._next + k + 1) % n
                    return slot
            for k in range(n):  # a free buffer that is too small: replace it with a larger one
                i = (self._next + k) % n
                if self.slots[i].free():
                    self.slots[i] = _Slot(_grown(nbytes), self.pin)
                    self._next = (i + 1) % n
                    return self.slots[i]
            slot = _Slot(_grown(nbytes), self.pin)
            self.slots.append(slot)
            return slot

    def pack(self, batch: "Batch") -> "Batch":
        """``batch`` copied into one buffer of the ring: a ``Batch`` of views with its storage."""
        tensors = _tensors(batch)
        places, nbytes = layout(tensors)
        slot = self._take(nbytes)
        host = slot.buffer.numpy()  # numpy copies: single-threaded, no OpenMP team on the reader thread
        for name, t in tensors.items():
            place, src = places[name], t.numpy()
            np.copyto(host[place.offset : place.offset + place.nbytes].view(src.dtype).reshape(place.shape), src)

        def on_copy(stream: Optional[torch.cuda.Stream], slot: _Slot = slot) -> None:
            event = self.make_event()
            event.record(stream)
            with self._lock:
                slot.event = event

        storage = BatchStorage(slot.buffer, places, on_copy)
        with self._lock:
            slot.storage = weakref.ref(storage)
            slot.event = None
        return rebuild(batch, slot.buffer, places, storage)


def _grown(nbytes: int) -> int:
    """Room for batches a little larger than this one (multi-hot lengths vary per batch)."""
    return max(ALIGN, -(-int(nbytes * 1.25) // ALIGN) * ALIGN)
