"""tools/bench_peer.py: its data generator, its AUC, that its peer model has dlrm_mtl's widths,
and (slow) one tiny end-to-end case of both sides."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dlrm_mtl.config import Config
from dlrm_mtl.schema import Schema

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_peer", ROOT / "tools" / "bench_peer.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_peer"] = bench  # its dataclasses look their module up while being defined
_spec.loader.exec_module(bench)

TINY = dict(files=(2, 1), row_group_rows=300)


def _tables(d: Path):
    return {p.relative_to(d).as_posix(): pq.read_table(p) for p in sorted(d.glob("*/*.parquet"))}


@pytest.mark.parametrize("shape", bench.SHAPES)
def test_generator_is_deterministic_for_a_seed(tmp_path, shape):
    a = bench.generate(shape, tmp_path / "a", 900, 300, seed=5, **TINY)
    b = bench.generate(shape, tmp_path / "b", 900, 300, seed=5, **TINY)
    c = bench.generate(shape, tmp_path / "c", 900, 300, seed=6, **TINY)
    ta, tb, tc = _tables(a), _tables(b), _tables(c)
    assert sorted(ta) == ["eval/part-00000.parquet", "train/part-00000.parquet", "train/part-00001.parquet"]
    assert all(ta[k].equals(tb[k]) for k in ta)
    assert (a / "schema.yaml").read_text() == (b / "schema.yaml").read_text()
    assert not ta["train/part-00000.parquet"].equals(tc["train/part-00000.parquet"])
    assert pq.ParquetFile(a / "train" / "part-00000.parquet").metadata.num_row_groups == 2  # 450 rows, groups of 300
    ids = np.concatenate([t["row_id"].to_numpy() for t in ta.values()])
    assert sorted(ids.tolist()) == list(range(1200))  # unique row ids across the splits


@pytest.mark.parametrize("shape", bench.SHAPES)
def test_generated_data_is_read_by_dlrm_mtl(tmp_path, shape):
    from dlrm_mtl.data import ParquetStream

    out = bench.generate(shape, tmp_path / shape, 1000, 400, seed=1, **TINY)
    schema = Schema.load(out / "schema.yaml")
    assert all(d.standardize and d.std > 0 for d in schema.dense)
    stream = ParquetStream(schema, str(out / "train"), batch_size=256, shuffle_buffer_rows=0, prefetch_batches=0)
    ids, dense = [], []
    for batch in stream:
        real = batch.row_id >= 0
        ids.append(batch.row_id[real].numpy())
        dense.append(batch.dense[real].numpy())
        assert batch.labels.shape == (256, len(schema.tasks)) and bool(batch.label_mask[real].all())
    assert np.concatenate(ids).tolist() == list(range(1000)) and stream.counters() == {}
    x = np.concatenate(dense)  # the schema's statistics standardise the training split
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(x.std(0), 1, atol=1e-3)
    # the peer's own reader sees the same rows and dense values (transform + standardisation)
    split = bench.load_split(schema, out / "train")
    assert split.rows == 1000
    np.testing.assert_allclose(split.dense, x, atol=1e-5)


def test_generated_rates_follow_the_known_model(tmp_path):
    c = pq.read_table(bench.generate("census", tmp_path / "c", 20_000, 10, seed=0, **TINY) / "train")
    assert 0.045 < float(np.mean(c["income_50k"].to_numpy())) < 0.075
    assert 0.35 < float(np.mean(c["never_married"].to_numpy())) < 0.45
    assert max(int(c[n].to_numpy().max()) for n, _ in bench.CENSUS_FIELDS) <= 51
    m = pq.read_table(bench.generate("movielens", tmp_path / "m", 20_000, 10, seed=0, **TINY) / "train")
    click, like = m["click"].to_numpy(), m["like"].to_numpy()
    assert 0.5 < click.mean() < 0.6 and 0.35 < like[click == 1].mean() < 0.45
    assert not (like > click).any()  # like => click
    lengths = np.diff(m["genres"].combine_chunks().offsets.to_numpy())
    assert lengths.min() == 1 and lengths.max() == 3
    assert set(np.unique(m["age_group"].to_numpy())) == {0, 1, 2}


def _brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


@pytest.mark.parametrize("seed", range(5))
def test_rank_auc_equals_pairwise_auc_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    y = (rng.random(n) < rng.uniform(0.05, 0.9)).astype(np.float32)
    y[0], y[1] = 0, 1  # both classes
    s = np.round(rng.normal(size=n) + y * rng.uniform(0, 2), int(rng.integers(0, 2)))  # many ties
    assert np.unique(s).size < n
    assert bench.rank_auc(y, s) == pytest.approx(_brute_auc(y, s), abs=1e-12)
    assert bench.rank_auc(y, np.zeros(n)) == pytest.approx(0.5)
    assert np.isnan(bench.rank_auc(np.ones(4), np.arange(4.0)))


def test_auc_views_follow_dlrm_mtl_views():
    schema = bench.shape_schema("movielens", {"release_year": (0.0, 1.0)})
    rng = np.random.default_rng(0)
    click = (rng.random(500) < 0.5).astype(np.float32)
    like = click * (rng.random(500) < 0.4)
    probs = rng.random((500, 2))
    views = bench.auc_views(schema, np.stack([click, like], 1), probs)
    assert list(views) == ["click", "like", "click_like"]
    assert views["click"] == pytest.approx(_brute_auc(click, probs[:, 0]))
    assert views["like"] == pytest.approx(_brute_auc(like[click == 1], probs[click == 1, 1]))
    assert views["click_like"] == pytest.approx(_brute_auc(like, probs[:, 0] * probs[:, 1]))
    calib = bench.calibration_views(schema, np.stack([click, like], 1), probs)  # Σ p / Σ y on the same rows
    assert list(calib) == list(views)
    assert calib["click"] == pytest.approx(probs[:, 0].sum() / click.sum())
    assert calib["like"] == pytest.approx(probs[click == 1, 1].sum() / like[click == 1].sum())
    assert calib["click_like"] == pytest.approx((probs[:, 0] * probs[:, 1]).sum() / like.sum())


def test_gather_lists_selects_rows_in_order():
    off = np.array([0, 2, 2, 5, 6])
    vals = np.array([10, 11, 20, 21, 22, 30])
    o, v = bench.gather_lists(off, vals, np.array([3, 0, 2, 1]))
    assert o.tolist() == [0, 1, 3, 6, 6] and v.tolist() == [30, 10, 11, 20, 21, 22]


def _dlrm_model(schema, arch: str):
    import torch

    from dlrm_mtl.models import MultiScenarioMultiTaskModel

    sets = ["model.dense_arch=[]"] + (["model.interaction=concat"] if bench.concat_supported() else [])
    cfg = Config.load([str(ROOT / "configs" / "arch" / f"{arch}.yaml")], sets)
    torch.manual_seed(0)
    return MultiScenarioMultiTaskModel(schema, cfg.model, device=torch.device("cpu")), cfg


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _x_width(model, schema, data: Path) -> int:
    """Width of x entering dlrm_mtl's first task layer, read with a forward hook on a real batch."""
    from dlrm_mtl.data import ParquetStream

    seen = []
    hook = model.dense_arch.task_layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-1]))
    batch = next(iter(ParquetStream(schema, str(data / "train"), batch_size=16, prefetch_batches=0)))
    model(batch.sparse, batch.dense, batch.scenario)
    hook.remove()
    return seen[0]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_peer")
    return {s: bench.generate(s, root / s, 300, 100, seed=0, **TINY) for s in bench.SHAPES}


