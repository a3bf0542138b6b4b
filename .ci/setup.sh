#!/usr/bin/env bash
# The README's one set-up command: system libraries, a virtual environment in .venv,
# recon_slam (editable) with its test tools. Safe to run again.
#   VENV=path      where to create the virtual environment (default .venv)
#   PYTHON=python3 the interpreter to use (3.10-3.12)
#   TORCH_SPEC     the torch requirement to install first (default torch==2.13.0)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

run_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# 1. System packages: Open3D needs libusb-1.0; venv needs ensurepip (Debian's python3-venv).
need_apt=()
ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0' || need_apt+=(libusb-1.0-0)
"$PYTHON" -c 'import ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing system packages: ${need_apt[*]}"
  run_root apt-get update -qq
  run_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

# 2. Virtual environment and Python packages (one list, declared in setup.py).
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q -e ".[test]"
"$VENV/bin/python" -c 'import recon_slam, open3d, torch; print("setup: recon_slam", recon_slam.__version__, "torch", torch.__version__, "open3d", open3d.__version__)'
echo "setup: done. Activate with: . $VENV/bin/activate"
