"""Small raw files in each public data set's documented format, written by the tests (no
download, nothing committed). Each writer returns the records it wrote so tests can compare
the converted Parquet row by row against them."""

from __future__ import annotations

import gzip
import random
from pathlib import Path
from typing import Dict, List

from dlrm_mtl.datasets import census_income, movielens

# --------------------------------------------------------------------------- census-income
CENSUS_NOMINAL_VALUES = {
    "class_of_worker": ["Not in universe", "Private", "Self-employed-not incorporated", "Local government"],
    "education": ["High school graduate", "Bachelors degree(BA AB BS)", "Children", "Some college but no degree"],
    "marital_stat": ["Never married", "Married-civilian spouse present", "Widowed", "Divorced"],
    "sex": ["Female", "Male"],
    "race": ["White", "Black", "Asian or Pacific Islander"],
    "income": ["- 50000.", "50000+."],
}


def census_record(rng: random.Random) -> Dict[str, str]:
    rec = {}
    for c in census_income.COLUMNS:
        if c in CENSUS_NOMINAL_VALUES:
            rec[c] = rng.choice(CENSUS_NOMINAL_VALUES[c])
        elif c in census_income.CONTINUOUS:
            rec[c] = str(rng.choice([0, 0, rng.randint(1, 90), rng.randint(100, 5000)]))
        elif c == "instance_weight":
            rec[c] = f"{rng.uniform(100, 3000):.2f}"
        elif c == "year":
            rec[c] = rng.choice(["94", "95"])
        elif c in ("detailed_industry_recode", "detailed_occupation_recode", "own_business_or_self_employed",
                   "veterans_benefits"):
            rec[c] = str(rng.randint(0, 6))
        else:
            rec[c] = rng.choice(["Not in universe", "?", "United-States", "Nonfiler", "Yes", "No"])
    return rec


def census_line(rec: Dict[str, str]) -> str:
    # UCI layout: ", "-separated (each field after the first preceded by a space)
    return ", ".join(rec[c] for c in census_income.COLUMNS)


def write_census(raw: Path, n_train: int = 300, n_test: int = 160, seed: int = 0, gz: bool = False) -> Dict[str, List[Dict[str, str]]]:
    rng = random.Random(seed)
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        recs = [census_record(rng) for _ in range(n)]
        text = "\n".join(census_line(r) for r in recs) + "\n"
        name = census_income.RAW_FILES[split]
        if gz:
            with gzip.open(raw / (name + ".gz"), "wt", encoding="latin-1") as fh:
                fh.write(text)
        else:
            (raw / name).write_text(text, encoding="latin-1")
        out[split] = recs
    return out


# --------------------------------------------------------------------------- MovieLens
def write_movielens(raw: Path, variant: str, n_users: int = 40, n_movies: int = 30, n_ratings: int = 1200,
                    seed: int = 0) -> Dict[str, object]:
    rng = random.Random(seed)
    raw.mkdir(parents=True, exist_ok=True)
    users, movies, ratings = {}, {}, []
    occupations = ["administrator", "artist", "doctor", "educator", "engineer", "student", "other"]
    for u in range(1, n_users + 1):
        if variant == "1m":
            users[u] = {"gender": rng.choice("MF"), "age": rng.choice(movielens.AGE_CODES), "occupation": rng.randint(0, 20),
                        "zip": f"{rng.randint(10000, 99999)}"}
        else:
            users[u] = {"gender": rng.choice("MF"), "age": rng.randint(7, 73), "occupation": rng.choice(occupations),
                        "zip": rng.choice([f"{rng.randint(10000, 99999)}", "T8H1N"])}
    for m in range(1, n_movies + 1):
        k = rng.randint(1, 3)
        genres = sorted(rng.sample(range(1 if variant == "1m" else 0, len(movielens.GENRES)), k))
        year = rng.randint(1930, 1998)
        movies[m] = {"title": f"Movie é {m} ({year})", "year": year, "genres": genres,
                     "date": "" if (variant == "100k" and m % 11 == 0) else f"01-Jan-{year}"}
    for _ in range(n_ratings):
        u, m = rng.randint(1, n_users), rng.randint(1, n_movies)
        ratings.append((u, m, rng.randint(1, 5), 874724710 + rng.randint(0, 10**7)))
    if variant == "1m":
        (raw / "users.dat").write_text("".join(f"{u}::{d['gender']}::{d['age']}::{d['occupation']}::{d['zip']}\n"
                                               for u, d in users.items()), encoding="latin-1")
        (raw / "movies.dat").write_text("".join(
            f"{m}::{d['title']}::{'|'.join(movielens.GENRES[g] for g in d['genres'])}\n" for m, d in movies.items()),
            encoding="latin-1")
        (raw / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in ratings), encoding="latin-1")
    else:
        (raw / "u.user").write_text("".join(f"{u}|{d['age']}|{d['gender']}|{d['occupation']}|{d['zip']}\n"
                                            for u, d in users.items()), encoding="latin-1")
        lines = []
        for m, d in movies.items():
            flags = ["1" if g in d["genres"] else "0" for g in range(len(movielens.GENRES))]
            lines.append("|".join([str(m), d["title"], d["date"], "", f"http://us.imdb.com/M/title-exact?{m}"] + flags))
        (raw / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")
        (raw / "u.data").write_text("".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in ratings), encoding="latin-1")
    return {"users": users, "movies": movies, "ratings": ratings}


