#!/usr/bin/env bash
# The GPU check: the real Qwen3-VL-Reranker-8B and -2B architectures (random weights built on the
# machine) measured per precision, beside the planner's predictions (cli/gpu_check.py says what).
#
#   bash scripts/gpu-check.sh OUT_DIR                 on a GPU machine (ends within --budget-s, 420 s)
#   bash scripts/gpu-check.sh --cpu-smoke OUT_DIR     on CPU, shrunk architectures (the test suite runs this)
#   bash scripts/gpu-check.sh --fetch-wheels          here: download what the GPU machine lacks into .whl/
#
# It runs on the machine's own python3 (torch, transformers, PIL, numpy, safetensors, psutil) with
# nothing installed; wheels carried in .whl/ (bitsandbytes 0.50.2, 41 MiB: int8 and nf4; pydantic,
# ~2 MiB with its core: the engine's settings are pydantic models) are installed into a scratch
# folder first. Further arguments go to cli/gpu_check.py (--help).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch-wheels" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "bitsandbytes==0.50.2" "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"
  ls -la .whl
  exit 0
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# What this Python lacks, from the carried wheels (only those: a wheel for another Python is left).
MISSING=""
"$PYTHON" -c "import bitsandbytes" 2>/dev/null || MISSING="bitsandbytes"
"$PYTHON" -c "import pydantic" 2>/dev/null || MISSING="$MISSING pydantic pydantic-core annotated-types typing-inspection"
if compgen -G ".whl/*.whl" >/dev/null && [ -n "$MISSING" ]; then
  echo "[gpu-check] installing from the carried wheels:$MISSING" >&2
  SITE="${TMPDIR:-/tmp}/rerank-fleet-gpu-check-site"
  # shellcheck disable=SC2086
  "$PYTHON" -m pip install -q --no-index --find-links .whl --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $MISSING
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec "$PYTHON" -m cli.gpu_check "$@"
