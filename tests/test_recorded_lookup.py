"""RecordedLookup: the tables' fbgemm kernel called with the arguments its module built on the
first call trains bit for bit like the module's own forward, and steps aside where it cannot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _cfg(data: Path, run: Path, *sets: str):
    from dlrm_mtl.config import Config

    return Config.load([str(ROOT / "configs/demo.yaml")], [
        f"data.train={data / 'train'}", f"data.eval={data / 'eval'}", f"train.run_dir={run}",
        "data.batch_size=64", "train.threads_per_rank=1", "train.progress=false",
        "train.lr_schedule=cosine", "train.epochs=1", "train.max_steps=8", *sets,
    ])


def _state(run) -> dict:
    """Everything a step changes: the dense parameters, and per kernel its weights, Adagrad
    state and counters."""
    model = run.dmp.module.model
    out = {f"dense.{k}": v.detach().clone() for k, v in model.dense_arch.state_dict().items()}
    for i, emb in enumerate(model.local_lookup.modules):
        t = emb._emb_module
        out[f"{i}.weights"] = t.weights_host.detach().clone()
        out[f"{i}.momentum1"] = t.momentum1_host.detach().clone()
        out[f"{i}.counters"] = (int(t.iter.item()), int(t.iter_cpu.item()), t.step, t.timestep,
                                float(t.get_learning_rate()))
    return out


def _train_step(run, batch) -> torch.Tensor:
    """One training step of ``run`` on ``batch`` (as ``train_step`` runs it) -> the loss."""
    run.optimizer.zero_grad()
    loss, _ = run.dmp(batch)
    loss.backward()
    run.optimizer.step()
    run.scheduler.step()
    return loss.detach()


def _train_alike(runs, steps: int) -> list:
    """Trains two runs step by step on their own streams and asserts after every step that
    they are identical bit for bit (loss, :func:`_state`) -> the streams, still open."""
    streams = [iter(r.train_stream) for r in runs]
    for step in range(steps):
        losses = [_train_step(r, next(it)) for r, it in zip(runs, streams)]
        assert torch.equal(losses[0], losses[1]), step
        a, b = _state(runs[0]), _state(runs[1])
        for k in a:
            assert _same(a[k], b[k], False), (step, k)
    return streams


def _same(a, b, one_table: bool) -> bool:
    if not isinstance(a, torch.Tensor):
        return a == b
    if not one_table:
        return torch.equal(a, b)
    # one table: fbgemm's shared-table backward adds each row's squares up in another order
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("one_table", [False, True])
def test_replayed_kernel_calls_train_like_the_module(synthetic_small, tmp_path, monkeypatch, one_table):
    """Two identical runs, one calling each kernel through its replay, one through the module:
    after every step (cosine schedule: a new table learning rate each step, so a stale rate
    would show) the losses, dense weights, tables, Adagrad state and counters are identical —
    bit for bit, or with ``one_table`` (fbgemm's shared-table backward) to float rounding
    after the same first forward; a checkpoint-style reset of ``iter_cpu`` is resynced from
    ``iter`` the same way."""
    from dlrm_mtl.distributed import init_distributed, shutdown_distributed
    from dlrm_mtl.models import recorded_lookup
    from dlrm_mtl.models.recorded_lookup import RecordedLookup
    from dlrm_mtl.train import setup_run

    monkeypatch.setattr(recorded_lookup, "ONE_TABLE_BACKWARD", one_table)
    env = init_distributed("gloo", 60, 1)
    try:
        runs = [setup_run(_cfg(synthetic_small, tmp_path / name), env) for name in ("replay", "module")]
        replay, module = (r.dmp.module.model.local_lookup for r in runs)
        assert replay.calls and all(isinstance(c, RecordedLookup) and c.one_table == one_table for c in replay.calls)
        module.calls = list(module.modules)  # the module's own forward
        streams = [iter(r.train_stream) for r in runs]
        a, b = _state(runs[0]), _state(runs[1])
        assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
        for step in range(7):
            if step == 4:  # as after loading a checkpoint: iter_cpu 0, iter elsewhere
                for r in runs:
                    for emb in r.dmp.module.model.local_lookup.modules:
                        emb._emb_module.iter_cpu.zero_()
                        emb._emb_module.iter.fill_(100)
            losses = [_train_step(r, next(it)) for r, it in zip(runs, streams)]
            assert _same(losses[0], losses[1], one_table and step > 1), step  # steps 0, 1: the same tables
            a, b = _state(runs[0]), _state(runs[1])
            for k in a:
                assert _same(a[k], b[k], one_table), (step, k, a[k] if not isinstance(a[k], torch.Tensor) else "")
            if step == 0:
                after_first = b  # the module run after step 0
            if one_table and step == 6:  # the replay's tables moved as the module's did, not just a little
                k = "0.weights"
                assert (a[k] - b[k]).abs().max() < 1e-3 * (a[k] - after_first[k]).abs().max()
        assert all(c.replays == 6 and not c.disabled for c in replay.calls)  # the first call records
        # one table where asked for (the synthetic tables share one dim and lie back to back)
        assert all((c._row_start is not None) == one_table for c in replay.calls)
        counters = [_state(runs[0])[f"{i}.counters"] for i in range(len(replay.calls))]
        assert all(c[0] == 103 and c[1] == 103 and c[2] == 7 for c in counters)
        for it in streams:
            it.close()
    finally:
        shutdown_distributed()


def test_a_call_it_cannot_replay_goes_to_the_module(synthetic_small, tmp_path):
    """Ids of another dtype than the kernel's, and a forward hook on the kernel module, take the
    module's forward (same result); replaced weights are recorded again."""
    from dlrm_mtl.distributed import init_distributed, shutdown_distributed
    from dlrm_mtl.train import setup_run

    env = init_distributed("gloo", 60, 1)
    try:
        run = setup_run(_cfg(synthetic_small, tmp_path / "run"), env)
        lookup = run.dmp.module.model.local_lookup
        call, emb = lookup.calls[0], lookup.modules[0]
        it = iter(run.train_stream)
        batch = next(it)
        kjt = batch.sparse.split(lookup.splits)[0] if len(lookup.splits) > 1 else batch.sparse
        with torch.no_grad():
            first = call(kjt)  # records
            assert call.replays == 0 and call._common is not None
            assert torch.equal(call(kjt), first) and call.replays == 1
            as_int32 = type(kjt)(keys=kjt.keys(), values=kjt.values().to(torch.int32), lengths=kjt.lengths())
            assert torch.equal(call(as_int32), first) and call.replays == 1
            seen = []
            handle = emb.register_forward_hook(lambda *_: seen.append(1))
            assert torch.equal(call(kjt), first) and seen == [1] and call.replays == 1
            handle.remove()
            tbe = emb._emb_module
            tbe.weights_host = torch.nn.Parameter(tbe.weights_host.detach().clone())  # new tensor, same values
            assert torch.equal(call(kjt), first) and call.replays == 1  # recorded again
            assert call._common.host_weights is tbe.weights_host
            assert torch.equal(call(kjt), first) and call.replays == 2
        it.close()
    finally:
        shutdown_distributed()


@pytest.mark.parametrize("mode", ["warning", "fatal"])
def test_a_bounds_checked_kernel_is_not_replayed(synthetic_small, tmp_path, mode):
    from dlrm_mtl.distributed import init_distributed, shutdown_distributed
    from dlrm_mtl.train import setup_run

    env = init_distributed("gloo", 60, 1)
    try:
        run = setup_run(_cfg(synthetic_small, tmp_path / "run", f"sharding.bounds_check={mode}"), env)
        lookup = run.dmp.module.model.local_lookup
        assert lookup.calls == lookup.modules
    finally:
        shutdown_distributed()


@pytest.mark.parametrize("choice,expected", [("one_table", True), ("per_table", False)])
def test_cpu_backward_config_picks_the_path(synthetic_small, tmp_path, choice, expected):
    """``sharding.cpu_backward`` overrides the CPU-vendor default either way."""
    from dlrm_mtl.distributed import init_distributed, shutdown_distributed
    from dlrm_mtl.train import setup_run

    env = init_distributed("gloo", 60, 1)
    try:
        run = setup_run(_cfg(synthetic_small, tmp_path / "run", f"sharding.cpu_backward={choice}"), env)
        calls = run.dmp.module.model.local_lookup.calls
        assert calls and all(c.one_table == expected for c in calls)
    finally:
        shutdown_distributed()


def test_one_table_records_through_the_same_path_as_it_replays(synthetic_small, tmp_path):
    """A run resumed in a new process records its kernel calls again: with ``one_table`` that
    recording call must update the tables through the one-table path like every replay, or a
    resumed run would not train bit for bit like an uninterrupted one. Two replaying runs, one
    made to record again after step 3: identical after every step."""
    from dlrm_mtl.distributed import init_distributed, shutdown_distributed
    from dlrm_mtl.train import setup_run

    env = init_distributed("gloo", 60, 1)
    try:
        runs = [setup_run(_cfg(synthetic_small, tmp_path / name, "sharding.cpu_backward=one_table"), env)
                for name in ("again", "once")]
        streams = [iter(r.train_stream) for r in runs]
        for step in range(6):
            if step == 3:
                for call in runs[0].dmp.module.model.local_lookup.calls:
                    call._common = None  # as in a new process: the next call records
            for r, it in zip(runs, streams):
                _train_step(r, next(it))
            a, b = _state(runs[0]), _state(runs[1])
            for k in a:
                assert _same(a[k], b[k], False), (step, k)
        calls = runs[0].dmp.module.model.local_lookup.calls
        assert all(c._row_start is not None and c.replays == 4 for c in calls)  # recorded at steps 0 and 3
        for it in streams:
            it.close()
    finally:
        shutdown_distributed()


def test_one_table_shift_from_the_host_counts_equals_the_operator_formula():
    """``_shift`` (each id's table offset kept per ids-per-feature counts that came twice in a
    row, from the batch's host ``length_per_key``) gives the ids ``_shifted`` computes with
    operators, reuses its shift for repeated counts, keeps at most ``SHIFTS_KEPT`` of them,
    and computes counts seen once, or a KJT without host counts, with ``_shifted``."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from dlrm_mtl.models.recorded_lookup import RecordedLookup

    look = RecordedLookup.__new__(RecordedLookup)  # only the layout state _shift reads
    look._row_start = torch.tensor([0, 10, 30, 31])
    look._shifts, look._last_counts = {}, None
    g = torch.Generator().manual_seed(0)

    def kjt(lengths, host=True):
        lengths = torch.tensor(lengths)
        values = torch.randint(0, 10, (int(lengths.sum()),), generator=g)
        per_key = lengths.view(4, -1).sum(1).tolist()
        return KeyedJaggedTensor(keys=list("abcd"), values=values, lengths=lengths, stride=3,
                                 length_per_key=per_key if host else None)

    # the second has the first's counts per key in other bags (the shift is the same), the
    # third other counts
    kept = []
    for lengths in ([1] * 12, [1, 0, 2, 1, 1, 1, 0, 0, 3, 1, 1, 1], [1] * 12, [1, 0, 2, 1, 1, 1, 0, 0, 1, 1, 1, 1],
                    [1, 0, 2, 1, 1, 1, 0, 0, 1, 1, 1, 1], [0] * 12, [1] * 12):
        k = kjt(lengths)
        got = look._shift(k, k.values(), k.offsets())
        assert torch.equal(got, RecordedLookup._shifted(k.values(), k.offsets(), look._row_start))
        kept.append(sorted(look._shifts))
    # the second batch has the first's counts per key in other bags: its shift is kept and
    # reused; (3, 3, 1, 3) is kept on its second batch in a row; (0, 0, 0, 0) came once
    assert kept[0] == [] and kept[1] == [(3, 3, 3, 3)] and kept[3] == [(3, 3, 3, 3)]
    assert kept[-1] == [(3, 3, 1, 3), (3, 3, 3, 3)]
    a = kjt([1] * 12)
    shift = look._shifts[(3, 3, 3, 3)]
    assert torch.equal(look._shift(a, a.values(), a.offsets()) - a.values(), shift)
    for n in range(RecordedLookup.SHIFTS_KEPT + 2):  # distinct counts, twice each: the oldest leave
        for _ in range(2):
            k = kjt([1] * 11 + [n])
            assert torch.equal(look._shift(k, k.values(), k.offsets()),
                               RecordedLookup._shifted(k.values(), k.offsets(), look._row_start))
    assert len(look._shifts) == RecordedLookup.SHIFTS_KEPT and (3, 3, 3, 2 + RecordedLookup.SHIFTS_KEPT + 1) in look._shifts
    bare = kjt([2, 1, 0, 1, 1, 1, 1, 1, 1, 0, 1, 1], host=False)
    assert bare.length_per_key_or_none() is None
    assert torch.equal(look._shift(bare, bare.values(), bare.offsets()),
                       RecordedLookup._shifted(bare.values(), bare.offsets(), look._row_start))


def _single_hot_schema(data: Path, out: Path) -> Path:
    """``data``'s schema without its multi-hot feature: every bag of the kernel holds one id."""
    from dataclasses import replace

    from dlrm_mtl.schema import Schema

    schema = Schema.load(data / "schema.yaml")
    single = replace(schema, sparse=[f for f in schema.sparse if not f.multi_hot])
    assert single.sparse and len(single.sparse) < len(schema.sparse)
    path = out / "schema_single_hot.yaml"
    single.save(path)
    return path


def test_single_id_bags_gather_and_train_like_the_kernel(synthetic_small, tmp_path):
    """A kernel whose every bag holds one id (single-hot features, one table) looks its rows up
    with a gather and updates them with fbgemm's own backward call: two identical runs, one
    gathering, one calling the kernel's forward, are identical bit for bit after every step
    (losses, dense weights, tables, Adagrad state, counters; cosine schedule: a new table
    learning rate every step), and so is a lookup without autograd (evaluation). The gather's
    output takes an in-place division of some of its columns, as mean pooling divides a
    multi-hot feature whose bags all happen to hold one id, and trains like the kernel's. (The
    path where the C kernels are off or not built: tests/test_native.py has theirs.)"""
    from dlrm_mtl.distributed import init_distributed, shutdown_distributed
    from dlrm_mtl.models.recorded_lookup import RecordedLookup
    from dlrm_mtl.train import setup_run

    schema = _single_hot_schema(synthetic_small, tmp_path)
    env = init_distributed("gloo", 60, 1)
    try:
        runs = [setup_run(_cfg(synthetic_small, tmp_path / name, "sharding.cpu_backward=one_table", f"data.schema={schema}",
                               "train.native_kernels=false"), env) for name in ("gather", "kernel")]
        gather, kernel = (r.dmp.module.model.local_lookup.calls for r in runs)
        assert gather and all(isinstance(c, RecordedLookup) for c in gather + kernel)
        for c in kernel:
            c._single_hot = lambda ids, offsets: False  # the kernel's own forward every call
        streams = _train_alike(runs, 7)
        assert all(c.gathers == 6 and c.replays == 6 for c in gather)  # the first call records
        assert all(c.gathers == 0 for c in kernel)
        # without autograd (evaluation): the gather, no backward recorded for it
        batch = next(streams[0])
        with torch.no_grad():
            outs = [r.dmp.module.model.local_lookup(batch.sparse) for r in runs]
        assert torch.equal(outs[0], outs[1]) and all(c.gathers == 7 for c in gather)
        # mean pooling's in-place division of a feature's columns (mean_of_bags), then a backward
        for r in runs:
            pooled = r.dmp.module.model.local_lookup(batch.sparse)  # [B, Σ D]
            pooled[:, 16:32].div_(torch.arange(1, pooled.shape[0] + 1, dtype=pooled.dtype).unsqueeze(1))
            pooled.pow(2).sum().backward()
        assert all(c.gathers == 8 for c in gather)
        a, b = _state(runs[0]), _state(runs[1])
        for k in a:
            assert _same(a[k], b[k], False), k
        for it in streams:
            it.close()
    finally:
        shutdown_distributed()


def test_single_hot_is_every_bag_one_id_and_follows_in_place_changes():
    """``_single_hot`` needs offsets 0, 1, 2, ...: as many ids as bags with one bag empty and
    another of two is not; an offsets tensor found single-hot is not checked again until it is
    modified in place."""
    from dlrm_mtl.models.recorded_lookup import RecordedLookup

    look = RecordedLookup.__new__(RecordedLookup)  # only the state _single_hot reads
    look._single_offsets = None
    ids = torch.arange(6)
    ones = torch.arange(7)
    assert look._single_hot(ids, ones) and look._single_offsets[0] is ones
    assert not look._single_hot(ids, torch.tensor([0, 0, 2, 3, 4, 5, 6]))  # an empty bag, a bag of two
    assert not look._single_hot(torch.arange(5), ones)  # fewer ids than bags
    assert look._single_hot(ids, ones)
    ones[2] = 1  # modified in place: checked again
    assert not look._single_hot(ids, ones)


def test_fused_backward_records_fbgemms_call_without_running_it(synthetic_small, tmp_path):
    """``FusedBackward.record`` keeps the arguments of fbgemm's backward call (the module's
    weights and Adagrad state among them) and leaves the tables and their state untouched; a
    forward whose backward makes no such call records nothing."""
    from dlrm_mtl.distributed import init_distributed, shutdown_distributed
    from dlrm_mtl.models.single_hot_gather import FusedBackward
    from dlrm_mtl.train import setup_run

    env = init_distributed("gloo", 60, 1)
    try:
        run = setup_run(_cfg(synthetic_small, tmp_path / "run", "sharding.cpu_backward=one_table"), env)
        call = run.dmp.module.model.local_lookup.calls[0]
        it = iter(run.train_stream)
        _train_step(run, next(it))  # records the kernel call
        tbe = call.tbe
        before = (tbe.weights_host.detach().clone(), tbe.momentum1_host.detach().clone())
        kjt = next(it).sparse
        args = call._common._replace(indices=call._shift(kjt, kjt.values(), kjt.offsets()), offsets=kjt.offsets(),
                                     learning_rate_tensor=tbe.learning_rate_tensor)
        backward = FusedBackward.record(lambda: call._invoke(args, tbe.optimizer_args, call._momentum, **call._kwargs),
                                        args.placeholder_autograd_tensor, tbe.optimizer_args)
        assert backward is not None and backward.optimizer_args is tbe.optimizer_args
        assert any(a is tbe.weights_host for a in backward.args) and any(a is tbe.momentum1_host for a in backward.args)
        assert torch.equal(tbe.weights_host, before[0]) and torch.equal(tbe.momentum1_host, before[1])
        leaf = torch.zeros(3, requires_grad=True)
        assert FusedBackward.record(lambda: leaf * 2, leaf, None) is None
        it.close()
    finally:
        shutdown_distributed()
