"""TrainingOptimizer: the nested CombinedOptimizer's updates, bit for bit, with its per-call
Python left out (dlrm_mtl/training_optimizer.py)."""

from pathlib import Path

import pytest
import torch
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from dlrm_mtl.training_optimizer import FusedAdamStep, TrainingOptimizer

ROOT = Path(__file__).resolve().parents[1]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _pair(**adam):
    """The same model and Adam twice: under torchrec's CombinedOptimizer and under ours."""
    out = []
    for cls in (CombinedOptimizer, TrainingOptimizer):
        m = _model()
        opt = cls([KeyedOptimizerWrapper(dict(m.named_parameters()), lambda p: torch.optim.Adam(p, **adam))])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # the lr changes every step
        out.append((m, opt, sched))
    return out


def _train(m, opt, sched, steps: int, skip=None) -> None:
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        opt.zero_grad()
        x = torch.randn(32, 7, generator=g)
        y = m(x)
        if skip is not None and i % 2 == 1:  # a layer without a gradient this step
            y = m[2](torch.relu(m[0](x).detach()))
        (y ** 2).mean().backward()
        opt.step()
        sched.step()


def _assert_same(a, b) -> None:
    (ma, oa, _), (mb, ob, _) = a, b
    for (n, p), q in zip(ma.named_parameters(), mb.parameters()):
        assert torch.equal(p, q), n
    _assert_equal(oa.state_dict(), ob.state_dict(), "state_dict")
    _assert_equal([{k: v for k, v in g.items() if k != "params"} for g in oa.param_groups],
                  [{k: v for k, v in g.items() if k != "params"} for g in ob.param_groups], "param_groups")


