#!/usr/bin/env bash
# Every GPU check behind docs/performance.md "GPU", in one call on a lent GPU machine (its
# device time is scarce: one prepared script, results written as they come).
#
#   bash tools/gpu_checks.sh              # results under $OUT (default /tmp/gpu_out)
#
# Needs the torchrec/fbgemm-gpu bundle for the machine's torch unpacked by .gpu/unpack.sh
# (docs/performance.md says how it gets there). Steps, each with its own time limit so that
# one failure leaves the others' results:
#   1. the synthetic demo data (3M rows, seed 0);
#   2. tools/bench_gpu.py: the real step vs the plain PyTorch peer, kernels, syncs and busy %
#      per step at batch 2048 / 8192 / 32768 in fp32 and bf16; dense arch batched vs loop;
#   3. the real `dlrm-mtl train` loop (demo config, one GPU) at batch 8192 with the dense step
#      graphed and eager, in bf16, through TorchRec's sharded lookup instead of the direct one
#      (sharding.local_lookup=false: same metrics expected, the speed and syncs of each), with the
#      reader packing batches into page-locked buffers (data.pin_memory=true: one copy per step), and at
#      batch 2048 (the CPU demo's global batch: AUC parity) and 32768: metrics.json of each.
#   4. behaviour sequences: the synthetic set with a 20-event history (400k rows), trained with
#      DIN's target attention and with DeepMCP at batch 8192 (the EmbeddingCollections' GPU
#      path, never measured on a GPU before): metrics.json of each.
# SKIP_BENCH=1 / SKIP_TRAIN=1 / SKIP_SEQ=1 leave a part out; TRAINS="name ..." picks train
# variants; ROWS=N / SEQ_ROWS=N generate fewer rows (smoke runs); TRACE=1 runs each train
# variant under tools/trace_loop.py (where its loop's host time goes, per thread).
set -u
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "[gpu_checks +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/steps.log"; }

if [ -f .gpu/unpack.sh ] && [ "${NO_UNPACK:-0}" != 1 ]; then  # NO_UNPACK=1: a dry run on the CPU
  source .gpu/unpack.sh > "$OUT/unpack.log" 2>&1 || { tail -20 "$OUT/unpack.log"; exit 1; }
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
PY="${PY:-python3}"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
stamp "unpacked; python $($PY -V 2>&1)"
# dlrm_mtl's C kernels (host-side; the GPU step does not use them) for this machine's Python,
# as make install builds them; without a compiler the tests run with them off
if ! $PY setup.py -q build_ext --inplace > "$OUT/build_ext.log" 2>&1 \
   || ! $PY -c "import dlrm_mtl._cpu_kernels" 2>> "$OUT/build_ext.log"; then
  export DLRM_MTL_NATIVE=0
fi
stamp "C kernels: $([ "${DLRM_MTL_NATIVE:-1}" = 0 ] && echo off || echo built)"

DATA=/tmp/syn
if [ ! -f "$DATA/schema.yaml" ]; then
  timeout 120 $PY -m dlrm_mtl generate --out "$DATA" --rows "${ROWS:-3000000}" --seed 0 > "$OUT/generate.log" 2>&1
  stamp "generate rc=$?"
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-260}" $PY tools/bench_gpu.py --data "$DATA" --json "$OUT/gpu.json" ${BENCH_ARGS:-} > "$OUT/bench_gpu.log" 2>&1
  stamp "bench_gpu rc=$?"
  # what the graph and the pipeline each bring: the same step with one of them off
  # (sharded_lookup: TorchRec's own lookup path instead of sharding.local_lookup's direct kernels)
  for v in ${BENCH_VARIANTS:-eager:train.cuda_graph=eager pipeline:train.pipeline=sparse_dist sharded_lookup:sharding.local_lookup=false}; do
    timeout 90 $PY tools/bench_gpu.py --data "$DATA" --batch-sizes 8192 --precision fp32 --skip-arch \
      --set "${v#*:}" --json "$OUT/gpu-${v%%:*}.json" > "$OUT/bench_gpu-${v%%:*}.log" 2>&1
    stamp "bench_gpu ${v%%:*} rc=$?"
  done
fi

train() {  # name, then --set overrides
  local name=$1; shift
  local sets=()
  for s in "$@"; do
    case $s in cfg:*) sets+=(--config "${s#cfg:}") ;; *) sets+=(--set "$s") ;; esac
  done
  # TRACE=1: the same run (a world of one, without the launcher) under tools/trace_loop.py:
  # host time in steps / reads / gaps, CPU per thread, the device's lag -> trace-<name>.json
  local launch=(-m torch.distributed.run --standalone --nproc_per_node 1 -m dlrm_mtl)
  [ "${TRACE:-0}" = 1 ] && launch=(tools/trace_loop.py --json "$OUT/trace-$name.json")
  timeout "${TRAIN_TIMEOUT:-120}" $PY "${launch[@]}" train \
    --config configs/demo.yaml --set train.run_dir=/tmp/run-$name --set data.train=$DATA/train \
    --set data.eval=$DATA/eval --set checkpoint.at_end=false --set checkpoint.keep_best=false "${sets[@]}" > "$OUT/train-$name.log" 2>&1
  local rc=$?
  [ -f /tmp/run-$name/metrics.json ] && cp /tmp/run-$name/metrics.json "$OUT/train-$name.json"
  stamp "train $name rc=$rc"
}

if [ "${SKIP_TRAIN:-0}" != 1 ]; then
  for v in ${TRAINS:-b8192_graph b8192_packed b8192_sharded b8192_eager b8192_bf16 b8192_workers b2048_graph b32768_graph}; do
    case $v in
      b8192_graph)  train $v data.batch_size=8192 ;;
      b8192_gpu)    train $v cfg:configs/gpu.yaml ;;
      b8192_eager)  train $v data.batch_size=8192 train.cuda_graph=eager ;;
      b8192_sharded) train $v data.batch_size=8192 sharding.local_lookup=false ;;
      b8192_bf16)   train $v data.batch_size=8192 train.precision=bf16 ;;
      b8192_workers) train $v data.batch_size=8192 data.num_workers=8 data.prefetch_batches=32 ;;
      b8192_packed) train $v data.batch_size=8192 data.pin_memory=true ;;  # one page-locked buffer per batch
      b2048_graph)  train $v data.batch_size=2048 ;;
      b32768_graph) train $v data.batch_size=32768 ;;
    esac
  done
fi
if [ "${SKIP_SEQ:-0}" != 1 ]; then
  SEQ=/tmp/syn_seq
  if [ ! -f "$SEQ/schema.yaml" ]; then
    timeout 120 $PY -m dlrm_mtl generate --out "$SEQ" --rows "${SEQ_ROWS:-400000}" --seed 0 --sequence-len 20 > "$OUT/generate-seq.log" 2>&1
    stamp "generate sequences rc=$?"
  fi
  for c in din deepmcp; do
    DATA=$SEQ train "seq_$c" "cfg:configs/sequence/$c.yaml" "data.schema=$SEQ/schema.yaml" data.batch_size=8192
  done
fi
stamp "done"
# one archive: the device tool brings back only a few files per call
(cd "$OUT" && tar czf /tmp/results.tgz --exclude results.tgz . && mv /tmp/results.tgz . \
  && find . -type f ! -name results.tgz ! -name steps.log ! -name gpu.json -delete)
