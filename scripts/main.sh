#!/usr/bin/env bash
# The main job, end to end on a config (default configs/demo.yaml):
#   synthetic events -> Spark prepare -> 2-process training -> export + FAISS -> report.
# Usage: scripts/main.sh [CONFIG] [section.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
CONFIG=${1:-configs/demo.yaml}
shift || true
PY=.venv/bin/python
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} PYTHONPATH="$PWD"
setting() { "$PY" -m core.config "$CONFIG" "$1" --set "${OVERRIDES[@]}"; }
OVERRIDES=("$@")
[ ${#OVERRIDES[@]} -gt 0 ] || OVERRIDES=()

stage() {  # stage NAME COMMAND...: run it and print one summary line with its time
  local name=$1; shift
  local start=$SECONDS
  echo "==> $name"
  "$@"
  echo "==> $name done in $((SECONDS - start)) s"
}

EVENTS=$(setting data.events)
RUN_DIR=$(setting train.run_dir)
if [ ! -e "$EVENTS" ]; then
  stage "synthetic events ($EVENTS)" \
    "$PY" -m spark_jobs.synth --out "$EVENTS" --events "${DEMO_EVENTS:-400000}" \
      --users "${DEMO_USERS:-20000}" --items "${DEMO_ITEMS:-3000}" --seed 7
fi
stage "spark prepare" "$PY" -m spark_jobs.prepare "$CONFIG" "${OVERRIDES[@]}"
stage "train ($(setting distributed.nproc_per_node) processes)" ./launch.sh "$CONFIG" "${OVERRIDES[@]}"
stage "export" "$PY" -m mqsa_ted.export "$RUN_DIR"
stage "report" "$PY" -m mqsa_ted.report "$RUN_DIR"
