import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory):
    """A small synthetic data set (train/eval/schema.yaml), shared by the session's tests."""
    from dlrm_mtl.synthetic import SyntheticSpec, generate

    out = tmp_path_factory.mktemp("synthetic_small")
    spec = SyntheticSpec(train_files=3, eval_files=2, row_group_rows=1000)
    generate(out, rows=12_000, seed=3, spec=spec)
    return out
