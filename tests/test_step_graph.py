"""StepGraph and DenseStep on CPU: the capture-free twin of the CUDA-graphed step must give
the eager step's outputs and gradients (the GPU only adds the capture itself)."""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from dlrm_mtl.config import Config, LayerConfig
from dlrm_mtl.data import ParquetStream
from dlrm_mtl.losses import EntireSpaceLoss
from dlrm_mtl.models import MultiScenarioMultiTaskModel, TrainModule
from dlrm_mtl.schema import Schema
from dlrm_mtl.step_graph import StepGraph


def _fn_and_params():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    scale = nn.Parameter(torch.tensor(2.0))
    unused = nn.Parameter(torch.ones(2))

    def fn(x, y, z):
        h = torch.tanh(lin(x)) * scale  # [B, 3]
        extra = 0.0 if z is None else z.sum()
        return (h.pow(2).sum() + (h * y).sum() + extra, h, h.detach().mean(0))

    return fn, [lin.weight, lin.bias, scale, unused]


def test_twin_gives_eager_outputs_and_gradients_over_several_calls():
    fn, params = _fn_and_params()
    x0 = torch.randn(5, 4, requires_grad=True)
    graph = StepGraph(fn, (x0, torch.randn(5, 3), None), params, capture=False)
    for step in range(3):
        x = torch.randn(5, 4, requires_grad=True)
        y = torch.randn(5, 3)
        for p in params:
            p.grad = None
        out = graph(x, y, None)
        (out[0] + out[1].sum()).backward()
        got = [x.grad.clone()] + [None if p.grad is None else p.grad.clone() for p in params]
        want_out = fn(x.detach().requires_grad_(), y, None)
        x2 = x.detach().clone().requires_grad_()
        for p in params:
            p.grad = None
        ref = fn(x2, y, None)
        (ref[0] + ref[1].sum()).backward()
        want = [x2.grad] + [p.grad for p in params]
        for o, w in zip(out, want_out):
            torch.testing.assert_close(o, w.detach(), rtol=0, atol=1e-6)
        for g, w in zip(got, want):
            if w is None:
                assert g is None  # the unused parameter gets no gradient, as in eager
            else:
                torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    assert graph.replays == 3
    # non-differentiable outputs are marked so: the mean of the detached h has no grad_fn
    assert out[2].grad_fn is None and out[0].grad_fn is not None


def test_shapes_other_than_the_recorded_ones_are_refused():
    fn, params = _fn_and_params()
    graph = StepGraph(fn, (torch.randn(5, 4, requires_grad=True), torch.randn(5, 3), None), params, capture=False)
    assert not graph.matches((torch.randn(6, 4, requires_grad=True), torch.randn(6, 3), None))
    assert not graph.matches((torch.randn(5, 4), torch.randn(5, 3), None))  # no grad wanted: eval
    assert not graph.matches((torch.randn(5, 4, requires_grad=True), torch.randn(5, 3), torch.ones(1)))
    with pytest.raises(ValueError, match="recorded shapes"):
        graph(torch.randn(6, 4, requires_grad=True), torch.randn(6, 3), None)


def _module_and_batches(data: Path, cfg: Config, n: int):
    schema = Schema.load(data / "schema.yaml")
    torch.manual_seed(1)
    model = MultiScenarioMultiTaskModel(schema, cfg.model, device=torch.device("cpu"))
    module = TrainModule(model, EntireSpaceLoss(schema, cfg.loss), cuda_graph="eager", precision=cfg.train.precision)
    stream = ParquetStream(schema, str(data / "train"), batch_size=128, shuffle_buffer_rows=0, prefetch_batches=0)
    batches = [b for _, b in zip(range(n), stream)]
    return module, batches


def _train(module: TrainModule, batches, steps: int):
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    torch.manual_seed(7)  # gate noise (AESM²) draws the same numbers on both sides
    losses = []
    for i in range(steps):
        opt.zero_grad(set_to_none=i % 2 == 0)  # both zero_grad flavours: in place and None
        loss, (logits, terms, gates, real) = module(batches[i % len(batches)])
        loss.backward()
        opt.step()
        losses.append(float(terms["loss/total"]))
    return losses


