#!/usr/bin/env bash
# The architecture comparison on kuairand (see datasets/kuairand/README.md for what to expect).
#   RAW=/path/to/unpacked/download datasets/kuairand/run_comparison.sh [--set key=value ...]
# Environment and arguments: datasets/run_comparison.sh.
exec "$(dirname "$0")/../run_comparison.sh" kuairand "$@"
