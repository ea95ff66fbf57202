#!/usr/bin/env bash
# checkov (the deployment-file linter the tests run on rendered manifests and the Dockerfile) in
# a virtual environment of its own: it pins dozens of packages the project's environment must not
# see. Idempotent: a finished install is reused. Runs offline (the tests pass --skip-download).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-checkov
SPEC=${CHECKOV_SPEC:-checkov==3.3.30}
STAMP="$VENV/.rerank-fleet-checkov"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$SPEC" ] && [ -x "$VENV/bin/checkov" ]; then
  exit 0
fi
echo "[checkov env] installing $SPEC into $VENV (~1 min)" >&2
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/pip" install -q "$SPEC"
"$VENV/bin/checkov" --version >&2
echo "$SPEC" > "$STAMP"
