"""shared_input_affine / SharedInputAffine: one product for several affine maps of one input
(ReLU after some) gives the separate products' outputs and gradients; MMoE uses it for its
experts' first layer and its gate."""

import pytest
import torch

from dlrm_mtl.modules import shared_affine
from dlrm_mtl.modules.mmoe import MMoELayer
from dlrm_mtl.modules.shared_affine import shared_input_affine


def _maps(d, sizes, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(d, n, dtype=torch.float64, generator=g).requires_grad_(requires_grad),
             torch.randn(n, dtype=torch.float64, generator=g).requires_grad_(requires_grad)) for n in sizes]


@pytest.mark.parametrize("relu", [(), (True,), (True, False, True)])
@pytest.mark.parametrize("unused", [None, 1])
def test_one_product_equals_the_separate_maps(relu, unused):
    torch.manual_seed(0)
    x = torch.randn(16, 5, dtype=torch.float64, requires_grad=True)
    maps = _maps(5, [4, 3, 2])
    flags = list(relu) + [False] * (3 - len(relu))
    joined = shared_input_affine(x, maps, relu=relu)
    separate = [torch.addmm(b, x, w) for w, b in maps]
    separate = [y.relu() if r else y for y, r in zip(separate, flags)]
    weights = [torch.randn_like(y) for y in separate]
    for a, b in zip(joined, separate):
        assert a.shape == b.shape and torch.equal(a, b)
    params = [x] + [t for m in maps for t in m]

    def grads(outs):
        loss = sum((y * w).sum() for i, (y, w) in enumerate(zip(outs, weights)) if i != unused)
        g = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if d is None else d for p, d in zip(params, g)]  # an unused map's: 0

    for a, b in zip(grads(joined), grads(separate)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_outputs_may_not_be_modified_in_place():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    a, _ = shared_input_affine(x, _maps(3, [2, 2]))
    with pytest.raises(RuntimeError):
        a.relu_()


def test_gradcheck():
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    (w1, b1), (w2, b2) = _maps(4, [3, 2])
    # ReLU's kink: keep the first block's pre-activations away from 0
    b1 = (b1.detach() + 3.0).requires_grad_()
    f = lambda x, w1, b1, w2, b2: tuple(shared_input_affine(x, [(w1, b1), (w2, b2)], relu=[True]))  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w1, b1, w2, b2))


@pytest.mark.parametrize("gate,one_gate,hidden", [("softmax", False, []), ("softmax", True, [8]), ("topk", False, [6]),
                                                  ("noisy", False, [])])
def test_mmoe_reads_its_input_once_with_the_same_result(gate, one_gate, hidden, monkeypatch):
    """MMoE's joined path (experts' layer 0 and gate logits in one product) against its separate
    path: the same outputs, gate weights and gradients; a noisy gate in training keeps the
    separate path (its noise scale is another map of the input)."""
    torch.manual_seed(0)
    layer = MMoELayer(12, num_tasks=2, num_experts=4, hidden=hidden, out_dim=6, one_gate=one_gate, gate=gate, top_k=2).double()
    layer.eval()  # the noisy gate without noise
    x = torch.randn(32, 12, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 32, 6, dtype=torch.float64)
    calls = []
    real = shared_affine.SharedInputAffine.apply
    monkeypatch.setattr(shared_affine.SharedInputAffine, "apply", lambda *a: calls.append(1) or real(*a))

    def run(joined):
        if not joined:
            layer._reads_once = lambda task_in: False
        out = layer(x)
        loss = (out.y * r).sum() + out.gates[""].pow(2).sum()
        params = [x] + [p for p in layer.parameters() if p.requires_grad]
        g = torch.autograd.grad(loss, params, allow_unused=True)
        layer.__dict__.pop("_reads_once", None)
        return out, g

    a, ga = run(True)
    assert len(calls) == 1
    b, gb = run(False)
    assert len(calls) == 1
    torch.testing.assert_close(a.y, b.y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.gates[""], b.gates[""], rtol=1e-12, atol=1e-12)
    for p, q in zip(ga, gb):
        assert (p is None) == (q is None)
        if p is not None:
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # evaluation and export: the plain modules, the same forward
        c = layer(x)
    assert len(calls) == 1 and torch.equal(c.y, a.y.detach())
    if gate == "noisy":
        layer.train()
        layer(x)
        assert len(calls) == 1  # training noise: the separate products


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA twin of the test above")
def test_mmoe_joined_path_on_cuda_and_in_a_cuda_graph(monkeypatch):
    """On a GPU: the joined path's outputs and gradients equal the separate path's (fp32, TF32
    off), and the same forward + backward recorded in a CUDA graph (as ``train.cuda_graph``
    records the dense step) replays to the eager results."""
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    torch.manual_seed(0)
    layer = MMoELayer(48, num_tasks=2, num_experts=4, hidden=[32], out_dim=16).to(dev).train()
    x = torch.randn(256, 48, device=dev, requires_grad=True)
    r = torch.randn(2, 256, 16, device=dev)
    params = [x] + list(layer.parameters())
    calls = []
    real = shared_affine.SharedInputAffine.apply
    monkeypatch.setattr(shared_affine.SharedInputAffine, "apply", lambda *a: calls.append(1) or real(*a))

    def step():
        out = layer(x)
        loss = (out.y * r).sum() + out.gates[""].pow(2).sum()
        # detached: nothing keeps this step's autograd graph (whose leaf nodes belong to the
        # stream that made them) alive into the capture
        return (out.y.detach(),) + torch.autograd.grad(loss, params)

    joined = step()
    assert len(calls) == 1  # the joined path runs on CUDA
    layer._reads_once = lambda task_in: False
    separate = step()
    del layer._reads_once
    for a, b in zip(joined, separate):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, joined):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
