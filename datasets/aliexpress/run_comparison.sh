#!/usr/bin/env bash
# The architecture comparison on aliexpress (see datasets/aliexpress/README.md for what to expect).
#   RAW=/path/to/unpacked/download datasets/aliexpress/run_comparison.sh [--set key=value ...]
# Environment and arguments: datasets/run_comparison.sh.
exec "$(dirname "$0")/../run_comparison.sh" aliexpress "$@"
