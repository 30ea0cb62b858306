"""Task layers (CGC, PLE, MMoE, OMoE, Shared-Bottom, separate) against hand-written references."""

from __future__ import annotations

import pytest
import torch

from dlrm_mtl.modules import MMoELayer, PLELayer, SharedBottomLayer

from test_modules import ATOL, reference_expert, reference_gate_logits


def manual_extraction(net, task_in, shared_in):
    """One extraction network by loops over tasks and experts (PLE eq. 2-5)."""
    T, E_sh, E_sp = net.num_tasks, net.num_shared, net.num_specific
    if net.task_gate is None:  # one expert per task: weight 1
        g = task_in.new_ones(task_in.shape[1], T, 1)
    else:
        g = torch.softmax(reference_gate_logits(net.task_gate, task_in), dim=-1)  # [B, T, E]
    outs = []
    for t in range(T):
        experts = [reference_expert(net.shared, k, shared_in) for k in range(E_sh)]
        experts += [reference_expert(net.specific, t * E_sp + j, task_in[t]) for j in range(E_sp)]
        outs.append(sum(g[:, t, k : k + 1] * experts[k] for k in range(E_sh + E_sp)))
    shared_out = None
    if net.shared_gate is not None:
        gs = torch.softmax(reference_gate_logits(net.shared_gate, shared_in), dim=-1)[:, 0]  # [B, E_all]
        pool = [reference_expert(net.shared, k, shared_in) for k in range(E_sh)]
        pool += [reference_expert(net.specific, t * E_sp + j, task_in[t]) for t in range(T) for j in range(E_sp)]
        shared_out = sum(gs[:, k : k + 1] * pool[k] for k in range(len(pool)))
    return torch.stack(outs), shared_out, g


@pytest.mark.parametrize("T,E_sh,E_sp", [(3, 2, 2), (2, 1, 1), (2, 0, 2), (2, 2, 0)])
def test_cgc_shapes_gates_and_manual_formula(T, E_sh, E_sp):
    torch.manual_seed(8)
    cgc = PLELayer(5, num_tasks=T, num_shared=E_sh, num_specific=E_sp, hidden=[6], out_dim=4, levels=1).double()  # CGC
    x = torch.randn(7, 5, dtype=torch.float64)
    out = cgc(x)
    gates = out.gates["level0/task"]
    assert out.y.shape == (T, 7, 4) and gates.shape == (7, T, E_sh + E_sp)
    assert set(out.gates) == {"level0/task"}  # CGC has no shared gate
    torch.testing.assert_close(gates.sum(-1), torch.ones(7, T, dtype=torch.float64), atol=1e-6, rtol=0)
    y_ref, _, g_ref = manual_extraction(cgc.levels[0], x.unsqueeze(0).expand(T, 7, 5), x)
    torch.testing.assert_close(gates, g_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.y, y_ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["zero", "perturb"])
def test_cgc_gate_support_excludes_other_tasks_specific_experts(mode):
    """Task k's gate covers shared + its own experts only: changing task 1's experts moves task 1 alone."""
    T, E_sp = 3, 2
    torch.manual_seed(9)
    cgc = PLELayer(5, num_tasks=T, num_shared=2, num_specific=E_sp, hidden=[6], out_dim=4, levels=1).double()
    x = torch.randn(8, 5, dtype=torch.float64)
    y0 = cgc(x).y
    sl = slice(1 * E_sp, 2 * E_sp)
    with torch.no_grad():
        for w, b in zip(cgc.levels[0].specific.weights, cgc.levels[0].specific.biases):
            if mode == "zero":
                w[sl].zero_(), b[sl].zero_()
            else:
                w[sl].add_(torch.randn_like(w[sl])), b[sl].add_(torch.randn_like(b[sl]))
    y1 = cgc(x).y
    assert not torch.allclose(y1[1], y0[1])
    torch.testing.assert_close(y1[[0, 2]], y0[[0, 2]], atol=0, rtol=0)


def test_cgc_rejects_no_experts():
    with pytest.raises(ValueError):
        PLELayer(4, num_tasks=2, num_shared=0, num_specific=0, hidden=[], out_dim=3, levels=1)


