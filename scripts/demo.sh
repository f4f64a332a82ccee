#!/usr/bin/env bash
# Set everything up from a fresh machine (Python + pip) and run a real tuning demo:
# an MLP on scikit-learn's digits data, 4 candidates x 4 rounds on 2 CPU slots, with
# the embedded Prefect API. Results land in output_digits_demo/ (re-running resumes it).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check "uv>=0.9"
python3 -m uv sync --frozen --all-extras
exec python3 -m uv run --frozen --no-sync python -m flows.autofinetune examples/digits/train.py \
  --param-file examples/digits/hparam.yaml --evaluator fulltrail --tuning-strategy hazero \
  --popsize 4 --round 4 --cpu-slots 2 --seed 0 --output-dir output_digits_demo "$@"
