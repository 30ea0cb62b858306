"""dlrm_mtl, run as a user runs it, next to a straightforward research-style PyTorch peer.

What is measured
----------------
Two ways of training the *same* model widths on the *same* rows, each in its own process:

* **A = dlrm_mtl**: ``python -m dlrm_mtl train --config CFG.yaml --config configs/arch/<arch>.yaml
  --set ...`` exactly as a user starts it (a world of one over gloo, no torchrun): Parquet
  streamed by ``ParquetStream`` (bounded shuffle, reader threads), embedding tables sharded
  by TorchRec DMP (fbgemm kernels, fused row-wise Adagrad, ``sparse_lr`` 0.05), Adam on the
  dense part (``dense_lr`` 3e-3), cosine schedule (``--quick``: constant, as the peer), the
  entire-space loss, TensorBoard logging, exact metrics. Overrides: ``model.interaction=concat`` and ``model.dense_arch=[]`` (x = raw
  dense features ⊕ flattened pooled embeddings ⊕ scenario embeddings, as the peer),
  ``train.threads_per_rank=2``, ``train.eval_every_epoch=false``, ``checkpoint.at_end=false``,
  ``train.progress=false``; loader settings stay at their defaults, shuffling on.
* **B = peer**: ``python tools/bench_peer.py --peer ...``: the whole training split read into
  memory with pyarrow, one ``nn.Embedding`` per single-hot feature and ``nn.EmbeddingBag``
  per multi-hot one (Xavier-uniform initialised, as research code commonly does: PyTorch's
  N(0, 1) default cost it 0.01 AUC), experts as a Python loop over ``nn.Sequential``s, one
  tower per task, BCE (ESMM: BCE(p_click, click) + BCE(p_click·p_like, click∧like) on every
  row), ``torch.optim.Adam`` on every parameter at a constant rate tuned per shape and size
  (the best eval AUC of 1e-3 / 3e-3 / 1e-2: full census 1e-3, full movielens 3e-3, ``--quick``
  1e-2; ``--lr`` overrides), a fresh index permutation per epoch and a plain batch loop;
  ``torch.set_num_threads(2)``. dlrm_mtl gets the same treatment: its ``train.dense_lr`` is
  the best eval AUC of the same three rates at that size (MMoE, as for the peer): the default
  3e-3 at full size (census 0.9302 / 0.8433 vs 0.9279 / 0.8425 at 1e-3 and 0.9210 / 0.8348 at
  1e-2; movielens within 0.004 of the best view at each rate, best on average), 1e-2 for the
  3-epoch ``--quick`` runs (census income 0.8922 / 0.9192 / 0.9243 at 1e-3 / 3e-3 / 1e-2,
  movielens like 0.6164 / 0.6429 / 0.6610), and so is its ``train.lr_schedule``: the default
  cosine decay at full size, the peer's constant rate for ``--quick`` (see ``run_sizes``);
  every other setting is its default.

Both sides: same rows, batch size, epochs, model widths (the arch fragments'
shared-bottom [128] → 64, MMoE 4 experts → 64, PLE 2 levels × (2 shared + 1 per task) → 64;
towers [64] then Linear(64, 1)) and one evaluation at the end on the same eval split.

Per run: **start-up** = child's wall clock at its first training step minus the parent's
``time.time()`` just before ``subprocess.Popen`` (process start, imports, data / model /
sharding set-up); **import** = the part of it spent importing torch (peer) or
torch/torchrec/fbgemm (A, ``metrics.json`` ``throughput.import_s``); **samples/s** = rows
trained / training seconds (data loading inside the loop included); **eval** = seconds of the
final evaluation; **AUC** per task view on the eval split, over all scenarios (movielens:
``click`` on every row, ``like`` on clicked rows, ``click_like`` = click∧like on every row,
as dlrm_mtl's ``metrics.json`` scenario ``all``; the peer computes them exactly with midranks).
``oracle`` is the AUC of the generator's true probabilities: the ceiling of any model.

Data: two synthetic shapes, generated once per (shape, rows, seed) and cached under
``data/bench_peer/<shape>-<train rows>-<seed>/`` (``train/*.parquet``, ``eval/*.parquet``,
``schema.yaml``) before any timing:

* ``census``: Census-Income KDD's layout (``datasets/census_income/schema.yaml``): its 32
  single-hot fields (with the 7 dense and 2 label columns, the data set's ~40 columns) with
  their real vocabulary sizes (2–52), dim 8, its 7 dense features
  (5 log1p), one scenario level with one value, tasks ``income`` (~6 % positive) and
  ``marital`` (~40 %) from a known logistic model (a shared part and task-specific parts).
  Batch 1024; 80k train / 20k eval rows, 10 epochs (``--quick``: 40k / 10k, 3 epochs).
* ``movielens``: MovieLens-1M's layout (``datasets/movielens/schema.yaml``): user_id (6040),
  movie_id (3706), genres multi-hot (18 values, 1–3 per movie, mean pooled), gender, age (7),
  occupation (21), zip_prefix (100), dim 16, dense release_year, scenario level
  ``age_group`` (3), tasks ``click`` → ``like`` (ESMM, like ⇒ click). Batch 2048; 100k / 20k
  rows, 5 epochs (``--quick``: 60k / 12k, 3 epochs).

Runs alternate A B B A A B ... per case (``--repeats``, default 3; ``--quick`` 2), so drift
hits both sides alike; every run is printed, then a table of medians and min–max. Repeat r
trains with seed r on both sides (dlrm_mtl's ``train.seed``, the peer's ``torch.manual_seed``
and batch order; the data set's seed stays fixed), so the AUC medians are over seeds, not one
seed pair: at ``--quick`` size one seed moves a view's AUC by up to ±0.002-0.003 (census PLE
income over seeds 0-3: dlrm_mtl 0.9241-0.9257, the peer 0.9232-0.9277).

Reading the ratio
-----------------
``ratio = A samples/s / peer samples/s`` (medians over the repeats; the per-run range in
brackets pairs repeat i of A with repeat i of the peer). Above 1, dlrm_mtl trains faster than
the plain loop on the same CPU threads; below 1 its machinery costs more than it saves at
this size. It says nothing about start-up, which is a separate column (dlrm_mtl pays for
importing torchrec/fbgemm and planning/sharding; the peer for reading the split into memory).
Compare AUCs against each other and against ``oracle``: a faster side that learns less is
not faster. Each run also prints the **calibration** of every view (Σ predicted / Σ label over
the view's eval rows, dlrm_mtl's ``calibration``; in the JSON ``calibration`` and
``peer_calibration``): below 1 a side under-predicts. The two sides differ by design in: embedding optimizer (row-wise Adagrad vs
Adam), the schedule at full size (cosine vs constant), initialisation (TorchRec's table init and He-uniform
expert weights vs Xavier-uniform embeddings and nn.Linear's default) and the data order
(a bounded shuffle buffer vs a full permutation).

Noise: each run also reports its CPU seconds and ``other``, the CPU seconds the rest of the
machine used meanwhile (/proc/stat); a run where other processes used more than 0.15 of a
core is marked ``!`` and the case gets a warning line. Two compute threads on two cores
degrade badly when a third process competes, so rerun flagged cases, or pass
``--wait-idle S`` to wait (up to S seconds per run) for the cores to be free first.

Commands::

    .venv/bin/python tools/bench_peer.py --quick --json /tmp/peer.json   # ≈ 2 min on an idle 2-core machine
    .venv/bin/python tools/bench_peer.py                                        # full sizes, 3 repeats
    .venv/bin/python tools/bench_peer.py --cases census:mmoe,movielens:ple --repeats 5 --keep

Example output (``--quick`` on an idle 2-core VM, 126 s in all; two of the six cases)::

    census:mmoe            A    rep 0  start-up    3.3s  import   2.5s     80,298 samples/s  train    1.5s  eval  0.08s  wall   5.8s  cpu   7.2s  other 0.0s  AUC income 0.9193  marital 0.8253
    census:mmoe            peer rep 0  start-up    2.2s  import   0.9s     73,751 samples/s  train    1.6s  eval  0.03s  wall   4.6s  cpu   6.3s  other 0.0s  AUC income 0.9240  marital 0.8362
    ...
    case                   side  start-up s         import s         samples/s                eval s            AUC (median)
    ------------------------------------------------------------------------------------------------------------------------
    census:mmoe            A     3.2 [3.1-3.3]      2.4 [2.3-2.5]    81,805 [80,298-83,312]   0.08 [0.08-0.09]  income 0.9193  marital 0.8253
                           peer  2.2 [2.2-2.2]      0.9 [0.9-0.9]    78,890 [73,751-84,028]   0.03 [0.03-0.03]  income 0.9240  marital 0.8362
                           ratio A/peer samples/s 1.04 [0.99-1.09]   oracle AUC: income 0.9370  marital 0.8494
    movielens:ple          A     3.4 [3.1-3.8]      2.6 [2.3-3.0]    70,429 [69,709-71,149]   0.12 [0.11-0.14]  click 0.7115  click_like 0.7083  like 0.6558
                           peer  2.5 [2.3-2.7]      1.1 [1.0-1.2]    104,801 [103,702-105,899] 0.03 [0.03-0.04]  click 0.7079  click_like 0.7022  like 0.6453
                           ratio A/peer samples/s 0.67 [0.67-0.67]   oracle AUC: click 0.7963  like 0.7455  click_like 0.7991
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("shared_bottom", "mmoe", "ple")
SHAPES = ("census", "movielens")
SEED = 0
THREADS = 2
PEER_MARK = "BENCH_PEER_RESULT "
GENERATOR_VERSION = 1
NOISY_SHARE = 0.15  # other processes' CPU-seconds per wall second above which a run is flagged


# ============================================================================ sizes
@dataclass(frozen=True)
class RunSize:
    """Rows, epochs and batch size of one shape in one mode, the peer's learning rate and
    dlrm_mtl's ``train.dense_lr`` and ``train.lr_schedule`` (None: its default), each tuned
    on the same grid."""

    train_rows: int
    eval_rows: int
    epochs: int
    batch_size: int
    peer_lr: float
    dense_lr: Optional[float] = None
    lr_schedule: Optional[str] = None


def run_sizes(quick: bool, train_rows: Optional[int] = None) -> Dict[str, RunSize]:
    """The peer's Adam rate and dlrm_mtl's ``train.dense_lr`` are each side's best eval AUC of
    {1e-3, 3e-3, 1e-2} at that size (MMoE; the longer full runs overfit at larger rates, the
    3-epoch quick runs underfit at smaller ones); dlrm_mtl's full-size best is its default.
    Its schedule likewise: the default cosine decay at full size, and for the 3-epoch quick
    runs the peer's own constant rate (MMoE, both seeds 0 and 1 of dlrm_mtl: cosine gave
    census income / marital 0.9243 / 0.8345 and 0.9242 / 0.8388 against constant's
    0.9274 / 0.8386 and 0.9251 / 0.8397, MovieLens like 0.6608 / 0.6440 against 0.6565 /
    0.6588 and click 0.7117 / 0.7078 against 0.7183 / 0.7180; at full size cosine was better
    by 0.005-0.01: a decay to 5 % of the rate helps a run long enough to overfit).
    ``train_rows`` replaces every shape's train rows (eval rows: a quarter), for the step
    tools' small data sets."""
    if quick:
        sizes = {"census": RunSize(40_000, 10_000, 3, 1024, 1e-2, 1e-2, "constant"),
                 "movielens": RunSize(60_000, 12_000, 3, 2048, 1e-2, 1e-2, "constant")}
    else:
        sizes = {"census": RunSize(80_000, 20_000, 10, 1024, 1e-3), "movielens": RunSize(100_000, 20_000, 5, 2048, 3e-3)}
    if train_rows:  # the step tools' small data sets (eval: a quarter)
        sizes = {k: replace(z, train_rows=train_rows, eval_rows=max(train_rows // 4, 1)) for k, z in sizes.items()}
    return sizes


# ============================================================================ generator
# Census-Income KDD's categorical fields (the reference schema's names) and their real
# vocabulary sizes; the dense fields with the reference transform.
CENSUS_FIELDS: Tuple[Tuple[str, int], ...] = (
    ("class_of_worker", 9), ("detailed_industry_recode", 52), ("detailed_occupation_recode", 47),
    ("education", 17), ("enroll_in_edu_inst_last_wk", 3), ("major_industry_code", 24),
    ("major_occupation_code", 15), ("race", 5), ("hispanic_origin", 10), ("sex", 2),
    ("member_of_a_labor_union", 3), ("reason_for_unemployment", 6), ("full_or_part_time_employment_stat", 8),
    ("tax_filer_stat", 6), ("region_of_previous_residence", 6), ("state_of_previous_residence", 51),
    ("detailed_household_and_family_stat", 38), ("detailed_household_summary_in_household", 8),
    ("migration_code_change_in_msa", 10), ("migration_code_change_in_reg", 9), ("migration_code_move_within_reg", 10),
    ("live_in_this_house_1_year_ago", 3), ("migration_prev_res_in_sunbelt", 4), ("family_members_under_18", 5),
    ("country_of_birth_father", 43), ("country_of_birth_mother", 43), ("country_of_birth_self", 43),
    ("citizenship", 5), ("own_business_or_self_employed", 3), ("fill_inc_questionnaire_for_veterans_admin", 3),
    ("veterans_benefits", 3), ("year", 2),
)
CENSUS_DENSE: Tuple[Tuple[str, str], ...] = (
    ("age", "none"), ("wage_per_hour", "log1p"), ("capital_gains", "log1p"), ("capital_losses", "log1p"),
    ("dividends_from_stocks", "log1p"), ("num_persons_worked_for_employer", "none"), ("weeks_worked_in_year", "none"),
)
ML_USERS, ML_MOVIES, ML_GENRES, ML_AGES, ML_OCCUPATIONS, ML_ZIPS = 6040, 3706, 18, 7, 21, 100
ML_AGE_GROUP = np.array([0, 0, 1, 2, 2, 2, 2])  # ML-1M age code index -> age_group (under 25, 25-34, 35+)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _gumbel_argmax(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One categorical draw per row of ``logits [n, V]`` -> ``[n]`` int64."""
    return np.argmax(logits + rng.gumbel(size=logits.shape), axis=1).astype(np.int64)


def _intercept(logit: np.ndarray, target: float, weight: Optional[np.ndarray] = None) -> float:
    """b with mean σ(logit + b) (weighted) = target, by bisection."""
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.average(_sigmoid(logit + mid), weights=weight) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def gather_lists(offsets: np.ndarray, values: np.ndarray, idx: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Rows ``idx`` of a list column given as ``offsets [N+1]`` / ``values`` ->
    (``offsets [len(idx)+1]``, ``values``) of the selected rows, in ``idx`` order."""
    lens = offsets[idx + 1] - offsets[idx]  # [n]
    out_off = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(lens, out=out_off[1:])
    pos = np.arange(out_off[-1], dtype=np.int64) - np.repeat(out_off[:-1], lens) + np.repeat(offsets[idx], lens)
    return out_off, values[pos]


class CensusWorld:
    """Known logistic model behind the census-shaped rows (drawn once from the seed).

    A latent status z ~ N(0, 1) shifts the category distributions of some fields and the
    dense values. Fields get a role: *shared* effects enter both tasks (income +, never-married
    −0.7×), *income* or *marital* effects one task, the rest are noise. Intercepts are set so
    that the base rates are ~6 % (income > 50k) and ~40 % (never married).
    """

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng([seed, 101])
        self.base = [rng.normal(0, 1.2, v) for _, v in CENSUS_FIELDS]  # per field [V]
        self.load = [rng.normal(0, 0.8, v) * (rng.random() < 0.5) for _, v in CENSUS_FIELDS]
        roles = rng.choice(4, len(CENSUS_FIELDS), p=[0.25, 0.25, 0.2, 0.3])  # shared, income, marital, noise
        self.shared = [rng.normal(0, 0.45, v) * (r == 0) for (_, v), r in zip(CENSUS_FIELDS, roles)]
        self.income = [rng.normal(0, 0.45, v) * (r == 1) for (_, v), r in zip(CENSUS_FIELDS, roles)]
        self.marital = [rng.normal(0, 0.45, v) * (r == 2) for (_, v), r in zip(CENSUS_FIELDS, roles)]
        self.b_income = self.b_marital = 0.0
        cal = self.rows(50_000, np.random.default_rng([seed, 102]), 0)
        self.b_income = _intercept(_logit_of(cal["true_income"]), 0.06)
        self.b_marital = _intercept(_logit_of(cal["true_marital"]), 0.40)

    def rows(self, n: int, rng: np.random.Generator, start_id: int) -> Dict[str, Any]:
        z = rng.normal(size=n)  # [n] latent status
        age = np.clip(rng.normal(40, 17, n), 0, 90).round()  # [n]
        cols: Dict[str, Any] = {"row_id": np.arange(start_id, start_id + n, dtype=np.int64)}
        shared = np.zeros(n)
        inc = np.zeros(n)
        mar = np.zeros(n)
        for j, (name, _) in enumerate(CENSUS_FIELDS):
            ids = _gumbel_argmax(self.base[j][None, :] + self.load[j][None, :] * z[:, None], rng)  # [n]
            cols[name] = ids
            shared += self.shared[j][ids]
            inc += self.income[j][ids]
            mar += self.marital[j][ids]

        def sometimes(p: np.ndarray, amount: np.ndarray) -> np.ndarray:
            return np.where(rng.random(n) < p, amount, 0.0)

        wage = sometimes(_sigmoid(-2.2 + 0.3 * z), rng.lognormal(6.5, 0.5, n))
        gains = sometimes(_sigmoid(-3.2 + 0.8 * z), rng.lognormal(8.0 + 0.5 * z, 1.0))
        losses = sometimes(_sigmoid(-4.0 + 0.4 * z), rng.lognormal(7.3, 0.3, n))
        dividends = sometimes(_sigmoid(-2.2 + 0.9 * z), rng.lognormal(5.0 + 0.5 * z, 1.5))
        persons = rng.integers(0, 7, n).astype(np.float64)
        works = rng.random(n) < _sigmoid(0.8 + 0.6 * z - ((age - 40) / 20) ** 2)
        weeks = np.where(works, 52 - np.minimum(rng.poisson(2, n), 52), rng.integers(0, 30, n)).astype(np.float64)
        income_logit = (
            self.b_income + 0.8 * z + shared + inc + 0.3 * np.log1p(gains) + 0.12 * np.log1p(dividends)
            + 1.2 * weeks / 52 - 0.8 * ((age - 48) / 16) ** 2
        )
        marital_logit = self.b_marital - 2.0 * np.tanh((age - 28) / 10) - 0.7 * shared + mar - 0.3 * z
        p_income, p_marital = _sigmoid(income_logit), _sigmoid(marital_logit)
        cols.update(
            age=age.astype(np.float32), wage_per_hour=wage.astype(np.float32), capital_gains=gains.astype(np.float32),
            capital_losses=losses.astype(np.float32), dividends_from_stocks=dividends.astype(np.float32),
            num_persons_worked_for_employer=persons.astype(np.float32), weeks_worked_in_year=weeks.astype(np.float32),
            scenario=np.zeros(n, dtype=np.int64),
            income_50k=(rng.random(n) < p_income).astype(np.float32),
            never_married=(rng.random(n) < p_marital).astype(np.float32),
            true_income=p_income.astype(np.float32), true_marital=p_marital.astype(np.float32),
        )
        return cols


def _logit_of(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def _zipf(rng: np.random.Generator, n: int, alpha: float) -> np.ndarray:
    """Popularity ∝ rank^-alpha over a random permutation of ``n`` ids -> probabilities [n]."""
    w = (np.arange(n) + 10.0) ** -alpha
    p = np.empty(n)
    p[rng.permutation(n)] = w / w.sum()
    return p


class MovielensWorld:
    """Known model behind the movielens-shaped rows (drawn once from the seed).

    Users have a demographic profile (gender, age code, occupation, zip) and a latent taste
    (K = 8) mostly explained by it; movies have 1–3 genres, a release year and a latent vector
    near their genres' mean. click = σ(b + 2<u, v> + biases + scenario×genre effect − recency)
    ~ 55 %; like | click = σ(b' + 1.6<u, v> + quality + scenario×genre effect) ~ 40 %;
    like ⇒ click.
    """

    K = 8

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng([seed, 201])
        K = self.K
        self.gender = (rng.random(ML_USERS) < 0.28).astype(np.int64)
        self.age = rng.choice(ML_AGES, ML_USERS, p=[0.04, 0.18, 0.35, 0.2, 0.08, 0.07, 0.08])
        self.occupation = rng.choice(ML_OCCUPATIONS, ML_USERS, p=rng.dirichlet(np.ones(ML_OCCUPATIONS)))
        self.zip = rng.choice(ML_ZIPS, ML_USERS, p=_zipf(rng, ML_ZIPS, 0.8))
        demo = (rng.normal(0, 1, (2, K))[self.gender] + rng.normal(0, 1, (ML_AGES, K))[self.age]
                + rng.normal(0, 1, (ML_OCCUPATIONS, K))[self.occupation])
        self.user_vec = (demo * 0.6 + rng.normal(0, 0.6, (ML_USERS, K))) / math.sqrt(K)
        self.user_bias = rng.normal(0, 0.4, ML_USERS)
        n_genres = rng.choice([1, 2, 3], ML_MOVIES, p=[0.45, 0.4, 0.15])
        genre_pop = np.log(rng.dirichlet(np.ones(ML_GENRES) * 2))
        order = np.argsort(-(genre_pop[None, :] + rng.gumbel(size=(ML_MOVIES, ML_GENRES))), axis=1)
        self.genre_off = np.zeros(ML_MOVIES + 1, dtype=np.int64)
        np.cumsum(n_genres, out=self.genre_off[1:])
        self.genre_val = np.concatenate([order[m, : n_genres[m]] for m in range(ML_MOVIES)]).astype(np.int64)
        genre_vec = rng.normal(0, 1, (ML_GENRES, K))
        movie_of = np.repeat(np.arange(ML_MOVIES), n_genres)
        genre_mean = np.zeros((ML_MOVIES, K))
        np.add.at(genre_mean, movie_of, genre_vec[self.genre_val])
        genre_mean /= n_genres[:, None]
        self.movie_vec = (genre_mean + rng.normal(0, 0.7, (ML_MOVIES, K))) / math.sqrt(K)
        self.movie_bias = rng.normal(0, 0.5, ML_MOVIES)
        self.quality = rng.normal(0, 1, ML_MOVIES)
        self.year = np.clip(2000 - np.floor(rng.exponential(12, ML_MOVIES)), 1919, 2000)
        # per (age group, movie): mean over the movie's genres of a scenario x genre effect
        self.scen_click = self._per_movie(rng.normal(0, 0.5, (3, ML_GENRES)), movie_of, n_genres)
        self.scen_like = self._per_movie(rng.normal(0, 0.4, (3, ML_GENRES)), movie_of, n_genres)
        self.p_user = _zipf(rng, ML_USERS, 0.8)
        self.p_movie = _zipf(rng, ML_MOVIES, 1.0)
        self.b_click = self.b_like = 0.0
        cal = self.rows(50_000, np.random.default_rng([seed, 202]), 0)
        self.b_click = _intercept(_logit_of(cal["true_click"]), 0.55)
        p_click = _sigmoid(_logit_of(cal["true_click"]) + self.b_click)
        self.b_like = _intercept(_logit_of(cal["true_like"]), 0.40, weight=p_click)

    def _per_movie(self, effect: np.ndarray, movie_of: np.ndarray, n_genres: np.ndarray) -> np.ndarray:
        out = np.zeros((3, ML_MOVIES))  # [groups, movies]
        for g in range(3):
            np.add.at(out[g], movie_of, effect[g, self.genre_val])
        return out / n_genres[None, :]

    def rows(self, n: int, rng: np.random.Generator, start_id: int) -> Dict[str, Any]:
        import pyarrow as pa

        user = rng.choice(ML_USERS, n, p=self.p_user)  # [n]
        movie = rng.choice(ML_MOVIES, n, p=self.p_movie)  # [n]
        group = ML_AGE_GROUP[self.age[user]]  # [n]
        affinity = (self.user_vec[user] * self.movie_vec[movie]).sum(1)
        recency = (self.year[movie] - 1990) / 10
        click_logit = (self.b_click + 2.0 * affinity + self.user_bias[user] + self.movie_bias[movie]
                       + self.scen_click[group, movie] - 0.2 * recency)
        like_logit = self.b_like + 1.6 * affinity + 0.7 * self.quality[movie] + self.scen_like[group, movie]
        p_click, p_like = _sigmoid(click_logit), _sigmoid(like_logit)
        click = rng.random(n) < p_click
        like = click & (rng.random(n) < p_like)
        off, val = gather_lists(self.genre_off, self.genre_val, movie)
        return {
            "row_id": np.arange(start_id, start_id + n, dtype=np.int64),
            "user_id": user.astype(np.int64), "movie_id": movie.astype(np.int64),
            "genres": pa.ListArray.from_arrays(pa.array(off.astype(np.int32)), pa.array(val)),
            "gender": self.gender[user], "age": self.age[user].astype(np.int64),
            "occupation": self.occupation[user].astype(np.int64), "zip_prefix": self.zip[user].astype(np.int64),
            "release_year": self.year[movie].astype(np.float32), "age_group": group.astype(np.int64),
            "click": click.astype(np.float32), "like": like.astype(np.float32),
            "true_click": p_click.astype(np.float32), "true_like": p_like.astype(np.float32),
        }


def shape_schema(shape: str, dense_stats: Dict[str, Tuple[float, float]]) -> Any:
    """The dlrm_mtl schema of a shape; ``dense_stats``: name -> (mean, std) after the transform."""
    from dlrm_mtl.schema import DenseFeature, ScenarioLevel, Schema, SparseFeature, Task

    def dense(name: str, transform: str) -> DenseFeature:
        mean, std = dense_stats[name]
        return DenseFeature(name, transform, standardize=True, mean=mean, std=std)

    if shape == "census":
        return Schema(
            name="bench_census", row_id="row_id",
            sparse=[SparseFeature(n, f"t_{n}", v, 8) for n, v in CENSUS_FIELDS],
            dense=[dense(n, t) for n, t in CENSUS_DENSE],
            scenarios=[ScenarioLevel("population", 1, column="scenario", value_names=["everyone"])],
            tasks=[Task("income", "income_50k", oracle="true_income"), Task("marital", "never_married", oracle="true_marital")],
        )
    if shape == "movielens":
        return Schema(
            name="bench_movielens", row_id="row_id",
            sparse=[
                SparseFeature("user_id", "t_user", ML_USERS, 16), SparseFeature("movie_id", "t_movie", ML_MOVIES, 16),
                SparseFeature("genres", "t_genre", ML_GENRES, 16, multi_hot=True, max_len=ML_GENRES, pooling="mean"),
                SparseFeature("gender", "t_gender", 2, 16), SparseFeature("age", "t_age", ML_AGES, 16),
                SparseFeature("occupation", "t_occupation", ML_OCCUPATIONS, 16), SparseFeature("zip_prefix", "t_zip", ML_ZIPS, 16),
            ],
            dense=[dense("release_year", "none")],
            scenarios=[ScenarioLevel("age_group", 3, value_names=["under_25", "25_34", "35_plus"])],
            tasks=[Task("click", "click", oracle="true_click"),
                   Task("like", "like", parent="click", loss_space="entire", oracle="true_like")],
        )
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def data_dir(root: Path, shape: str, train_rows: int, seed: int) -> Path:
    return root / f"{shape}-{train_rows}-{seed}"


def generate(shape: str, out: Path, train_rows: int, eval_rows: int, seed: int = SEED,
             files: Tuple[int, int] = (4, 2), row_group_rows: int = 16_384) -> Path:
    """Writes ``out/train/part-*.parquet``, ``out/eval/part-*.parquet``, ``out/schema.yaml``
    (dense mean/std from the training rows) and ``out/done.json``; deterministic for a seed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    world = CensusWorld(seed) if shape == "census" else MovielensWorld(seed) if shape == "movielens" else None
    if world is None:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    transforms = dict(CENSUS_DENSE) if shape == "census" else {"release_year": "none"}
    sums = {k: np.zeros(3) for k in transforms}  # n, Σx, Σx² after the transform
    from dlrm_mtl.synthetic import split_parts

    for part in split_parts(out, [("train", train_rows, files[0]), ("eval", eval_rows, files[1])], seed):
        cols = world.rows(part.rows, part.rng, part.first_id)
        if part.split == "train":
            for k, tr in transforms.items():
                x = np.log1p(cols[k].astype(np.float64)) if tr == "log1p" else cols[k].astype(np.float64)
                sums[k] += [x.size, x.sum(), (x * x).sum()]
        pq.write_table(pa.table(cols), part.path, row_group_size=row_group_rows)
    stats = {k: (float(s[1] / s[0]), float(math.sqrt(max(s[2] / s[0] - (s[1] / s[0]) ** 2, 1e-12)))) for k, s in sums.items()}
    shape_schema(shape, stats).save(out / "schema.yaml")
    (out / "done.json").write_text(json.dumps(_data_key(shape, train_rows, eval_rows, seed)))
    return out


def _data_key(shape: str, train_rows: int, eval_rows: int, seed: int) -> Dict[str, Any]:
    return {"shape": shape, "train_rows": train_rows, "eval_rows": eval_rows, "seed": seed, "version": GENERATOR_VERSION}


def ensure_data(root: Path, shape: str, size: RunSize, seed: int = SEED) -> Path:
    """The cached data set of (shape, rows, seed), generated when missing or stale."""
    out = data_dir(root, shape, size.train_rows, seed)
    done = out / "done.json"
    if done.exists() and json.loads(done.read_text()) == _data_key(shape, size.train_rows, size.eval_rows, seed):
        return out
    t0 = time.perf_counter()
    generate(shape, out, size.train_rows, size.eval_rows, seed)
    print(f"generated {out} ({size.train_rows} train / {size.eval_rows} eval rows) in {time.perf_counter() - t0:.1f}s", flush=True)
    return out


# ============================================================================ AUC
def rank_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC by the rank-sum formula with midranks for ties (a tie counts 1/2);
    NaN when a class is missing. ``labels [n]`` 0/1, ``scores [n]``."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    first = np.r_[True, sorted_s[1:] != sorted_s[:-1]]  # start of each run of equal scores
    run = np.cumsum(first) - 1  # [n] run index per sorted position
    starts = np.flatnonzero(first)
    lengths = np.diff(np.r_[starts, s.size])
    mid = starts + (lengths + 1) / 2.0  # 1-based mean rank of each run
    ranks = np.empty(s.size)
    ranks[order] = mid[run]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auc_views(schema: Any, labels: np.ndarray, probs: np.ndarray) -> Dict[str, float]:
    """dlrm_mtl's binary views over all rows: a root task on every row; a chained task's
    conditional probability on its parent-positive rows and its entire-space product
    (``schema.entire_name``) on every row. ``labels, probs [n, T]`` (probs conditional)."""
    out: Dict[str, float] = {}
    for k, task in enumerate(schema.tasks):
        if task.parent is None:
            out[task.name] = rank_auc(labels[:, k], probs[:, k])
            continue
        chain = schema.chain(task.name)  # root ... task
        parents = chain[:-1]
        inside = np.all(labels[:, parents] == 1, axis=1)
        out[task.name] = rank_auc(labels[inside, k], probs[inside, k])
        out[schema.entire_name(task)] = rank_auc(np.prod(labels[:, chain], axis=1), np.prod(probs[:, chain], axis=1))
    return out


def calibration_views(schema: Any, labels: np.ndarray, probs: np.ndarray) -> Dict[str, float]:
    """Σ predicted / Σ label over the rows of each of :func:`auc_views`' views (dlrm_mtl's
    ``calibration``: above 1 the model over-predicts)."""
    def ratio(y: np.ndarray, p: np.ndarray) -> float:
        return float(p.sum() / y.sum()) if y.sum() > 0 else float("nan")

    out: Dict[str, float] = {}
    for k, task in enumerate(schema.tasks):
        if task.parent is None:
            out[task.name] = ratio(labels[:, k], probs[:, k])
            continue
        chain = schema.chain(task.name)
        inside = np.all(labels[:, chain[:-1]] == 1, axis=1)
        out[task.name] = ratio(labels[inside, k], probs[inside, k])
        out[schema.entire_name(task)] = ratio(np.prod(labels[:, chain], axis=1), np.prod(probs[:, chain], axis=1))
    return out


def oracle_aucs(schema: Any, eval_dir: Path) -> Dict[str, float]:
    """The AUC views of the generator's true probabilities on the eval split."""
    import pyarrow.parquet as pq

    t = pq.read_table(eval_dir, columns=[x.label for x in schema.tasks] + [x.oracle for x in schema.tasks])
    labels = np.stack([t[x.label].to_numpy() for x in schema.tasks], axis=1)
    probs = np.stack([t[x.oracle].to_numpy() for x in schema.tasks], axis=1)
    return auc_views(schema, labels, probs)


# ============================================================================ side B: the peer
@dataclass
class Split:
    """A whole split in memory: ``ids [N, F1]`` single-hot, ``bags`` name -> (offsets [N+1],
    values), ``dense [N, Fd]``, ``scenario [N, L]``, ``labels [N, T]`` (numpy)."""

    ids: np.ndarray
    bags: Dict[str, Tuple[np.ndarray, np.ndarray]]
    dense: np.ndarray
    scenario: np.ndarray
    labels: np.ndarray

    @property
    def rows(self) -> int:
        return self.labels.shape[0]


def load_split(schema: Any, path: Path) -> Split:
    """Reads every Parquet file of ``path`` with pyarrow and applies the schema's dense transforms."""
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    single = [f for f in schema.sparse if not f.multi_hot]
    if any(f.hash for f in schema.sparse):
        raise ValueError("the peer reads raw ids in [0, num_embeddings) only (no hash: true features)")
    ids = np.stack([t[f.column].to_numpy() for f in single], axis=1).astype(np.int64) if single else np.zeros((t.num_rows, 0), np.int64)
    bags = {}
    for f in schema.sparse:
        if f.multi_hot:
            col = t[f.column].combine_chunks()
            off = col.offsets.to_numpy().astype(np.int64)
            vals = col.values.to_numpy().astype(np.int64)
            if f.max_len:  # keep the first max_len ids of each list
                lens = np.minimum(np.diff(off), f.max_len)
                keep = np.arange(vals.size) - np.repeat(off[:-1], np.diff(off)) < np.repeat(lens, np.diff(off))
                vals = vals[keep]
                off = np.r_[0, np.cumsum(lens)]
            bags[f.name] = (off, vals)
    dense = np.zeros((t.num_rows, len(schema.dense)), dtype=np.float32)
    for j, d in enumerate(schema.dense):
        x = t[d.column].to_numpy(zero_copy_only=False).astype(np.float64)
        if d.default is not None:
            x = np.where(np.isnan(x), d.default, x)
        if d.transform == "log1p":
            x = np.log1p(x)
        x = np.clip(x, -np.inf if d.clip_min is None else d.clip_min, np.inf if d.clip_max is None else d.clip_max)
        dense[:, j] = (x - d.mean) / d.std if d.standardize else x
    scenario = np.stack([t[s.column].to_numpy() for s in schema.scenarios], axis=1).astype(np.int64)
    labels = np.stack([t[x.label].to_numpy(zero_copy_only=False) for x in schema.tasks], axis=1).astype(np.float32)
    if np.isnan(labels).any():
        raise ValueError("the peer has no label masks: null labels are not supported")
    return Split(ids, bags, dense, scenario, labels)


def peer_input_dim(schema: Any, scenario_emb_dim: int = 8) -> int:
    """Width of x = [dense, flattened pooled embeddings, scenario embeddings]."""
    return len(schema.dense) + sum(f.dim for f in schema.sparse) + len(schema.scenarios) * scenario_emb_dim


def build_peer_model(schema: Any, arch: str, in_dim: Optional[int] = None, scenario_emb_dim: int = 8,
                     expert_dim: int = 64, tower: int = 64, emb_init: str = "xavier") -> Any:
    """The research-style model: nn.Embedding / nn.EmbeddingBag per feature, experts and towers
    as nn.Sequential in ModuleLists, looped over in Python. ``in_dim`` overrides the width of x
    seen by the expert part (for width checks against another input layer)."""
    import torch
    from torch import nn

    T = len(schema.tasks)
    d = in_dim if in_dim is not None else peer_input_dim(schema, scenario_emb_dim)

    def expert(a: int, hidden: Sequence[int] = ()) -> nn.Sequential:
        layers: List[nn.Module] = []
        for h in list(hidden) + [expert_dim]:
            layers += [nn.Linear(a, h), nn.ReLU()]
            a = h
        return nn.Sequential(*layers)

    class PeerModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.arch = arch
            self.single = [f.name for f in schema.sparse if not f.multi_hot]
            self.order = [f.name for f in schema.sparse]
            self.emb = nn.ModuleDict({
                f.name: nn.EmbeddingBag(f.num_embeddings, f.dim, mode=f.pooling) if f.multi_hot else nn.Embedding(f.num_embeddings, f.dim)
                for f in schema.sparse
            })
            self.scenario_emb = nn.ModuleList(nn.Embedding(s.num_values, scenario_emb_dim) for s in schema.scenarios)
            if emb_init == "xavier":
                for e in list(self.emb.values()) + list(self.scenario_emb):
                    nn.init.xavier_uniform_(e.weight)
            if arch == "shared_bottom":
                self.bottom = expert(d, [128])
            elif arch == "mmoe":
                self.experts = nn.ModuleList(expert(d) for _ in range(4))
                self.gates = nn.ModuleList(nn.Linear(d, 4) for _ in range(T))
            elif arch == "ple":
                self.levels = nn.ModuleList()
                for lvl in range(2):
                    a = d if lvl == 0 else expert_dim
                    level = nn.Module()
                    level.shared = nn.ModuleList(expert(a) for _ in range(2))
                    level.specific = nn.ModuleList(expert(a) for _ in range(T))  # 1 per task
                    level.gates = nn.ModuleList(nn.Linear(a, 2 + 1) for _ in range(T))
                    level.shared_gate = nn.Linear(a, 2 + T) if lvl == 0 else None  # all but the last level
                    self.levels.append(level)
            else:
                raise ValueError(f"unknown arch {arch!r}; known: {ARCHS}")
            self.towers = nn.ModuleList(
                nn.Sequential(nn.Linear(expert_dim, tower), nn.ReLU(), nn.Linear(tower, 1)) for _ in range(T)
            )

        def features(self, ids: torch.Tensor, bags: Dict[str, Tuple[torch.Tensor, torch.Tensor]],
                     dense: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
            """``ids [B, F1]``, bags name -> (values, offsets [B]), ``dense [B, Fd]``,
            ``scenario [B, L]`` -> x ``[B, d]``."""
            pooled = {}
            for j, name in enumerate(self.single):
                pooled[name] = self.emb[name](ids[:, j])  # [B, D]
            for name, (values, offsets) in bags.items():
                pooled[name] = self.emb[name](values, offsets)  # [B, D]
            scen = [e(scenario[:, i]) for i, e in enumerate(self.scenario_emb)]  # L x [B, e]
            return torch.cat([dense] + [pooled[n] for n in self.order] + scen, dim=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """x ``[B, d]`` -> logits ``[B, T]``."""
            if self.arch == "shared_bottom":
                h = self.bottom(x)
                towers_in = [h] * T
            elif self.arch == "mmoe":
                experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, 4, 64]
                towers_in = []
                for gate in self.gates:
                    g = torch.softmax(gate(x), dim=1)  # [B, 4]
                    towers_in.append((g.unsqueeze(-1) * experts).sum(1))  # [B, 64]
            else:
                task_in, shared_in = [x] * T, x
                for level in self.levels:
                    shared = [e(shared_in) for e in level.shared]  # 2 x [B, 64]
                    specific = [level.specific[t](task_in[t]) for t in range(T)]  # T x [B, 64]
                    out = []
                    for t in range(T):
                        cand = torch.stack(shared + [specific[t]], dim=1)  # [B, 3, 64]
                        g = torch.softmax(level.gates[t](task_in[t]), dim=1)  # [B, 3]
                        out.append((g.unsqueeze(-1) * cand).sum(1))
                    if level.shared_gate is not None:
                        cand = torch.stack(shared + specific, dim=1)  # [B, 2+T, 64]
                        g = torch.softmax(level.shared_gate(shared_in), dim=1)
                        shared_in = (g.unsqueeze(-1) * cand).sum(1)
                    task_in = out
                towers_in = task_in
            return torch.cat([tw(h) for tw, h in zip(self.towers, towers_in)], dim=1)

    return PeerModel()


def peer_loss(schema: Any, logits: Any, labels: Any) -> Any:
    """Σ over tasks of BCE: a root task on its logit; a chained task (ESMM) on the product of
    the chain's probabilities against the product of its labels, every row."""
    import torch
    import torch.nn.functional as F

    total = logits.new_zeros(())
    for k, task in enumerate(schema.tasks):
        if task.parent is None:
            total = total + F.binary_cross_entropy_with_logits(logits[:, k], labels[:, k])
        else:
            chain = schema.chain(task.name)
            p = torch.sigmoid(logits[:, chain]).prod(dim=1)
            total = total + F.binary_cross_entropy(p, labels[:, chain].prod(dim=1))
    return total


def peer_batches(split: Split, idx: np.ndarray) -> Tuple[Any, Dict[str, Tuple[Any, Any]], Any, Any, Any]:
    """Rows ``idx`` of an in-memory split as tensors."""
    import torch

    bags = {}
    for name, (off, vals) in split.bags.items():
        o, v = gather_lists(off, vals, idx)
        bags[name] = (torch.from_numpy(v), torch.from_numpy(o[:-1]))
    return (torch.from_numpy(split.ids[idx]), bags, torch.from_numpy(split.dense[idx]),
            torch.from_numpy(split.scenario[idx]), torch.from_numpy(split.labels[idx]))


@dataclass
class PeerTraining:
    """What the peer's training loop reports."""

    first_step_unix: float
    seconds: float
    rows: int
    steps: int
    final_loss: float


def peer_train(schema: Any, model: Any, train: Split, batch_size: int, epochs: int, lr: float,
               rng: np.random.Generator) -> PeerTraining:
    """Adam on every parameter; per epoch a fresh permutation of the rows, then plain batches."""
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    first: Optional[float] = None
    seconds, rows, steps, loss = 0.0, 0, 0, float("nan")
    for _ in range(epochs):
        t0 = time.perf_counter()
        perm = rng.permutation(train.rows)  # [N]
        for start in range(0, train.rows, batch_size):
            ids, bags, dense, scen, y = peer_batches(train, perm[start : start + batch_size])
            if first is None:
                first = time.time()
            total = peer_loss(schema, model(model.features(ids, bags, dense, scen)), y)
            opt.zero_grad()
            total.backward()
            opt.step()
            rows += y.shape[0]
            steps += 1
        loss = float(total.detach())
        seconds += time.perf_counter() - t0
    return PeerTraining(first if first is not None else time.time(), seconds, rows, steps, loss)


def peer_evaluate(schema: Any, model: Any, split: Split, batch_size: int) -> Tuple[Dict[str, float], Dict[str, float]]:
    """AUC and calibration views of the model's conditional probabilities on ``split``."""
    import torch

    model.eval()
    probs = []  # [B, T] each
    with torch.no_grad():
        for start in range(0, split.rows, batch_size):
            ids, bags, dense, scen, _ = peer_batches(split, np.arange(start, min(start + batch_size, split.rows)))
            probs.append(torch.sigmoid(model(model.features(ids, bags, dense, scen))).numpy())
    model.train()
    p = np.concatenate(probs)
    return auc_views(schema, split.labels, p), calibration_views(schema, split.labels, p)


def peer_main(args: argparse.Namespace) -> int:
    """Side B in its own process: prints one ``PEER_MARK`` JSON line."""
    t_import = time.perf_counter()
    import torch

    import_s = time.perf_counter() - t_import
    from dlrm_mtl.schema import Schema

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = Path(args.data)
    schema = Schema.load(data / "schema.yaml")
    train, evals = load_split(schema, data / "train"), load_split(schema, data / "eval")
    model = build_peer_model(schema, args.arch, emb_init=args.emb_init)
    lr = args.lr if args.lr is not None else 3e-3
    run = peer_train(schema, model, train, args.batch_size, args.epochs, lr, np.random.default_rng(args.seed))
    t0 = time.perf_counter()
    auc, calibration = peer_evaluate(schema, model, evals, args.batch_size)
    eval_s = time.perf_counter() - t0
    result = {"import_s": import_s, "first_step_unix": run.first_step_unix, "samples_per_s": run.rows / max(run.seconds, 1e-9),
              "train_seconds": run.seconds, "eval_seconds": eval_s, "rows_trained": run.rows, "steps": run.steps,
              "final_loss": run.final_loss, "auc": auc, "calibration": calibration}
    print(PEER_MARK + json.dumps(result), flush=True)
    return 0


# ============================================================================ running the sides
@dataclass
class RunResult:
    """One process of one side. ``None``: the side did not report it."""

    side: str  # "A" or "peer"
    rep: int
    startup_s: Optional[float]
    import_s: Optional[float]
    samples_per_s: float
    train_s: float
    eval_s: Optional[float]
    wall_s: float  # process start -> exit
    auc: Dict[str, float]
    cpu_s: float = 0.0  # the child's CPU seconds (user + system, all threads)
    other_cpu_s: Optional[float] = None  # CPU seconds the rest of the machine used meanwhile
    steal_s: Optional[float] = None  # CPU seconds the hypervisor gave this VM's vCPUs to others meanwhile
    ready_s: Optional[float] = None  # A: process start -> its "train rows" log line (before the loop)
    setup_phases: Dict[str, float] = field(default_factory=dict)  # A: metrics.json throughput.setup_phases
    self_startup_s: Optional[float] = None  # A: its own throughput.startup_s (from /proc, for comparison)
    calibration: Dict[str, float] = field(default_factory=dict)  # Σ predicted / Σ label per view


@dataclass
class Child:
    """A finished child: its output lines, each with the parent's time.time() on arrival."""

    rc: int
    lines: List[Tuple[float, str]]
    start_unix: float
    end_unix: float
    cpu_s: float  # the child's user + system CPU seconds
    other_cpu_s: Optional[float]  # busy CPU seconds of the whole machine meanwhile, minus the child's
    steal_s: Optional[float] = None  # stolen CPU seconds of the whole machine meanwhile (a VM's host)

    def tail(self, n: int = 30) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


def machine_steal_s() -> Optional[float]:
    """CPU seconds since boot the hypervisor ran something else while this VM's vCPUs wanted
    to run (``steal`` of /proc/stat; 0 on bare metal), or None where there is no /proc. A
    repeat that slows down with no other process on the machine often shows it here."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0
    except (OSError, ValueError):
        return None


def machine_busy_s() -> Optional[float]:
    """CPU seconds all cores spent busy since boot (user, nice, system, irq, softirq of
    /proc/stat), or None where there is no /proc."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = ticks
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def wait_idle(max_wait_s: float, probe_s: float = 1.0) -> float:
    """Waits (up to ``max_wait_s``) until the machine's other processes use less than
    NOISY_SHARE of one core over a ``probe_s`` window; returns the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        b0 = machine_busy_s()
        time.sleep(probe_s)
        b1 = machine_busy_s()
        if b0 is None or b1 is None or b1 - b0 < NOISY_SHARE * probe_s:
            break
    return time.perf_counter() - t0


def children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_child(cmd: List[str], cwd: Path) -> Child:
    """Starts ``cmd`` (the process start is ``time.time()`` just before Popen) and reads its
    merged stdout/stderr to the end. Also measures the child's CPU time and what the rest of
    the machine used meanwhile (other processes sharing the cores make timings noisy)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    busy0, cpu0, steal0 = machine_busy_s(), children_cpu_s(), machine_steal_s()
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: List[Tuple[float, str]] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append((time.time(), line.rstrip("\n")))
    rc = proc.wait()
    end = time.time()
    cpu = children_cpu_s() - cpu0
    busy1, steal1 = machine_busy_s(), machine_steal_s()
    other = None if busy0 is None or busy1 is None else max(busy1 - busy0 - cpu, 0.0)
    steal = None if steal0 is None or steal1 is None else max(steal1 - steal0, 0.0)
    return Child(rc, lines, start, end, cpu, other, steal)


def concat_supported() -> bool:
    """Whether this dlrm_mtl has ``model.interaction`` (the concat input layer)."""
    import dataclasses

    from dlrm_mtl.config import ModelConfig

    return "interaction" in {f.name for f in dataclasses.fields(ModelConfig)}


def side_a_command(data: Path, arch: str, size: RunSize, run_dir: Path, concat: bool, extra: Sequence[str] = ()) -> List[str]:
    """``python -m dlrm_mtl train`` with a config naming the data and the run directory, the
    arch fragment, and the overrides (see the module docstring); ``extra`` (``--set``) last."""
    data, run_dir = data.resolve(), run_dir.resolve()
    cfg = run_dir / "bench.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.write_text(json.dumps({  # JSON is YAML
        "data": {"train": str(data / "train"), "eval": str(data / "eval"), "schema": str(data / "schema.yaml")},
        "train": {"run_dir": str(run_dir / "run")},
    }, indent=2))
    sets = [
        f"data.batch_size={size.batch_size}", f"train.epochs={size.epochs}", f"train.threads_per_rank={THREADS}",
        "train.eval_every_epoch=false", "checkpoint.at_end=false", "checkpoint.keep_best=false", "train.progress=false", "model.dense_arch=[]",
    ] + (["model.interaction=concat"] if concat else []) + ([f"train.dense_lr={size.dense_lr!r}"] if size.dense_lr is not None else []) \
      + ([f"train.lr_schedule={size.lr_schedule}"] if size.lr_schedule is not None else [])
    cmd = [sys.executable, "-m", "dlrm_mtl", "train", "--config", str(cfg), "--config", str(ROOT / "configs" / "arch" / f"{arch}.yaml")]
    for s in sets + list(extra):
        cmd += ["--set", s]
    return cmd


def run_side_a(data: Path, arch: str, size: RunSize, run_dir: Path, rep: int, concat: bool, extra: Sequence[str] = ()) -> RunResult:
    """Side A's repeat ``rep`` with training seed ``rep`` (model init and shuffle; the data's
    seed is fixed): the AUCs of the repeats then show seed spread, as the peer's do."""
    child = run_child(side_a_command(data, arch, size, run_dir, concat, [f"train.seed={rep}", *extra]), ROOT)
    path = run_dir / "run" / "metrics.json"
    if child.rc != 0 or not path.exists():
        raise RuntimeError(f"side A ({arch}, {data.name}) failed with exit code {child.rc}:\n{child.tail()}")
    result = json.loads(path.read_text())
    tp = result["throughput"]
    first = tp.get("first_step_unix")
    ready = next((t for t, line in child.lines if "train rows" in line), None)
    auc = {str(r["task"]): float(r["auc"]) for r in result["metrics"] if r.get("scenario") == "all" and "auc" in r}
    calibration = {str(r["task"]): float(r["calibration"]) for r in result["metrics"]
                   if r.get("scenario") == "all" and isinstance(r.get("calibration"), (int, float))}
    return RunResult(
        side="A", rep=rep, startup_s=None if first is None else float(first) - child.start_unix,
        import_s=_opt_float(tp.get("import_s")), samples_per_s=float(tp["samples_per_s"]),
        train_s=float(tp["train_seconds"]), eval_s=_opt_float(tp.get("eval_seconds")),
        wall_s=child.end_unix - child.start_unix, auc=auc, cpu_s=child.cpu_s, other_cpu_s=child.other_cpu_s,
        steal_s=child.steal_s,
        ready_s=None if ready is None else ready - child.start_unix,
        setup_phases={str(k): float(v) for k, v in (tp.get("setup_phases") or {}).items()},
        self_startup_s=_opt_float(tp.get("startup_s")), calibration=calibration,
    )


def run_side_b(data: Path, arch: str, size: RunSize, rep: int) -> RunResult:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peer", "--data", str(data.resolve()), "--arch", arch,
           "--batch-size", str(size.batch_size), "--epochs", str(size.epochs), "--lr", str(size.peer_lr),
           "--threads", str(THREADS), "--seed", str(rep)]  # repeat r: training seed r, as side A's
    child = run_child(cmd, ROOT)
    line = next((l for _, l in child.lines if l.startswith(PEER_MARK)), None)
    if child.rc != 0 or line is None:
        raise RuntimeError(f"peer ({arch}, {data.name}) failed with exit code {child.rc}:\n{child.tail()}")
    r = json.loads(line[len(PEER_MARK):])
    return RunResult(
        side="peer", rep=rep, startup_s=r["first_step_unix"] - child.start_unix, import_s=r["import_s"],
        samples_per_s=r["samples_per_s"], train_s=r["train_seconds"], eval_s=r["eval_seconds"],
        wall_s=child.end_unix - child.start_unix, auc={k: float(v) for k, v in r["auc"].items()},
        cpu_s=child.cpu_s, other_cpu_s=child.other_cpu_s, steal_s=child.steal_s,
        calibration={k: float(v) for k, v in r.get("calibration", {}).items()},
    )


def _opt_float(x: Any) -> Optional[float]:
    return None if x is None else float(x)


# ============================================================================ summary
@dataclass
class CaseResult:
    shape: str
    arch: str
    size: RunSize
    oracle: Dict[str, float]
    runs: List[RunResult] = field(default_factory=list)

    def side(self, name: str) -> List[RunResult]:
        return sorted((r for r in self.runs if r.side == name), key=lambda r: r.rep)

    @property
    def name(self) -> str:
        return f"{self.shape}:{self.arch}"


def _median(xs: Sequence[Optional[float]]) -> Optional[float]:
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(vals) if vals else None


def _span(xs: Sequence[Optional[float]]) -> Optional[Tuple[float, float]]:
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    return (min(vals), max(vals)) if vals else None


def ratios(case: CaseResult) -> List[float]:
    """A/peer samples/s of repeat i of each side."""
    return [a.samples_per_s / b.samples_per_s for a, b in zip(case.side("A"), case.side("peer"))]


def median_auc(runs: Sequence[RunResult], attr: str = "auc") -> Dict[str, float]:
    """Per view, the median over ``runs`` of ``attr`` (auc or calibration)."""
    keys = sorted({k for r in runs for k in getattr(r, attr)})
    return {k: float(statistics.median(getattr(r, attr)[k] for r in runs if k in getattr(r, attr))) for k in keys}


def side_summary(runs: Sequence[RunResult]) -> Dict[str, Any]:
    def stat(attr: str) -> Dict[str, Any]:
        xs = [getattr(r, attr) for r in runs]
        return {"median": _median(xs), "span": _span(xs), "runs": xs}

    return {"startup_s": stat("startup_s"), "import_s": stat("import_s"), "samples_per_s": stat("samples_per_s"),
            "eval_s": stat("eval_s"), "ready_s": stat("ready_s"), "wall_s": stat("wall_s"), "cpu_s": stat("cpu_s"),
            "other_cpu_s": stat("other_cpu_s"), "steal_s": stat("steal_s"), "auc": median_auc(runs),
            "auc_runs": [r.auc for r in runs], "calibration": median_auc(runs, "calibration")}


def case_json(case: CaseResult) -> Dict[str, Any]:
    a, b = side_summary(case.side("A")), side_summary(case.side("peer"))
    sps_a, sps_b = a["samples_per_s"]["median"], b["samples_per_s"]["median"]
    return {
        "shape": case.shape, "arch": case.arch, "size": asdict(case.size),
        "ratio": sps_a / sps_b if sps_a and sps_b else None, "ratio_runs": ratios(case),
        "startup_s": a["startup_s"]["median"], "import_s": a["import_s"]["median"],
        "samples_per_s": sps_a, "eval_s": a["eval_s"]["median"], "auc": a["auc"],
        "peer_startup_s": b["startup_s"]["median"], "peer_import_s": b["import_s"]["median"],
        "peer_samples_per_s": sps_b, "peer_eval_s": b["eval_s"]["median"], "peer_auc": b["auc"],
        "calibration": a["calibration"], "peer_calibration": b["calibration"],
        "oracle_auc": case.oracle, "a": a, "peer": b, "runs": [asdict(r) for r in case.runs],
    }


def _fmt(x: Optional[float], spec: str = ".1f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _fmt_span(xs: Sequence[Optional[float]], spec: str = ".1f") -> str:
    m, s = _median(xs), _span(xs)
    if m is None or s is None:
        return "n/a"
    return f"{format(m, spec)} [{format(s[0], spec)}-{format(s[1], spec)}]"


def _fmt_auc(auc: Dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in auc.items())


def format_run(case: CaseResult, r: RunResult) -> str:
    startup = _fmt(r.startup_s) if r.startup_s is not None else (f"~{r.ready_s:.1f}" if r.ready_s is not None else "n/a")
    return (f"{case.name:<22} {r.side:<4} rep {r.rep}  start-up {startup:>6}s  import {_fmt(r.import_s):>5}s  "
            f"{r.samples_per_s:>9,.0f} samples/s  train {r.train_s:6.1f}s  eval {_fmt(r.eval_s, '.2f'):>5}s  "
            f"wall {r.wall_s:5.1f}s  cpu {r.cpu_s:5.1f}s  other {_fmt(r.other_cpu_s)}s  steal {_fmt(r.steal_s)}s{'!' if noisy(r) else ''}  "
            f"AUC {_fmt_auc(r.auc)}  calibration {'  '.join(f'{k} {v:.3f}' for k, v in r.calibration.items())}")


def noisy(r: RunResult) -> bool:
    """Other processes used (or the hypervisor stole) more than NOISY_SHARE of one core on
    average during the run."""
    return _shared_s(r) > NOISY_SHARE * r.wall_s


def _shared_s(r: RunResult) -> float:
    return (r.other_cpu_s or 0.0) + (r.steal_s or 0.0)


def format_table(cases: Sequence[CaseResult]) -> str:
    head = f"{'case':<22} {'side':<5} {'start-up s':<18} {'import s':<16} {'samples/s':<24} {'eval s':<17} AUC (median)"
    out = [head, "-" * len(head)]
    for c in cases:
        for side in ("A", "peer"):
            runs = c.side(side)
            startup = _fmt_span([r.startup_s for r in runs])
            if startup == "n/a" and side == "A" and _median([r.ready_s for r in runs]) is not None:
                startup = "~" + _fmt_span([r.ready_s for r in runs])  # to its last log line before training
            sps = [r.samples_per_s for r in runs]
            out.append(f"{c.name if side == 'A' else '':<22} {side:<5} {startup:<18} {_fmt_span([r.import_s for r in runs]):<16} "
                       f"{_fmt_span(sps, ',.0f'):<24} {_fmt_span([r.eval_s for r in runs], '.2f'):<17} {_fmt_auc(median_auc(runs))}")
        rs = ratios(c)
        sa, sb = _median([r.samples_per_s for r in c.side("A")]), _median([r.samples_per_s for r in c.side("peer")])
        ratio = f"{sa / sb:.2f} [{min(rs):.2f}-{max(rs):.2f}]" if sa and sb and rs else "n/a"
        out.append(f"{'':<22} ratio A/peer samples/s {ratio}   oracle AUC: {_fmt_auc(c.oracle)}")
        busy = [r for r in c.runs if noisy(r)]
        if busy:
            out.append(f"{'':<22} (!) {len(busy)} of {len(c.runs)} runs shared the cores with other processes or the "
                       f"VM's host (up to {max(_shared_s(r) / r.wall_s for r in busy):.2f} CPU-s per s): timings are noisy")
    return "\n".join(out)


# ============================================================================ driver
def parse_cases(text: Optional[str]) -> List[Tuple[str, str]]:
    """``census:mmoe,movielens:ple`` -> [(shape, arch)]; None -> all 6 cases."""
    if not text:
        return [(s, a) for s in SHAPES for a in ARCHS]
    out = []
    for item in text.split(","):
        shape, _, arch = item.strip().partition(":")
        if shape not in SHAPES or arch not in ARCHS:
            raise SystemExit(f"--cases: {item!r}: expected SHAPE:ARCH with SHAPE in {SHAPES} and ARCH in {ARCHS}")
        out.append((shape, arch))
    return out


def run_case(shape: str, arch: str, data: Path, size: RunSize, repeats: int, runs_root: Path,
             concat: bool, idle_s: float = 0.0, extra: Sequence[str] = (), first_repeat: int = 0) -> CaseResult:
    """``repeats`` runs per side, numbered from ``first_repeat`` (repeat r trains with seed r)."""
    from dlrm_mtl.schema import Schema

    case = CaseResult(shape, arch, size, oracle_aucs(Schema.load(data / "schema.yaml"), data / "eval"))
    for rep in range(first_repeat, first_repeat + repeats):
        for side in (("A", "peer") if rep % 2 == 0 else ("peer", "A")):  # A B B A A B ...
            if idle_s > 0:
                wait_idle(idle_s)
            if side == "A":
                r = run_side_a(data, arch, size, runs_root / f"{shape}-{arch}-A-{rep}", rep, concat, extra)
            else:
                r = run_side_b(data, arch, size, rep)
            case.runs.append(r)
            print(format_run(case, r), flush=True)
    return case


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller rows/epochs and 2 repeats (≈ 2 min for all 6 cases on an idle 2-core machine)")
    p.add_argument("--repeats", type=int, default=None, help="runs per side and case (default 3; --quick 2)")
    p.add_argument("--cases", default=None, help="e.g. census:mmoe,movielens:ple (default: all 6)")
    p.add_argument("--first-repeat", type=int, default=0, metavar="R",
                   help="number the repeats from R (repeat r trains with seed r on both sides): "
                        "tools/side_by_side.sh runs one repeat per call")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")
    p.add_argument("--keep", action="store_true", help="keep side A's run directories (under runs/bench_peer/)")
    p.add_argument("--data-root", default=str(ROOT / "data" / "bench_peer"), help="cache of the generated data sets")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="before each run, wait up to S seconds for other processes to leave the cores")
    p.add_argument("--lr", type=float, default=None, help="the peer's Adam learning rate (default: tuned per shape and size, see run_sizes)")
    p.add_argument("--train-rows", type=int, default=None, help="override the train rows of every shape (eval: a quarter)")
    p.add_argument("--epochs", type=int, default=None, help="override the epochs of every shape")
    p.add_argument("--set", dest="a_sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for side A, after the bench's own (repeatable; e.g. train.precision=fp32)")
    # the peer process
    p.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--arch", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=THREADS, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=SEED, help=argparse.SUPPRESS)
    p.add_argument("--emb-init", default="xavier", choices=["xavier", "default"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peer:
        return peer_main(args)
    return bench_main(args)


def bench_main(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    cases = parse_cases(args.cases)
    repeats = args.repeats or (2 if args.quick else 3)
    sizes = run_sizes(args.quick)
    for shape in list(sizes):
        s = sizes[shape]
        rows = args.train_rows or s.train_rows
        sizes[shape] = replace(s, train_rows=rows, eval_rows=s.eval_rows if args.train_rows is None else max(rows // 4, 1),
                               epochs=args.epochs or s.epochs, peer_lr=args.lr or s.peer_lr)
    data = {shape: ensure_data(Path(args.data_root), shape, sizes[shape]) for shape in {s for s, _ in cases}}
    concat = concat_supported()
    if not concat:
        print("note: this dlrm_mtl has no model.interaction key: side A runs WITHOUT model.interaction=concat "
              "(its dot interaction and a Linear(dense, D) projection; widths differ from the peer)", flush=True)
    if args.keep:
        runs_root = ROOT / "runs" / "bench_peer" / time.strftime("%Y%m%d-%H%M%S")
        runs_root.mkdir(parents=True, exist_ok=True)
    else:
        runs_root = Path(tempfile.mkdtemp(prefix="bench_peer-"))
    results: List[CaseResult] = []
    try:
        for shape, arch in cases:
            results.append(run_case(shape, arch, data[shape], sizes[shape], repeats, runs_root, concat, args.wait_idle, args.a_sets,
                                    args.first_repeat))
    finally:
        if not args.keep:
            shutil.rmtree(runs_root, ignore_errors=True)
    print()
    print(format_table(results))
    wall = time.perf_counter() - t_start
    notes = [f"{len(results)} case(s) x {repeats} repeat(s) x 2 sides in {wall:.0f}s"]
    if any(r.startup_s is None for c in results for r in c.side("A")):
        notes.append("start-up '~' = to A's last log line before training (its metrics.json has no first_step_unix)")
    if args.keep:
        notes.append(f"run dirs kept in {runs_root}")
    print("\n" + "; ".join(notes))
    if args.json:
        doc = {"quick": args.quick, "repeats": repeats, "concat": concat, "threads": THREADS, "a_sets": args.a_sets,
               "wall_s": wall, "cases": [case_json(c) for c in results]}
        Path(args.json).write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
