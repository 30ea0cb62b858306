"""Row ids declared unique: a duplicate (a file copied twice) stops training, naming both rows."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dlrm_mtl.data.row_ids import DuplicateRowIdError, check_unique_row_ids

ROOT = Path(__file__).resolve().parents[1]


def _files(d: Path, ranges, row_group_size=7):
    d.mkdir(parents=True, exist_ok=True)
    for i, ids in enumerate(ranges):
        pq.write_table(pa.table({"rid": pa.array(ids, pa.int64()), "x": pa.array(np.zeros(len(ids)))}),
                       d / f"part-{i}.parquet", row_group_size=row_group_size)
    return d


@pytest.mark.parametrize("memory_rows", [1_000_000, 10])  # in memory; spilled, many partitions
@pytest.mark.parametrize("world", [1, 2, 3])
def test_unique_ids_pass_and_every_id_is_checked_once(tmp_path, memory_rows, world):
    d = _files(tmp_path / "d", [range(0, 50), range(50, 120), [1000, 7, 10**15]][:2] + [[1000, 10**15]])
    checked = [check_unique_row_ids(str(d), "rid", r, world, memory_rows=memory_rows) for r in range(world)]
    assert sum(checked) == 122


@pytest.mark.parametrize("memory_rows", [1_000_000, 10])
@pytest.mark.parametrize("world", [1, 2])
def test_a_file_copied_twice_names_both_files_and_rows(tmp_path, memory_rows, world):
    d = _files(tmp_path / "d", [range(0, 50), range(50, 120)])
    shutil.copy(d / "part-1.parquet", d / "part-1-copy.parquet")
    errors = []
    for r in range(world):
        try:
            check_unique_row_ids(str(d), "rid", r, world, memory_rows=memory_rows)
        except DuplicateRowIdError as e:
            errors.append(str(e))
    assert errors  # every rank owning a partition that holds a duplicated id
    for msg in errors:
        assert "part-1-copy.parquet row" in msg and "part-1.parquet row" in msg and "'rid'" in msg
    msg = errors[0]
    # the earliest duplicated id and the two rows holding it
    if memory_rows > 1000 and world == 1:
        assert "row id 50 appears twice:" in msg and msg.count(" row 0") == 2 and "70 duplicate id(s)" in msg


def test_duplicate_inside_one_file_and_non_integer_ids(tmp_path):
    d = _files(tmp_path / "a", [[3, 1, 2, 1, 9]])
    with pytest.raises(DuplicateRowIdError, match=r"row id 1 appears twice: .*part-0.parquet row 1 and .*part-0.parquet row 3"):
        check_unique_row_ids(str(d), "rid")
    e = tmp_path / "b"
    e.mkdir()
    pq.write_table(pa.table({"rid": ["a", "b"]}), e / "s.parquet")
    with pytest.raises(ValueError, match="expected integer row ids"):
        check_unique_row_ids(str(e), "rid")


def test_training_refuses_a_data_dir_with_a_file_copied_twice(synthetic_small, tmp_path):
    train = tmp_path / "train"
    shutil.copytree(synthetic_small / "train", train)
    first = sorted(train.glob("*.parquet"))[0]
    shutil.copy(first, train / ("copy-" + first.name))
    shutil.copy(synthetic_small / "schema.yaml", tmp_path / "schema.yaml")
    cmd = [sys.executable, "-m", "dlrm_mtl", "train", "--set", f"data.train={train}", "--set", f"data.eval={synthetic_small / 'eval'}",
           "--set", f"data.schema={tmp_path / 'schema.yaml'}", "--set", f"train.run_dir={tmp_path / 'run'}", "--set", "data.batch_size=256"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "appears twice" in out and f"copy-{first.name} row 0" in out and f"{first.name} row 0" in out
    assert "epoch 0 step" not in out  # refused before training


def test_one_duplicate_is_found_by_exactly_one_rank(tmp_path):
    d = _files(tmp_path / "d", [range(0, 40), [39]])
    raised = []
    for r in range(3):
        try:
            check_unique_row_ids(str(d), "rid", r, 3, memory_rows=5)
        except DuplicateRowIdError as e:
            raised.append((r, str(e)))
    assert len(raised) == 1 and "row id 39 appears twice" in raised[0][1] and "part-1.parquet row 0" in raised[0][1]
