"""Parquet sources, the streaming reader and the batch.

The names are loaded on first use (PEP 562): ``dlrm_mtl.data.errors`` and ``source`` need
only pyarrow, so commands that never build a batch do not pay for importing torch/torchrec.
"""

import importlib
from typing import Any

_WHERE = {
    "Batch": "batch",
    "DataError": "errors",
    "SourceError": "source",
    "open_source": "source",
    "resolve_files": "source",
    "ParquetStream": "stream",
    "RowGroup": "stream",
    "Segment": "stream",
    "assign_row_groups": "stream",
    "list_row_groups": "stream",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'dlrm_mtl.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"dlrm_mtl.data.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
