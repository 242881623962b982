#!/usr/bin/env bash
# Set everything up, then run the whole test suite (unit, operator-on-emulator, local end-to-end).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
