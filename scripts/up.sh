#!/usr/bin/env bash
# Main job: install, then serve two precision arms of the offline model on 127.0.0.1:8000
# (embedded Ray; the tiny model is trained on first use and cached). Ctrl-C stops it cleanly.
# A config with a vLLM arm (e.g. --config configs/local-vllm.yaml) runs in the vLLM environment,
# built first by scripts/vllm-env.sh; every other config runs in the default .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=""
prev=""
for arg in "$@"; do
  case "$arg" in --config=*) CONFIG="${arg#--config=}" ;; esac
  [ "$prev" = "--config" ] && CONFIG="$arg"
  prev="$arg"
done
if [ -n "$CONFIG" ] && grep -Eq '^[[:space:]]*backend:[[:space:]]*vllm' "$CONFIG"; then
  bash scripts/vllm-env.sh
  exec .venv-vllm/bin/rerank-fleet up "$@"
fi
bash scripts/bootstrap.sh
exec .venv/bin/rerank-fleet up "$@"
