#!/usr/bin/env bash
# The architecture comparison on movielens (see datasets/movielens/README.md for what to expect).
#   RAW=/path/to/unpacked/download datasets/movielens/run_comparison.sh [--set key=value ...]
# Converts once into $DATA (default data/movielens), trains every architecture in
# datasets/movielens/ARCHS for each seed in $SEEDS (default 0,1,2) with $NPROC workers (default 1),
# and writes $OUT/results.md (default runs/movielens). Extra arguments go to every training run,
# e.g. --set train.epochs=1 for a quick pass.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/movielens}
if [ ! -f "$DATA/schema.yaml" ]; then
  if [ -z "${RAW:-}" ]; then
    echo "$DATA/schema.yaml not found: set RAW=<unpacked download> to convert it (datasets/movielens/README.md)" >&2
    exit 2
  fi
  "$PY" -m dlrm_mtl convert movielens --raw "$RAW" --out "$DATA" ${CONVERT_ARGS:-}
fi
exec "$PY" -m dlrm_mtl.datasets.compare --dataset movielens --data "$DATA" --out "${OUT:-runs/movielens}" \
  --seeds "${SEEDS:-0,1,2}" --nproc "${NPROC:-1}" ${ARCHS:+--archs "$ARCHS"} "$@"
