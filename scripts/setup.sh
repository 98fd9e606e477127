#!/usr/bin/env bash
# Creates .venv with the matched, pinned stack (idempotent: a second run only checks).
# Usage: scripts/setup.sh [cpu|gpu]   (default: gpu if nvidia-smi works, else cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
FLAVOUR=${1:-$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)}
VENV=${VENV:-.venv}
STAMP="$VENV/.setup-$FLAVOUR-$(sha1sum pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"

ensure_java() {
  if command -v java >/dev/null 2>&1 && java -version 2>&1 | grep -Eq 'version "(1[7-9]|2[0-9])'; then
    return
  fi
  echo "[setup] Java 17+ not found (PySpark 4 needs it); installing openjdk-17-jre-headless" >&2
  local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq openjdk-17-jre-headless; }; then
    echo "[setup] ERROR: could not install Java 17. Install a JDK/JRE >= 17 and set JAVA_HOME." >&2
    exit 1
  fi
}

ensure_java
if [ -f "$STAMP" ]; then
  exit 0
fi
echo "[setup] creating $VENV ($FLAVOUR)" >&2
python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip
$PIP install -e ".[$FLAVOUR,dev,tracking]"  # tracking: MLflow, for tests/test_tracking.py
# torchrec declares a dependency on the CUDA fbgemm-gpu; skip deps so the CPU build stays.
$PIP install --no-deps torchrec==1.8.0
"$VENV/bin/python" -c "import torch, torchrec, fbgemm_gpu, deepspeed, pyspark; print('[setup] ok: torch', torch.__version__, 'torchrec', torchrec.__version__ if hasattr(torchrec, '__version__') else '1.8.0', 'deepspeed', deepspeed.__version__, 'pyspark', pyspark.__version__)" >&2
rm -f "$VENV"/.setup-*
touch "$STAMP"
echo "[setup] done. In each new shell: source $VENV/bin/activate  (puts mqsa-ted on PATH)" >&2
