#!/usr/bin/env bash
# Set everything up from a fresh machine (Python + pip) and run the whole test suite.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check "uv>=0.9"
python3 -m uv sync --frozen --all-extras
# -n 3: the end-to-end tests mostly wait on subprocesses, servers and heartbeats; the
# deployment tests share one worker (xdist_group) because their module fixture deploys once.
exec python3 -m uv run --frozen --no-sync python -m pytest -n 3 --dist loadgroup "$@"
