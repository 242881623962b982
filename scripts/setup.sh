#!/usr/bin/env bash
# Create .venv and install Salamander with its test tools. Idempotent; safe to re-run.
# On a machine without an NVIDIA GPU it installs torch's CPU build: the PyTorch CPU index is
# added as an extra index, and pip prefers its `+cpu` wheels, so the multi-GB CUDA build is
# never pulled. Set SALAMANDER_TORCH to override the torch requirement.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
"$python" - <<'PY' || { echo "setup: Salamander needs Python 3.11 or newer" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

torch_req=${SALAMANDER_TORCH:-torch==2.13.0}
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing $torch_req (CUDA build)"
    pip install -q "$torch_req"
  else
    echo "setup: no GPU, installing $torch_req (CPU build)"
    pip install -q "$torch_req" --extra-index-url https://download.pytorch.org/whl/cpu --retries 1 --timeout 20
  fi
fi
pip install -q -e ".[test]"
python -c "import torch, salamander; print(f'setup: salamander {salamander.__version__}, torch {torch.__version__}')"