@pytest.mark.parametrize("levels", [2, 3])
def test_ple_matches_stacked_manual_levels_and_shared_gate_spans_all_experts(levels):
    torch.manual_seed(10)
    T, E_sh, E_sp = 2, 2, 1
    ple = PLELayer(5, num_tasks=T, num_shared=E_sh, num_specific=E_sp, hidden=[], out_dim=4, levels=levels).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    out = ple(x)
    assert out.y.shape == (T, 6, 4)
    task_in, shared_in = x.unsqueeze(0).expand(T, 6, 5), x
    for l, net in enumerate(ple.levels):
        task_in, shared_out, g = manual_extraction(net, task_in, shared_in)
        torch.testing.assert_close(out.gates[f"level{l}/task"], g, atol=ATOL, rtol=0)
        if l < levels - 1:
            # every level but the last: a shared gate over *all* experts (shared + every task's)
            assert out.gates[f"level{l}/shared"].shape == (6, 1, E_sh + T * E_sp)
            shared_in = shared_out
        else:
            assert f"level{l}/shared" not in out.gates and net.shared_gate is None
    torch.testing.assert_close(out.y, task_in, atol=ATOL, rtol=0)


def test_ple_higher_level_task_experts_read_their_own_task_input():
    """Level 1's task-1 experts read level 0's task-1 output: perturbing task 0's level-0
    specific expert changes task 0's level-1 output and (via the shared gate) task 1's too,
    but with no shared gate at level 0 (CGC stack of 1) task 1 would stay put."""
    torch.manual_seed(11)
    ple = PLELayer(5, num_tasks=2, num_shared=1, num_specific=1, hidden=[], out_dim=4, levels=2).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    y0 = ple(x).y
    with torch.no_grad():
        ple.levels[0].specific.biases[0][0].add_(1.0)  # task 0's level-0 expert
    y1 = ple(x).y
    assert not torch.allclose(y1[0], y0[0])
    assert not torch.allclose(y1[1], y0[1])  # reaches task 1 through level 0's shared gate


def test_ple_rejects_shared_gate_without_shared_experts():
    with pytest.raises(ValueError, match="shared"):
        PLELayer(4, num_tasks=2, num_shared=0, num_specific=1, hidden=[], out_dim=3, levels=2)


def test_mmoe_matches_manual_formula():
    torch.manual_seed(12)
    T, E = 3, 4
    mmoe = MMoELayer(5, num_tasks=T, num_experts=E, hidden=[6], out_dim=4).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    out = mmoe(x)
    g = torch.softmax(reference_gate_logits(mmoe.gate, x), dim=-1)  # [B, T, E]
    experts = [reference_expert(mmoe.experts, k, x) for k in range(E)]
    y_ref = torch.stack([sum(g[:, t, k : k + 1] * experts[k] for k in range(E)) for t in range(T)])
    torch.testing.assert_close(out.gates[""], g, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.y, y_ref, atol=ATOL, rtol=0)
    assert not torch.allclose(out.y[0], out.y[1])  # tasks have their own gates


def test_omoe_has_one_gate_shared_by_all_tasks():
    torch.manual_seed(13)
    omoe = MMoELayer(5, num_tasks=3, num_experts=4, hidden=[], out_dim=4, one_gate=True).double()
    out = omoe(torch.randn(7, 5, dtype=torch.float64))
    assert out.gates[""].shape == (7, 1, 4)
    torch.testing.assert_close(out.y[0], out.y[1], atol=0, rtol=0)
    torch.testing.assert_close(out.y[1], out.y[2], atol=0, rtol=0)


def test_mmoe_with_one_expert_equals_shared_bottom_with_the_same_weights():
    torch.manual_seed(14)
    sb = SharedBottomLayer(5, num_tasks=2, hidden=[7], out_dim=4).double()
    mmoe = MMoELayer(5, num_tasks=2, num_experts=1, hidden=[7], out_dim=4).double()
    mmoe.experts.load_state_dict(sb.bottom.state_dict())
    x = torch.randn(9, 5, dtype=torch.float64)
    out = mmoe(x)
    torch.testing.assert_close(out.gates[""], torch.ones(9, 2, 1, dtype=torch.float64), atol=0, rtol=0)
    torch.testing.assert_close(out.y, sb(x).y, atol=ATOL, rtol=0)


