"""DeepMCP's matching and correlation subnets: their losses against loop references, their place
in the training module's objective (L = L_p + α L_m + β L_c), and learning what each models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dlrm_mtl.config import ConfigError, DeepMCPConfig, ModelConfig
from dlrm_mtl.modules.correlation_subnet import CorrelationSubnet, negative_positions
from dlrm_mtl.modules.matching_subnet import MatchingSubnet


def _auc(y: torch.Tensor, s: torch.Tensor) -> float:
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=s.dtype)
    n1 = y.sum()
    n0 = len(y) - n1
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


# ---------------------------------------------------------------------------- equations
def test_matching_loss_is_the_weighted_log_loss_of_the_towers_inner_product():
    torch.manual_seed(0)
    m = MatchingSubnet(6, 5, [7, 4]).double()
    u, a = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    y = torch.randint(0, 2, (9,)).double()
    rows = torch.tensor([1, 0, 2, 1, 1, 0, 0.5, 1, 1], dtype=torch.float64)
    loss, score = m(u, a, y, rows)
    num = den = 0.0
    for i in range(9):
        vu, va = u[i], a[i]
        for lin in (m.user_tower[0], m.user_tower[2]):
            vu = torch.tanh(lin.weight @ vu + lin.bias)
        for lin in (m.item_tower[0], m.item_tower[2]):
            va = torch.tanh(lin.weight @ va + lin.bias)
        s = float(vu @ va)
        assert math.isclose(float(score[i]), s, rel_tol=1e-9, abs_tol=1e-12)
        p = 1 / (1 + math.exp(-s))
        num += float(rows[i]) * -(float(y[i]) * math.log(p) + (1 - float(y[i])) * math.log(1 - p))
        den += float(rows[i])
    assert math.isclose(float(loss), num / den, rel_tol=1e-9)


@pytest.mark.parametrize("negatives", [0, 3])
def test_correlation_loss_against_a_loop_over_pairs_and_draws(negatives):
    B, L, D = 4, 6, 5
    torch.manual_seed(1)
    c = CorrelationSubnet(D, 3, window=2, negatives=negatives).double()
    x = torch.randn(B, L, D, dtype=torch.float64)
    lengths = [0, 6, 3, 1]
    mask = torch.arange(L).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    loss, pairs = c(x, mask)
    n = B * L  # anchor p's q-th negative at a fixed scattering of the flattened positions
    draws = {k: torch.tensor([[[((b * L + j) * 7919 + (q + 1) * 104729 + k * 15485863) % n for q in range(negatives)]
                               for j in range(L - k)] for b in range(B)]).reshape(B, L - k, negatives) for k in (1, 2)}
    h = torch.tanh(x @ c.proj.weight.T + c.proj.bias)  # [B, L, d]
    flat_h, flat_m = h.reshape(B * L, -1), mask.reshape(B * L)
    total, n = 0.0, 0
    for b in range(B):
        for j in range(L):
            for k in (1, 2):
                if j + k >= L or not (mask[b, j] and mask[b, j + k]):
                    continue
                term = -F.logsigmoid(h[b, j] @ h[b, j + k])
                for q in range(negatives):
                    idx = int(draws[k][b, j, q])
                    if flat_m[idx]:
                        term = term - F.logsigmoid(-(h[b, j] @ flat_h[idx]))
                total += float(term)
                n += 1
    assert int(pairs) == n == (5 + 4) + (2 + 1)  # length 6: 5 + 4 pairs; length 3: 2 + 1
    assert math.isclose(float(loss), total / n, rel_tol=1e-9)


def test_negatives_scatter_over_the_batch_without_the_random_generator():
    state = torch.get_rng_state()
    pos = negative_positions(64, 8, 1, 4, torch.device("cpu"))  # [64, 7, 4]
    assert torch.equal(torch.get_rng_state(), state)  # training's random stream is untouched
    for q in range(4):  # each negative slot: distinct positions for distinct anchors
        assert len(set(pos[:, :, q].flatten().tolist())) == 64 * 7
    anchors = (torch.arange(64).unsqueeze(1) * 8 + torch.arange(7)).unsqueeze(2)
    assert (pos // 8 != anchors // 8).float().mean() > 0.95  # almost always another row's event


def test_correlation_of_rows_without_pairs_is_zero_with_finite_gradients():
    c = CorrelationSubnet(4, 3)
    x = torch.randn(3, 5, 4, requires_grad=True)
    loss, pairs = c(x, torch.tensor([[True, False, False, False, False]] * 3))
    loss.backward()
    assert float(loss) == 0.0 and float(pairs) == 0.0 and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------- in the model
def _schema():
    from dlrm_mtl.schema import DenseFeature, ScenarioLevel, Schema, SparseFeature, Task

    return Schema(name="s", sparse=[SparseFeature("user_id", "t_user", 30, 8), SparseFeature("item_id", "t_item", 40, 8),
                                    SparseFeature("hist", "t_hist", 40, 8, sequence=True, max_len=5),
                                    SparseFeature("cand", "t_hist", 40, 8, sequence=True, max_len=1)],
                  dense=[DenseFeature("x")], scenarios=[ScenarioLevel("s", 2)],
                  tasks=[Task("ctr", "click"), Task("cvr", "conversion", parent="ctr")])


def _batch(schema, B: int = 16, seed: int = 0):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from dlrm_mtl.data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 6, (B,), generator=g)
    seq = KeyedJaggedTensor.from_lengths_sync(
        keys=["hist", "cand"], values=torch.randint(0, 40, (int(lengths.sum()) + B,), generator=g),
        lengths=torch.cat([lengths, torch.ones(B, dtype=torch.long)]).int())
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=["user_id", "item_id"], values=torch.randint(0, 30, (2 * B,), generator=g),
                                                 lengths=torch.ones(2 * B, dtype=torch.int32))
    click = torch.randint(0, 2, (B,), generator=g).float()
    labels = torch.stack([click, click * torch.randint(0, 2, (B,), generator=g).float()], dim=1)
    return Batch(sparse=sparse, dense=torch.randn(B, 1, generator=g), scenario=torch.randint(0, 2, (B, 1), generator=g),
                 labels=labels, label_mask=torch.ones(B, 2, dtype=torch.bool), row_id=torch.arange(B),
                 weight=torch.ones(B), sequence=seq)


def _module(schema, deepmcp: DeepMCPConfig):
    from dlrm_mtl.losses import EntireSpaceLoss
    from dlrm_mtl.models.ranking_model import MultiScenarioMultiTaskModel, TrainModule

    torch.manual_seed(3)
    model = MultiScenarioMultiTaskModel(schema, ModelConfig(interaction="concat", deepmcp=deepmcp))
    return TrainModule(model, EntireSpaceLoss(schema), cuda_graph="eager")


def test_the_objective_is_prediction_plus_weighted_matching_and_correlation():
    schema = _schema()
    cfg = DeepMCPConfig(task="ctr", user=["user_id"], item=["cand"], towers=[6], matching_weight=0.3,
                        sequence="hist", negatives=2, correlation_weight=0.7)
    with_mcp, plain = _module(schema, cfg), _module(schema, DeepMCPConfig())
    plain.load_state_dict({k: v for k, v in with_mcp.state_dict().items() if ".deepmcp." not in k})
    batch = _batch(schema)
    torch.manual_seed(5)
    loss, (_, terms, _, _) = with_mcp(batch)
    base, (_, base_terms, _, _) = plain(batch)
    assert set(terms) - set(base_terms) == {"loss/deepmcp_matching", "loss_weight/deepmcp_matching", "loss/deepmcp_correlation",
                                             "loss_weight/deepmcp_correlation", "deepmcp/pairs"}
    want = base + 0.3 * terms["loss/deepmcp_matching"] + 0.7 * terms["loss/deepmcp_correlation"]
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(terms["loss/total"], want.detach())
    loss.backward()  # the auxiliary losses reach the shared embeddings' gradient through the subnets
    assert with_mcp.model.deepmcp.matching.user_tower[0].weight.grad.abs().sum() > 0
    assert with_mcp.model.deepmcp.correlation.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cfg, message", [
    (DeepMCPConfig(task="nope", user=["user_id"], item=["item_id"]), "is not a task"),
    (DeepMCPConfig(task="ctr", user=[], item=["item_id"]), "user tower needs features"),
    (DeepMCPConfig(task="ctr", user=["user_id"], item=["hist"]), "'hist' is neither"),
    (DeepMCPConfig(task="ctr", user=["user_id"], item=["item_id"], sequence="item_id"), "is not a sequence"),
    (DeepMCPConfig(task="ctr", user=["user_id"], item=["item_id"], matching_weight=-1), "must be >= 0"),
])
def test_deepmcp_config_errors(cfg, message):
    with pytest.raises(ConfigError, match=message):
        _module(_schema(), cfg)


# ---------------------------------------------------------------------------- learning
def test_matching_subnet_learns_user_item_relevance():
    """Clicks follow σ(3·<p_u, q_i>) of hidden factors, with no user or item main effect: user
    and item embeddings trained through the matching subnet alone rank held-out pairs far
    better than the users' and items' click rates can (which know no interaction)."""
    torch.manual_seed(0)
    U, I, K, N, n_train = 200, 150, 4, 130_000, 100_000
    pu, qi = torch.randn(U, K) / math.sqrt(K), torch.randn(I, K) / math.sqrt(K)
    users, items = torch.randint(0, U, (N,)), torch.randint(0, I, (N,))
    truth = torch.sigmoid(3 * (pu[users] * qi[items]).sum(1))
    y = torch.bernoulli(truth)
    eu, ei = torch.nn.Embedding(U, 8), torch.nn.Embedding(I, 8)
    m = MatchingSubnet(8, 8, [16, 8])
    opt = torch.optim.Adam([*eu.parameters(), *ei.parameters(), *m.parameters()], lr=0.01)
    for _ in range(3):
        for s in range(0, n_train, 500):
            loss, _ = m(eu(users[s:s + 500]), ei(items[s:s + 500]), y[s:s + 500], torch.ones(500))
            opt.zero_grad()
            loss.backward()
            opt.step()
    test = slice(n_train, N)
    with torch.no_grad():
        _, score = m(eu(users[test]), ei(items[test]), y[test], torch.ones(N - n_train))
    rate_u = torch.zeros(U).index_add_(0, users[:n_train], y[:n_train]) / torch.bincount(users[:n_train], minlength=U)
    rate_i = torch.zeros(I).index_add_(0, items[:n_train], y[:n_train]) / torch.bincount(items[:n_train], minlength=I)
    got, oracle = _auc(y[test], score), _auc(y[test], truth[test])
    popularity = _auc(y[test], rate_u[users[test]] + rate_i[items[test]])
    assert got > popularity + 0.1 and got > 0.68, (got, popularity, oracle)  # measured 0.708, popularity ~0.52, oracle 0.803


def test_correlation_subnet_learns_which_items_occur_together():
    """Sequences draw their items from one of 10 clusters of 10 items: after training the
    item table through the correlation subnet alone, items of one cluster are closer (cosine
    of h) than items of different clusters."""
    torch.manual_seed(0)
    n_items, B, L = 100, 64, 8
    emb = torch.nn.Embedding(n_items, 8)
    c = CorrelationSubnet(8, 8, window=2, negatives=4)
    opt = torch.optim.Adam([*emb.parameters(), *c.parameters()], lr=0.02)
    for _ in range(300):
        cluster = torch.randint(0, 10, (B, 1))
        ids = cluster * 10 + torch.randint(0, 10, (B, L))
        loss, _ = c(emb(ids), torch.ones(B, L, dtype=torch.bool))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        h = F.normalize(torch.tanh(c.proj(emb.weight)), dim=1)  # [items, d]
        sim = h @ h.T
        same = torch.arange(n_items).unsqueeze(0) // 10 == torch.arange(n_items).unsqueeze(1) // 10
        off_diag = ~torch.eye(n_items, dtype=torch.bool)
        within, across = sim[same & off_diag].mean(), sim[~same].mean()
    assert within > across + 0.5, (float(within), float(across))
