"""Asymmetric sharing (PLE paper, Tang et al. 2020, §3, fig. 1b): the DAG order, the layer against
a loop of nn.Linear copies, gradients from child to parent, config validation, and a child task
that learns from its parent's latent only through the edge."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple

import pytest
import torch
import yaml
from torch import nn

from dlrm_mtl.config import Config, ConfigError, LayerConfig, ModelConfig, check
from dlrm_mtl.models.arch import build_task_layer
from dlrm_mtl.models.ranking_model import DenseArch
from dlrm_mtl.modules import AsymmetricLayer, ExpertBank, resolve_task_edges, task_dag_order
from dlrm_mtl.synthetic import synthetic_schema

from test_modules import ATOL

SCHEMA = synthetic_schema()  # tasks ctr -> cvr


def linear_copies(bank: ExpertBank) -> nn.Sequential:
    """The bank's single expert as nn.Linear + ReLU layers holding copies of its weights."""
    layers: List[nn.Module] = []
    for w, b in zip(bank.weights, bank.biases):
        lin = nn.Linear(w.shape[1], w.shape[2]).to(w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w[0].detach().T)  # the bank computes x @ W, Linear x @ weight.T
            lin.bias.copy_(b[0].detach())
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers)


def reference(layer: AsymmetricLayer, x: torch.Tensor, order: Sequence[int], edges: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """Task by task in the given order: [x_t ; parents' outputs in ascending task index] through
    the task's own nn.Linear copies."""
    T = layer.num_tasks
    nets = [linear_copies(b) for b in layer.bottoms]
    h = {}
    for t in order:
        parents = sorted(p for p, c in edges if c == t)
        assert all(p in h for p in parents), "a parent must run before its child"
        x_t = x[t] if x.dim() == 3 else x
        h[t] = nets[t](torch.cat([x_t] + [h[p] for p in parents], dim=1))
    return torch.stack([h[t] for t in range(T)])


# ---------------------------------------------------------------------------- the DAG


def test_dag_order_puts_parents_first_lowest_index_first():
    assert task_dag_order(3, []) == [0, 1, 2]
    assert task_dag_order(3, [(2, 0)]) == [1, 2, 0]  # 1 and 2 ready; 0 waits for 2
    assert task_dag_order(3, [(2, 1), (1, 0)]) == [2, 1, 0]  # a chain against index order
    assert task_dag_order(4, [(3, 1), (3, 2), (1, 0), (2, 0)]) == [3, 1, 2, 0]  # a diamond


@pytest.mark.parametrize("edges,problem", [
    ([(0, 0)], "self-edge"),
    ([(0, 1), (0, 1)], "given twice"),
    ([(0, 1), (1, 2), (2, 0)], "cycle: 0 -> 1 -> 2 -> 0"),
    ([(0, 3)], "outside 0..2"),
])
def test_dag_order_refuses_what_is_not_a_dag(edges, problem):
    with pytest.raises(ValueError, match=problem):
        task_dag_order(3, edges)


def test_bottoms_run_in_dag_order():
    torch.manual_seed(1)
    edges = [(2, 0), (0, 1)]  # 2 -> 0 -> 1
    layer = AsymmetricLayer(4, 3, edges, [], 3)
    calls: List[int] = []
    for t, bank in enumerate(layer.bottoms):
        bank.register_forward_pre_hook(lambda mod, args, t=t: calls.append(t))
    layer(torch.randn(5, 4))
    assert calls == layer.order == [2, 0, 1]


def test_resolve_names():
    names = ["click", "cart", "buy"]
    assert resolve_task_edges([["click", "cart"], ["cart", "buy"], ["click", "buy"]], names) == [(0, 1), (1, 2), (0, 2)]
    with pytest.raises(ValueError, match="'pay' is not a task of the schema"):
        resolve_task_edges([["click", "pay"]], names)


# ---------------------------------------------------------------------------- equations


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("edges,order", [
    ([], [0, 1, 2]),  # no edges: three separate bottoms
    ([(0, 1)], [0, 1, 2]),  # ctr -> cvr
    ([(2, 0), (2, 1), (0, 1)], [2, 0, 1]),  # task 1 has two parents, task 2 is everyone's root
])
def test_matches_loop_of_linear_copies(edges, order, stacked):
    torch.manual_seed(2)
    d, d_out, B = 5, 4, 7
    layer = AsymmetricLayer(d, 3, edges, [6], d_out).double()
    for t, bank in enumerate(layer.bottoms):  # the child's input: own input + d' per parent
        assert bank.in_dim == d + sum(1 for _, c in edges if c == t) * d_out
    with torch.no_grad():  # non-zero biases, so a missing bias would show
        for bank in layer.bottoms:
            for b in bank.biases:
                b.normal_()
    x = torch.randn(3, B, d, dtype=torch.float64) if stacked else torch.randn(B, d, dtype=torch.float64)
    out = layer(x)
    assert out.y.shape == (3, B, d_out) and out.gates == {} and out.aux == {}
    torch.testing.assert_close(out.y, reference(layer, x, order, edges), atol=ATOL, rtol=0)


def test_parents_enter_in_ascending_task_index():
    """Swapping the two parents' blocks of the child's first weight changes the output: the
    concatenation order is fixed (parent 0's block before parent 1's), not arbitrary."""
    torch.manual_seed(3)
    layer = AsymmetricLayer(3, 3, [(1, 2), (0, 2)], [], 2).double()  # edges listed high index first
    x = torch.randn(6, 3, dtype=torch.float64)
    y = layer(x).y
    w = layer.bottoms[2].weights[0]  # [3 + 2 + 2, 2]: x, h_0, h_1
    h0, h1 = y[0], y[1]
    expected = torch.relu(x @ w[0, :3] + h0 @ w[0, 3:5] + h1 @ w[0, 5:7] + layer.bottoms[2].biases[0][0])
    torch.testing.assert_close(y[2], expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------- gradients


def test_gradient_flows_from_child_to_parent_and_not_back():
    torch.manual_seed(4)
    layer = AsymmetricLayer(4, 2, [(0, 1)], [8], 6)
    x = torch.randn(16, 4)
    layer(x).y[1].sum().backward()  # the child's loss only
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.bottoms[0].parameters())  # reaches the parent
    layer.zero_grad(set_to_none=True)
    layer(x).y[0].sum().backward()  # the parent's loss only
    assert all(p.grad is None or not p.grad.any() for p in layer.bottoms[1].parameters())  # the parent never reads the child


def test_without_the_edge_the_child_does_not_reach_the_parent():
    torch.manual_seed(5)
    layer = AsymmetricLayer(4, 2, [], [8], 6)
    layer(torch.randn(16, 4)).y[1].sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in layer.bottoms[0].parameters())


