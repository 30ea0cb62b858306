import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _process_switches():
    """The training set-up's process-wide switches (``train.native_kernels``,
    ``train.fold_first_layer``: ``train.configure_backends``) restored after every test: a
    test that trains with one of them off must not leave the next test in the same worker on
    the fallback path it did not ask for."""
    from dlrm_mtl import native
    from dlrm_mtl.modules import folded_affine

    saved = native._enabled, folded_affine._enabled
    yield
    native._enabled, folded_affine._enabled = saved


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory):
    """A small synthetic data set (train/eval/schema.yaml), shared by the session's tests."""
    from dlrm_mtl.synthetic import SyntheticSpec, generate

    out = tmp_path_factory.mktemp("synthetic_small")
    spec = SyntheticSpec(train_files=3, eval_files=2, row_group_rows=1000)
    generate(out, rows=12_000, seed=3, spec=spec)
    return out


@pytest.fixture(scope="session")
def synthetic_seq(tmp_path_factory):
    """A small synthetic data set with behaviour sequences (6 events per row; two training
    files, so two ranks each read one), shared by the session's sequence tests."""
    from dataclasses import replace

    from dlrm_mtl.synthetic import SyntheticSpec, generate

    out = tmp_path_factory.mktemp("synthetic_seq")
    spec = SyntheticSpec(train_files=2, eval_files=1, row_group_rows=500, user_table=3000, item_table=2000)
    generate(out, rows=4000, seed=5, spec=replace(spec, sequence_len=6))
    return out
