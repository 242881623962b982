#!/usr/bin/env bash
# Set everything up, then train the GPT example locally with two elastic workers. Half-way
# through, one training process is killed: watch it detected, restarted and resumed from the
# in-memory snapshot. Metrics are served on the port printed at start (add --metrics-port N).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
rm -rf runs/gpt-checkpoints  # every demo starts from step 0
exec .venv/bin/salamander run examples/gpt.yaml --fault kill-process:step=150,rank=1 "$@"
