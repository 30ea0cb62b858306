#!/usr/bin/env bash
# `make test` / `make test-fast`: the suite in two parts.
#   1. every test not marked `serial`, in TEST_WORKERS pytest-xdist workers side by side
#      (default 2; work stealing, so the minute-long learning tests do not leave one worker
#      idle at the end). Many tests wait on subprocesses, rendezvous or timeouts, or run one
#      thread of Python: on the 2-core development VM the suite takes 15 minutes this way
#      against 21 in one process (docs/performance.md, "The test suite's time").
#   2. the tests marked `serial` (they measure time or per-thread CPU: a second worker beside
#      them would move what they measure), alone, in one process.
# Usage: tools/run_tests.sh [MARK_EXPRESSION] [pytest args...]; the mark expression ("" for
# none, "not slow" for test-fast) is combined with each part's own.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORKERS=${TEST_WORKERS:-2}
MARK=${1:-}
shift || true
and() { if [ -n "$MARK" ]; then echo "$1 and ($MARK)"; else echo "$1"; fi; }
par=(-n "$WORKERS" --dist worksteal)
[ "$WORKERS" = 0 ] && par=()  # TEST_WORKERS=0: everything in this process
# Beside a second worker, PyTorch's OpenMP threads must not spin-wait: two processes with two
# spinning threads each on two cores took 238 s for tests/test_task_configs_learn.py against
# 40 s with OMP_WAIT_POLICY=PASSIVE (55 s in one process). Results do not depend on it.
passive=(env)
[ "$WORKERS" = 0 ] || passive=(env "OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}")
"${passive[@]}" "$PY" -m pytest -ra --durations=15 "${par[@]}" -m "$(and "not serial")" "$@" tests; rc1=$?
"$PY" -m pytest -ra -m "$(and serial)" "$@" tests; rc2=$?
# exit status 5 is "no test collected": fine for one part (-k may select tests of one part only)
if [ $rc1 -eq 5 ] && [ $rc2 -eq 5 ]; then exit 5; fi
[ $rc1 -eq 5 ] && rc1=0
[ $rc2 -eq 5 ] && rc2=0
[ $rc1 -ne 0 ] && exit $rc1
exit $rc2
