"""BatchBuffers: a batch packed into one reused host buffer is the same batch, reaches a device
in one copy, and its buffer is never overwritten while a batch or a pending copy still uses it."""

from __future__ import annotations

import gc
import itertools
from pathlib import Path
from typing import List, Optional

import pytest
import torch

from dlrm_mtl.data.batch import Batch
from dlrm_mtl.data.batch_buffers import ALIGN, BatchBuffers, copy_packed, rebuild
from dlrm_mtl.data.stream import ParquetStream
from dlrm_mtl.schema import Schema


def _batches(data: Path, n: int, **kw) -> List[Batch]:
    schema = Schema.load(data / "schema.yaml")
    stream = ParquetStream(schema, str(data / "train"), 256, shuffle_buffer_rows=2000, seed=1, **kw)
    it = iter(stream)
    try:
        return list(itertools.islice(it, n))
    finally:
        it.close()


def _kjt_state(kjt):
    return (kjt.keys(), kjt.stride(), kjt._length_per_key, kjt._offset_per_key,
            [None if t is None else t.clone() for t in (kjt._values, kjt._weights, kjt._lengths, kjt._offsets)])


def _same(a: Batch, b: Batch) -> None:
    """Every tensor equal (dtype and shape included), KJT keys, stride and per-key caches equal."""
    for name in ("dense", "scenario", "labels", "label_mask", "row_id", "weight", "oracle", "bias", "user", "group"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), name
    for name in ("sparse", "sequence"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is None:
            continue
        sx, sy = _kjt_state(x), _kjt_state(y)
        assert sx[:4] == sy[:4], name
        for tx, ty in zip(sx[4], sy[4]):
            assert (tx is None) == (ty is None)
            if tx is not None:
                assert tx.dtype == ty.dtype and torch.equal(tx, ty), name
    assert a.real_rows == b.real_rows and a.real_rows is not None  # the reader's host count travels along


def _in(buffer: torch.Tensor, t: torch.Tensor) -> bool:
    lo = buffer.data_ptr()
    return lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= lo + buffer.numel()


@pytest.mark.parametrize("which", ["plain", "sequence"])
def test_packed_batch_is_the_same_batch(which, synthetic_small, synthetic_seq):
    data = synthetic_small if which == "plain" else synthetic_seq
    original = _batches(data, 3, prefetch_batches=0)
    if which == "sequence":
        assert original[0].sequence is not None
    buffers = BatchBuffers()
    for b in original:
        p = buffers.pack(b)
        _same(p, b)
        buf = p.storage.buffer
        views = [p.dense, p.labels, p.label_mask, p.row_id, p.weight, p.scenario, p.sparse.values(), p.sparse.lengths()]
        for t in views:  # all in the one buffer, each at an aligned offset
            assert _in(buf, t) and (t.data_ptr() - buf.data_ptr()) % ALIGN == 0
        # what copy_packed does on the other side of the copy: views of a second buffer
        _same(rebuild(p, buf.clone(), p.storage.places), b)
        _same(p.to(torch.device("cpu")), b)  # same device: no copy, the same views


class FakeEvent:
    """A CUDA event stand-in: ``done`` is what ``query()`` answers."""

    made: List["FakeEvent"] = []

    def __init__(self) -> None:
        self.done = False
        self.stream: Optional[object] = "unset"
        FakeEvent.made.append(self)

    def record(self, stream=None) -> None:
        self.stream = stream

    def query(self) -> bool:
        return self.done


def test_a_buffer_is_reused_only_when_its_batch_and_copy_are_done(synthetic_small):
    FakeEvent.made = []
    a, b, c = _batches(synthetic_small, 3, prefetch_batches=0)
    buffers = BatchBuffers(make_event=FakeEvent)
    pa = buffers.pack(a)
    pb = buffers.pack(b)  # a is alive: another buffer
    assert len(buffers.slots) == 2 and pb.storage.buffer.data_ptr() != pa.storage.buffer.data_ptr()
    _same(pa, a)  # not overwritten by b
    first = pa.storage.buffer.data_ptr()
    del pa
    gc.collect()
    pc = buffers.pack(c)  # a is gone and was never copied: its buffer is reused
    assert len(buffers.slots) == 2 and pc.storage.buffer.data_ptr() == first
    _same(pc, c)

    # a copy in flight: the batch is dropped, but its buffer waits for the copy's event
    pc.storage.on_copy(None)  # what copy_packed calls right after enqueueing the copy
    (event,) = FakeEvent.made
    del pc
    gc.collect()
    pb_ptr = pb.storage.buffer.data_ptr()
    pa2 = buffers.pack(a)  # b alive, c's copy pending: a third buffer
    assert len(buffers.slots) == 3 and pa2.storage.buffer.data_ptr() not in (first, pb_ptr)
    del pa2
    gc.collect()
    event.done = True
    pa3 = buffers.pack(a)  # c's copy finished: c's buffer (or a2's, both free) is reused
    assert len(buffers.slots) == 3
    _same(pa3, a)
    _same(pb, b)  # b, alive all along, was never touched


def test_a_larger_batch_gets_a_larger_buffer(synthetic_small):
    small, = _batches(synthetic_small, 1, prefetch_batches=0)
    buffers = BatchBuffers()
    p = buffers.pack(small)
    size = p.storage.buffer.numel()
    del p
    gc.collect()
    schema = Schema.load(synthetic_small / "schema.yaml")
    big = next(iter(ParquetStream(schema, str(synthetic_small / "train"), 2048, prefetch_batches=0)))
    q = buffers.pack(big)
    assert q.storage.buffer.numel() > size and len(buffers.slots) == 1  # the free, too small one replaced
    _same(q, big)


def test_stream_reader_thread_packs_the_same_batches(synthetic_small):
    """The reader thread's packing (unpinned here: no GPU) yields the batches of an unpacked
    stream, shuffle and two epochs included, each in its own buffer while it is held."""
    schema = Schema.load(synthetic_small / "schema.yaml")

    def epochs(pack: bool) -> List[List[Batch]]:
        s = ParquetStream(schema, str(synthetic_small / "train"), 512, shuffle_buffer_rows=3000, seed=7,
                          prefetch_batches=3, num_workers=1)
        if pack:
            s.buffers = BatchBuffers()
        out = []
        for ep in range(2):
            s.set_epoch(ep)
            out.append(list(s))  # every batch held: none of their buffers may be reused
        return out

    plain, packed = epochs(False), epochs(True)
    assert [len(e) for e in plain] == [len(e) for e in packed] and len(plain[0]) > 5
    for pe, qe in zip(plain, packed):
        for p, q in zip(pe, qe):
            assert p.storage is None and q.storage is not None
            _same(q, p)
    assert len({q.storage.buffer.data_ptr() for e in packed for q in e}) == sum(len(e) for e in packed)


def test_copy_packed_is_one_copy_then_views(synthetic_small):
    """To another device the buffer is copied once, the batch rebuilt as views of the copy, and
    the ring's event recorded after the copy; to the buffer's own device nothing is copied or
    recorded. ``meta`` stands in for the GPU (a copy with shapes and dtypes, no data)."""
    FakeEvent.made = []
    b, = _batches(synthetic_small, 1, prefetch_batches=0)
    p = BatchBuffers(make_event=FakeEvent).pack(b)
    same = copy_packed(p, torch.device("cpu"))
    assert FakeEvent.made == [] and same.dense.data_ptr() == p.dense.data_ptr()
    moved = p.to(torch.device("meta"), non_blocking=True)
    assert len(FakeEvent.made) == 1 and FakeEvent.made[0].stream is None  # recorded (no CUDA stream on meta)
    for name in ("dense", "scenario", "labels", "label_mask", "row_id", "weight", "oracle"):
        x, y = getattr(moved, name), getattr(b, name)
        assert x.device.type == "meta" and x.dtype == y.dtype and x.shape == y.shape, name
    kjt = moved.sparse
    assert kjt.values().device.type == "meta" and kjt.values().shape == b.sparse.values().shape
    assert kjt.keys() == b.sparse.keys() and kjt._length_per_key == b.sparse._length_per_key  # no read-back needed
    # one buffer: every tensor of the moved batch is a view of the same storage
    assert len({t.untyped_storage().data_ptr() for t in (moved.dense, moved.labels, kjt.values(), kjt.lengths())}) == 1


def test_the_field_lists_cover_every_batch_field():
    """Moving, pinning and packing map TENSOR_FIELDS and KJT_FIELDS: a new tensor field of
    Batch must be in one of them (else it would be dropped on the way to the device)."""
    import dataclasses

    from dlrm_mtl.data.batch import KJT_FIELDS, TENSOR_FIELDS

    names = {f.name for f in dataclasses.fields(Batch)} - {"real_rows", "storage"}
    assert names == set(TENSOR_FIELDS) | set(KJT_FIELDS) and not set(TENSOR_FIELDS) & set(KJT_FIELDS)
