"""Synthetic multi-scenario, multi-task impression logs with known true probabilities.

Design §7. Rows belong to one of 2 channels x 2 domains = 4 leaf scenarios of very
different sizes and base rates (one large with rare conversions, one small and
conversion-rich). Labels come from a known model:

* latent taste ``u`` per user segment, latent ``v`` per item category (dim K);
* pCTR = σ(b_ctr[s] + <u, v> + β_ctr[s]·v + γ[s]·u
          + 0.9·[item category in the user's history] + user/item id biases + quality − position)
* pCVR = σ(b_cvr[s] + 0.6·<u, v> + c·v + β_cvr[s]·v − price + activity)
  (<u, v> is shared by both tasks and all scenarios — unless ``small_leaf_conflict`` flips it in
  the smallest leaf; β, γ are scenario-specific directions in
  the latent space, largest
  in the small scenario, so hard sharing shows negative transfer there)
* click ~ Bernoulli(pCTR); conversion ~ click · Bernoulli(pCVR)   (conversion ⇒ click)

The true ``true_pctr``, ``true_pcvr``, ``true_pctcvr`` are written per row, so every run can
report the oracle AUC (the ceiling any model can reach). Deterministic for a seed.

Options (``SyntheticSpec``; all off by default, and the default data set is unchanged by them):

* ``esm2``: ESM²'s action split (Wen et al. 2020). A clicked row takes a deterministic action
  D (``d_action``, e.g. add-to-cart) with y2 = P(D | click); conversion then follows
  y3 = P(buy | D) or y4 = P(buy | ¬D), so pCVR = y2·y3 + (1−y2)·y4. Truths:
  ``true_pdact``, ``true_pbuy_d``, ``true_pbuy_o``, and ``true_pcvr`` is that mixture.
* ``regression``: a completion ratio ``completion`` in [0, 1] on every impression (e.g. of
  an auto-playing preview), drawn from Beta(μκ, (1−μ)κ), κ = 8, with known mean
  μ = ``true_completion`` (PLE's VCR), so the best possible MSE is known.
* ``position_bias``: the schema moves ``position`` from the dense features to a
  position-bias tower on ``ctr`` (the click model has the effect −``position_effect``·(pos−1)).
* ``child_on_parent`` (w): the conversion depends on the click's latent — the conversion logit
  gains w · (click logit − its leaf base rate + the position effect), i.e. the row's own
  click propensity. A model that reads the click head's representation (``model.heads``:
  dbmtl, aitm, nmtr) can take it from the click task, trained on every impression;
  independent towers must learn it from the conversion signal alone. No extra random draws:
  features and clicks are those of w = 0.
* ``request_size`` (n > 0): request groups for ranking losses (``loss.ranking``). Consecutive
  rows of a part file form requests of n rows, id ``request_id`` (the row id of the request's
  first row; the schema's ``group_id``); each request has an unobserved effect
  e ~ N(0, ``request_effect``²) added to the click logit of its rows (the page's context:
  some requests click more). A pointwise loss must absorb e as noise; a ranking loss within
  the request cancels it. The effects come from a generator of their own, so the features
  are those of the default world (the clicks differ: their probabilities do).
* ``sequence_len`` (L > 0): a behaviour sequence per row (issue: behaviour sequences): the
  items the user interacted with, oldest first, ``hist_items`` (raw ids, hashed), with two
  aligned side-info columns, ``hist_item_categories`` (each event's item category) and
  ``hist_ages`` (0 = the most recent event, 1 the one before, ...); the schema also reads the
  candidate's ``item_id`` and ``item_category`` as a sequence of one in the history's tables
  (``cand_item`` with ``cand_item_category``: DIN's shared embedding space). Rows hold 0 to 1.25·L
  events (the schema keeps the last L: longer rows are truncated, counted). Events are drawn
  like the multi-hot history (mostly the segment's favourite categories, an item of that
  category), 15 % of them of the candidate's own category. The click logit gains ``sequence_effect`` · (Σ_j γ^{age_j} · [category_j = the
  candidate's category] − c) over the kept events, γ = ``sequence_decay``, c a constant
  centring it: recent events of the candidate's category raise the click, older ones hardly.
  A mean over the events loses which category came when (the mean of [item, category, age]
  embeddings keeps the histogram of each, not their pairing) — target attention, which
  weighs each event by its match with the candidate and its age, can reach the oracle. The
  events come from a generator of their own: the other features are those of the default world.

Example::

    from dlrm_mtl.synthetic import generate
    generate("data/synthetic", rows=200_000, seed=0)   # train/*.parquet, eval/*.parquet, schema.yaml
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dlrm_mtl.schema import DenseFeature, PositionBias, Schema, ScenarioLevel, SparseFeature, Task


@dataclass(frozen=True)
class SyntheticSpec:
    num_users: int = 20_000  # active users; raw ids are random 62-bit integers ...
    num_items: int = 10_000
    user_table: int = 500_000  # ... hashed into tables this large (schema: hash: true)
    item_table: int = 200_000
    num_segments: int = 64
    num_categories: int = 256
    latent_dim: int = 4
    max_hist: int = 8
    # leaf scenario = channel * 2 + domain
    leaf_share: tuple = (0.55, 0.27, 0.11, 0.07)
    ctr_base: tuple = (0.035, 0.06, 0.05, 0.12)  # base rates before features
    cvr_base: tuple = (0.02, 0.05, 0.08, 0.25)
    eval_fraction: float = 0.2
    train_files: int = 6
    eval_files: int = 2
    row_group_rows: int = 32_768
    esm2: bool = False  # ESM² deterministic-action split of the conversion path
    regression: bool = False  # completion-ratio regression target on clicked rows
    position_bias: bool = False  # schema: position feeds a bias tower instead of the model
    position_effect: float = 0.08  # click logit decreases by this per position
    cvr_loss_space: str = "entire"  # schema: entire (ESMM) | parent_positive (PLE's mask)
    # conflicting preferences in the smallest leaf (vertical/product_card): the shared affinity
    # <u, v> enters its click and conversion logits with weight 1 − 2·c instead of 1 (c = 0.75:
    # −0.5, users there avoid what everyone else likes). 0 = the default world, byte-identical.
    small_leaf_conflict: float = 0.0
    # the conversion depends on the click's latent (task-relation heads, issue 17): the conversion
    # logit gains this times the click logit's row-specific part (the click logit less its
    # leaf base rate and the position effect). 0 = the default world, byte-identical.
    child_on_parent: float = 0.0
    # request groups (loss.ranking): rows per request (0 = none, the default world,
    # byte-identical) and the standard deviation of the request-level click-logit effect
    request_size: int = 0
    request_effect: float = 1.5
    # behaviour sequences (issue 18): events per row (0 = none, the default world,
    # byte-identical), their click effect and its decay per step of age
    sequence_len: int = 0
    sequence_effect: float = 2.0
    sequence_decay: float = 0.6


def synthetic_schema(spec: SyntheticSpec = SyntheticSpec()) -> Schema:
    tasks = [Task("ctr", "click", oracle="true_pctr")]
    if spec.esm2:
        tasks += [
            Task("dact", "d_action", parent="ctr", loss_space="entire", entire_name="ctavr", oracle="true_pdact"),
            Task("buy_d", "conversion", parent="dact", loss_space="none", oracle="true_pbuy_d"),
            Task("buy_o", "conversion", parent="!dact", loss_space="none", oracle="true_pbuy_o"),
            Task("cvr", "conversion", parent="ctr", loss_space="entire", entire_name="ctcvr", oracle="true_pcvr",
                 sum_of=["buy_d", "buy_o"]),
        ]
    else:
        tasks.append(Task("cvr", "conversion", parent="ctr", loss_space=spec.cvr_loss_space, entire_name="ctcvr", oracle="true_pcvr"))
    if spec.regression:
        tasks.append(Task("completion", "completion", type="regression", oracle="true_completion"))
    schema = _base_schema(spec, tasks)
    if spec.position_bias:
        schema.dense = [d for d in schema.dense if d.name != "position"]
        schema.position_bias = PositionBias(features=["position"], tasks=["ctr"], reference=[1.0])
        schema.validate()
    if spec.request_size > 0:
        schema.group_id = "request_id"
        schema.validate()
    if spec.sequence_len > 0:
        L = spec.sequence_len
        schema.sequence = [
            SparseFeature("hist_items", "t_hist_item", spec.item_table, 16, hash=True, sequence=True, max_len=L),
            SparseFeature("hist_item_categories", "t_hist_category", spec.num_categories, 8, sequence=True, max_len=L,
                          aligned_with="hist_items"),
            SparseFeature("hist_ages", "t_hist_age", _max_events(L), 8, sequence=True, max_len=L, aligned_with="hist_items"),
            # the candidate in the history's tables (a sequence of one over the item_id and
            # item_category columns): the attention's target, in the events' embedding space
            SparseFeature("cand_item", "t_hist_item", spec.item_table, 16, hash=True, sequence=True, max_len=1,
                          column="item_id"),
            SparseFeature("cand_item_category", "t_hist_category", spec.num_categories, 8, sequence=True, max_len=1,
                          column="item_category", aligned_with="cand_item"),
        ]
        schema.validate()
    return schema


_SAME_CATEGORY = 0.15  # share of behaviour events drawn from the candidate's own category


def _max_events(sequence_len: int) -> int:
    """The longest behaviour sequence the generator writes (the schema keeps the last L)."""
    return sequence_len + (sequence_len + 3) // 4


def _base_schema(spec: SyntheticSpec, tasks: List[Task]) -> Schema:
    return Schema(
        name="synthetic",
        row_id="row_id",
        sparse=[
            SparseFeature("user_id", "t_user", spec.user_table, 16, hash=True),
            SparseFeature("item_id", "t_item", spec.item_table, 16, hash=True),
            SparseFeature("user_segment", "t_segment", spec.num_segments, 16),
            # item category and the user's history share one table: membership of the item's
            # category in the history is a dot product of the two pooled embeddings.
            SparseFeature("item_category", "t_category", spec.num_categories, 16),
            SparseFeature(
                "hist_categories", "t_category", spec.num_categories, 16,
                multi_hot=True, max_len=spec.max_hist,
            ),
            SparseFeature("device", "t_device", 8, 16),
        ],
        dense=[
            DenseFeature("price", "log1p"),
            DenseFeature("activity", "log1p"),
            DenseFeature("quality"),
            DenseFeature("position"),
        ],
        scenarios=[
            ScenarioLevel("channel", 2, value_names=["home", "vertical"]),
            ScenarioLevel("domain", 2, value_names=["hot_card", "product_card"]),
        ],
        tasks=tasks,
        user_id="user_id",
    )


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def _zipf_sampler(rng: np.random.Generator, n: int, alpha: float, offset: float):
    """Ids in [0, n) with P(rank r) ∝ (r + offset)^-alpha, ranks mapped through a permutation."""
    w = (np.arange(n) + offset) ** -alpha
    cdf = np.cumsum(w / w.sum())
    perm = rng.permutation(n)

    def sample(size: int, r: np.random.Generator) -> np.ndarray:
        return perm[np.minimum(np.searchsorted(cdf, r.random(size)), n - 1)]

    return sample


class _World:
    """The hidden generative model (drawn once from the seed)."""

    def __init__(self, spec: SyntheticSpec, seed: int) -> None:
        rng = np.random.default_rng([seed, 1])
        K = spec.latent_dim
        self.spec = spec
        self.seed = seed
        self.taste = rng.normal(0, 1, (spec.num_segments, K)) / math.sqrt(K) * 1.6
        self.cat_vec = rng.normal(0, 1, (spec.num_categories, K)) / math.sqrt(K) * 1.6
        self.user_segment = rng.integers(0, spec.num_segments, spec.num_users)
        self.item_category = rng.integers(0, spec.num_categories, spec.num_items)
        self.user_bias = rng.normal(0, 0.1, spec.num_users)
        self.item_bias = rng.normal(0, 0.1, spec.num_items)
        self.item_price = rng.lognormal(3.0, 0.8, spec.num_items)
        self.item_quality = rng.normal(0, 1, spec.num_items)
        # scenario-specific preferences: per leaf, a direction in the category / segment latent
        # space (low rank, so a small scenario can learn it); the small conversion-rich leaf
        # departs most from the others, so hard sharing shows negative transfer there.
        leaf_scale = np.array([0.3, 0.45, 0.6, 0.9])[:, None]

        def directional(latent: np.ndarray, sd: np.ndarray) -> np.ndarray:
            eff = rng.normal(0, 1, (4, K)) @ latent.T  # [4, N]
            return eff / eff.std(axis=1, keepdims=True) * sd

        self.ctr_leaf_cat = directional(self.cat_vec, leaf_scale)  # [4, C]
        self.ctr_leaf_seg = directional(self.taste, np.full((4, 1), 0.3))  # [4, S]
        self.cvr_cat = directional(self.cat_vec, np.full((1, 1), 0.5))[0]  # [C]
        self.cvr_leaf_cat = directional(self.cat_vec, leaf_scale * 0.8)  # [4, C]
        self.user_raw_id = rng.integers(0, 2**62, spec.num_users, dtype=np.int64)
        self.item_raw_id = rng.integers(0, 2**62, spec.num_items, dtype=np.int64)
        self.users = _zipf_sampler(rng, spec.num_users, 1.05, 20.0)
        self.items = _zipf_sampler(rng, spec.num_items, 1.05, 20.0)
        # each segment's favourite categories (history is drawn mostly from these)
        aff = self.taste @ self.cat_vec.T  # [S, C]
        self.fav = np.argsort(-aff, axis=1)[:, :24]

    def rows(self, n: int, rng: np.random.Generator, start_id: int) -> Dict[str, object]:
        spec = self.spec
        leaf = rng.choice(4, size=n, p=np.asarray(spec.leaf_share) / sum(spec.leaf_share))
        user = self.users(n, rng)
        item = self.items(n, rng)
        seg = self.user_segment[user]
        cat = self.item_category[item]
        # multi-hot history: 1..max_hist categories, mostly the segment's favourites
        lengths = np.minimum(1 + rng.poisson(2.5, n), spec.max_hist)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tot = int(offsets[-1])
        row_of = np.repeat(np.arange(n), lengths)
        from_fav = rng.random(tot) < 0.75
        hist = np.where(
            from_fav,
            self.fav[seg[row_of], rng.integers(0, self.fav.shape[1], tot)],
            rng.integers(0, spec.num_categories, tot),
        )
        in_hist = np.add.reduceat((hist == cat[row_of]).astype(np.int64), offsets[:-1]) > 0
        device = rng.integers(0, 8, n)
        activity = rng.gamma(2.0, 2.0, n)
        position = rng.integers(1, 11, n).astype(np.float64)
        price = self.item_price[item] * np.exp(rng.normal(0, 0.1, n))
        quality = self.item_quality[item]

        affinity = (self.taste[seg] * self.cat_vec[cat]).sum(1)  # shared <u, v>
        if spec.small_leaf_conflict:
            affinity = affinity * np.where(leaf == 3, 1.0 - 2.0 * spec.small_leaf_conflict, 1.0)
        ctr_logit = (
            _logit(np.asarray(spec.ctr_base))[leaf]
            + affinity
            + self.ctr_leaf_cat[leaf, cat]
            + self.ctr_leaf_seg[leaf, seg]
            + 0.9 * in_hist
            + self.user_bias[user]
            + self.item_bias[item]
            + 0.35 * quality
            - spec.position_effect * (position - 1)
        )
        request: Dict[str, object] = {}
        if spec.request_size > 0:  # its own generator: the default draws are untouched
            ctr_logit, request = self._requests(ctr_logit, n, start_id)
        if spec.sequence_len > 0:  # its own generator too
            effect, sequence = self._sequences(seg, cat, n, start_id)
            ctr_logit = ctr_logit + effect
            request.update(sequence)
        cvr_logit = (
            _logit(np.asarray(spec.cvr_base))[leaf]
            + 0.6 * affinity
            + self.cvr_cat[cat]
            + self.cvr_leaf_cat[leaf, cat]
            - 0.6 * (np.log1p(price) - 3.0)
            + 0.25 * (np.log1p(activity) - 1.3)
        )
        if spec.child_on_parent:  # no extra draws: features and clicks stay byte-identical
            click_latent = ctr_logit - _logit(np.asarray(spec.ctr_base))[leaf] + spec.position_effect * (position - 1)
            cvr_logit = cvr_logit + spec.child_on_parent * click_latent
        pctr = 1 / (1 + np.exp(-ctr_logit))
        pcvr = 1 / (1 + np.exp(-cvr_logit))
        click = rng.random(n) < pctr
        conversion = click & (rng.random(n) < pcvr)
        extra: Dict[str, object] = {}
        # options draw after every default draw, so the default columns stay byte-identical
        if spec.esm2:
            pdact = 1 / (1 + np.exp(-(-0.4 + 0.8 * affinity + 0.5 * quality)))
            pbuy_d = 1 / (1 + np.exp(-(cvr_logit + 1.2)))
            pbuy_o = 1 / (1 + np.exp(-(cvr_logit - 1.2)))
            d_action = click & (rng.random(n) < pdact)
            u = rng.random(n)
            conversion = click & np.where(d_action, u < pbuy_d, u < pbuy_o)
            pcvr = pdact * pbuy_d + (1 - pdact) * pbuy_o
            extra.update(
                d_action=d_action.astype(np.int64), true_pdact=pdact.astype(np.float32),
                true_pbuy_d=pbuy_d.astype(np.float32), true_pbuy_o=pbuy_o.astype(np.float32),
            )
        if spec.regression:
            mu = 1 / (1 + np.exp(-(0.2 + 0.7 * affinity + 0.5 * quality - 0.3 * (np.log1p(price) - 3.0))))
            kappa = 8.0
            y = rng.beta(mu * kappa, (1 - mu) * kappa)
            extra.update(completion=y.astype(np.float32), true_completion=mu.astype(np.float32))
        return {
            "row_id": np.arange(start_id, start_id + n, dtype=np.int64),
            "user_id": self.user_raw_id[user],
            "item_id": self.item_raw_id[item],
            "user_segment": seg.astype(np.int64),
            "item_category": cat.astype(np.int64),
            "hist_categories": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(hist.astype(np.int64))),
            "device": device.astype(np.int64),
            "price": price.astype(np.float32),
            "activity": activity.astype(np.float32),
            "quality": quality.astype(np.float32),
            "position": position.astype(np.float32),
            "channel": (leaf // 2).astype(np.int64),
            "domain": (leaf % 2).astype(np.int64),
            "click": click.astype(np.int64),
            "conversion": conversion.astype(np.int64),
            "true_pctr": pctr.astype(np.float32),
            "true_pcvr": pcvr.astype(np.float32),
            "true_pctcvr": (pctr * pcvr).astype(np.float32),
            **extra,
            **request,
        }

    def _sequences(self, seg: np.ndarray, cat: np.ndarray, n: int, start_id: int) -> tuple:
        """The rows' behaviour sequences -> (their click-logit effect ``[n]``, columns)."""
        spec = self.spec
        L, gamma = spec.sequence_len, spec.sequence_decay
        rng = np.random.default_rng([self.seed, 4, start_id])
        lengths = rng.integers(0, _max_events(L) + 1, n)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tot = int(offsets[-1])
        row_of = np.repeat(np.arange(n), lengths)
        age = (offsets[1:][row_of] - 1 - np.arange(tot)).astype(np.int64)  # 0 = the row's most recent event
        ecat = np.where(rng.random(tot) < 0.75, self.fav[seg[row_of], rng.integers(0, self.fav.shape[1], tot)],
                        rng.integers(0, spec.num_categories, tot))
        ecat = np.where(rng.random(tot) < _SAME_CATEGORY, cat[row_of], ecat)  # some events of the candidate's category
        # an item of that category (categories without items: any item)
        by_cat = np.argsort(self.item_category, kind="stable")
        first = np.searchsorted(self.item_category[by_cat], np.arange(spec.num_categories))
        count = np.bincount(self.item_category, minlength=spec.num_categories)
        pick = rng.random(tot)
        item = np.where(count[ecat] > 0, by_cat[np.minimum(first[ecat] + (pick * count[ecat]).astype(np.int64), len(by_cat) - 1)],
                        rng.integers(0, spec.num_items, tot))
        ecat = self.item_category[item]
        kept = age < L  # the schema keeps the last L events
        score = np.bincount(row_of, weights=np.where(kept & (ecat == cat[row_of]), gamma ** age, 0.0), minlength=n)
        # centred near the score's mean (every event matching with probability ~_SAME_CATEGORY):
        # the base rates stay close to the default world's
        centre = _SAME_CATEGORY / (1 - gamma)
        effect = spec.sequence_effect * (score - centre)

        def lists(x: np.ndarray) -> pa.ListArray:
            return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(x.astype(np.int64)))

        return effect, {"hist_items": lists(self.item_raw_id[item]), "hist_item_categories": lists(ecat), "hist_ages": lists(age)}

    def _requests(self, ctr_logit: np.ndarray, n: int, start_id: int) -> tuple:
        """``ctr_logit [n]`` -> (the logit plus its request's effect, {"request_id": [n]}):
        requests of ``request_size`` consecutive rows, ids = their first row's id."""
        size = self.spec.request_size
        local = np.arange(n) // size  # [n] request index within this part
        effect = np.random.default_rng([self.seed, 3, start_id]).normal(0, self.spec.request_effect, local[-1] + 1 if n else 0)
        ids = (start_id + local * size).astype(np.int64)
        return ctr_logit + effect[local], {"request_id": ids}


