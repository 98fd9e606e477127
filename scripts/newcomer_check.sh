#!/usr/bin/env bash
# A newcomer's first hour, by script: clone the committed HEAD into a temporary directory and
# follow README.md exactly: its set-up and main-job command, its activation step, then every
# command of "Using it on your data" as printed (read from the README, not copied here). Checks
# that each step's outputs exist, that the logs hold no traceback, warning or Spark banner, and
# that the main job's report states a lift over the best baseline; prints each step's time.
#
#   scripts/newcomer_check.sh [WORKDIR]      (default: a new mktemp -d; kept for inspection)
#
# Needs network access for the set-up (pip installs the pinned stack into the clone's .venv).
set -euo pipefail
unset PYTHONPATH  # the clone must run on its own code and venv
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d /tmp/newcomer-check.XXXXXX)}
CLONE="$WORK/mqsa-ted"
LOGS="$WORK/logs"
SHA=$(git -C "$ROOT" rev-parse HEAD)
mkdir -p "$LOGS"
TIMES=()
STEP=0

fail() { echo "FAILED: $*" >&2; exit 1; }

step() {  # step NAME COMMAND [noisy]: run COMMAND (a shell line) in the clone, log it, time it
  local name=$1 line=$2 noisy=${3:-} start=$SECONDS log
  STEP=$((STEP + 1))
  log="$LOGS/$(printf '%02d' "$STEP")-${name// /-}.log"
  echo "==> $name: $line"
  if ! (cd "$CLONE" && eval "$line") </dev/null >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    fail "$name (log: $log)"
  fi
  if [ -z "$noisy" ] && grep -nE "Traceback|Warning:|Setting default log level|log4j profile" "$log" >&2; then
    fail "$name printed a traceback, a warning or Spark's banner (log: $log)"
  fi
  TIMES+=("$(printf '%-28s %5d s' "$name" $((SECONDS - start)))")
}

exists() { for path in "$@"; do [ -e "$CLONE/$path" ] || fail "missing $path"; done; }

exported() {  # exported EXPORT_DIR: CURRENT names a version holding a manifest and the encoder
  local current="$CLONE/$1/CURRENT" version
  [ -f "$current" ] || fail "missing $1/CURRENT"
  version=$(sed -n 's/.*"version": *"\([^"]*\)".*/\1/p' "$current")
  exists "$1/versions/$version/manifest.json" "$1/versions/$version/user_encoder.pt"
}

readme_block() {  # the README's ```bash block that contains $1, one command per line
  awk -v want="$1" '
    /^```bash$/ { inside = 1; block = ""; next }
    /^```$/ && inside { inside = 0; if (index(block, want)) { printf "%s", block; exit } }
    inside { sub(/[ \t]+#.*$/, ""); if (length($0)) block = block $0 "\n" }
  ' "$CLONE/README.md"
}

echo "clone of $SHA in $CLONE (logs: $LOGS)"
git clone -q --no-checkout "$ROOT" "$CLONE"
git -C "$CLONE" checkout -q "$SHA"

step "set-up" "bash scripts/setup.sh" noisy  # pip's and setuptools' output: not ours
MAIN=$(readme_block "scripts/main.sh")
[ "$MAIN" = "bash scripts/main.sh" ] || fail "README's main-job block is '$MAIN'"
step "main job" "$MAIN"
exists runs/demo/report.md runs/demo/curves.png
exported runs/demo/export
LIFT=$(grep -E "\(the best baseline\)" "$CLONE/runs/demo/report.md") || fail "no lift in report"
echo "    $LIFT"

ACTIVATE=$(readme_block "source .venv/bin/activate" | head -n 1)
[ "$ACTIVATE" = "source .venv/bin/activate" ] || fail "README's activation step is '$ACTIVATE'"
# shellcheck disable=SC1091
source "$CLONE/.venv/bin/activate"
command -v mqsa-ted | grep -q "^$CLONE/.venv/bin/" || fail "mqsa-ted is not the clone's"
step "help" "mqsa-ted --help"

while IFS= read -r line; do
  name=$(awk '{print $1 == "mqsa-ted" ? $2 : $1}' <<<"$line")
  step "$name (example)" "$line"
  case "$name" in
    prepare) exists data/example/prepared/_COMPLETE data/example/prepared/stats.json ;;
    train) exists runs/example/metrics.json runs/example/model.pt ;;
    export) exported runs/example/export ;;
    recommend) [ "$(grep -cE '^ +[0-9]+  i[0-9]+ ' "$LOGS"/*recommend*.log)" = 10 ] \
                 || fail "recommend did not print 10 items" ;;
    report) exists runs/example/report.md runs/example/curves.png ;;
  esac
done < <(readme_block "configs/example.yaml")

echo
echo "newcomer check passed on $SHA ($(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
printf '  %s\n' "${TIMES[@]}"
