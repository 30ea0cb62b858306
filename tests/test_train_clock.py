"""What the training clock counts: the run's first batch ends the start-up (outside
``train_seconds``, reported as ``setup_phases.first_batch``); every later wait for a batch,
an epoch's start included, is training time."""

import time

from dlrm_mtl.config import Config
from dlrm_mtl.distributed import init_distributed, shutdown_distributed
from dlrm_mtl.train import Totals, run_epoch, setup_run

DELAY = 0.6  # seconds every epoch's first batch is held back


def test_the_first_batch_is_start_up_and_later_epoch_starts_are_training(synthetic_small, tmp_path):
    env = init_distributed("gloo", 60, 1)
    cfg = Config.load([], [f"data.train={synthetic_small}/train", f"data.eval={synthetic_small}/eval",
                           f"data.schema={synthetic_small}/schema.yaml", "data.batch_size=512", "train.epochs=2",
                           "train.progress=false", "checkpoint.at_end=false", "checkpoint.keep_best=false",
                           f"train.run_dir={tmp_path}/run"])
    try:
        run = setup_run(cfg, env)
        stream = run.train_stream
        real = stream._epoch_batches

        def held_back():  # the epoch's batches, the first one DELAY seconds late
            batches = real()
            time.sleep(DELAY)
            yield from batches

        stream._epoch_batches = held_back  # ParquetStream.__iter__ calls it per epoch
        waited = []
        totals = Totals()
        try:
            run_epoch(run, 0, totals, on_first_step=waited.append)
            first = (totals.train_seconds, totals.input_wait_seconds)
            run_epoch(run, 1, totals)
        finally:
            stream.discard_prepared()
        second = totals.train_seconds - first[0]
        assert len(waited) == 1 and waited[0] >= DELAY  # the first batch's wait, reported to the caller
        assert first[1] < DELAY / 2  # ... and neither input wait nor training time
        assert second >= DELAY and first[0] < second - DELAY / 2  # a later epoch's start is training time
        assert totals.trained_rows == 2 * stream.total_rows
    finally:
        shutdown_distributed()
