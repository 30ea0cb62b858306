"""Learning is tested by learning: STAR, HMoE and HiNet, each as the whole expert arch of a
DenseArch, learn a problem whose feature effect flips sign between scenarios (true
probabilities known) and get close to the oracle AUC in every leaf scenario."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dlrm_mtl.config import LayerConfig, ModelConfig
from dlrm_mtl.metrics import auc
from dlrm_mtl.models.ranking_model import DenseArch
from dlrm_mtl.synthetic import synthetic_schema

SCHEMA = synthetic_schema()  # channel x domain = 4 leaf scenarios


def sample(n: int, g: torch.Generator):
    F, D = len(SCHEMA.sparse), SCHEMA.sparse[0].dim
    pooled = torch.randn(n, F, D, generator=g)
    dense = torch.randn(n, len(SCHEMA.dense), generator=g)
    scenario = torch.randint(0, 2, (n, 2), generator=g)
    leaf = scenario[:, 0] * 2 + scenario[:, 1]
    u = torch.linspace(-1, 1, D) / D**0.5
    sign = torch.tensor([1.0, 1.0, -1.0, -0.5])[leaf]  # scenarios 2, 3 invert the effect
    bias = torch.tensor([-1.0, 0.0, -0.5, 0.5])[leaf]
    p = torch.sigmoid(3.0 * sign * (pooled[:, 0] @ u) + 1.0 * (pooled[:, 1] @ u.flip(0)) + bias)
    return pooled, dense, scenario, leaf, p, torch.bernoulli(p, generator=g)


@pytest.fixture
def one_thread():
    """A tiny model: two threads on a shared 2-core machine are 10-30× slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("layer", [
    LayerConfig(type="star", level="leaf", hidden=[32], out_dim=16),
    LayerConfig(type="hmoe", level="leaf", hidden=[], out_dim=16),
    LayerConfig(type="hinet", level="leaf", sub_experts=2, hidden=[], out_dim=8),
], ids=["star", "hmoe", "hinet"])
def test_scenario_layer_learns_scenario_dependent_effects(layer, one_thread):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = DenseArch(SCHEMA, ModelConfig(dense_arch=[8], scenario_emb_dim=4, scenario_layers=[layer], task_layers=[], tower=[8]))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    pooled, dense, scenario, _, _, y = sample(65536, g)  # one pass: fresh rows, no overfitting
    model.train()
    for i in range(0, 65536, 256):
        logits, _, _ = model(pooled[i : i + 256], dense[i : i + 256], scenario[i : i + 256])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y[i : i + 256])
        opt.zero_grad()
        loss.backward()
        opt.step()
    pooled, dense, scenario, leaf, p, y = sample(16384, g)
    model.eval()
    with torch.no_grad():
        score = model(pooled, dense, scenario)[0][:, 0].numpy()
    for s in range(4):
        rows = (leaf == s).numpy()
        oracle, got = auc(y.numpy()[rows], p.numpy()[rows]), auc(y.numpy()[rows], score[rows])
        # evaluation runs in eval mode: STAR's partitioned norm on its moving statistics
        assert oracle - got < 0.03, (s, got, oracle)