# ---------------------------------------------------------------------------- config


def arch(**layer) -> DenseArch:
    torch.manual_seed(0)
    cfg = ModelConfig(dense_arch=[8], scenario_emb_dim=4, scenario_layers=[], task_layers=[LayerConfig(**layer)], tower=[8])
    return DenseArch(SCHEMA, cfg)


def test_edges_by_schema_task_name():
    model = arch(type="asymmetric", edges=[["ctr", "cvr"]], out_dim=8)
    assert model.task_layers[0].edges == [(SCHEMA.task_index("ctr"), SCHEMA.task_index("cvr"))]
    model = arch(type="asymmetric", edges=[["cvr", "ctr"]], out_dim=8)  # any DAG, not only the schema's chain
    assert model.task_layers[0].order == [SCHEMA.task_index("cvr"), SCHEMA.task_index("ctr")]


@pytest.mark.parametrize("layer,key,problem", [
    (dict(type="asymmetric", edges=[["ctr", "ctcvr"]]), "edges", "'ctcvr' is not a task of the schema ['ctr', 'cvr']"),
    (dict(type="asymmetric", edges=[["cvr", "cvr"]]), "edges", "edge [cvr, cvr] is a self-edge"),
    (dict(type="asymmetric", edges=[["ctr", "cvr"], ["cvr", "ctr"]]), "edges", "edges form a cycle: ctr -> cvr -> ctr"),
    (dict(type="asymmetric", edges=[["ctr", "cvr"], ["ctr", "cvr"]]), "edges", "edge [ctr, cvr] is given twice"),
    (dict(type="asymmetric", edges=[["ctr"]]), "edges", "a [parent, child] pair"),
    (dict(type="mmoe", edges=[["ctr", "cvr"]]), "edges", "type mmoe does not read ['edges']"),
    (dict(type="asymmetric", levels=2), "levels", "type asymmetric does not read ['levels']"),
])
def test_config_errors_are_one_line_and_name_the_key(layer, key, problem):
    with pytest.raises(ConfigError) as e:
        arch(**layer)
    assert e.value.key == f"model.task_layers[0].{key}"
    assert problem in str(e.value) and "\n" not in str(e.value)


