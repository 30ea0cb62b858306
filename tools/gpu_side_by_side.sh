#!/usr/bin/env bash
# Two versions of dlrm_mtl on one lent GPU machine, back to back in one call: the working tree
# ("new") and an older tree exported into $OLD ("old"), so that their GPU numbers are measured
# on the same machine (the lent machines differ between calls: only numbers from one call are
# compared). docs/performance.md "GPU, third round" was measured with it.
#
#   # here, before the call (the old tree travels inside .gpu/, which .git/info/exclude ignores):
#   mkdir -p .gpu/old && git archive <rev> dlrm_mtl tools configs datasets pyproject.toml | tar -x -C .gpu/old
#   # on the GPU machine (device tool, carry [".gpu"]):
#   bash tools/gpu_side_by_side.sh              # results under $OUT (default /tmp/gpu_out)
#
# Steps, each under its own time limit so that one failure leaves the others' results:
#   1. the synthetic demo data (ROWS, default 3M rows, seed 0);
#   2. tools/bench_gpu.py on each tree: the real step vs the plain PyTorch peer at batch BS
#      (default "2048 8192"), fp32, graphed (the default): ms/step, kernels, launch calls,
#      host syncs, GPU busy per step -> bench-new.json, bench-old.json;
#   3. `dlrm-mtl train` of each tree: the demo config + configs/gpu.yaml (batch 8192), one GPU,
#      metrics and throughput -> train-new.json, train-old.json (inside results.tgz);
#      TRAIN_REPEATS=N (default 1) runs N pairs, alternating which tree goes first ->
#      train-new-2.json, train-old-2.json, ... for the pairs after the first;
#   4. bench_gpu.py at batch 8192 with the dense step eager (train.cuda_graph=eager): every
#      operator a launch -> bench-new_eager.json, bench-old_eager.json (EAGER=0 leaves it out);
#   5. TRAINS_NEW="name:key=value,key=value ..." more `dlrm-mtl train` runs of the working tree
#      with those overrides -> train-<name>.json;
#   6. ARCHS="mmoe ple ...": `dlrm-mtl train` of both trees with configs/arch/<name>.yaml added
#      (same data and gpu.yaml) -> train-<name>-new.json, train-<name>-old.json;
#   7. TESTS="tests/test_x.py ..." pytest on the GPU machine (the code picks CUDA there where
#      a test leaves the device to it); pytest comes from PYLIB (default .gpu/pylib) when the
#      machine has none -> pytest.log.
# The device tool returns at most 8 files: logs and train JSONs travel in results.tgz.
# Dry run on a CPU machine: NO_UNPACK=1 PY=.venv/bin/python ROWS=60000 BS=1024 \
#   BENCH_ARGS="--steps 4 --warmup 1 --chunk 2 --count-steps 1" OUT=/tmp/dry DATA=/tmp/dry_syn bash tools/gpu_side_by_side.sh
set -u; export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
T0=$(date +%s); st(){ echo "[+$(( $(date +%s)-T0 ))s] $*" | tee -a "$OUT/steps.log"; }
ROOT=$PWD
OLD="${OLD:-$ROOT/.gpu/old}"
if [ -f .gpu/unpack.sh ] && [ "${NO_UNPACK:-0}" != 1 ]; then
  source .gpu/unpack.sh > "$OUT/unpack.log" 2>&1 || { tail -20 "$OUT/unpack.log"; exit 1; }
fi
BASE="${PYTHONPATH:-}"
PY="${PY:-python3}"
nvidia-smi -L >> "$OUT/steps.log" 2>&1
st "unpacked $($PY -V 2>&1)"
export PYTHONPATH="${BASE:+$BASE:}$ROOT"
DATA=${DATA:-/tmp/syn}
if [ ! -f "$DATA/schema.yaml" ]; then
  timeout 90 $PY -m dlrm_mtl generate --out "$DATA" --rows "${ROWS:-3000000}" --seed 0 > "$OUT/gen.log" 2>&1
  st "generate rc=$?"
fi

side() {  # name tree [bench_gpu args]
  local name=$1 dir=$2 extra=${3:-}
  ( cd "$dir" && export PYTHONPATH="${BASE:+$BASE:}$dir" \
    && timeout "${BENCH_T:-110}" $PY tools/bench_gpu.py --data "$DATA" --batch-sizes ${BS:-2048 8192} --precision fp32 \
       --skip-arch ${BENCH_ARGS:-} $extra --json "$OUT/bench-$name.json" > "$OUT/bench-$name.log" 2>&1 )
  st "bench $name rc=$?"
}
train() {  # name tree [train args]
  local name=$1 dir=$2
  ( cd "$dir" && export PYTHONPATH="${BASE:+$BASE:}$dir" \
    && timeout "${TRAIN_T:-100}" $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m dlrm_mtl train \
       --config configs/demo.yaml --config configs/gpu.yaml --set train.run_dir=/tmp/run-$name --set data.train=$DATA/train \
       --set data.eval=$DATA/eval --set checkpoint.at_end=false ${3:-} ${TRAIN_SETS:-} > "$OUT/train-$name.log" 2>&1 )
  local rc=$?
  [ -f /tmp/run-$name/metrics.json ] && cp /tmp/run-$name/metrics.json "$OUT/train-$name.json"
  st "train $name rc=$rc"
}

side new "$ROOT"; side old "$OLD"
# checkpoint.keep_best is newer than some old trees: only the working tree is given it
for i in $(seq 1 "${TRAIN_REPEATS:-1}"); do
  sfx=$([ "$i" = 1 ] || echo "-$i")
  if [ $((i % 2)) = 1 ]; then
    train "new$sfx" "$ROOT" "--set checkpoint.keep_best=false"; train "old$sfx" "$OLD"
  else
    train "old$sfx" "$OLD"; train "new$sfx" "$ROOT" "--set checkpoint.keep_best=false"
  fi
done
for v in ${TRAINS_NEW:-}; do
  train "${v%%:*}" "$ROOT" "--set checkpoint.keep_best=false $(echo "${v#*:}" | sed 's/,/ --set /g; s/^/--set /')"
done
for a in ${ARCHS:-}; do
  train "$a-new" "$ROOT" "--config configs/arch/$a.yaml --set checkpoint.keep_best=false"
  train "$a-old" "$OLD" "--config configs/arch/$a.yaml"
done
if [ "${EAGER:-1}" != 0 ]; then
  BS=8192 BENCH_T=80 side new_eager "$ROOT" "--set train.cuda_graph=eager"
  BS=8192 BENCH_T=80 side old_eager "$OLD" "--set train.cuda_graph=eager"
fi
if [ -n "${TESTS:-}" ]; then
  PYLIB="${PYLIB:-$ROOT/.gpu/pylib}"
  $PY -c "import pytest" 2>/dev/null || export PYTHONPATH="$PYTHONPATH:$PYLIB"
  timeout "${TESTS_T:-150}" $PY -m pytest -q -x -p no:cacheprovider $TESTS > "$OUT/pytest.log" 2>&1
  st "pytest rc=$? $(tail -1 "$OUT/pytest.log")"
fi
st done
(cd "$OUT" && tar czf /tmp/results.tgz . && mv /tmp/results.tgz . \
  && find . -type f ! -name results.tgz ! -name steps.log ! -name 'bench-*.json' -delete)
