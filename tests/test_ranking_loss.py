"""loss.ranking (dlrm_mtl/ranking_loss.py): pairwise (BPR) and listwise (ListNet top-one)
losses against a Python loop over groups, their gradients, groups that cannot contribute,
the term inside EntireSpaceLoss, config and data errors, the synthetic request groups, and a
short training run that learns."""

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dlrm_mtl.config import Config, ConfigError, LossConfig, RankingConfig, check_values
from dlrm_mtl.data import ParquetStream
from dlrm_mtl.data.stream import DataError
from dlrm_mtl.losses import EntireSpaceLoss
from dlrm_mtl.ranking_loss import listwise_loss, pair_rows_fraction, pairwise_loss, ranking_loss
from dlrm_mtl.schema import Schema
from dlrm_mtl.synthetic import SyntheticSpec, generate, synthetic_schema

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- references (loops)
def _groups(labels, group, valid):
    """{group id: (positive rows, negative rows)} over the valid rows, by a Python loop."""
    out = {}
    for i in range(len(labels)):
        if not valid[i]:
            continue
        pos, neg = out.setdefault(int(group[i]), ([], []))
        (pos if labels[i] > 0.5 else neg).append(i)
    return out


def pairwise_ref(s, y, g, v) -> float:
    total, pairs = 0.0, 0
    for pos, neg in _groups(y, g, v).values():
        for i in pos:
            for j in neg:
                total += -math.log(1 / (1 + math.exp(-(float(s[i]) - float(s[j])))))
                pairs += 1
    return total / pairs if pairs else 0.0


def listwise_ref(s, y, g, v) -> float:
    total, n = 0.0, 0
    for pos, neg in _groups(y, g, v).values():
        if not pos or not neg:
            continue
        rows = pos + neg
        lse = math.log(sum(math.exp(float(s[j])) for j in rows))
        total += sum((float(s[i]) - lse) * -1.0 / len(pos) for i in pos)
        n += 1
    return total / n if n else 0.0


def pair_rows_ref(y, g, v) -> float:
    groups = _groups(y, g, v)
    ok = sum(len(p) + len(n) for p, n in groups.values() if p and n)
    return ok / max(int(sum(v)), 1)