def generate(out: str | Path, rows: int = 1_000_000, seed: int = 0, spec: SyntheticSpec = SyntheticSpec()) -> Schema:
    """Write ``out/train/part-*.parquet``, ``out/eval/part-*.parquet`` and ``out/schema.yaml``.

    Files hold several row groups of ``spec.row_group_rows`` rows. Returns the schema.
    """
    out = Path(out)
    world = _World(spec, seed)
    schema = synthetic_schema(spec)
    n_eval = int(round(rows * spec.eval_fraction))
    splits = [("train", rows - n_eval, spec.train_files), ("eval", n_eval, spec.eval_files)]
    for part in split_parts(out, splits, seed):
        table = pa.table(world.rows(part.rows, part.rng, part.first_id))
        pq.write_table(table, part.path, row_group_size=spec.row_group_rows)
    schema.save(out / "schema.yaml")
    return schema


@dataclass(frozen=True)
class SplitPart:
    """One Parquet part file to write: ``rows`` rows with ids from ``first_id``, drawn from ``rng``."""

    split: str
    path: Path
    rows: int
    first_id: int
    rng: np.random.Generator


def split_parts(out: Path, splits: List[tuple], seed: int) -> List[SplitPart]:
    """The part files of ``splits`` (``(name, rows, files)`` each) under ``out/<name>/``, rows
    spread evenly over the files, row ids consecutive over all splits, one generator per file
    seeded by (seed, split, file). Emptied directories are created; stale parts removed."""
    parts, next_id = [], 0
    for split_i, (split, n_split, n_files) in enumerate(splits):
        d = out / split
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("part-*.parquet"):
            old.unlink()
        sizes = np.full(n_files, n_split // n_files)
        sizes[: n_split % n_files] += 1
        for f, n in enumerate(sizes):
            parts.append(SplitPart(split, d / f"part-{f:05d}.parquet", int(n), next_id, np.random.default_rng([seed, 2, split_i, f])))
            next_id += int(n)
    return parts


def describe(path: str | Path) -> List[Dict[str, float]]:
    """Per-leaf row counts and label rates of a generated split (for logs and tests)."""
    t = pq.read_table(path, columns=["channel", "domain", "click", "conversion"])
    leaf = t["channel"].to_numpy() * 2 + t["domain"].to_numpy()
    click, conv = t["click"].to_numpy(), t["conversion"].to_numpy()
    out = []
    for s in range(4):
        m = leaf == s
        out.append({"leaf": s, "rows": int(m.sum()), "ctr": float(click[m].mean()), "cvr": float(conv[m].sum() / max(click[m].sum(), 1))})
    return out
