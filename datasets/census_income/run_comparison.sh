#!/usr/bin/env bash
# The architecture comparison on census_income (see datasets/census_income/README.md for what to expect).
#   RAW=/path/to/unpacked/download datasets/census_income/run_comparison.sh [--set key=value ...]
# Environment and arguments: datasets/run_comparison.sh.
exec "$(dirname "$0")/../run_comparison.sh" census_income "$@"
