#!/usr/bin/env bash
# Create .venv and install the project with every extra. torch is installed first, pinned to the
# CPU build (2.13.0) this project's machines carry, so nothing later resolves a CUDA torch.
# On a GPU machine set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0" with the CUDA index configured).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
pip install -q -e ".[all]"
