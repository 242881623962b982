#!/usr/bin/env bash
# Set everything up, then train the GPT example locally with two elastic workers.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/salamander run examples/gpt.yaml "$@"
