"""MovieLens-100K and -1M → a multi-scenario multi-task data set (the M3oE / Scenario-Wise
Rec recipe): scenarios are user age groups, tasks ``click`` = rating > 3 and ``like`` =
rating > 4 (a chain: like implies click, so ``like``'s parent is ``click``).

Raw formats (GroupLens READMEs), detected from the files in ``--raw``:

* **ml-100k**: ``u.data`` (``user id \\t item id \\t rating \\t timestamp``), ``u.user``
  (``user id | age | gender | occupation | zip code``), ``u.item`` (``movie id | movie title |
  release date | video release date | IMDb URL |`` then 19 genre flags 0/1 in the order of
  ``u.genre``); Latin-1 text.
* **ml-1m**: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``), ``users.dat``
  (``UserID::Gender::Age::Occupation::Zip-code``, Age one of 1, 18, 25, 35, 45, 50, 56),
  ``movies.dat`` (``MovieID::Title::Genres``, genres ``|``-separated names); Latin-1 text.

Scenarios: three age groups as in Scenario-Wise Rec's ML-1M script: {1, 18} (under 25),
{25} (25–34), {35, 45, 50, 56} (35 and over); ML-100K's ages in years are mapped to the same
groups. Features: user id, movie id, genres (multi-hot, mean pooled), gender, age bracket
(ML-1M's 7 codes), occupation, zip-code prefix (3 characters, hashed) and the release year
(dense, standardised with statistics over the training ratings).

Split: MovieLens-1M has no official split and the ML-100K ``u1..u5`` / ``ua, ub`` splits
are per-user folds unrelated to this recipe, so both use a seeded hash of (user, movie):
80 % train, 10 % eval, 10 % test. Users and movies files are small and held in memory; the
ratings file is streamed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Dict, List, Tuple

import pyarrow as pa

from dlrm_mtl.datasets.common import (
    ConversionResult, ConvertOptions, FormatError, ParquetSink, Vocabulary, finish, leaf_names, numbered_lines,
    refuse_split, stable_unit,
)
from dlrm_mtl.schema import DenseFeature, Schema, ScenarioLevel, SparseFeature, Task

GENRES: List[str] = [  # u.genre order (ML-1M uses the same names without "unknown")
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]
AGE_CODES = [1, 18, 25, 35, 45, 50, 56]  # ML-1M's age brackets (lower bounds)
AGE_GROUPS = {1: 0, 18: 0, 25: 1, 35: 2, 45: 2, 50: 2, 56: 2}
AGE_GROUP_NAMES = ["under_25", "25_34", "35_plus"]
ZIP_BUCKETS = 1000
NUM_OCCUPATIONS = 21  # ML-1M codes 0..20; ML-100K's u.occupation lists 21 names
SPLITS = (("train", 0.8), ("eval", 0.9), ("test", 1.0))


def age_code(years: int) -> int:
    """ML-100K age in years -> ML-1M bracket code (1: under 18, 18: 18-24, ..., 56: 56+)."""
    code = AGE_CODES[0]
    for c in AGE_CODES:
        if years >= c:
            code = c
    return code


def movielens_schema(variant: str, num_users: int, num_items: int, year_stats: Tuple[float, float]) -> Schema:
    mean, std = year_stats
    return Schema(
        name=f"movielens_{variant}",
        row_id="row_id",
        sparse=[
            SparseFeature("user_id", "t_user", num_users, 16),
            SparseFeature("movie_id", "t_movie", num_items, 16),
            SparseFeature("genres", "t_genre", len(GENRES), 16, multi_hot=True, max_len=len(GENRES), pooling="mean"),
            SparseFeature("gender", "t_gender", 2, 16),
            SparseFeature("age", "t_age", len(AGE_CODES), 16),
            SparseFeature("occupation", "t_occupation", NUM_OCCUPATIONS, 16),
            SparseFeature("zip_prefix", "t_zip", ZIP_BUCKETS, 16, hash=True),
        ],
        dense=[DenseFeature("release_year", default=mean, standardize=True, mean=mean, std=std)],
        scenarios=[ScenarioLevel("age_group", 3, value_names=list(AGE_GROUP_NAMES))],
        tasks=[Task("click", "click"), Task("like", "like", parent="click", loss_space="entire")],
    )


def _arrow_schema() -> pa.Schema:
    return pa.schema([
        ("row_id", pa.int64()), ("user_id", pa.int64()), ("movie_id", pa.int64()), ("genres", pa.list_(pa.int64())),
        ("gender", pa.int64()), ("age", pa.int64()), ("occupation", pa.int64()), ("zip_prefix", pa.string()),
        ("release_year", pa.float32()), ("age_group", pa.int64()), ("rating", pa.int8()),
        ("click", pa.int8()), ("like", pa.int8()), ("timestamp", pa.int64()),
    ])


def detect_variant(raw: Path) -> str:
    if (raw / "ratings.dat").exists():
        return "1m"
    if (raw / "u.data").exists():
        return "100k"
    raise FileNotFoundError(f"{raw}: neither ratings.dat (MovieLens-1M) nor u.data (MovieLens-100K) found")


def _int(path: Path, line_no: int, line: str, what: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise FormatError(path, line_no, f"{what} {text!r} is not an integer", line) from None


_YEAR = re.compile(r"\((\d{4})\)\s*$")


def _load_users(raw: Path, variant: str) -> Dict[int, Dict[str, object]]:
    users: Dict[int, Dict[str, object]] = {}
    occupations = Vocabulary()
    if variant == "1m":
        path, sep, n = raw / "users.dat", "::", 5
    else:
        path, sep, n = raw / "u.user", "|", 5
    for line_no, line in numbered_lines(path, "latin-1"):
        f = line.split(sep)
        if len(f) != n:
            raise FormatError(path, line_no, f"expected {n} {sep!r}-separated fields, found {len(f)}", line)
        if variant == "1m":
            uid, gender, age, occ, zipc = f
            code = _int(path, line_no, line, "age", age)
            if code not in AGE_GROUPS:
                raise FormatError(path, line_no, f"age code {code} not one of {AGE_CODES}", line)
            occ_id = _int(path, line_no, line, "occupation", occ)
        else:
            uid, age, gender, occ, zipc = f
            code = age_code(_int(path, line_no, line, "age", age))
            occ_id = occupations(occ)
        if gender not in ("M", "F"):
            raise FormatError(path, line_no, f"gender {gender!r} is neither M nor F", line)
        if not 0 <= occ_id < NUM_OCCUPATIONS:
            raise FormatError(path, line_no, f"occupation {occ!r} beyond the {NUM_OCCUPATIONS} documented ones", line)
        users[_int(path, line_no, line, "user id", uid)] = {
            "gender": int(gender == "F"), "age": AGE_CODES.index(code), "age_group": AGE_GROUPS[code],
            "occupation": occ_id, "zip_prefix": zipc[:3],
        }
    return users


def _load_movies(raw: Path, variant: str) -> Dict[int, Dict[str, object]]:
    movies: Dict[int, Dict[str, object]] = {}
    if variant == "1m":
        path = raw / "movies.dat"
        for line_no, line in numbered_lines(path, "latin-1"):
            f = line.split("::")
            if len(f) != 3:
                raise FormatError(path, line_no, f"expected 3 '::'-separated fields, found {len(f)}", line)
            genres = []
            for g in f[2].split("|"):
                if g not in GENRES:
                    raise FormatError(path, line_no, f"unknown genre {g!r}", line)
                genres.append(GENRES.index(g))
            m = _YEAR.search(f[1])
            movies[_int(path, line_no, line, "movie id", f[0])] = {"genres": genres, "release_year": float(m.group(1)) if m else None}
    else:
        path = raw / "u.item"
        for line_no, line in numbered_lines(path, "latin-1"):
            f = line.split("|")
            if len(f) != 5 + len(GENRES):
                raise FormatError(path, line_no, f"expected {5 + len(GENRES)} '|'-separated fields, found {len(f)}", line)
            flags = f[5:]
            if any(x not in ("0", "1") for x in flags):
                raise FormatError(path, line_no, "genre flags must be 0 or 1", line)
            date = f[2].strip()  # e.g. 01-Jan-1995, sometimes empty
            year = float(date[-4:]) if len(date) >= 4 and date[-4:].isdigit() else None
            movies[_int(path, line_no, line, "movie id", f[0])] = {
                "genres": [i for i, x in enumerate(flags) if x == "1"], "release_year": year}
    return movies


def convert(raw: str | Path, out: str | Path, opts: ConvertOptions = ConvertOptions()) -> ConversionResult:
    """Convert an ml-100k or ml-1m directory into ``out/{train,eval,test}`` + schema."""
    raw, out = Path(raw), Path(out)
    refuse_split(opts, "MovieLens has its own seeded 80/10/10 split of the (user, movie) pairs")
    variant = detect_variant(raw)
    users, movies = _load_users(raw, variant), _load_movies(raw, variant)
    arrow = _arrow_schema()
    sinks = {s: ParquetSink(out / s, arrow, ["age_group"], ["click", "like"], opts.row_group_rows, opts.file_rows)
             for s, _ in SPLITS}
    path = raw / ("ratings.dat" if variant == "1m" else "u.data")
    sep = "::" if variant == "1m" else "\t"
    n, s1, s2 = 0, 0.0, 0.0
    for line_no, line in numbered_lines(path, "latin-1", limit=opts.limit):
        f = line.split(sep)
        if len(f) != 4:
            raise FormatError(path, line_no, f"expected 4 {sep!r}-separated fields, found {len(f)}", line)
        uid, mid, rating, ts = (_int(path, line_no, line, w, x) for w, x in zip(("user id", "movie id", "rating", "timestamp"), f))
        if not 1 <= rating <= 5:
            raise FormatError(path, line_no, f"rating {rating} outside 1..5", line)
        if uid not in users:
            raise FormatError(path, line_no, f"user {uid} is not in the users file", line)
        if mid not in movies:
            raise FormatError(path, line_no, f"movie {mid} is not in the movies file", line)
        u, m = users[uid], movies[mid]
        year = m["release_year"]
        r = stable_unit(f"ml:{uid}:{mid}", opts.seed)
        split = next(name for name, upper in SPLITS if r < upper)
        row = {"row_id": line_no, "user_id": uid, "movie_id": mid, "genres": m["genres"], **u,
               "release_year": m["release_year"], "rating": rating, "click": int(rating > 3), "like": int(rating > 4),
               "timestamp": ts}
        sinks[split].add(row)
        if split == "train" and year is not None:
            n, s1, s2 = n + 1, s1 + year, s2 + year * year
    mean = s1 / n if n else 1990.0
    std = math.sqrt(max(s2 / n - mean * mean, 0.0)) if n else 1.0
    schema = movielens_schema(variant, max(users) + 1, max(movies) + 1, (mean, std if std > 0 else 1.0))
    return finish(out, schema, sinks, leaf_names(schema), opts, {"variant": variant, "users": len(users), "movies": len(movies)})
