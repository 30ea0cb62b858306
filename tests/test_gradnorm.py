"""GradNorm (Chen et al., ICML 2018; dlrm_mtl/loss_balancing.py): the weight update against
a hand computation and against a direct autograd implementation of eq. 1–2 on a tiny model
over several steps, the loss's use and logging of w, its checkpoint state, the choice of the
last shared layer, two ranks (DDP) against one process, and the config checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dlrm_mtl.config import Config, ConfigError, LayerConfig, LossConfig, ModelConfig, check_values
from dlrm_mtl.loss_balancing import GradNormWeighting, gradnorm_update, shared_layer_path

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------- references


def reference_step(losses: torch.Tensor, W, w: torch.Tensor, initial: torch.Tensor, alpha: float, lr: float):
    """Eq. 1–2 written out with autograd: G_k = ‖∇_W (w_k L_k)‖ with a graph to w, the target
    Ḡ r^α detached, L_grad = Σ|G − target|, w ← w − lr ∇_w L_grad, renormalised to Σ w = K."""
    w = w.clone().requires_grad_(True)
    G = []
    for k in range(losses.shape[0]):
        grads = torch.autograd.grad(w[k] * losses[k], W, retain_graph=True, create_graph=True)
        G.append(torch.cat([g.reshape(-1) for g in grads]).norm())
    G = torch.stack(G)
    L_tilde = losses.detach() / initial
    r = L_tilde / L_tilde.mean()
    target = (G.mean() * r ** alpha).detach()
    l_grad = (G - target).abs().sum()
    (grad_w,) = torch.autograd.grad(l_grad, w)
    new = (w - lr * grad_w).detach()
    return new * (len(new) / new.sum()), l_grad.detach()


class TinyShared(nn.Module):
    """shared Linear (3 -> 5) + ReLU, one head per task (a regression and a binary task)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(3, 5)
        self.heads = nn.Linear(5, 2)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self.heads(torch.relu(self.shared(x)))  # [B, 2]
        mse = ((z[:, 0] - y[:, 0]) ** 2).mean()
        bce = nn.functional.binary_cross_entropy_with_logits(z[:, 1], y[:, 1])
        return torch.stack([3.0 * mse, bce])  # [2] (scales differ on purpose)


def test_update_by_hand():
    """w = (1, 1), ‖∇_W L‖ = (2, 1), L(t)/L(0) = (0.5, 0.9), α = 1, lr = 0.1:
    G = (2, 1), Ḡ = 1.5, r = (0.5, 0.9)/0.7, target = Ḡ r = (1.0714, 1.9286),
    ∂L_grad/∂w = (+2, −1), w = (0.8, 1.1) -> renormalised 2 · w / 1.9."""
    w, l_grad = gradnorm_update(torch.ones(2), torch.tensor([2.0, 1.0]), torch.tensor([0.5, 0.9]), torch.ones(2), alpha=1.0, lr=0.1)
    torch.testing.assert_close(w, torch.tensor([0.8, 1.1]) * 2 / 1.9)
    assert float(l_grad) == pytest.approx(abs(2 - 1.5 * 0.5 / 0.7) + abs(1 - 1.5 * 0.9 / 0.7), rel=1e-6)
    # α = 0: the target is Ḡ for every task (pure gradient-norm equalisation)
    w, _ = gradnorm_update(torch.ones(2), torch.tensor([2.0, 1.0]), torch.tensor([0.5, 0.9]), torch.ones(2), alpha=0.0, lr=0.1)
    torch.testing.assert_close(w, torch.tensor([0.8, 1.1]) * 2 / 1.9)
    # equal norms and equal rates: nothing to correct
    w, l_grad = gradnorm_update(torch.tensor([1.5, 0.5]), torch.tensor([1.0, 3.0]), torch.ones(2), torch.ones(2), alpha=1.5, lr=0.1)
    torch.testing.assert_close(w, torch.tensor([1.5, 0.5]))
    assert float(l_grad) == 0.0