def random_batch(seed: int, B: int = 40, n_groups: int = 7, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(B, generator=gen, dtype=dtype) * 2
    y = (torch.rand(B, generator=gen) < 0.35).to(dtype)
    g = torch.randint(0, n_groups, (B,), generator=gen) * 1000 + 17  # arbitrary, non-contiguous ids
    v = torch.rand(B, generator=gen) < 0.85
    return s, y, g, v


# ---------------------------------------------------------------- values and gradients
@pytest.mark.parametrize("seed", range(6))
def test_pairwise_equals_loop(seed):
    s, y, g, v = random_batch(seed)
    ref = pairwise_ref(s, y, g, v)
    assert ref > 0
    assert float(pairwise_loss(s, y, g, v)) == pytest.approx(ref, abs=1e-6, rel=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_listwise_equals_loop(seed):
    s, y, g, v = random_batch(seed)
    ref = listwise_ref(s, y, g, v)
    assert ref > 0
    assert float(listwise_loss(s, y, g, v)) == pytest.approx(ref, abs=1e-6, rel=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_pair_rows_equals_loop(seed):
    s, y, g, v = random_batch(seed, n_groups=12)
    ref = pair_rows_ref(y, g, v)
    assert 0 < ref < 1
    assert float(pair_rows_fraction(y, g, v)) == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize("kind", ["pairwise", "listwise"])
def test_gradcheck(kind):
    s, y, g, v = random_batch(1, B=14, n_groups=3)
    s = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ranking_loss(kind, x, y, g, v), (s,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind, ref", [("pairwise", pairwise_ref), ("listwise", listwise_ref)])
def test_groups_without_both_labels_contribute_nothing(kind, ref):
    s, y, g, v = random_batch(2)
    base = ranking_loss(kind, s, y, g, v)
    # append an all-positive group, an all-negative group and a valid singleton
    s2 = torch.cat([s, torch.tensor([5.0, -3.0, 1.0, 0.2, 0.7], dtype=s.dtype)]).requires_grad_(True)
    y2 = torch.cat([y, torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0], dtype=y.dtype)])
    g2 = torch.cat([g, torch.tensor([-5, -5, -6, -6, -7])])
    v2 = torch.cat([v, torch.ones(5, dtype=torch.bool)])
    out = ranking_loss(kind, s2, y2, g2, v2)
    assert float(out) == pytest.approx(float(base), abs=1e-12)
    assert float(out) == pytest.approx(ref(s2.detach(), y2, g2, v2), abs=1e-6)
    out.backward()
    assert torch.all(s2.grad[-5:] == 0)
    assert torch.any(s2.grad[:-5] != 0)
    # invalid rows (padding, null labels) do not count either: their scores get no gradient
    assert torch.all(s2.grad[:-5][~v] == 0)


@pytest.mark.parametrize("kind", ["pairwise", "listwise"])
def test_no_eligible_group_is_zero_with_zero_gradient(kind):
    s = torch.tensor([1.0, 2.0, -1.0, 0.5], requires_grad=True)
    y = torch.tensor([1.0, 1.0, 0.0, 0.0])
    g = torch.tensor([1, 1, 2, 2])
    out = ranking_loss(kind, s, y, g, torch.ones(4, dtype=torch.bool))
    out.backward()
    assert float(out) == 0.0 and torch.all(s.grad == 0)
    assert float(pair_rows_fraction(y, g, torch.ones(4, dtype=torch.bool))) == 0.0


def test_pairwise_prefers_positive_above_negative():
    """The loss falls as the positive's score rises above the negative's (direction check)."""
    y, g, v = torch.tensor([1.0, 0.0]), torch.tensor([3, 3]), torch.ones(2, dtype=torch.bool)
    lo = pairwise_loss(torch.tensor([2.0, 0.0]), y, g, v)
    hi = pairwise_loss(torch.tensor([0.0, 2.0]), y, g, v)
    assert float(lo) == pytest.approx(math.log1p(math.exp(-2.0)), abs=1e-6)
    assert float(hi) == pytest.approx(math.log1p(math.exp(2.0)), abs=1e-6)


def test_float32_matches_float64():
    s, y, g, v = random_batch(4, B=256, n_groups=30)
    for kind in ("pairwise", "listwise"):
        a = ranking_loss(kind, s.float(), y.float(), g, v)
        b = ranking_loss(kind, s, y, g, v)
        assert float(a) == pytest.approx(float(b), rel=1e-5)


# ---------------------------------------------------------------- inside EntireSpaceLoss
@pytest.fixture(scope="module")
def schema():
    return synthetic_schema(replace(SyntheticSpec(), request_size=4))


@pytest.mark.parametrize("kind", ["pairwise", "listwise"])
def test_entire_space_loss_adds_the_term(schema, kind):
    B, T = 32, len(schema.tasks)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, generator=gen)
    click = (torch.rand(B, generator=gen) < 0.4).float()
    labels = torch.stack([click, click * (torch.rand(B, generator=gen) < 0.5).float()], 1)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[-3:] = False  # padding rows
    weight = torch.ones(B)
    weight[-3:] = 0
    group = torch.arange(B) // 4
    plain = EntireSpaceLoss(schema, LossConfig())
    ranked = EntireSpaceLoss(schema, LossConfig(ranking=RankingConfig(type=kind, group="request_id", task="ctr", weight=0.7)))
    t0, _ = plain(logits, labels, mask, weight)
    t1, terms = ranked(logits, labels, mask, weight, group=group)
    valid = mask[:, 0] & (weight > 0)
    ref = (pairwise_ref if kind == "pairwise" else listwise_ref)(logits[:, 0], click, group, valid)
    assert float(terms["loss/ranking"]) == pytest.approx(ref, abs=1e-5)
    assert float(t1) == pytest.approx(float(t0) + 0.7 * ref, abs=1e-5)
    assert float(terms["loss_weight/ranking"]) == pytest.approx(0.7)
    assert float(terms["ranking/pair_rows"]) == pytest.approx(pair_rows_ref(click, group, valid), abs=1e-6)
    assert "loss/ranking" not in plain(logits, labels, mask, weight)[1]


def test_entire_space_loss_needs_groups(schema):
    loss = EntireSpaceLoss(schema, LossConfig(ranking=RankingConfig(type="pairwise", group="request_id", task="ctr")))
    with pytest.raises(ValueError, match="group_id: request_id"):
        loss(torch.zeros(4, 2), torch.zeros(4, 2), torch.ones(4, 2, dtype=torch.bool), torch.ones(4))


def test_dense_step_graph_equals_eager(schema):
    """The group ids pass through DenseStep; the recorded step (``cuda_graph: graph``, run
    without capture on the CPU) gives the eager step's loss, terms and gradients."""
    from dlrm_mtl.config import ModelConfig
    from dlrm_mtl.models.dense_step import DenseStep
    from dlrm_mtl.models.ranking_model import DenseArch

    model = ModelConfig(dense_arch=[8], scenario_emb_dim=4, tower=[8])
    model.scenario_layers[0].out_dim = 16
    model.task_layers[0].out_dim = 8
    cfg = LossConfig(ranking=RankingConfig(type="pairwise", group="request_id", task="ctr", weight=0.5))
    B, g = 64, torch.Generator().manual_seed(3)
    labels = (torch.rand(B, 2, generator=g) < 0.3).float()
    labels[:, 1] *= labels[:, 0]
    scenario = torch.stack([torch.randint(0, lv.num_values, (B,), generator=g) for lv in schema.scenarios], 1)
    args = (torch.randn(B, sum(f.dim for f in schema.sparse), generator=g), torch.randn(B, len(schema.dense), generator=g),
            scenario, labels, torch.ones(B, 2, dtype=torch.bool), torch.ones(B), None, torch.arange(B) // 8)
    out = {}
    for mode in ("eager", "graph"):
        torch.manual_seed(0)
        arch = DenseArch(schema, model)
        step = DenseStep(arch, EntireSpaceLoss(schema, cfg), cuda_graph=mode).train()
        for _ in range(2):  # the second call replays the recording
            arch.zero_grad()
            total, _, terms, _ = step(*args)
            total.backward()
        out[mode] = (float(total), float(terms["loss/ranking"]), [p.grad.clone() for p in arch.parameters() if p.grad is not None])
        if mode == "graph":
            assert step.graph is not None and step.graph_error is None
    assert out["eager"][1] > 0
    assert out["graph"][:2] == pytest.approx(out["eager"][:2], rel=1e-6)
    for a, b in zip(out["graph"][2], out["eager"][2]):
        assert torch.allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------- config errors
def _cfg(*overrides: str) -> Config:
    return Config.load(None, overrides=list(overrides))


CONFIG_CASES = {
    "bad_type": (["loss.ranking.type=pointwise"], "loss.ranking.type"),
    "no_group": (["loss.ranking.type=pairwise", "loss.ranking.task=ctr"], "loss.ranking.group"),
    "no_task": (["loss.ranking.type=listwise", "loss.ranking.group=request_id"], "loss.ranking.task"),
    "negative_weight": (["loss.ranking.type=pairwise", "loss.ranking.group=request_id", "loss.ranking.task=ctr",
                         "loss.ranking.weight=-1"], "loss.ranking.weight"),
    "unknown_task": (["loss.ranking.type=pairwise", "loss.ranking.group=request_id", "loss.ranking.task=nosuch"],
                     "loss.ranking.task"),
    "group_not_in_schema": (["loss.ranking.type=pairwise", "loss.ranking.group=session", "loss.ranking.task=ctr"],
                            "loss.ranking.group"),
    "unknown_key": (["loss.ranking.nosuch=1"], "loss.ranking.nosuch"),
    "weight_not_a_number": (["loss.ranking.weight=abc"], "loss.ranking.weight"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_errors(schema, case):
    overrides, key = CONFIG_CASES[case]
    with pytest.raises(ConfigError) as ei:
        check_values(_cfg(*overrides), schema)
    msg = str(ei.value)
    assert key in msg and "\n" not in msg, msg


def test_config_ok_and_schema_without_groups(schema):
    ok = ["loss.ranking.type=listwise", "loss.ranking.group=request_id", "loss.ranking.task=ctr", "loss.ranking.weight=0.5"]
    check_values(_cfg(*ok), schema)  # no error
    check_values(_cfg(), synthetic_schema())  # default: off, no group column needed
    with pytest.raises(ConfigError, match="group_id"):
        check_values(_cfg(*ok), synthetic_schema())  # a schema without group_id


def test_ranking_yaml_composes_with_demo(schema):
    cfg = Config.load([str(ROOT / "configs/demo.yaml"), str(ROOT / "configs/ranking.yaml")])
    assert cfg.loss.ranking == RankingConfig(type="pairwise", group="request_id", task="ctr", weight=0.5)
    assert cfg.data.batch_size == 1024  # demo's value kept
    assert cfg.data.train == "data/synthetic_requests/train"
    check_values(cfg, schema)


def test_config_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  ranking: {type: pairwise, group: request_id, task: ctr, weight: -2}\n")
    with pytest.raises(ConfigError) as ei:
        check_values(Config.load(str(bad)), synthetic_schema(replace(SyntheticSpec(), request_size=4)))
    assert str(bad) in str(ei.value) and "loss.ranking.weight" in str(ei.value)


# ---------------------------------------------------------------- data: schema, reader, generator
@pytest.fixture(scope="module")
def request_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("requests")
    spec = replace(SyntheticSpec(), num_users=500, num_items=300, train_files=2, eval_files=1, row_group_rows=400,
                   request_size=8)
    generate(out, rows=4000, seed=5, spec=spec)
    return out


def test_schema_group_id_round_trip(request_data, tmp_path):
    s = Schema.load(request_data / "schema.yaml")
    assert s.group_id == "request_id"
    assert "request_id" in s.columns() and "request_id" in s.training_columns()
    s.save(tmp_path / "s.yaml")
    assert Schema.load(tmp_path / "s.yaml").group_id == "request_id"
    synthetic_schema().save(tmp_path / "plain.yaml")
    assert "group_id" not in (tmp_path / "plain.yaml").read_text()  # older schema files unchanged


def test_generator_requests(request_data):
    t = pq.read_table(request_data / "train" / "part-00000.parquet")
    rid = t["request_id"].to_numpy()
    _, counts = np.unique(rid, return_counts=True)
    assert counts.max() == 8 and (counts == 8).sum() >= len(counts) - 1  # the last request may be short
    assert np.all(np.diff(rid) >= 0)  # consecutive rows


def test_generator_defaults_unchanged_and_features_shared(tmp_path):
    small = replace(SyntheticSpec(), num_users=300, num_items=200, train_files=1, eval_files=1, row_group_rows=500)
    generate(tmp_path / "a", rows=1000, seed=2, spec=small)
    generate(tmp_path / "b", rows=1000, seed=2, spec=replace(small, request_size=5, request_effect=2.0))
    a = pq.read_table(tmp_path / "a" / "train" / "part-00000.parquet")
    b = pq.read_table(tmp_path / "b" / "train" / "part-00000.parquet")
    assert "request_id" not in a.column_names and "request_id" in b.column_names
    for c in a.column_names:
        if c in ("click", "conversion", "true_pctr", "true_pctcvr"):
            continue
        assert a[c].equals(b[c]), c  # features, cvr truth: the default world's
    pa_ = a["true_pctr"].to_numpy()
    pb = b["true_pctr"].to_numpy()
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    eff = logit(pb.astype(np.float64)) - logit(pa_.astype(np.float64))
    rid = b["request_id"].to_numpy()
    for r in np.unique(rid)[:20]:  # one effect per request
        assert np.ptp(eff[rid == r]) < 1e-3
    assert 1.2 < eff[::5].std() < 2.8  # request_effect = 2


def test_stream_carries_groups(request_data):
    s = Schema.load(request_data / "schema.yaml")
    t = pq.read_table(request_data / "train")
    by_row = dict(zip(t["row_id"].to_pylist(), t["request_id"].to_pylist()))
    n = 0
    for batch in ParquetStream(s, str(request_data / "train"), batch_size=64, prefetch_batches=0):
        real = batch.real
        assert batch.group is not None and batch.group.dtype == torch.int64
        assert torch.all(batch.group[~real] == -1)
        for r, g in zip(batch.row_id[real].tolist(), batch.group[real].tolist()):
            assert by_row[r] == g
            n += 1
    assert n == t.num_rows


def _bad_file(request_data, tmp_path, column_fn) -> Path:
    t = pq.read_table(request_data / "train" / "part-00000.parquet").slice(0, 100)
    t = column_fn(t)
    path = tmp_path / "bad.parquet"
    pq.write_table(t, path, row_group_size=30)
    return path


def _expect(schema, path, *words):
    with pytest.raises(DataError) as ei:
        for _ in ParquetStream(schema, str(path), batch_size=16, prefetch_batches=0):
            pass
    msg = str(ei.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def test_null_group_id_names_file_column_row(request_data, tmp_path):
    s = Schema.load(request_data / "schema.yaml")

    def with_null(t: pa.Table) -> pa.Table:
        vals = t["request_id"].to_pylist()
        vals[71] = None
        i = t.schema.get_field_index("request_id")
        return t.set_column(i, t.schema.field(i), pa.array(vals, type=pa.int64()))

    msg = _expect(s, _bad_file(request_data, tmp_path, with_null), "'request_id'", "null group id")
    assert int(re.search(r"\brow (\d+)\b", msg).group(1)) == 71


def test_missing_and_non_integer_group_column(request_data, tmp_path):
    s = Schema.load(request_data / "schema.yaml")
    _expect(s, _bad_file(request_data, tmp_path, lambda t: t.drop_columns(["request_id"])), "request_id", "missing")

    def as_float(t: pa.Table) -> pa.Table:
        i = t.schema.get_field_index("request_id")
        return t.set_column(i, "request_id", pa.array(t["request_id"].to_numpy().astype(np.float64)))

    _expect(s, _bad_file(request_data, tmp_path, as_float), "'request_id'", "integer group ids")


# ---------------------------------------------------------------- learning (a world of one, the CLI)
LEARN_SPEC = SyntheticSpec(num_users=2000, num_items=1000, num_segments=16, num_categories=32, user_table=20000,
                           item_table=10000, train_files=2, eval_files=1, row_group_rows=4000, request_size=8)


def group_auc(score: np.ndarray, label: np.ndarray, group: np.ndarray) -> float:
    """Row-weighted mean over the groups with both labels of the AUC inside the group (ties ½)."""
    order = np.argsort(group, kind="stable")
    score, label, group = score[order], label[order], group[order]
    cuts = np.flatnonzero(np.diff(group)) + 1
    num = den = 0.0
    for s, y in zip(np.split(score, cuts), np.split(label, cuts)):
        pos, neg = s[y == 1], s[y == 0]
        if len(pos) and len(neg):
            d = pos[:, None] - neg[None, :]
            num += len(s) * ((d > 0).mean() + 0.5 * (d == 0).mean())
            den += len(s)
    return num / den


def test_group_auc_reference():
    s = np.array([0.9, 0.1, 0.5, 0.3, 0.3, 0.7])
    y = np.array([1, 0, 0, 1, 0, 1])
    g = np.array([1, 1, 2, 2, 2, 3])  # group 3 has no negative: skipped
    assert group_auc(s, y, g) == pytest.approx((2 * 1.0 + 3 * 0.25) / 5)


@pytest.fixture(scope="module")
def learn_runs(tmp_path_factory):
    """The same data and seed trained with and without configs/ranking.yaml, each then scored."""
    import sys

    from side_by_side_runs import run_side_by_side

    root = tmp_path_factory.mktemp("ranking_learn")
    data = root / "data"
    generate(data, rows=40_000, seed=13, spec=LEARN_SPEC)
    configs = (("base", []), ("pairwise", ["--config", "configs/ranking.yaml"]),
               ("listwise", ["--config", "configs/ranking.yaml", "--set", "loss.ranking.type=listwise"]))

    def side_by_side(cmds):  # the runs as processes side by side, one thread each
        run_side_by_side(cmds, [root / f"{cmd[3]}-{i}.log" for i, cmd in enumerate(cmds)], ROOT, 900)

    side_by_side([[sys.executable, "-m", "dlrm_mtl", "train", *extra,
                   "--set", f"data.train={data / 'train'}", "--set", f"data.eval={data / 'eval'}",
                   "--set", f"train.run_dir={root / name}", "--set", "data.batch_size=256", "--set", "train.epochs=2",
                   "--set", "train.progress=false", "--set", "train.dense_lr=0.005", "--set", "train.lr_schedule=constant",
                   "--set", "train.sparse_lr=0.2", "--set", "train.log_every=10", "--set", "checkpoint.keep_best=false",
                   "--set", "train.eval_every_epoch=false", "--set", "data.shuffle_buffer_rows=0",
                   "--set", "train.threads_per_rank=1"] for name, extra in configs])
    side_by_side([[sys.executable, "-m", "dlrm_mtl", "predict", "--config", str(root / name / "config.yaml"),
                   "--checkpoint", str(root / name / "checkpoints" / "final"), "--data", str(data / "eval"),
                   "--out", str(root / f"pred_{name}"), "--keep", "request_id", "click"] for name, _ in configs])
    out = {}
    for name, _ in configs:
        run = root / name
        t = pq.read_table(root / f"pred_{name}")
        metrics = json.loads((run / "metrics.json").read_text())
        auc = next(r["auc"] for r in metrics["metrics"] if r["task"] == "ctr" and r["scenario"] == "all")
        gauc = group_auc(t["ctr"].to_numpy(), t["click"].to_numpy(), t["request_id"].to_numpy())
        out[name] = {"run": run, "auc": auc, "group_auc": gauc}
    out["data"] = data
    print({k: (v["auc"], v["group_auc"]) for k, v in out.items() if k != "data"})
    return out


def _scalars(run: Path, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0}).Reload()
    return [e.value for e in ev.Scalars(tag)] if tag in ev.Tags()["scalars"] else []


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pairwise", "listwise"])
def test_ranking_term_learns(learn_runs, kind):
    base, ranked = learn_runs["base"], learn_runs[kind]
    # the ranking term is logged and falls over training (first vs last 5 log steps)
    rank = _scalars(ranked["run"], "loss/ranking")
    assert len(rank) >= 20, rank
    assert np.mean(rank[-5:]) < np.mean(rank[:5]) - 0.05, rank
    assert _scalars(base["run"], "loss/ranking") == []  # off by default
    # ranking within requests: at least as good as the pointwise-only model; global AUC kept
    assert ranked["group_auc"] > base["group_auc"] - 0.005, (ranked, base)
    assert ranked["auc"] > base["auc"] - 0.01, (ranked, base)
    assert ranked["group_auc"] > 0.6


@pytest.mark.slow
def test_pair_rows_logged_matches_the_data(learn_runs):
    """Without shuffling, requests (8 rows, aligned with batches of 256) are never split, so the
    logged share equals the share of training rows whose request has a click and a non-click."""
    t = pq.read_table(learn_runs["data"] / "train", columns=["request_id", "click"])
    rid, y = t["request_id"].to_numpy(), t["click"].to_numpy()
    ids, inv = np.unique(rid, return_inverse=True)
    pos = np.bincount(inv, weights=y, minlength=len(ids))
    size = np.bincount(inv, minlength=len(ids))
    both = (pos > 0) & (pos < size)
    expected = both[inv].mean()
    logged = _scalars(learn_runs["pairwise"]["run"], "ranking/pair_rows")
    assert 0.2 < expected < 0.8
    assert abs(np.mean(logged) - expected) < 0.06, (np.mean(logged), expected)


@pytest.mark.slow
def test_two_ranks_sharded(learn_runs, tmp_path):
    """configs/ranking.yaml under torchrun with 2 ranks (DMP tables, DDP dense part): runs,
    logs the term, and the ranked ctr learns (AUC well above 0.5 after one epoch)."""
    import subprocess
    import sys

    data, run = learn_runs["data"], tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "dlrm_mtl", "train",
           "--config", "configs/ranking.yaml", "--set", f"data.train={data / 'train'}", "--set", f"data.eval={data / 'eval'}",
           "--set", f"train.run_dir={run}", "--set", "data.batch_size=128", "--set", "train.epochs=1",
           "--set", "train.progress=false", "--set", "train.log_every=10", "--set", "checkpoint.keep_best=false",
           "--set", "train.eval_every_epoch=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["throughput"]["world_size"] == 2
    auc = next(r["auc"] for r in metrics["metrics"] if r["task"] == "ctr" and r["scenario"] == "all")
    assert auc > 0.6, auc
    rank = _scalars(run, "loss/ranking")
    share = _scalars(run, "ranking/pair_rows")
    assert len(rank) >= 5 and all(0 < v < 2 for v in rank), rank
    assert all(0 < v < 1 for v in share), share
