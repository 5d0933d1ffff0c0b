#!/usr/bin/env bash
# Create .venv with medtl installed. Installs the CPU wheel torch==2.13.0 first when no torch is
# present, so pip never pulls a multi-GB CUDA build by accident (GPU users: install the torch
# build you want into .venv before running this; it is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
