#!/usr/bin/env bash
# The architecture comparison on movielens (see datasets/movielens/README.md for what to expect).
#   RAW=/path/to/unpacked/download datasets/movielens/run_comparison.sh [--set key=value ...]
# Environment and arguments: datasets/run_comparison.sh.
exec "$(dirname "$0")/../run_comparison.sh" movielens "$@"
