"""Very uneven row-group shards across 2 ranks: a real torchrun job must neither hang nor drop
or repeat rows. The rank with few rows pads (whole padding batches) until the big rank is
done, so both ranks take the same number of steps and their DDP-replicated dense parameters
stay identical."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BATCH = 64
BIG_ROWS = 3000  # one row group, alone on one rank
SMALL_ROWS = 300  # tiny row groups, all on the other rank
SMALL_GROUP = 40


def _uneven_dataset(out: Path) -> Path:
    """out/train: one file with a single 3000-row row group, one with 8 tiny row groups
    (300 rows), one empty file; out/eval and out/schema.yaml from the synthetic generator."""
    from dlrm_mtl.synthetic import SyntheticSpec, generate

    spec = SyntheticSpec(train_files=2, eval_files=1, row_group_rows=1000)
    generate(out, rows=4_200, seed=5, spec=spec)  # 3360 train rows, 840 eval rows
    src = out / "train"
    table = pq.ParquetDataset(src).read()
    assert table.num_rows >= BIG_ROWS + SMALL_ROWS
    for f in src.glob("*.parquet"):
        f.unlink()
    big = table.slice(0, BIG_ROWS)
    small = table.slice(BIG_ROWS, SMALL_ROWS)
    pq.write_table(big, src / "part-00000.parquet", row_group_size=BIG_ROWS)
    pq.write_table(small, src / "part-00001.parquet", row_group_size=SMALL_GROUP)
    pq.write_table(table.slice(0, 0), src / "part-00002.parquet")
    assert pq.ParquetFile(src / "part-00000.parquet").metadata.num_row_groups == 1
    assert pq.ParquetFile(src / "part-00001.parquet").metadata.num_row_groups == math.ceil(SMALL_ROWS / SMALL_GROUP)
    assert pq.ParquetFile(src / "part-00002.parquet").metadata.num_rows == 0
    return out


@pytest.mark.slow
def test_uneven_shards_two_ranks_equal_steps_no_hang(tmp_path):
    from dlrm_mtl.data.stream import assign_row_groups, list_row_groups

    data = _uneven_dataset(tmp_path / "data")
    train_rows = pq.ParquetDataset(data / "train").read(columns=["row_id"]).num_rows
    assert train_rows == BIG_ROWS + SMALL_ROWS

    shards = assign_row_groups(list_row_groups(str(data / "train")), 2)
    per_rank = [sum(g.num_rows for g in s) for s in shards]
    assert sum(per_rank) == train_rows
    assert sorted(per_rank) == [SMALL_ROWS, BIG_ROWS], per_rank
    assert max(per_rank) > 5 * min(per_rank), per_rank

    run_dir = tmp_path / "run"
    cmd = [
        str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "dlrm_mtl", "train",
        "--config", "configs/demo.yaml",
        "--set", f"data.train={data / 'train'}",
        "--set", f"data.eval={data / 'eval'}",
        "--set", f"train.run_dir={run_dir}",
        "--set", f"data.batch_size={BATCH}",
        "--set", "train.epochs=1",
        "--set", "train.progress=false",
        "--set", "train.timeout_s=60",
    ]
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-4000:], (e.stderr or b"")[-4000:]
        pytest.fail(f"2-rank training on uneven shards did not finish in 300 s (hang?): {out}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    ranks = [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    rows = [r["rows_trained"] for r in ranks]
    assert sum(rows) == train_rows, rows  # every row exactly once, none dropped
    assert sorted(rows) == sorted(per_rank), (rows, per_rank)
    small = min(range(2), key=lambda r: rows[r])
    assert ranks[small]["padding_rows"] > 0, ranks[small]

    result = json.loads((run_dir / "metrics.json").read_text())
    steps = result["step"]  # rank 0's step count
    assert steps == math.ceil(max(per_rank) / BATCH), (steps, per_rank)
    assert result["throughput"]["steps"] == steps and result["throughput"]["rows_trained"] == train_rows
    for r in ranks:  # every step is a full batch of real + padding rows: same step count on both ranks
        assert r["rows_trained"] + r["padding_rows"] == steps * BATCH, r
    assert ranks[small]["padding_rows"] == steps * BATCH - min(per_rank)
    assert ranks[0]["dense_sha256"] and ranks[0]["dense_sha256"] == ranks[1]["dense_sha256"]
