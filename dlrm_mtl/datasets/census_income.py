"""Census-Income (KDD) → dlrm_mtl Parquet, as used by MMoE (Ma et al., KDD 2018) and PLE
(Tang et al., RecSys 2020).

Raw format (UCI ``census-income.names``): ``census-income.data`` (199,523 rows) and
``census-income.test`` (99,762 rows), optionally gzipped; no header; 42 comma-separated
fields per line, each preceded by a space; the last field is the income class
``- 50000.`` or ``50000+.``. Field 24 (instance weight) is a sampling weight the UCI notes say
not to use in classifiers; it is dropped.

Tasks (MMoE's group 1, also PLE's census set-up): ``income`` = income > 50K, ``marital`` =
marital status is "Never married"; two independent root tasks. The marital status column is
therefore not a feature. Features: 7 continuous columns (dense; money columns ``log1p``; all
standardised with train-split statistics computed while converting) and the other 32 nominal
columns (one table each, vocabulary in order of first appearance in train then test).

Split: train = ``census-income.data``; the official test file is halved into ``eval``
(validation) and ``test`` by a seeded hash of its line number, as MMoE did (1:1 random split).
One scenario level with a single value (Census has no scenarios).

A download with only one of the two files (often only ``census-income.test`` is at hand)
has no split of its own: ``--opt split=F`` (``ConvertOptions(split="F")``) sends that
fraction of its rows to ``train`` and the rest to ``eval`` (``F,G``: train / eval / test), by
:class:`~dlrm_mtl.datasets.common.HashSplit` (a seeded hash of each row's line number);
vocabularies and dense statistics then come from that one file (statistics from its train
rows). Without it the converter stops and says so; with both files present ``--opt split``
is refused (the official split applies).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional

import pyarrow as pa

from dlrm_mtl.datasets.common import (
    SPLIT_HINT, ConversionResult, ConvertOptions, FormatError, HashSplit, ParquetSink, RunningMoments, Vocabulary, finish,
    hash_split, leaf_names, numbered_lines, refuse_split, stable_unit,
)
from dlrm_mtl.schema import DenseFeature, Schema, ScenarioLevel, SparseFeature, Task

# The 42 columns of census-income.names, in file order.
COLUMNS: List[str] = [
    "age", "class_of_worker", "detailed_industry_recode", "detailed_occupation_recode", "education",
    "wage_per_hour", "enroll_in_edu_inst_last_wk", "marital_stat", "major_industry_code", "major_occupation_code",
    "race", "hispanic_origin", "sex", "member_of_a_labor_union", "reason_for_unemployment",
    "full_or_part_time_employment_stat", "capital_gains", "capital_losses", "dividends_from_stocks",
    "tax_filer_stat", "region_of_previous_residence", "state_of_previous_residence",
    "detailed_household_and_family_stat", "detailed_household_summary_in_household", "instance_weight",
    "migration_code_change_in_msa", "migration_code_change_in_reg", "migration_code_move_within_reg",
    "live_in_this_house_1_year_ago", "migration_prev_res_in_sunbelt", "num_persons_worked_for_employer",
    "family_members_under_18", "country_of_birth_father", "country_of_birth_mother", "country_of_birth_self",
    "citizenship", "own_business_or_self_employed", "fill_inc_questionnaire_for_veterans_admin",
    "veterans_benefits", "weeks_worked_in_year", "year", "income",
]
# continuous per census-income.names (instance weight excluded); money columns get log1p
CONTINUOUS: Dict[str, str] = {
    "age": "none", "wage_per_hour": "log1p", "capital_gains": "log1p", "capital_losses": "log1p",
    "dividends_from_stocks": "log1p", "num_persons_worked_for_employer": "none", "weeks_worked_in_year": "none",
}
DROPPED = ("instance_weight", "marital_stat", "income")
CATEGORICAL: List[str] = [c for c in COLUMNS if c not in CONTINUOUS and c not in DROPPED]
INCOME_CLASSES = {"- 50000.": 0, "50000+.": 1}
NEVER_MARRIED = "Never married"
EMBEDDING_DIM = 8

RAW_FILES = {"train": "census-income.data", "test": "census-income.test"}


def census_schema(vocab_sizes: Dict[str, int], stats: Optional[Dict[str, tuple]] = None) -> Schema:
    """The schema the converter writes: one table per nominal column (``vocab_sizes``), the
    dense columns standardised with ``stats`` (name -> (mean, std)) when given."""
    dense = []
    for name, transform in CONTINUOUS.items():
        mean, std = (stats or {}).get(name, (None, None))
        dense.append(DenseFeature(name, transform, standardize=mean is not None, mean=mean, std=std))
    return Schema(
        name="census_income",
        row_id="row_id",
        sparse=[SparseFeature(c, f"t_{c}", vocab_sizes[c], EMBEDDING_DIM) for c in CATEGORICAL],
        dense=dense,
        scenarios=[ScenarioLevel("population", 1, column="scenario", value_names=["everyone"])],
        tasks=[Task("income", "income_50k"), Task("marital", "never_married")],
    )


def _arrow_schema() -> pa.Schema:
    return pa.schema(
        [("row_id", pa.int64())] + [(c, pa.int64()) for c in CATEGORICAL] + [(c, pa.float32()) for c in CONTINUOUS]
        + [("scenario", pa.int64()), ("income_50k", pa.int8()), ("never_married", pa.int8())]
    )


def look_for(raw: Path, split: str) -> Optional[Path]:
    """``raw/census-income.{data,test}`` or its ``.gz``, or None."""
    base = raw / RAW_FILES[split]
    for cand in (base, base.with_name(base.name + ".gz")):
        if cand.exists():
            return cand
    return None


def find_raw(raw: Path, split: str) -> Path:
    found = look_for(raw, split)
    if found is None:
        name = RAW_FILES[split]
        raise FileNotFoundError(f"{raw}: neither {name} nor {name}.gz found (the UCI census-income files)")
    return found


def plan(raw: Path, opts: ConvertOptions) -> List[tuple]:
    """(raw file, how its rows are split) in conversion order: ``"train"``, ``"halves"`` (the
    official test file into eval / test) or a :class:`HashSplit` (a one-file download)."""
    data, test = look_for(raw, "train"), look_for(raw, "test")
    if data is not None and test is not None:
        refuse_split(opts, f"{raw} holds both {data.name} and {test.name}, the official train / test split")
        return [(data, "train"), (test, "halves")]
    rule = hash_split(opts)
    if data is None and test is None:
        raise FileNotFoundError(f"{raw}: neither {RAW_FILES['train']} nor {RAW_FILES['test']} (or their .gz) found "
                                "(the UCI census-income files)")
    one = data if data is not None else test
    if rule is None:
        other = RAW_FILES["test" if data is not None else "train"]
        raise FileNotFoundError(f"{raw}: {other} (or {other}.gz) not found, only {one.name}; to convert that one file, "
                                f"{SPLIT_HINT}; or add {other} for the official split")
    return [(one, rule)]


def parse_line(path: Path, line_no: int, line: str) -> Dict[str, str]:
    """Fields of one raw line by column name, stripped; :class:`FormatError` if it is not a
    42-field census-income record."""
    fields = [f.strip() for f in line.split(",")]
    if len(fields) != len(COLUMNS):
        raise FormatError(path, line_no, f"expected {len(COLUMNS)} comma-separated fields, found {len(fields)}", line)
    rec = dict(zip(COLUMNS, fields))
    if rec["income"] not in INCOME_CLASSES:
        raise FormatError(path, line_no, f"income class {rec['income']!r} is neither '- 50000.' nor '50000+.'", line)
    for c in list(CONTINUOUS) + ["instance_weight"]:
        try:
            v = float(rec[c])
        except ValueError:
            raise FormatError(path, line_no, f"column {c!r}: {rec[c]!r} is not a number", line) from None
        if not math.isfinite(v) or (CONTINUOUS.get(c) == "log1p" and v < 0):
            raise FormatError(path, line_no, f"column {c!r}: {rec[c]!r} out of range", line)
    return rec


def convert(raw: str | Path, out: str | Path, opts: ConvertOptions = ConvertOptions()) -> ConversionResult:
    """Convert the UCI files in directory ``raw`` into ``out/{train,eval,test}`` + schema
    (``out/{train,eval}`` for a one-file download split with ``--opt split``)."""
    raw, out = Path(raw), Path(out)
    files = plan(raw, opts)
    vocab = {c: Vocabulary() for c in CATEGORICAL}
    welford = {c: RunningMoments() for c in CONTINUOUS}
    arrow = _arrow_schema()
    labels = ["income_50k", "never_married"]
    rule = files[0][1] if isinstance(files[0][1], HashSplit) else None
    split_names = rule.splits if rule is not None else ("train", "eval", "test")
    sinks = {s: ParquetSink(out / s, arrow, ["scenario"], labels, opts.row_group_rows, opts.file_rows)
             for s in split_names}
    row_id = 0
    for path, how in files:
        for line_no, line in numbered_lines(path, encoding="latin-1", limit=opts.limit):
            rec = parse_line(path, line_no, line)
            if how == "train":
                split = "train"
            elif how == "halves":  # MMoE: the official test set halved into validation and test at random
                split = "eval" if stable_unit(f"census-test:{line_no}", opts.seed) < 0.5 else "test"
            else:
                split = how.of(line_no)
            row = {"row_id": row_id, "scenario": 0,
                   "income_50k": INCOME_CLASSES[rec["income"]], "never_married": int(rec["marital_stat"] == NEVER_MARRIED)}
            for c in CATEGORICAL:
                row[c] = vocab[c](rec[c])
            for c, transform in CONTINUOUS.items():
                v = float(rec[c])
                row[c] = v
                if split == "train":
                    welford[c].add(math.log1p(v) if transform == "log1p" else v)
            sinks[split].add(row)
            row_id += 1
    schema = census_schema({c: max(len(v), 1) for c, v in vocab.items()}, {c: w.result() for c, w in welford.items()})
    notes = {"vocabulary_sizes": {c: len(v) for c, v in vocab.items()}, "raw_files": [p.name for p, _ in files],
             "split": rule.describe() if rule is not None else "official: train = census-income.data, "
             "census-income.test halved into eval / test"}
    if rule is not None and not opts.quiet:
        print(f"census-income: one file ({files[0][0].name}), {rule.describe()}")
    return finish(out, schema, sinks, leaf_names(schema), opts, notes)