def _assert_equal(x, y, where: str) -> None:
    """Nested dicts/lists of tensors and values, tensors bit for bit."""
    if isinstance(x, dict):
        assert isinstance(y, dict) and x.keys() == y.keys(), where
        for k in x:
            _assert_equal(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            _assert_equal(u, v, f"{where}[{i}]")
    elif isinstance(x, torch.Tensor):
        assert torch.equal(x, y), where
    else:
        assert x == y, where


def _direct_steps(opt: TrainingOptimizer) -> int:
    return sum(s.direct_steps for s in opt._direct_steps if isinstance(s, FusedAdamStep))


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_fused_adam_steps_are_bit_identical_to_torchrecs_combined_optimizer(weight_decay):
    """Six steps with a changing lr: the same parameters and optimizer state, bit for bit; every
    step after the first (which creates the state) took the direct call."""
    a, b = _pair(lr=0.01, weight_decay=weight_decay, fused=True)
    _train(*a, steps=6)
    _train(*b, steps=6)
    _assert_same(a, b)
    assert _direct_steps(b[1]) == 5


@pytest.mark.parametrize("adam", [dict(lr=0.01, fused=True, amsgrad=True), dict(lr=0.01), dict(lr=0.01, fused=True, maximize=True)])
def test_what_the_direct_call_does_not_cover_takes_adams_own_step(adam):
    """amsgrad, maximize, and an Adam that is not fused: Adam's own step, the same result."""
    a, b = _pair(**adam)
    _train(*a, steps=4)
    _train(*b, steps=4)
    _assert_same(a, b)
    assert _direct_steps(b[1]) == 0


def test_a_parameter_without_a_gradient_takes_adams_own_step():
    a, b = _pair(lr=0.01, fused=True)
    _train(*a, steps=6, skip=True)
    _train(*b, steps=6, skip=True)
    _assert_same(a, b)
    assert _direct_steps(b[1]) == 2  # steps 3 and 5 (the first creates the state; 2, 4, 6 lack a grad)


def test_step_hooks_and_closures_take_the_nested_path():
    (_, _, _), (m, opt, sched) = _pair(lr=0.01, fused=True)
    called = []
    adam = opt._optims[0][1]._optimizer
    handle = adam.register_step_pre_hook(lambda o, args, kwargs: called.append(1))
    _train(m, opt, sched, steps=3)
    assert len(called) == 3 and _direct_steps(opt) == 0
    handle.remove()
    _train(m, opt, sched, steps=2)
    assert len(called) == 3 and _direct_steps(opt) == 2

    def closure():
        return torch.zeros(())
    opt.step(closure)  # torch.optim's path: Adam evaluates the closure
    assert _direct_steps(opt) == 2


def test_zero_grad_sets_the_dense_gradients_to_none():
    _, (m, opt, _) = _pair(lr=0.01, fused=True)
    m(torch.randn(4, 7)).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def test_the_schedule_reaches_the_tables_through_the_training_optimizer(synthetic_small, tmp_path):
    """In the real set-up (world of one, fused row-wise Adagrad on the tables): the optimizer is
    a TrainingOptimizer, and each step's lr (the scheduler's, changing every step) is the one
    the tables' fbgemm kernels run with and the one the dense Adam ran with."""
    from dlrm_mtl.config import Config
    from dlrm_mtl.distributed import init_distributed, shutdown_distributed
    from dlrm_mtl.train import setup_run

    cfg = Config.load([str(ROOT / "configs/demo.yaml")], [
        f"data.train={synthetic_small / 'train'}", f"data.eval={synthetic_small / 'eval'}",
        f"train.run_dir={tmp_path / 'run'}", "data.batch_size=64", "train.threads_per_rank=1", "train.progress=false",
        "train.lr_schedule=cosine", "train.epochs=1", "train.max_steps=8",
    ])
    env = init_distributed("gloo", 60, 1)
    try:
        run = setup_run(cfg, env)
        assert isinstance(run.optimizer, TrainingOptimizer)
        tbes = [m._emb_module for m in run.dmp.module.model.local_lookup.modules]  # the fbgemm kernels it calls
        assert tbes and all(hasattr(t, "get_learning_rate") for t in tbes)
        it = iter(run.train_stream)
        seen = []
        for _ in range(5):
            lr = run.scheduler.get_last_lr()  # [tables..., dense]
            run.optimizer.zero_grad()  # train_step's calls; the tables' kernels update in the backward
            seen.append((lr, [t.get_learning_rate() for t in tbes]))
            loss, _ = run.dmp(next(it))
            loss.backward()
            run.optimizer.step()
            run.scheduler.step()
        it.close()
        table_lrs = [s[0][0] for s in seen]
        assert len(set(table_lrs)) == 5  # cosine: a new rate every step
        for lr, got in seen:
            assert got == pytest.approx([lr[0]] * len(tbes), rel=1e-6)
        assert _direct_steps(run.optimizer) == 4
    finally:
        shutdown_distributed()


def test_the_step_counters_advance_as_one_tensor_and_are_packed_again_when_replaced():
    """The direct step keeps the parameters' step counters as views of one tensor and advances
    them with one ``add_`` (``_foreach_add_`` on host tensors is an ``add_`` per parameter);
    counters the state gets anew (torch.optim's ``load_state_dict`` makes new tensors) are
    packed again, and the run stays bit for bit torchrec's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Adds(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = [0, 0]  # add_, _foreach_add_

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__
            self.n[0] += name.startswith("add_")
            self.n[1] += name.startswith("_foreach_add_")
            return func(*args, **(kwargs or {}))

    def counters(adam):
        return [adam.state[p]["step"] for p in adam.param_groups[0]["params"]]

    a, b = _pair(lr=0.01, fused=True)
    _train(*a, steps=6)
    _train(*b, steps=3)
    adam = next(s.adam for s in b[1]._direct_steps if isinstance(s, FusedAdamStep))
    steps = counters(adam)
    assert len(steps) == 4 and len({s.untyped_storage().data_ptr() for s in steps}) == 1
    assert [float(s) for s in steps] == [3.0] * 4
    for p in adam.param_groups[0]["params"]:  # what a load does: new counter tensors, the same values
        adam.state[p]["step"] = adam.state[p]["step"].clone()
    m, opt, sched = b
    g = torch.Generator().manual_seed(1)
    for i in range(6):  # _train's batches, the last three of them trained
        x = torch.randn(32, 7, generator=g)
        if i < 3:
            continue
        opt.zero_grad()
        (m(x) ** 2).mean().backward()
        with Adds() as adds:
            opt.step()
        assert adds.n == [1, 0], i
        sched.step()
    _assert_same(a, b)
    packed = counters(adam)
    assert len({s.untyped_storage().data_ptr() for s in packed}) == 1 and [float(s) for s in packed] == [6.0] * 4