def test_edges_on_a_scenario_layer_are_refused():
    cfg = ModelConfig(scenario_layers=[LayerConfig(type="cgc", edges=[["ctr", "cvr"]])], task_layers=[])
    with pytest.raises(ConfigError, match=r"type cgc does not read \['edges'\]"):
        DenseArch(SCHEMA, cfg)


def test_built_on_its_own_tasks_are_named_by_index():
    assert build_task_layer(LayerConfig(type="asymmetric", edges=[["1", "0"]], out_dim=4), 6, 2, 0).order == [1, 0]
    with pytest.raises(ConfigError, match="'ctr' is not a task"):
        build_task_layer(LayerConfig(type="asymmetric", edges=[["ctr", "cvr"]], out_dim=4), 6, 2, 0)


def test_config_file_with_a_cycle_names_the_file_and_key(tmp_path: Path):
    path = tmp_path / "arch.yaml"
    path.write_text(yaml.safe_dump({"model": {"scenario_layers": [], "task_layers": [
        {"type": "asymmetric", "edges": [["ctr", "cvr"], ["cvr", "ctr"]]}]}}))
    cfg = Config.load([str(path)])
    with pytest.raises(ConfigError) as e:
        check(cfg, SCHEMA)
    assert str(e.value).startswith(f"{path}: model.task_layers[0].edges: ") and "cycle" in str(e.value)


# ---------------------------------------------------------------------------- learning


@pytest.fixture
def one_thread():
    """Tiny models: two threads on a shared 2-core machine are many times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def parent_latent_data(n: int, seed: int):
    """x [n, 12] standard normal; the parent's latent is a sum of pairwise products,
    z = Σ_k x_2k · x_2k+1 / √6 (unit variance, learnable from thousands of rows, not from a
    hundred); the parent's target is z + N(0, 0.1²), the child's is 1 − z."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    z = (x[:, 0::2] * x[:, 1::2]).sum(1) / 6 ** 0.5
    return x, z + 0.1 * torch.randn(n, generator=g), 1 - z


def train(edges: List[Tuple[int, int]], seed: int, n_train: int = 3000, n_child: int = 100) -> Tuple[float, float]:
    """(child, parent) test MSE after 300 full-batch AdamW steps on ``n_train`` rows with parent
    labels on every row and child labels on the first ``n_child`` only (a conversion label
    seen on few rows); evaluated on 2000 held-out rows. Linear heads on the layer's outputs."""
    x, parent, child = parent_latent_data(n_train + 2000, seed)
    x, xt, parent_t, child_t = x[:n_train], x[n_train:], parent[n_train:], child[n_train:]
    parent, child = parent[:n_train], child[:n_child]
    torch.manual_seed(seed)
    layer = AsymmetricLayer(12, 2, edges, [32], 16)
    heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(2))
    opt = torch.optim.AdamW(list(layer.parameters()) + list(heads.parameters()), lr=1e-2, weight_decay=0.1)
    for _ in range(300):
        y = layer(x).y  # [2, n, 16]
        p_pred, c_pred = heads[0](y[0]).squeeze(1), heads[1](y[1, :n_child]).squeeze(1)
        loss = ((p_pred - parent) ** 2).mean() + ((c_pred - child) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        yt = layer(xt).y
        mse = [float(((heads[t](yt[t]).squeeze(1) - target) ** 2).mean()) for t, target in ((1, child_t), (0, parent_t))]
    return mse[0], mse[1]


def test_child_learns_the_parents_latent_through_the_edge(one_thread):
    """With the edge the child reads the parent's representation, trained on every row; without
    it the child fits its 100 labelled rows alone. Measured (seeds 0-4, this machine): child MSE
    0.21-0.40 with the edge, 0.58-0.93 without (target variance 1); parent MSE 0.07-0.09 either way."""
    results = {seed: (train([(0, 1)], seed), train([], seed)) for seed in (0, 2)}
    for seed, ((child_edge, parent_edge), (child_alone, parent_alone)) in results.items():
        assert parent_edge < 0.15 and parent_alone < 0.15, results  # the parent learned its latent
        assert child_edge < 0.7 * child_alone, results
    mean = lambda i: sum(r[i][0] for r in results.values()) / len(results)
    assert mean(0) < 0.5 * mean(1), results