@pytest.mark.parametrize("alpha", [0.0, 1.5])
def test_weights_follow_the_autograd_reference_over_steps(alpha):
    """GradNormWeighting on a tiny model, trained 6 SGD steps with its weights, against the
    direct implementation fed the same losses: w(t) used at every step, w(t+1) kept, L(0) from
    the first step, L_grad logged."""
    model = TinyShared()
    bal = GradNormWeighting(2, alpha=alpha, lr=0.05, shared_layer="shared")
    bal.bind(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w_ref, initial = torch.ones(2), None
    g = torch.Generator().manual_seed(2)
    moved = False
    for _ in range(6):
        x = torch.randn(32, 3, generator=g)
        y = torch.stack([x.sum(1), (x[:, 0] > 0).float()], 1)
        losses = model.losses(x, y)
        if initial is None:
            initial = losses.detach().clone()
        new_ref, l_grad_ref = reference_step(losses, list(model.shared.parameters()), w_ref, initial, alpha, 0.05)
        w = bal(losses)
        torch.testing.assert_close(w, w_ref)  # this step's loss uses w(t)
        torch.testing.assert_close(bal.weight, new_ref, atol=1e-6, rtol=1e-6)  # w(t+1)
        torch.testing.assert_close(bal.initial, initial)
        torch.testing.assert_close(bal.last_terms["gradnorm/l_grad"], l_grad_ref, atol=1e-6, rtol=1e-5)
        assert float(bal.weight.sum()) == pytest.approx(2.0, abs=1e-6)
        moved = moved or not torch.allclose(new_ref, torch.ones(2))
        opt.zero_grad()
        (w * losses).sum().backward()
        opt.step()
        w_ref = new_ref
    assert moved


def _synthetic(weighting: str = "gradnorm", model: ModelConfig = None, **kw):
    from dlrm_mtl.losses import EntireSpaceLoss
    from dlrm_mtl.models.dense_step import DenseStep
    from dlrm_mtl.models.ranking_model import DenseArch
    from dlrm_mtl.synthetic import synthetic_schema

    schema = synthetic_schema()
    torch.manual_seed(0)
    if model is None:
        model = ModelConfig(dense_arch=[8], scenario_emb_dim=4, tower=[8])
        model.scenario_layers[0].out_dim = 16
        model.task_layers[0].out_dim = 8
    arch = DenseArch(schema, model)
    loss = EntireSpaceLoss(schema, LossConfig(weighting=weighting, **kw))
    return schema, arch, loss, DenseStep(arch, loss, cuda_graph="eager")


def _batch(schema, seed: int, B: int = 64):
    g = torch.Generator().manual_seed(seed)
    width = sum(f.dim for f in schema.sparse)
    labels = (torch.rand(B, 2, generator=g) < 0.3).float()
    labels[:, 1] *= labels[:, 0]
    scenario = torch.stack([torch.randint(0, lv.num_values, (B,), generator=g) for lv in schema.scenarios], 1)
    return (torch.randn(B, width, generator=g), torch.randn(B, len(schema.dense), generator=g), scenario, labels,
            torch.ones(B, 2, dtype=torch.bool), torch.ones(B), None)


def _run(step, arch, loss, schema, seeds) -> list:
    opt = torch.optim.SGD(list(arch.parameters()), lr=0.05)
    logged = []
    for s in seeds:
        total, _, terms, _ = step(*_batch(schema, s))
        logged.append(torch.stack([terms[f"loss_weight/{n}"] for n in loss.term_names]))
        opt.zero_grad()
        total.backward()
        opt.step()
    return logged


def test_entire_space_loss_trains_with_w_and_logs_it():
    """Through DenseStep: the total is Σ w_k L_k with this step's w (static weights 1), the
    logged loss_weight/<term> are w, Σ w = K, gradnorm/l_grad is logged, evaluation keeps w."""
    schema, arch, loss, step = _synthetic(gradnorm_lr=0.5)
    assert loss.needs_eager and loss.balancer.path == "scenario_layers.1"
    w_before = loss.balancer.weight.clone()
    args = _batch(schema, 0)
    total, _, terms, _ = step(*args)
    L = torch.stack([terms[f"loss/{n}"] for n in loss.term_names])
    torch.testing.assert_close(total.detach(), (w_before * L).sum())
    assert "gradnorm/l_grad" in terms
    total.backward()
    logged = _run(step, arch, loss, schema, range(1, 6))
    assert all(abs(float(w.sum()) - 2) < 1e-5 for w in logged)
    assert not torch.allclose(logged[-1], torch.ones(2))
    loss.eval()
    with torch.no_grad():
        _, _, terms, _ = step(*_batch(schema, 9))
    torch.testing.assert_close(torch.stack([terms[f"loss_weight/{n}"] for n in loss.term_names]), loss.balancer.weight)


def test_state_is_in_the_checkpoint_and_resumes_exactly():
    """w and L(0) are persistent under gradnorm only; 3 + 3 steps with a state-dict round trip
    in between give the weights of 6 uninterrupted steps."""
    from dlrm_mtl.losses import EntireSpaceLoss
    from dlrm_mtl.synthetic import synthetic_schema

    schema, arch, loss, step = _synthetic(gradnorm_lr=0.5)
    assert {"balancer.weight", "balancer.initial"} <= set(loss.state_dict())
    assert not any(k.startswith("balancer.") for k in EntireSpaceLoss(synthetic_schema(), LossConfig()).state_dict())
    straight = _run(step, arch, loss, schema, range(6))

    schema, arch, loss, step = _synthetic(gradnorm_lr=0.5)
    first = _run(step, arch, loss, schema, range(3))
    saved = {k: v.clone() for k, v in loss.state_dict().items()}
    arch_state = {k: v.clone() for k, v in arch.state_dict().items()}
    schema, arch2, loss2, step2 = _synthetic(gradnorm_lr=0.5)
    loss2.load_state_dict(saved)
    arch2.load_state_dict(arch_state)
    second = _run(step2, arch2, loss2, schema, range(3, 6))
    # SGD carries no state, so the resumed run is the same computation
    for a, b in zip(straight, first + second):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(straight[-1], torch.ones(2))


@pytest.mark.parametrize("layers, expected", [
    ({}, "scenario_layers.1"),  # default: a scenario CGC layer per level, then CGC over tasks
    ({"scenario_layers": [], "task_layers": [LayerConfig(type="mmoe", num_experts=2, out_dim=8)]}, "dense_mlp"),
    ({"scenario_layers": [], "task_layers": [LayerConfig(type="shared_bottom", out_dim=8)]}, "task_layers.0"),
])
def test_the_last_shared_layer(layers, expected):
    from dlrm_mtl.models.ranking_model import DenseArch
    from dlrm_mtl.synthetic import synthetic_schema

    arch = DenseArch(synthetic_schema(), ModelConfig(dense_arch=[8], tower=[8], **layers))
    assert shared_layer_path(arch) == expected
    assert shared_layer_path(arch, "task_layers.0") == "task_layers.0"  # named in config
    with pytest.raises(ConfigError) as e:
        shared_layer_path(arch, "scenario_layers.7")
    assert e.value.key == "loss.shared_layer" and "'scenario_layers.7' is not a module" in str(e.value)


def test_an_arch_without_a_shared_layer_is_refused(synthetic_small):
    from dlrm_mtl.config import check
    from dlrm_mtl.schema import Schema

    base = [f"data.train={synthetic_small / 'train'}", "loss.weighting=gradnorm", "model.interaction=concat",
            "model.dense_arch=[]", "model.scenario_layers=[]", "model.task_layers=[{type: mmoe, num_experts: 2}]"]
    schema = Schema.load(synthetic_small / "schema.yaml")
    with pytest.raises(ConfigError) as e:
        check(Config.load(None, base), schema)
    assert e.value.key == "loss.shared_layer" and "no shared layer with weights" in str(e.value)
    check(Config.load(None, base + ["loss.shared_layer=task_layers.0.experts"]), schema)  # MMoE's experts, named


@pytest.mark.parametrize("overrides, key, words", [
    (["loss.weighting=gradnorm", "loss.gradnorm_lr=0"], "loss.gradnorm_lr", "> 0"),
    (["loss.weighting=gradnorm", "loss.gradnorm_alpha=-1"], "loss.gradnorm_alpha", ">= 0"),
    (["loss.weighting=gradnorm", "train.cuda_graph=graph"], "train.cuda_graph", "gradnorm"),
    (["loss.weighting=gradnrom"], "loss.weighting", "'gradnrom'"),
])
def test_config_values_are_checked(overrides, key, words):
    from dlrm_mtl.synthetic import synthetic_schema

    with pytest.raises(ConfigError) as e:
        check_values(Config.load(None, overrides), synthetic_schema())
    assert e.value.key == key and words in str(e.value) and "\n" not in str(e.value)


def test_gradnorm_config_example_composes_with_the_demo(synthetic_small):
    from dlrm_mtl.config import check
    from dlrm_mtl.schema import Schema

    cfg = Config.load([str(ROOT / "configs/demo.yaml"), str(ROOT / "configs/gradnorm.yaml")], [f"data.train={synthetic_small / 'train'}"])
    assert cfg.loss.weighting == "gradnorm"
    check(cfg, Schema.load(synthetic_small / "schema.yaml"))


# ---------------------------------------------------------------------------- 2 ranks (DDP)

WORKER = r'''
import json, sys
sys.path.insert(0, sys.argv[4]); sys.path.insert(0, sys.argv[5])
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
rank, world, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + out + ".store", rank=rank, world_size=world)
torch.set_num_threads(1)
from test_gradnorm import Net, data
res = {}
for weighting in ("gradnorm", "pareto"):
    net = Net(weighting)
    # as TorchRec's DMP wraps the dense part: static graph, bucket views, no buffer broadcast
    ddp = DistributedDataParallel(net, static_graph=True, gradient_as_bucket_view=True, broadcast_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    weights, grads = [], []
    for step in range(4):
        x, y = data(step, rank)
        opt.zero_grad()
        total, w = ddp(x, y)
        total.backward()
        weights.append(w.tolist())
        grads.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]).tolist())
        opt.step()
    res[weighting] = {"weights": weights, "grads": grads}
with open(f"{out}.{rank}.json", "w") as fh:
    json.dump(res, fh)
dist.destroy_process_group()
'''


class Net(nn.Module):
    """A shared layer, two heads and the weighting inside the module DDP wraps (as the loss
    sits inside DMP's TrainModule): forward -> (Σ w_k L_k, w)."""

    def __init__(self, weighting: str) -> None:
        super().__init__()
        from dlrm_mtl.loss_balancing import ParetoWeighting

        torch.manual_seed(0)
        self.shared = nn.Linear(3, 6)
        self.heads = nn.Linear(6, 2)
        self.bal = (GradNormWeighting(2, alpha=1.5, lr=0.2, shared_layer="shared") if weighting == "gradnorm"
                    else ParetoWeighting([0.2, 0.1], shared_layer="shared"))
        self.bal.bind(self)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        z = self.heads(torch.relu(self.shared(x)))  # [B, 2]
        losses = torch.stack([((z[:, 0] - y[:, 0]) ** 2).mean(),
                              nn.functional.binary_cross_entropy_with_logits(z[:, 1], y[:, 1])])
        w = self.bal(losses) if self.training else self.bal.weight
        return (w * losses).sum(), w


def data(step: int, rank: int):
    """Rank ``rank``'s half of step ``step``'s batch (equal halves: the global loss is the mean)."""
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(16, 3, generator=g) * (1 + rank)  # the ranks' data differ on purpose
    return x, torch.stack([x.sum(1), (x[:, 1] > 0).float()], 1)


@pytest.mark.slow
def test_two_ranks_use_the_weights_one_process_computes_on_the_whole_batch(tmp_path):
    """GradNorm and PE-LTR under DDP (gloo, 2 processes, different data per rank): both ranks
    get the same weights at every step, equal to one process training on both halves (the
    per-task gradients are averaged over the ranks as DDP averages the step's gradient), and
    DDP's gradients are those of Σ w_k L_k (the extra backward passes leave them alone)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = str(tmp_path / "res")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", out, str(ROOT), str(ROOT / "tests")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for p in procs:
        stdout, _ = p.communicate(timeout=240)
        assert p.returncode == 0, stdout[-3000:]
    ranks = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(2)]
    for weighting in ("gradnorm", "pareto"):
        assert ranks[0][weighting]["weights"] == ranks[1][weighting]["weights"]  # bit-identical
        net = Net(weighting)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for step in range(4):
            halves = [data(step, r) for r in range(2)]
            opt.zero_grad()
            z = [net.heads(torch.relu(net.shared(x))) for x, _ in halves]
            losses = torch.stack([  # the global loss: the mean of the ranks' (equal-size) halves
                sum(((zz[:, 0] - y[:, 0]) ** 2).mean() for zz, (_, y) in zip(z, halves)) / 2,
                sum(nn.functional.binary_cross_entropy_with_logits(zz[:, 1], y[:, 1]) for zz, (_, y) in zip(z, halves)) / 2,
            ])
            w = net.bal(losses)
            (w * losses).sum().backward()
            torch.testing.assert_close(torch.tensor(ranks[0][weighting]["weights"][step]), w, atol=1e-5, rtol=1e-5)
            grad = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
            torch.testing.assert_close(torch.tensor(ranks[0][weighting]["grads"][step]), grad, atol=1e-5, rtol=1e-4)
            opt.step()
        if weighting == "gradnorm":
            assert ranks[0][weighting]["weights"][-1] != [1.0, 1.0]
