#!/usr/bin/env bash
# Creates or updates .venv with the CPU or the GPU stack, idempotently.
#   CPU (no nvidia-smi): torch 2.13.0+cpu (local wheel via find-links), fbgemm-gpu-cpu 1.8.0,
#        torchrec 1.8.0 without its CUDA fbgemm-gpu dependency (uv override), torchx, pyarrow,
#        tensorboard. All pins live in pyproject.toml.
#   GPU (nvidia-smi works): the `gpu` extra (fbgemm-gpu 1.8.0 matching a CUDA torch).
#   Both: dlrm_mtl itself, editable, with its C kernels (setup.py, dlrm_mtl/csrc) compiled
#   in place; rebuilt when a source there changes (--reinstall-package).
# Force a side with DLRM_MTL_STACK=cpu|gpu. Nothing is downloaded after this step.
# Bytecode is compiled here (--compile-bytecode): where PYTHONDONTWRITEBYTECODE is set (CI,
# containers) Python would otherwise recompile torch/torchrec on every start (9 s instead of
# 3.7 s to import them on the 2-core development machine).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STACK=${DLRM_MTL_STACK:-}
if [ -z "$STACK" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then STACK=gpu; else STACK=cpu; fi
fi
stamp="$VENV/.dlrm_mtl-installed-$STACK"
# up to date: nothing the install reads (pins, this script, the C kernels' build) is newer
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt tools/install.sh ] \
   && [ "$stamp" -nt setup.py ] && [ -z "$(find dlrm_mtl/csrc -newer "$stamp" 2>/dev/null)" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "uv==0.13.9"
UV="$VENV/bin/uv"
links=()
for d in /opt/wheels; do [ -d "$d" ] && links+=(--find-links "$d"); done
echo "[install] stack=$STACK venv=$VENV"
if [ "$STACK" = cpu ]; then
  "$UV" pip install --python "$VENV/bin/python" "${links[@]}" --compile-bytecode \
    --override tools/cpu-overrides.txt --reinstall-package dlrm_mtl -e ".[cpu,dev]"
else
  # GPU machines: PyPI's CUDA builds of torch 2.13.0 and fbgemm-gpu 1.8.0. No local
  # find-links here: they hold the +cpu torch wheel, which would satisfy torch==2.13.0.
  "$UV" pip install --python "$VENV/bin/python" --compile-bytecode --reinstall-package dlrm_mtl -e ".[gpu,dev]"
fi
"$VENV/bin/python" - <<'PY'
import torch, torchrec, fbgemm_gpu  # noqa: F401 -- fails loudly on a broken stack
print(f"[install] torch {torch.__version__}, torchrec {torchrec.__version__ if hasattr(torchrec,'__version__') else '?'}, cuda={torch.cuda.is_available()}")
from dlrm_mtl import native
print(f"[install] dlrm_mtl C kernels: {'built' if native.built() else 'NOT built (no C compiler?): the ATen paths will be used'}")
PY
rm -f "$VENV"/.dlrm_mtl-installed-*
touch "$stamp"
