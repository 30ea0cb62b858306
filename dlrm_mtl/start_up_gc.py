"""Python's cyclic garbage collector during ``dlrm-mtl train``'s start-up: off, then frozen.

Importing torch, torchrec and fbgemm_gpu leaves ~360,000 objects that CPython's collector
tracks (modules, classes, functions, their dicts), nearly all alive until the process ends.
The collector runs a generation-0 pass every 700 net allocations and the older generations as
they fill, and each pass of an older generation traverses every survivor so far: measured
here, 0.55 s of the imports' ~3.2 s and ~0.25 s of the rest of the set-up (process group,
model, planner, DMP) went to passes that found next to nothing (a full collection after the
imports finds ~10,000 unreachable objects among the 360,000; docs/performance.md,
"Twenty-second round").

:func:`pause` (the command line's first step for ``train``) turns the collector off;
:func:`resume` (where the start-up ends: before the first training step) moves every object
then alive into the permanent generation (``gc.freeze``) and turns the collector back on, so
the collections during training never traverse the start-up's objects again. The garbage
cycles made during the start-up are frozen with them and stay allocated until exit (~10,000
objects: the price of not running a 0.3 s full collection). :func:`resume` acts only after
:func:`pause`: a program that calls ``train()`` itself (tests, a notebook) keeps its own
collector settings.

Example::

    from dlrm_mtl import start_up_gc
    start_up_gc.pause()     # before the heavy imports
    ...                     # imports, set-up
    start_up_gc.resume()    # before the first step
"""

from __future__ import annotations

import gc

_paused = False


def pause() -> None:
    """Turns the cyclic collector off for the start-up (where it was on)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume() -> None:
    """After :func:`pause`: freezes the objects alive now and turns the collector back on;
    otherwise nothing."""
    global _paused
    if _paused:
        gc.freeze()
        gc.enable()
        _paused = False


def paused() -> bool:
    """Whether :func:`pause` has turned the collector off and :func:`resume` not yet back on."""
    return _paused
