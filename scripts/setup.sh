#!/usr/bin/env bash
# Create .venv (if needed) and install ekd-lightning with its test extras into it.
# Torch is installed first on its own so that pip does not pull a second, larger build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "is ignored" || true
fi
python -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
python -c "import torch, pytorch_lightning, torch_geometric, hydra, h5py, ekd_lightning; print('ekd-lightning ready: torch', torch.__version__)"