@pytest.mark.parametrize("shape", bench.SHAPES)
@pytest.mark.parametrize("arch", bench.ARCHS)
def test_peer_has_dlrm_mtl_widths(tiny_data, shape, arch):
    """Equal parameter counts, part by part: every embedding table (shape), the scenario
    embeddings, and the expert part + towers given the same input width. Left out: dlrm_mtl's
    ``dense_mlp`` (a Linear(dense, D) under the dot interaction; none under concat with
    ``dense_arch: []``), which the peer does not have."""
    schema = Schema.load(tiny_data[shape] / "schema.yaml")
    model, cfg = _dlrm_model(schema, arch)
    d = _x_width(model, schema, tiny_data[shape])
    peer = bench.build_peer_model(schema, arch, in_dim=d)
    tables = {c.name: (c.num_embeddings, c.embedding_dim) for c in model.ebc.embedding_bag_configs()}
    by_feature = {f.name: tables[f.table] for f in schema.sparse}
    assert {n: tuple(e.weight.shape) for n, e in peer.emb.items()} == by_feature
    assert _numel(peer.emb) == _numel(model.ebc)
    assert _numel(peer.scenario_emb) == _numel(model.dense_arch.scenario_emb)
    expert_part = _numel(peer) - _numel(peer.emb) - _numel(peer.scenario_emb)
    assert expert_part == _numel(model.dense_arch.task_layers) + _numel(model.dense_arch.towers)
    assert _numel(model.dense_arch) - _numel(model.dense_arch.dense_mlp) == _numel(peer) - _numel(peer.emb)


