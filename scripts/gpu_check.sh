#!/usr/bin/env bash
# One command for a GPU machine: the tests marked for CUDA, then a short synthetic training on one
# GPU for paper mode and catalogue mode, compared with a CPU run of the same seed and data on
# this machine (same losses and metrics within a stated tolerance), an export, and step time,
# samples per second and peak GPU memory.
#
#   scripts/gpu_check.sh              # the whole check (needs a CUDA device)
#   scripts/gpu_check.sh --cpu-only   # only the CPU reference run (any machine)
#
# Python: $PYTHON, else .venv/bin/python, else python3. Wheels found in $WHEELS (default .whl/)
# are installed first into a private directory, without network and without dependencies (e.g.
# deepspeed, pyarrow, fsspec, pyyaml, tqdm, pytest for a machine that has only a CUDA torch).
# TorchRec parts are skipped with a printed reason when fbgemm-gpu is absent (docs/gpu.md).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
[ -n "$PY" ] || { [ -x .venv/bin/python ] && PY=.venv/bin/python; } || PY=python3
WHEELS=${WHEELS:-.whl}
WORK=${GPU_CHECK_DIR:-/tmp/gpu_check}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$WORK"

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "==> installing the wheels in $WHEELS into $WORK/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WHEELS"/*.whl \
    || { echo "error: could not install the wheels in $WHEELS" >&2; exit 2; }
  export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi

if [ "${1:-}" = "--cpu-only" ]; then
  exec "$PY" bench/gpu_check.py run --device cpu --out "$WORK/cpu.json" --workdir "$WORK"
fi
"$PY" bench/gpu_check.py require-cuda || exit 3   # prints "no CUDA device" and stops

if "$PY" -c "import fbgemm_gpu, torchrec" 2>/dev/null; then
  echo "==> TorchRec and fbgemm-gpu found: their CUDA tests run too"
else
  echo "==> TorchRec skipped: fbgemm-gpu / torchrec are not installed in $PY (docs/gpu.md)"
fi
STATUS=0
echo "==> tests marked for CUDA"
if "$PY" -c "import pytest" 2>/dev/null; then
  DS_ACCELERATOR=cuda "$PY" -m pytest -q -m cuda -p no:cacheprovider tests || STATUS=1
else
  echo "pytest is not installed in $PY: put its wheel in $WHEELS; CUDA tests not run" >&2
  STATUS=1
fi
echo "==> CPU reference run (same seed and data)"
DS_ACCELERATOR=cpu "$PY" bench/gpu_check.py run --device cpu --out "$WORK/cpu.json" \
  --workdir "$WORK" || STATUS=1
echo "==> GPU run"
DS_ACCELERATOR=cuda "$PY" bench/gpu_check.py run --device cuda --out "$WORK/cuda.json" \
  --workdir "$WORK" || STATUS=1
echo "==> GPU against CPU"
"$PY" bench/gpu_check.py compare "$WORK/cpu.json" "$WORK/cuda.json" || STATUS=1
[ "$STATUS" = 0 ] && echo "==> GPU check passed" || echo "==> GPU check FAILED" >&2
exit "$STATUS"
