"""``dlrm_mtl.start_up_gc``: the cyclic collector off during ``train``'s start-up, the start-up's
objects frozen and the collector back on before the first step."""

from __future__ import annotations

import gc
import subprocess
import sys
from typing import List

from dlrm_mtl import start_up_gc


def test_pause_then_resume_freezes_and_turns_the_collector_back_on():
    """In a fresh process: off after ``pause``, on with the objects alive frozen after
    ``resume``; ``resume`` without a ``pause`` leaves the collector as it was."""
    script = (
        "import gc\n"
        "from dlrm_mtl import start_up_gc as s\n"
        "s.resume(); assert gc.isenabled() and gc.get_freeze_count() == 0  # no pause: nothing\n"
        "s.pause(); assert not gc.isenabled() and s.paused()\n"
        "keep = [[i] for i in range(1000)]\n"
        "s.resume(); assert gc.isenabled() and not s.paused() and gc.get_freeze_count() > 1000\n"
        "n = gc.get_freeze_count(); s.resume(); assert gc.get_freeze_count() == n  # once\n"
        "gc.disable(); s.pause(); assert not s.paused()  # already off (someone else's): not ours to turn on\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_train_turns_the_collector_back_on_before_its_first_step(synthetic_small, tmp_path, monkeypatch):
    """After the command line's ``pause``, ``train`` resumes the collector where the start-up
    ends: every step runs with it on, the freeze happened once, before the first step."""
    import dlrm_mtl.train as train_mod
    from dlrm_mtl.config import Config

    events: List[str] = []
    monkeypatch.setattr(gc, "freeze", lambda: events.append("freeze"))  # not in the test process itself
    real_step = train_mod.train_step

    def step(*args, **kwargs):
        events.append("step on" if gc.isenabled() else "step off")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", step)
    cfg = Config.load([], [f"data.train={synthetic_small}/train", f"data.eval={synthetic_small}/eval",
                           f"data.schema={synthetic_small}/schema.yaml", "data.batch_size=1024", "train.epochs=1",
                           "train.max_steps=3", "train.progress=false", "checkpoint.at_end=false",
                           "checkpoint.keep_best=false", f"train.run_dir={tmp_path}/run"])
    start_up_gc.pause()
    try:
        assert not gc.isenabled()
        train_mod.train(cfg)
    finally:
        gc.enable()
    assert events[0] == "freeze" and events.count("freeze") == 1
    assert events[1:] and set(events[1:]) == {"step on"}
    assert not start_up_gc.paused()