@pytest.mark.skipif(not bench.concat_supported(), reason="this dlrm_mtl has no model.interaction (concat) yet")
@pytest.mark.parametrize("shape", bench.SHAPES)
def test_concat_input_is_the_peers_input(tiny_data, shape):
    schema = Schema.load(tiny_data[shape] / "schema.yaml")
    model, _ = _dlrm_model(schema, "mmoe")
    assert _x_width(model, schema, tiny_data[shape]) == bench.peer_input_dim(schema, model.dense_arch.scenario_emb[0].embedding_dim)
    assert _numel(model.dense_arch.dense_mlp) == 0  # the raw dense features, as the peer


def test_peer_forward_and_loss_shapes(tiny_data):
    import torch

    schema = Schema.load(tiny_data["movielens"] / "schema.yaml")
    split = bench.load_split(schema, tiny_data["movielens"] / "train")
    ids, bags, dense, scen, y = bench.peer_batches(split, np.arange(7))
    for arch in bench.ARCHS:
        model = bench.build_peer_model(schema, arch)
        x = model.features(ids, bags, dense, scen)
        assert x.shape == (7, bench.peer_input_dim(schema))
        logits = model(x)
        assert logits.shape == (7, 2)
        loss = bench.peer_loss(schema, logits, y)
        p = torch.sigmoid(logits)
        expect = (torch.nn.functional.binary_cross_entropy(p[:, 0], y[:, 0])
                  + torch.nn.functional.binary_cross_entropy(p[:, 0] * p[:, 1], y[:, 0] * y[:, 1]))
        torch.testing.assert_close(loss, expect)


def test_side_a_command_carries_the_tuned_rate_and_schedule(tmp_path):
    """Quick runs give dlrm_mtl the peer's constant rate (its tuned schedule at that size); full
    runs leave its default cosine schedule and dense rate alone."""
    from dlrm_mtl.config import Config

    for quick, want in ((True, ("constant", 1e-2)), (False, ("cosine", Config().train.dense_lr))):
        size = bench.run_sizes(quick)["movielens"]
        cmd = bench.side_a_command(tmp_path / "data", "mmoe", size, tmp_path / f"run{quick}", concat=True)
        sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
        configs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--config"]
        train = Config.load(configs, sets).train
        assert (train.lr_schedule, train.dense_lr) == want
        assert train.epochs == size.epochs


def test_repeat_r_trains_with_seed_r_on_both_sides(tmp_path, monkeypatch):
    """Repeat r: dlrm_mtl's train.seed r (a --set of the user still wins) and the peer's --seed
    r, so that the repeats' AUCs are over seeds rather than one seed pair."""
    from dlrm_mtl.config import Config

    seen = []

    class Stop(Exception):
        pass

    def fake_child(cmd, cwd):
        seen.append(cmd)
        raise Stop

    monkeypatch.setattr(bench, "run_child", fake_child)
    size = bench.run_sizes(True)["census"]
    for rep in (0, 1, 2):
        with pytest.raises(Stop):
            bench.run_side_a(tmp_path / "data", "mmoe", size, tmp_path / f"a{rep}", rep, concat=True)
        with pytest.raises(Stop):
            bench.run_side_b(tmp_path / "data", "mmoe", size, rep)
    with pytest.raises(Stop):
        bench.run_side_a(tmp_path / "data", "mmoe", size, tmp_path / "user", 1, concat=True, extra=["train.seed=7"])
    seeds = []
    for cmd in seen:
        if "--peer" in cmd:
            seeds.append(("peer", int(cmd[cmd.index("--seed") + 1])))
        else:
            sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
            configs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--config"]
            seeds.append(("A", Config.load(configs, sets).train.seed))
    assert seeds == [("A", 0), ("peer", 0), ("A", 1), ("peer", 1), ("A", 2), ("peer", 2), ("A", 7)]


