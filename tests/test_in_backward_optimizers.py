"""The tables' in-backward optimizer without ``torch.distributed.optim``'s package import
(``dlrm_mtl.distributed.in_backward_optimizers``): the same attributes and the same updates
as PyTorch's own function, and a world of one never imports the package."""

import subprocess
import sys
import textwrap

import torch
from torch import nn

from dlrm_mtl.distributed import IN_BACKWARD_MODULE, in_backward_optimizers


def _train_once(apply, seed: int = 0):
    torch.manual_seed(seed)
    layer = nn.Linear(4, 3)
    apply(torch.optim.SGD, layer.parameters(), {"lr": 0.5})
    before = [p.detach().clone() for p in layer.parameters()]
    layer(torch.randn(5, 4)).square().sum().backward()
    return layer, before


def test_light_module_attaches_and_fires_like_pytorchs():
    light = in_backward_optimizers(ddp=False)
    assert light.__name__ != IN_BACKWARD_MODULE  # loaded from its file, not through the package
    ours, before = _train_once(light._apply_optimizer_in_backward)
    import importlib

    real = importlib.import_module(IN_BACKWARD_MODULE)
    theirs, _ = _train_once(real._apply_optimizer_in_backward)
    for p, q, b in zip(ours.parameters(), theirs.parameters(), before):
        assert p._optimizer_classes == q._optimizer_classes == [torch.optim.SGD]
        assert p._optimizer_kwargs == q._optimizer_kwargs == [{"lr": 0.5}]
        assert len(p._in_backward_optimizers) == 1 and isinstance(p._in_backward_optimizers[0], torch.optim.SGD)
        assert p.grad is None and q.grad is None  # the hook stepped and cleared the gradient
        assert not torch.equal(p.detach(), b)  # it moved ...
        assert torch.equal(p.detach(), q.detach())  # ... exactly as PyTorch's function moves it


def test_ddp_gets_the_module_its_package_imports():
    assert in_backward_optimizers(ddp=True) is sys.modules[IN_BACKWARD_MODULE]


def test_world_of_one_shard_model_does_not_import_the_package(synthetic_small, tmp_path):
    """The real set-up path of a world of one (planner, DMP, local lookup, fused Adam) runs
    without ``torch.distributed.optim`` (its package import costs ~0.3 s of start-up)."""
    code = textwrap.dedent(f"""
        import sys
        from dlrm_mtl.config import Config
        from dlrm_mtl.distributed import init_distributed, shutdown_distributed
        from dlrm_mtl.train import setup_run
        cfg = Config.load(None, ["data.train={synthetic_small / 'train'}", "data.eval={synthetic_small / 'eval'}",
                                 "train.run_dir={tmp_path / 'run'}"])
        env = init_distributed("gloo", 60, 1)
        run = setup_run(cfg, env)
        names = [n for n, p in run.dmp.named_parameters() if hasattr(p, "_in_backward_optimizers")]
        assert names, "no table parameter carries its fused optimizer"
        shutdown_distributed()
        print("IMPORTED", "torch.distributed.optim" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "IMPORTED False" in out.stdout, out.stdout[-2000:]
