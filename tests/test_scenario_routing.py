"""group_by_scenario: rows grouped by scenario and put back in batch order, exactly."""

from __future__ import annotations

import pytest
import torch

from dlrm_mtl.modules.scenario_routing import group_by_scenario


def test_split_groups_rows_by_scenario_in_batch_order_and_merge_inverts_it():
    scenario = torch.tensor([2, 0, 2, 1, 0, 2])
    x = torch.arange(6.0).unsqueeze(1) * torch.ones(1, 3)  # row i holds i
    g = group_by_scenario(scenario, 4)  # scenario 3 has no rows
    assert g.counts == [2, 1, 3, 0]
    parts = g.split(x)
    assert [p[:, 0].tolist() for p in parts] == [[1.0, 4.0], [3.0], [0.0, 2.0, 5.0], []]
    torch.testing.assert_close(g.merge(parts), x)
    # a per-scenario function lands on its own rows
    y = g.merge([p * (s + 1) for s, p in enumerate(parts)])
    torch.testing.assert_close(y[:, 0], x[:, 0] * (scenario + 1).float())


def test_gradients_flow_back_to_the_rows_they_came_from():
    scenario = torch.tensor([1, 0, 1, 1])
    x = torch.randn(4, 2, requires_grad=True)
    g = group_by_scenario(scenario, 2)
    y = g.merge([p * (10.0 ** s) for s, p in enumerate(g.split(x))])
    y.sum().backward()
    torch.testing.assert_close(x.grad, (10.0 ** scenario.float()).unsqueeze(1).expand(4, 2))


def test_out_of_range_scenario_is_refused():
    with pytest.raises(ValueError, match="scenario ids must be < 2, got 3"):
        group_by_scenario(torch.tensor([0, 3]), 2)


@pytest.mark.parametrize("S,k,hidden", [(2, 1, []), (3, 2, [16]), (6, 1, [8])])
def test_static_routing_equals_gather_routing(S, k, hidden):
    """ScenarioCGCLayer's static-shape routing (every scenario's experts on every row, then a
    gather) gives the gather routing's outputs and gradients (float64, to 1e-12)."""
    from dlrm_mtl.modules import ScenarioCGCLayer

    torch.manual_seed(0)
    gather = ScenarioCGCLayer(12, S, 4, 2, k, hidden, 8, routing="gather").double()
    static = ScenarioCGCLayer(12, S, 4, 2, k, hidden, 8, routing="static").double()
    static.load_state_dict(gather.state_dict())
    x = torch.randn(37, 12, dtype=torch.float64)
    s = torch.randint(0, S, (37,))
    s[:3] = S - 1  # at least one row of the last scenario; some scenario may have none
    e = torch.randn(37, 4, dtype=torch.float64)
    ya, yb = gather(x, s, e), static(x, s, e)
    torch.testing.assert_close(ya.y, yb.y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ya.gates[""], yb.gates[""], rtol=1e-12, atol=1e-12)
    w = torch.randn_like(ya.y)
    for pa, pb in zip(torch.autograd.grad((ya.y * w).sum(), list(gather.parameters())),
                      torch.autograd.grad((yb.y * w).sum(), list(static.parameters()))):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12)


def test_auto_routing_is_static_for_few_scenarios_or_on_gpu():
    from dlrm_mtl.modules.scenario_routing import STATIC_MAX_SCENARIOS, static_routing

    x = torch.zeros(2, 3)
    assert static_routing("auto", x, STATIC_MAX_SCENARIOS)
    assert not static_routing("auto", x, STATIC_MAX_SCENARIOS + 1)
    assert static_routing("static", x, 100) and not static_routing("gather", x, 2)
