#!/usr/bin/env bash
# .venv-deploy: medtl plus the MONAI Deploy App SDK, for tests/test_deploy.py.
# A separate environment because the SDK brings holoscan, tritonclient and an older protobuf, and
# MONAI imports every installed monai.* package on `import monai`; the main .venv stays without it.
# The CPU wheel torch==2.13.0 goes in first, as in setup.sh (keep a GPU build you installed yourself).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv-deploy/bin/python ]; then
  "$PY" -m venv .venv-deploy
fi
if ! .venv-deploy/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv-deploy/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
.venv-deploy/bin/pip install --quiet --disable-pip-version-check -e ".[test,deploy]"
