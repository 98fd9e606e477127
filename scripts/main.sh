#!/usr/bin/env bash
# The main job, end to end on a config (default configs/demo.yaml):
#   synthetic events -> Spark prepare -> 2-process training -> export + FAISS -> report.
# Usage: scripts/main.sh [CONFIG] [section.key=value ...]
# Each stage is the `mqsa-ted` command the README prints. When data.events does not exist, a
# synthetic log is written there first: DEMO_KIND (default series), DEMO_EVENTS, DEMO_USERS,
# DEMO_ITEMS and DEMO_SEED set it (spark_jobs/synth.py). MQSA_SKIP_SETUP=1 skips scripts/setup.sh
# (for a .venv you manage yourself).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${MQSA_SKIP_SETUP:-}" ] || scripts/setup.sh
CONFIG=${1:-configs/demo.yaml}
shift || true
OVERRIDES=("$@")
export PYTHONPATH="$PWD"
MQSA=(.venv/bin/python -m mqsa_ted.cli)
setting() { "${MQSA[@]}" config "$CONFIG" "$1" --set "${OVERRIDES[@]}"; }

stage() {  # stage NAME COMMAND...: run it and print one summary line with its time
  local name=$1; shift
  local start=$SECONDS
  echo "==> $name"
  "$@"
  echo "==> $name done in $((SECONDS - start)) s"
}

START=$SECONDS
EVENTS=$(setting data.events)
RUN_DIR=$(setting train.run_dir)
if [ ! -e "$EVENTS" ]; then
  stage "synthetic events ($EVENTS)" "${MQSA[@]}" synth --out "$EVENTS" \
    --kind "${DEMO_KIND:-series}" --events "${DEMO_EVENTS:-400000}" \
    --users "${DEMO_USERS:-20000}" --items "${DEMO_ITEMS:-3000}" --seed "${DEMO_SEED:-7}"
fi
stage "prepare" "${MQSA[@]}" prepare "$CONFIG" "${OVERRIDES[@]}"
stage "train ($(setting distributed.nproc_per_node) processes)" \
  "${MQSA[@]}" train "$CONFIG" "${OVERRIDES[@]}"
stage "export" "${MQSA[@]}" export "$RUN_DIR"
stage "report" "${MQSA[@]}" report "$RUN_DIR"
echo "==> main job done in $((SECONDS - START)) s: $RUN_DIR/report.md, $RUN_DIR/curves.png"
echo "==> next: source .venv/bin/activate && mqsa-ted --help  (README: \"Using it on your data\")"
