"""Converters from public data set downloads to dlrm_mtl's Parquet layout
(``out/train``, ``out/eval`` or ``out/test``, ``out/schema.yaml``, ``out/conversion.json``).

Each data set's README, reference schema, training configs and comparison script live in
``datasets/<name>/`` of the repository. Example::

    from dlrm_mtl.datasets import convert
    result = convert("movielens", "raw/ml-1m", "data/ml-1m")
    result.splits["train"]["under_25"]["rows"]
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Dict

from dlrm_mtl.datasets.common import ConversionResult, ConvertOptions, FormatError

# CLI name -> module under dlrm_mtl.datasets with a ``convert(raw, out, opts)`` function
CONVERTERS: Dict[str, str] = {
    "ali-ccp": "ali_ccp",
    "aliexpress": "aliexpress",
    "census-income": "census_income",
    "movielens": "movielens",
    "kuairand": "kuairand",
}


def convert(name: str, raw: str | Path, out: str | Path, opts: ConvertOptions | None = None) -> ConversionResult:
    """Run the converter ``name`` (a key of :data:`CONVERTERS`) on the raw download ``raw``."""
    if name not in CONVERTERS:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(CONVERTERS)}")
    module = importlib.import_module(f"dlrm_mtl.datasets.{CONVERTERS[name]}")
    if not Path(raw).is_dir():
        raise FileNotFoundError(f"--raw {raw}: not a directory (give the unpacked download's directory)")
    return module.convert(raw, out, opts or ConvertOptions())


__all__ = ["CONVERTERS", "ConversionResult", "ConvertOptions", "FormatError", "convert"]