def test_repeats_are_numbered_from_first_repeat(tiny_data, tmp_path, monkeypatch):
    """``--first-repeat R`` (tools/side_by_side.sh: one repeat per call) numbers the repeats
    from R, so repeat r still trains with seed r on both sides, alternating A B B A."""
    calls = []
    monkeypatch.setattr(bench, "run_side_a", lambda data, arch, size, run_dir, rep, concat, extra=(): calls.append(("A", rep)))
    monkeypatch.setattr(bench, "run_side_b", lambda data, arch, size, rep: calls.append(("peer", rep)))
    monkeypatch.setattr(bench, "format_run", lambda case, r: "")
    size = bench.run_sizes(True)["census"]
    bench.run_case("census", "mmoe", tiny_data["census"], size, 2, tmp_path, True, first_repeat=3)
    assert calls == [("peer", 3), ("A", 3), ("A", 4), ("peer", 4)]
    calls.clear()
    bench.run_case("census", "mmoe", tiny_data["census"], size, 1, tmp_path, True)
    assert calls == [("A", 0), ("peer", 0)]


@pytest.mark.slow
def test_tiny_end_to_end_run_reports_both_sides(tmp_path):
    out = tmp_path / "peer.json"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_peer.py"), "--quick", "--cases", "census:shared_bottom", "--repeats", "1",
           "--train-rows", "12000", "--epochs", "3", "--data-root", str(tmp_path / "data"), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ratio A/peer" in proc.stdout
    doc = json.loads(out.read_text())
    (case,) = doc["cases"]
    assert (case["shape"], case["arch"]) == ("census", "shared_bottom")
    for key in ("ratio", "startup_s", "import_s", "auc", "peer_auc", "samples_per_s", "peer_samples_per_s",
                "peer_startup_s", "peer_import_s", "peer_eval_s", "eval_s", "oracle_auc", "runs", "ratio_runs"):
        assert key in case, key
    assert case["ratio"] > 0 and len(case["ratio_runs"]) == 1
    assert [r["side"] for r in case["runs"]] == ["A", "peer"]
    assert case["peer_startup_s"] > case["peer_import_s"] > 0
    assert case["auc"]["income"] > 0.6 and case["peer_auc"]["income"] > 0.6
    assert set(case["auc"]) == set(case["peer_auc"]) == {"income", "marital"}
    # calibration of both sides on the same views (dlrm_mtl's from metrics.json)
    assert set(case["calibration"]) == set(case["peer_calibration"]) == {"income", "marital"}
    assert all(0.3 < v < 3 for v in list(case["calibration"].values()) + list(case["peer_calibration"].values()))
    assert 0.6 < case["oracle_auc"]["income"] <= 1
    # both sides' tuned rates survive the command-line size overrides
    quick = bench.run_sizes(True)["census"]
    assert case["size"]["dense_lr"] == quick.dense_lr is not None and case["size"]["peer_lr"] == quick.peer_lr


def test_runs_that_lost_cpu_to_other_processes_or_the_vms_host_are_flagged():
    """A repeat is flagged noisy when other processes on the machine, or the hypervisor
    (``steal`` in /proc/stat), took more than NOISY_SHARE of a core on average."""
    def run(other, steal):
        return bench.RunResult(side="A", rep=0, startup_s=1.0, import_s=0.5, samples_per_s=1.0, train_s=1.0, eval_s=0.1,
                               wall_s=10.0, auc={}, other_cpu_s=other, steal_s=steal)

    share = bench.NOISY_SHARE * 10.0
    assert not bench.noisy(run(0.0, 0.0)) and not bench.noisy(run(None, None))
    assert bench.noisy(run(share + 0.1, 0.0)) and bench.noisy(run(0.0, share + 0.1))
    assert bench.noisy(run(share / 2 + 0.1, share / 2 + 0.1))  # the two together
    steal = bench.machine_steal_s()
    assert steal is None or steal >= 0.0
