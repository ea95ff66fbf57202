#!/usr/bin/env bash
# The test suite, as CI runs it: install, make sure Redis answers on 127.0.0.1:6379, run pytest;
# then (when run whole, as CI does) build the vLLM environment (scripts/vllm-env.sh) and run the
# tests marked `vllm` there: the vLLM backend against the transformers engine, and over HTTP.
# Arguments go to the first pytest and skip the vLLM pass (RERANK_VLLM_TESTS=1 keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# The parity tests' official reference (tests/engine/official_reference.py) runs the official
# reranker's stack as its lockfile pins it: transformers 4.57.3 (with the hub client and tokenizers
# it accepts), qwen-vl-utils, decord (its video reader) and torchvision (its resizing, the Qwen3-VL
# video processor). None of it may reach the project's own process (transformers 5.17 is the pin;
# a transformers that finds torchvision switches processors), and PyPI's torchvision is a CUDA
# build: so they go into a folder of their own, put on the path by the reference process only.
REF_PKGS=.venv/reference-packages
REF_SPECS="transformers==4.57.3 huggingface-hub==0.36.0 tokenizers==0.22.1 torchvision==0.28.0 decord==0.6.0"
if [ "$(cat "$REF_PKGS/SPECS" 2>/dev/null)" != "$REF_SPECS" ]; then
  echo "installing the parity reference's packages into $REF_PKGS (~60 MB): $REF_SPECS" >&2
  rm -rf "$REF_PKGS"
  # shellcheck disable=SC2086
  .venv/bin/pip install -q --no-deps --target "$REF_PKGS" $REF_SPECS
  echo "$REF_SPECS" > "$REF_PKGS/SPECS"
fi
export RERANK_REFERENCE_PACKAGES="$PWD/$REF_PKGS"
bash scripts/checkov-env.sh  # the linter of the rendered deployment files and the Dockerfile (tests/placement/test_deploy_files.py)
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  echo "no Redis on 127.0.0.1:6379; starting one" >&2
  command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no --logfile /tmp/rerank-fleet-redis.log
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null && break; sleep 0.1; done
fi
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q "$@"
if [ $# -eq 0 ] || [ "${RERANK_VLLM_TESTS:-0}" = 1 ]; then
  bash scripts/vllm-env.sh
  echo "vLLM backend tests (in .venv-vllm):" >&2
  exec .venv-vllm/bin/python -m pytest -q -m vllm tests/engine/test_vllm_engine.py tests/serve/test_serve_vllm.py
fi
