#!/usr/bin/env bash
# Create .venv and install the project with every extra. torch is installed first, pinned to the
# CPU build (2.13.0) this project's machines carry, so nothing later resolves a CUDA torch.
# On a GPU machine set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0" with the CUDA index configured).
# A finished install is recorded (a hash of pyproject.toml): a warm start skips pip entirely.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.rerank-fleet-installed
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1) ${TORCH_SPEC:-torch==2.13.0}"
if [ -x .venv/bin/python ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ] && .venv/bin/python -c "import engine, serve, torch" 2>/dev/null; then
  exit 0
fi
step() { echo "[install] $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  step "creating .venv"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  step "installing ${TORCH_SPEC:-torch==2.13.0} (the CPU build here)"
  pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
step "installing the project and its extras (first run: a few minutes; each package is listed as it comes)"
if ! pip install -e ".[all]" 2>&1 | tee .venv/install.log | { grep --line-buffered -E "^(Collecting|Successfully installed)" || true; } \
    | sed -u 's/^/[install]   /' >&2; then
  step "pip failed; the last lines of .venv/install.log:"
  tail -20 .venv/install.log >&2
  exit 1
fi
python -c "import engine, serve, torch"
echo "$WANT" > "$STAMP"
step "done"