ARCHS = {
    "default": [],
    "star_mmoe": ["model.scenario_layers=[{type: star, level: leaf, out_dim: 32}]",
                  "model.task_layers=[{type: mmoe, num_experts: 3, out_dim: 16}]"],
    "aesm": ["model.scenario_layers=[{type: aesm, level: each, num_experts: 4, k_specific: 1, k_shared: 1, out_dim: 32}]",
             "model.task_layers=[{type: aesm, num_experts: 4, k_specific: 1, k_shared: 1, out_dim: 16}]"],
    "gather_routing": ["model.scenario_layers=[{type: cgc, level: each, routing: gather, out_dim: 32}]"],
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_graphed_step_trains_exactly_like_the_eager_step(synthetic_small, arch):
    """Six optimizer steps through DenseStep's step graph (CPU twin) and eagerly, from the same
    weights on the same batches: same losses, same final weights (embedding tables included,
    whose gradient leaves the graph through the pooled input)."""
    cfg = Config.load(None, ARCHS[arch])
    eager, batches = _module_and_batches(synthetic_small, cfg, 3)
    graphed = copy.deepcopy(eager)
    graphed.dense_step.cuda_graph = "graph"
    want = _train(eager, batches, 6)
    got = _train(graphed, batches, 6)
    assert graphed.dense_step.graph is not None and graphed.dense_step.graph.replays == 6
    assert eager.dense_step.graph is None
    assert got == pytest.approx(want, rel=0, abs=1e-6)
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    # evaluation (no grad) runs eagerly on the same weights
    graphed.eval()
    eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(graphed(batches[0])[1][0], eager(batches[0])[1][0], rtol=0, atol=1e-6)
    assert graphed.dense_step.graph.replays == 6


def test_a_step_recorded_on_a_short_batch_records_again_at_the_full_size(synthetic_small):
    """A run whose first step is a short batch (resumed at an epoch's short last batch) must
    not keep that shape: the next, full batch records the step again, and later full batches
    replay it (the CPU twin of the captured graph)."""
    import dataclasses

    cfg = Config.load(None, [])
    module, batches = _module_and_batches(synthetic_small, cfg, 2)
    module.dense_step.cuda_graph = "graph"
    full = batches[0]
    schema = Schema.load(synthetic_small / "schema.yaml")
    short = list(ParquetStream(schema, str(synthetic_small / "train"), batch_size=70, shuffle_buffer_rows=0,
                               prefetch_batches=0, pad_last=False))[-1]  # the epoch's short last batch
    n = short.batch_size
    assert 0 < n < full.batch_size
    module(short)[0].backward()
    assert module.dense_step.graph.static_args[0].shape[0] == n
    module(full)[0].backward()
    recorded = module.dense_step.graph
    assert recorded.static_args[0].shape[0] == full.batch_size
    module(batches[1])[0].backward()
    assert module.dense_step.graph is recorded  # a full batch replays, records nothing new
    module(short)[0].backward()  # a short one runs eagerly
    assert module.dense_step.graph is recorded



def test_bf16_keeps_loss_and_logits_in_fp32(synthetic_small):
    cfg = Config.load(None, ["train.precision=bf16"])
    module, batches = _module_and_batches(synthetic_small, cfg, 1)
    fp32 = copy.deepcopy(module)
    fp32.dense_step.precision = "fp32"
    loss, (logits, terms, _, _) = module(batches[0])
    loss32, (logits32, _, _, _) = fp32(batches[0])
    assert loss.dtype == torch.float32 and logits.dtype == torch.float32
    assert terms["loss/total"].dtype == torch.float32
    # bf16 has an 8-bit mantissa: close to fp32, but not equal (the autocast really ran)
    assert 0 < (logits - logits32).abs().max() < 0.1
    loss.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in module.parameters())


def test_unknown_modes_name_the_config_key():
    schema_cfg = Config()
    with pytest.raises(ValueError, match="train.cuda_graph"):
        from dlrm_mtl.models.dense_step import DenseStep

        DenseStep(nn.Linear(1, 1), nn.Linear(1, 1), cuda_graph="always")
    with pytest.raises(ValueError, match="train.precision"):
        DenseStep(nn.Linear(1, 1), nn.Linear(1, 1), precision="fp16")
    assert schema_cfg.train.cuda_graph == "auto" and schema_cfg.train.allow_tf32


def test_a_step_that_cannot_be_recorded_runs_eagerly_under_auto_and_raises_under_graph(synthetic_small, monkeypatch):
    import dlrm_mtl.models.dense_step as ds

    def refuse(*a, **k):
        raise RuntimeError("operation not permitted when stream is capturing\nmore lines")

    monkeypatch.setattr(ds, "StepGraph", refuse)
    cfg = Config.load(None, [])
    module, batches = _module_and_batches(synthetic_small, cfg, 1)
    step = module.dense_step
    step.cuda_graph = "graph"
    with pytest.raises(RuntimeError, match="capturing"):
        module(batches[0])
    step.cuda_graph = "auto"  # on CUDA: recording is attempted, fails, and the step runs eagerly
    monkeypatch.setattr(ds.DenseStep, "_wants_graph", lambda self, pooled: self.graph_error is None)
    with pytest.warns(UserWarning, match="could not be captured .*capturing"):
        loss, _ = module(batches[0])
    assert step.graph is None and step.graph_error == "RuntimeError: operation not permitted when stream is capturing"
    loss.backward()  # the eager step's graph
    module(batches[0])  # no second attempt, no second warning
