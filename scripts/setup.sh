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

# Prometheus and promtool: tests/observability checks and unit-tests the alert rules with promtool
# and scrapes real metrics with a real server. Debian's package has both. Its maintainer scripts
# would start (and, under systemd, enable) a service: a temporary policy-rc.d forbids starting it,
# and where systemd runs it is disabled afterwards. Never fails the setup.
install_prometheus() {
  local sudo="" policy=/usr/sbin/policy-rc.d made_policy=0 rc=0
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null && $sudo chmod +x "$policy" && made_policy=1
  fi
  local apt="$sudo env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Dpkg::Use-Pty=0"
  $apt install --no-install-recommends prometheus >/dev/null 2>&1 \
    || { $apt update >/dev/null && $apt install --no-install-recommends prometheus >/dev/null; } || rc=1
  [ "$made_policy" -eq 0 ] || $sudo rm -f "$policy"
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
  return "$rc"
}
if ! command -v promtool >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's prometheus package (prometheus, promtool)"
    install_prometheus || echo "setup: note: could not install prometheus; the tests that need it skip" >&2
  else
    echo "setup: note: no promtool and no apt-get; put prometheus and promtool on PATH to run" \
      "tests/observability fully (those tests skip without them)" >&2
  fi
fi
python -c "import torch, salamander; print(f'setup: salamander {salamander.__version__}, torch {torch.__version__}')"