def test_task_layers_accept_per_task_input():
    """Stacked after another task layer ([T, B, d]): task t's gate reads x[t]."""
    torch.manual_seed(15)
    mmoe = MMoELayer(5, num_tasks=2, num_experts=3, hidden=[], out_dim=4).double()
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    out = mmoe(x)
    g = torch.softmax(reference_gate_logits(mmoe.gate, x), dim=-1)
    torch.testing.assert_close(out.gates[""], g, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="task rows"):
        mmoe(torch.randn(3, 6, 5, dtype=torch.float64))


@pytest.mark.parametrize("make", [
    lambda: PLELayer(5, 2, 2, 1, [6], 4, levels=1),
    lambda: PLELayer(5, 2, 2, 1, [6], 4, levels=2),
    lambda: MMoELayer(5, 2, 3, [6], 4),
    lambda: MMoELayer(5, 2, 3, [], 4, one_gate=True),
    lambda: SharedBottomLayer(5, 2, [6], 4),
])
def test_gradients_reach_every_parameter(make):
    torch.manual_seed(16)
    layer = make()
    out = layer(torch.randn(32, 5))
    (out.y * torch.randn_like(out.y)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("hidden", [[], [3, 4]])
def test_ple_pool_of_both_banks_at_once_equals_the_banks_apart(hidden):
    """On a shared input (level 0) the shared and task experts run as one bank over their
    concatenated weights (no cat of two outputs): the same outputs, gates and parameter
    gradients as each bank on its own."""
    torch.manual_seed(12)
    ple = PLELayer(5, num_tasks=2, num_shared=2, num_specific=2, hidden=hidden, out_dim=4, levels=2).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    w = torch.randn(2, 7, 4, dtype=torch.float64)
    results = []
    for fuse in (True, False):
        for net in ple.levels:
            net._fuse_pool = fuse
        ple.zero_grad()
        out = ple(x)
        (out.y * w).sum().backward()
        results.append((out.y.detach(), {k: v.detach() for k, v in out.gates.items()},
                        {n: p.grad.clone() for n, p in ple.named_parameters()}))
    (y1, g1, p1), (y2, g2, p2) = results
    torch.testing.assert_close(y1, y2, atol=1e-12, rtol=0)
    assert g1.keys() == g2.keys() and all(torch.allclose(g1[k], g2[k], atol=1e-12, rtol=0) for k in g1)
    assert p1.keys() == p2.keys() and all(torch.allclose(p1[n], p2[n], atol=1e-12, rtol=0) for n in p1)
    assert any(p1[n].abs().sum() > 0 for n in p1 if ".shared." in n) and any(p1[n].abs().sum() > 0 for n in p1 if ".specific." in n)


@pytest.mark.parametrize("E_sh,E_sp,hidden,levels", [(2, 1, [], 2), (2, 2, [3, 4], 3), (0, 2, [5], 1), (3, 0, [], 2),
                                                      (1, 1, [4], 2), (0, 1, [], 1)])
def test_ple_with_the_c_mixture_trains_like_the_aten_path(E_sh, E_sp, hidden, levels):
    """With the C kernels PLE leaves its banks' last ReLU to the mixture and hands it the banks'
    outputs as they lie (``mix_expert_parts``); without them it keeps ReLU, ``cat``, the batched
    matmul and ``split``. Outputs, gates and every parameter's and the input's gradient agree
    (one expert per task and nothing shared, the last case, is no mixture at all)."""
    from dlrm_mtl import native

    if not native.built():
        pytest.skip("the C kernels are not built")
    torch.manual_seed(7)
    ple = PLELayer(6, num_tasks=3, num_shared=E_sh, num_specific=E_sp, hidden=hidden, out_dim=5, levels=levels)
    x = torch.randn(37, 6)
    up = torch.randn(3, 37, 5)
    res = []
    was = native.available()
    try:
        for on in (True, False):
            native.set_enabled(on)
            ple.zero_grad()
            xi = x.clone().requires_grad_()
            out = ple(xi)
            (out.y * up).sum().backward()
            res.append([out.y.detach()] + [g.detach() for g in out.gates.values()] + [xi.grad]
                       + [p.grad.clone() for p in ple.parameters()])
    finally:
        native.set_enabled(was)
    assert len(res[0]) == len(res[1])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
