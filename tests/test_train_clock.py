"""What the training clock counts: the row groups read ahead during the set-up (the first
shuffle buffer's decoding and validation, the reader's loading) end the start-up, outside
``train_seconds`` (``setup_phases.read_ahead``); shuffling them into batches and every later
wait for a batch, an epoch's start included, are training time."""

import threading
import time

import pytest

from dlrm_mtl.config import Config
from dlrm_mtl.data.stream import RowGroupConverter
from dlrm_mtl.distributed import init_distributed, shutdown_distributed
from dlrm_mtl.train import Totals, run_epoch, setup_run

# compares epochs' clocks with a 1 s delay: alone, not beside a second test worker (tools/run_tests.sh)
pytestmark = pytest.mark.serial

# 0.6 s until a clean-clone run whose first epoch took 0.4 s longer than its second: the clocks'
# assertions keep a margin of DELAY / 2 against this VM's noise
DELAY = 1.0  # seconds


def test_the_read_ahead_is_start_up_and_epoch_starts_are_training(synthetic_small, tmp_path, monkeypatch):
    release = threading.Event()
    real_read = RowGroupConverter.read_counted

    def read_counted(self, group, tally=True):  # the set-up's read-ahead finishes when released
        if threading.current_thread().name.startswith("dlrm_mtl-ahead"):
            release.wait()
        return real_read(self, group, tally)

    monkeypatch.setattr(RowGroupConverter, "read_counted", read_counted)
    env = init_distributed("gloo", 60, 1)
    cfg = Config.load([], [f"data.train={synthetic_small}/train", f"data.eval={synthetic_small}/eval",
                           f"data.schema={synthetic_small}/schema.yaml", "data.batch_size=512", "train.epochs=2",
                           "train.progress=false", "checkpoint.at_end=false", "checkpoint.keep_best=false",
                           f"train.run_dir={tmp_path}/run"])
    try:
        run = setup_run(cfg, env)
        stream = run.train_stream
        assert stream._ahead  # groups are being read ahead (and wait for the release)
        real_epoch = stream._epoch_batches

        def held_back():  # epoch 1's batches, its first one DELAY seconds late
            batches = real_epoch()
            if stream.epoch == 1:
                time.sleep(DELAY)
            yield from batches

        stream._epoch_batches = held_back  # ParquetStream.__iter__ calls it per epoch
        waited = []
        totals = Totals()
        threading.Timer(DELAY, release.set).start()
        try:
            run_epoch(run, 0, totals, on_first_step=waited.append)
            first = (totals.train_seconds, totals.input_wait_seconds)
            run_epoch(run, 1, totals)
        finally:
            release.set()
            stream.discard_prepared()
        second = totals.train_seconds - first[0]
        assert len(waited) == 1 and waited[0] >= DELAY * 0.8  # the read-ahead's wait, reported to the caller
        assert first[1] < DELAY / 2  # ... and neither input wait
        assert second >= DELAY and first[0] < second - DELAY / 2  # ... nor training time; a later epoch's start is
        assert totals.trained_rows == 2 * stream.total_rows
        assert stream.wait_read_ahead() < 0.05  # nothing left to wait for
    finally:
        shutdown_distributed()
