#!/usr/bin/env bash
# The test command (README, CI): installs the pinned stack if needed, then lint + the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export DS_ACCELERATOR=cpu PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
