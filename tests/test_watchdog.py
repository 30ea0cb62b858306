"""The watchdog's decisions on a simulated clock and store, then on real 2-process jobs."""

import pytest

from dlrm_mtl.watchdog import Watchdog


class DictStore:
    def __init__(self):
        self.d = {}

    def set(self, k, v):
        self.d[k] = v.encode() if isinstance(v, str) else v

    def get(self, k):
        return self.d[k]

    def check(self, keys):
        return all(k in self.d for k in keys)


def _pair(timeout=10.0):
    store = DictStore()
    a = Watchdog(store, 0, 2, timeout, 1.0)
    b = Watchdog(store, 1, 2, timeout, 1.0)
    return a, b


def test_a_rank_whose_heartbeat_stops_is_named_with_its_step():
    a, b = _pair()
    t = 0.0
    for step in range(1, 6):  # both beat and progress
        for dog in (a, b):
            dog.progress(step, "step")
            dog._publish()
        assert a.check(t) is None
        t += 1.0
    # b is stopped (SIGSTOP): its heartbeat no longer changes; a keeps beating, blocked in a collective
    for _ in range(10):
        a._publish()
        assert a.check(t) is None  # not yet: 10 s is the limit
        t += 1.0
    a._publish()
    msg = a.check(t + 0.5)
    assert msg is not None and msg.startswith("rank 1 has been silent for 12s (limit 10s)") and "at step 5," in msg and "pid" in msg


def test_no_progress_anywhere_names_the_longest_stalled_rank():
    a, b = _pair(timeout=5.0)
    a.progress(3, "step")
    b.progress(2, "eval batch")
    t = 0.0
    for _ in range(5):
        for dog in (a, b):
            dog._publish()
        a.check(t)
        t += 1.0
    a.progress(4, "step")  # a progressed once more, then both hang (deadlock): heartbeats go on
    msgs = []
    for _ in range(8):
        for dog in (a, b):
            dog._publish()
        msgs.append(a.check(t))
        t += 1.0
    # a progressed at t=5: from t=11 on neither has for more than 5 s; b stalled longest
    assert msgs[:6] == [None] * 6
    assert msgs[6] is not None and msgs[6].startswith("no rank has made progress for 11s") and "rank 1 at eval batch 2" in msgs[6]


def test_a_rank_that_finished_is_not_watched():
    a, b = _pair(timeout=2.0)
    for dog in (a, b):
        dog._publish()
    a.check(0.0)
    b._phase = "done"
    b._publish()
    for t in range(1, 10):
        a.progress(t, "step")
        a._publish()
        assert a.check(float(t)) is None


def test_the_thread_calls_on_silent_once(monkeypatch):
    store = DictStore()
    fired = []
    a = Watchdog(store, 0, 2, 0.3, 0.05, on_silent=lambda msg, beat: fired.append(msg))
    b = Watchdog(store, 1, 2, 0.3, 0.05)
    b._publish()  # b beats once, then never again
    a._thread.start()
    a._thread.join(timeout=5)
    assert len(fired) == 1 and fired[0].startswith("rank 1 has been silent") and a.fired == fired[0]


# ---------------------------------------------------------------- real jobs: kill -STOP a rank

@pytest.mark.slow
@pytest.mark.parametrize("where,at,phase", [("step", 3, "step "), ("eval", 1, "eval batch "), ("save", 4, "checkpoint of step 4,")])
def test_a_stopped_rank_ends_the_job_naming_it(synthetic_small, tmp_path, where, at, phase):
    """A 2-worker torchrun job whose rank 1 stops itself (SIGSTOP: all its threads) during a
    step, during evaluation or inside a checkpoint save ends within train.timeout_s plus the
    launcher's teardown, with rank 0's watchdog naming rank 1 and where it stopped."""
    import time

    from ckpt_runs import train_torchrun

    start = time.monotonic()
    proc = train_torchrun(synthetic_small, tmp_path / "run", 2, "train.timeout_s=12", "train.eval_every_epoch=true",
                          "checkpoint.every_steps=4", "train.max_steps=6", "data.eval_batch_size=256",  # several eval batches
                          epochs=2, expect_ok=False, timeout=400,
                          env_extra={"DLRM_MTL_TEST_STOP": f"{where}:{at}:1"})
    took = time.monotonic() - start
    out = proc.stdout + proc.stderr
    line = next((l for l in out.splitlines() if "watchdog on rank 0" in l), None)
    assert line is not None, out[-3000:]
    assert "rank 1 has been silent for" in line and f"its last heartbeat at {phase}" in line, line
    silent = float(line.split("silent for ")[1].split("s")[0])
    assert 6 <= silent <= 12, line  # limit = timeout_s - 2 intervals (3 s each) = 6 s, checked every 3 s
    assert "disk full" not in out  # the save's collective did not time out first and blame the disk
    assert took < 200, took  # without the watchdog the job never ended (the stopped rank held it)


def test_no_progress_during_a_long_checkpoint_save_is_not_a_deadlock():
    a, b = _pair(timeout=3.0)
    a.progress(7, "checkpoint of step")
    b.progress(7, "checkpoint of step")
    for t in range(10):  # both write shards for 10 s; their heartbeats go on
        for dog in (a, b):
            dog._publish()
        assert a.check(float(t)) is None
    a.progress(8, "step")  # a finished its save; b is still writing
    for t in range(10, 20):
        for dog in (a, b):
            dog._publish()
        assert a.check(float(t)) is None
