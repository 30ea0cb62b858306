#!/usr/bin/env bash
# The architecture comparison on one public data set: FOLDER is a folder of datasets/ (ali_ccp,
# aliexpress, census_income, kuairand, movielens); each datasets/FOLDER/run_comparison.sh calls this.
#   RAW=/path/to/unpacked/download datasets/run_comparison.sh FOLDER [--set key=value ...]
# Converts once into $DATA (default data/FOLDER) with `dlrm-mtl convert` ($CONVERT_ARGS are
# added, e.g. --opt key=value), trains every architecture in datasets/FOLDER/ARCHS (or $ARCHS, a
# comma list) for each seed in $SEEDS (default 0,1,2) with $NPROC workers (default 1), and writes
# $OUT/results.md (default runs/FOLDER). Extra arguments go to every training run, e.g.
# --set train.epochs=1 for a quick pass.
set -euo pipefail
cd "$(dirname "$0")/.."
FOLDER=${1:?usage: datasets/run_comparison.sh FOLDER [--set key=value ...]}
shift
if [ ! -f "datasets/$FOLDER/ARCHS" ]; then
  echo "datasets/$FOLDER/ARCHS not found: FOLDER is one of: $(cd datasets && ls -d */ | tr -d / | tr '\n' ' ')" >&2
  exit 2
fi
CONVERTER=${FOLDER//_/-}  # the `dlrm-mtl convert` name: ali_ccp -> ali-ccp, census_income -> census-income
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/$FOLDER}
if [ ! -f "$DATA/schema.yaml" ]; then
  if [ -z "${RAW:-}" ]; then
    echo "$DATA/schema.yaml not found: set RAW=<unpacked download> to convert it (datasets/$FOLDER/README.md)" >&2
    exit 2
  fi
  "$PY" -m dlrm_mtl convert "$CONVERTER" --raw "$RAW" --out "$DATA" ${CONVERT_ARGS:-}
fi
exec "$PY" -m dlrm_mtl.datasets.compare --dataset "$FOLDER" --data "$DATA" --out "${OUT:-runs/$FOLDER}" \
  --seeds "${SEEDS:-0,1,2}" --nproc "${NPROC:-1}" ${ARCHS:+--archs "$ARCHS"} "$@"