# --------------------------------------------------------------------------- AliExpress
def write_aliexpress(raw: Path, countries=("NL", "ES", "FR", "US"), n: int = 150, seed: int = 0) -> Dict[str, List[list]]:
    from dlrm_mtl.datasets import aliexpress as ax

    rng = random.Random(seed)
    header = ["search_id"] + [f"categorical_{i}" for i in range(1, 17)] + [f"numerical_{i}" for i in range(1, 64)] + ["click", "conversion"]
    out = {}
    for c in countries:
        d = raw / f"AliExpress_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            rows = []
            for i in range(n if split == "train" else n // 2):
                click = int(rng.random() < 0.3)
                conv = int(click and rng.random() < 0.3)
                cats = [rng.randint(0, 5 + 7 * j) for j in range(ax.NUM_CATEGORICAL)]
                nums = [round(rng.uniform(-1, 3), 4) for _ in range(ax.NUM_NUMERICAL)]
                rows.append([f"{c}{split}{i}"] + cats + nums + [click, conv])
            (d / f"{split}.csv").write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
            out[f"{split}/{c}"] = rows
    return out


# --------------------------------------------------------------------------- Ali-CCP
def _features(items: List[tuple]) -> str:
    return "\x01".join(f"{f}\x02{i}\x03{v}" for f, i, v in items)


def write_ali_ccp(raw: Path, n_common: int = 25, n_samples: int = 400, seed: int = 0) -> Dict[str, object]:
    from dlrm_mtl.datasets import ali_ccp as ac

    rng = random.Random(seed)
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    user_fields = ["101", "121", "122", "124", "125", "126", "127", "128", "129"]
    item_fields = ["205", "206", "207", "210", "216", "508", "509", "702", "853"]
    for split in ("train", "test"):
        commons = {}
        lines = []
        for k in range(n_common):
            key = f"{split}{k:04d}abcdef"
            items = [(f, 1000 * int(f) + rng.randint(0, 20), "1.0") for f in user_fields]
            for f in ac.MULTI_FIELDS:
                for _ in range(rng.randint(0, 70 if f == "109_14" else 4)):
                    items.append((f, 9_000_000 + rng.randint(0, 500), f"{rng.randint(1, 9)}.0"))
            commons[key] = items
            lines.append(f"{key},{len(items)},{_features(items)}")
        (raw / f"common_features_{split}.csv").write_text("\n".join(lines) + "\n")
        samples = []
        lines = []
        for s in range(n_samples):
            key = f"{split}{rng.randint(0, n_common - 1):04d}abcdef"
            click = int(rng.random() < 0.2)
            buy = int(click and rng.random() < 0.3)
            items = [(f, 500_000 * int(f) + rng.randint(0, 60), "1.0") for f in item_fields if rng.random() < 0.95]
            items.append(("301", rng.choice([7001, 7002, 7003]), "1.0"))
            if rng.random() < 0.05:
                items.append(("999", 1, "1.0"))  # a field outside the ESMM list (ignored, counted)
            samples.append({"sample_id": s + 1, "click": click, "buy": buy, "common": key, "items": items})
            lines.append(f"{s + 1},{click},{buy},{key},{len(items)},{_features(items)}")
        (raw / f"sample_skeleton_{split}.csv").write_text("\n".join(lines) + "\n")
        out[split] = {"commons": commons, "samples": samples}
    return out


# --------------------------------------------------------------------------- KuaiRand
KUAIRAND_LOG_COLUMNS = ["user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow",
                        "is_comment", "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms",
                        "profile_stay_time", "comment_stay_time", "is_profile_enter", "is_rand", "tab"]


def write_kuairand(raw: Path, n: int = 600, seed: int = 0) -> Dict[str, object]:
    from dlrm_mtl.datasets import kuairand as kr

    rng = random.Random(seed)
    raw.mkdir(parents=True, exist_ok=True)
    users = list(range(0, 30))
    videos = list(range(0, 50))
    ucols = ["user_id"] + kr.USER_COLUMNS
    (raw / "user_features_pure.csv").write_text(",".join(ucols) + "\n" + "".join(
        ",".join([str(u)] + [("high_active" if c == "user_active_degree" and u % 2 else
                              "full_active" if c == "user_active_degree" else
                              f"{rng.randint(0, 9)}-{rng.randint(10, 99)}" if c.endswith("_range") else
                              str(rng.randint(0, 5))) for c in kr.USER_COLUMNS]) + "\n" for u in users))
    vcols = ["video_id"] + kr.VIDEO_COLUMNS
    (raw / "video_features_basic_pure.csv").write_text(",".join(vcols) + "\n" + "".join(
        ",".join([str(v)] + [("NORMAL" if c == "video_type" else
                              f"\"{rng.randint(1, 40)},{rng.randint(1, 40)}\"" if c == "tag" else
                              str(rng.randint(0, 300))) for c in kr.VIDEO_COLUMNS]) + "\n" for v in videos))
    rows = []
    for name, dates in (("log_standard_4_08_to_4_21_pure.csv", range(20220408, 20220422)),
                        ("log_standard_4_22_to_5_08_pure.csv", list(range(20220422, 20220431)) + list(range(20220501, 20220509)))):
        lines = [",".join(KUAIRAND_LOG_COLUMNS)]
        dates = list(dates)
        for _ in range(n // 2):
            click = int(rng.random() < 0.4)
            r = {"user_id": rng.choice(users), "video_id": rng.choice(videos), "date": rng.choice(dates),
                 "hourmin": 1300, "time_ms": 1649412000000 + rng.randint(0, 10**8), "is_click": click,
                 "is_like": int(click and rng.random() < 0.2), "is_follow": 0, "is_comment": 0, "is_forward": 0,
                 "is_hate": 0, "long_view": int(rng.random() < 0.3), "play_time_ms": rng.randint(0, 60000),
                 "duration_ms": 60000, "profile_stay_time": 0, "comment_stay_time": 0, "is_profile_enter": 0,
                 "is_rand": 0, "tab": rng.choice([0, 1, 1, 2, 4, 6])}
            rows.append(r)
            lines.append(",".join(str(r[c]) for c in KUAIRAND_LOG_COLUMNS))
        (raw / name).write_text("\n".join(lines) + "\n")
    return {"rows": rows}


# --------------------------------------------------------------------------- preprocessed variants
# torch-rechub's Ali-CCP CSVs (ali_ccp_{train,val,test}.csv): labels, 23 sparse field columns
# (integer codes, 0 = absent or rare), 8 dense columns.
ALI_CCP_RECHUB_SPARSE = ["101", "121", "122", "124", "125", "126", "127", "128", "129", "205", "206", "207", "210", "216",
                         "508", "509", "702", "853", "301", "109_14", "110_14", "127_14", "150_14"]
ALI_CCP_RECHUB_DENSE = ["D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853"]
ALI_CCP_RECHUB_COLUMNS = ["click", "purchase"] + ALI_CCP_RECHUB_SPARSE + ALI_CCP_RECHUB_DENSE


def write_ali_ccp_rechub(raw: Path, files=("train", "val", "test"), n: int = 40, seed: int = 0,
                         name: str = "ali_ccp_{}.csv", drop=(), extra=()) -> Dict[str, List[Dict[str, str]]]:
    """One CSV per entry of ``files`` in torch-rechub's layout (columns in ``drop`` left out,
    columns in ``extra`` appended with junk values); returns file name -> records (column ->
    text, in file order)."""
    rng = random.Random(seed)
    raw.mkdir(parents=True, exist_ok=True)
    header = [c for c in ALI_CCP_RECHUB_COLUMNS if c not in drop] + list(extra)
    out = {}
    for role in files:
        recs = []
        for _ in range(n):
            click = int(rng.random() < 0.3)
            rec = {"click": str(click), "purchase": str(int(click and rng.random() < 0.4))}
            for c in ALI_CCP_RECHUB_SPARSE:
                rec[c] = str(rng.choice([1, 2, 3]) if c == "301" else rng.randint(0, 3 if c.startswith("1") else 12))
            for c in ALI_CCP_RECHUB_DENSE:
                rec[c] = repr(round(rng.random(), 4))
            for c in extra:
                rec[c] = f"x{rng.randint(0, 9)}"
            recs.append(rec)
        fname = name.format(role)
        (raw / fname).write_text(",".join(header) + "\n" + "".join(",".join(r[c] for c in header) + "\n" for r in recs))
        out[fname] = recs
    return out


# Scenario-Wise Rec's KuaiRand CSV (kuairand_sample.csv): interactions joined with user and
# video columns, label-encoded; only is_click as a label.
KUAIRAND_SWR_COLUMNS = (
    ["user_id", "video_id", "is_click", "play_time_ms", "duration_ms", "profile_stay_time", "comment_stay_time", "tab",
     "user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author", "follow_user_num",
     "follow_user_num_range", "fans_user_num", "fans_user_num_range", "friend_user_num", "friend_user_num_range",
     "register_days", "register_days_range"] + [f"onehot_feat{i}" for i in range(18)]
    + ["video_type", "visible_status", "server_width", "server_height"]
)


def write_kuairand_swr(raw: Path, n: int = 60, seed: int = 0, name: str = "kuairand_sample.csv", drop=(),
                       date: bool = False) -> List[Dict[str, str]]:
    """One CSV in Scenario-Wise Rec's KuaiRand layout (``drop``: columns left out; ``date``:
    a ``date`` column appended); returns the records (column -> text, in file order)."""
    rng = random.Random(seed)
    raw.mkdir(parents=True, exist_ok=True)
    header = [c for c in KUAIRAND_SWR_COLUMNS if c not in drop] + (["date"] if date else [])
    recs = []
    for _ in range(n):
        rec = {c: str(rng.randint(0, 6)) for c in KUAIRAND_SWR_COLUMNS}
        rec.update(user_id=str(rng.randint(0, 15)), video_id=str(rng.randint(0, 25)), is_click=str(int(rng.random() < 0.4)),
                   play_time_ms=str(rng.randint(0, 60000)), duration_ms=str(rng.choice([0, 7600, 30066, 169500])),
                   tab=str(rng.choice([0, 1, 1, 2, 4, 6])), is_live_streamer=rng.choice(["1", "-124"]),
                   onehot_feat4=f"{rng.randint(0, 5)}.0", server_width="720.0", server_height="1280.0",
                   date=str(rng.choice([20220425, 20220430, 20220502, 20220507])))
        recs.append(rec)
    (raw / name).write_text(",".join(header) + "\n" + "".join(",".join(r[c] for c in header) + "\n" for r in recs))
    return recs
