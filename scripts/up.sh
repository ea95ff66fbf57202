#!/usr/bin/env bash
# Main job: install, then serve two precision arms of the offline model on 127.0.0.1:8000
# (embedded Ray; the tiny model is trained on first use and cached). Ctrl-C stops it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/rerank-fleet up "$@"
