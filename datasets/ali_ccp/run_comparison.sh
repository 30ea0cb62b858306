#!/usr/bin/env bash
# The architecture comparison on ali_ccp (see datasets/ali_ccp/README.md for what to expect).
#   RAW=/path/to/unpacked/download datasets/ali_ccp/run_comparison.sh [--set key=value ...]
# Environment and arguments: datasets/run_comparison.sh.
exec "$(dirname "$0")/../run_comparison.sh" ali_ccp "$@"
