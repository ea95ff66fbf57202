"""Loading a reranker checkpoint at a given precision.

Quantized precisions keep the vision tower and lm_head in 16-bit (32-bit on CPU): the ViT is
small next to the decoder and its output is cached and shared between arms, and the yes/no
logits are read from lm_head rows, where quantization error lands directly on the score.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import ModelLoadError, PrecisionUnsupported, UnknownPrecision

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "nf4", "awq", "w8a8", "fp8")
# transformers 5 matches these against full module names from their start (`should_convert_module`):
# "visual" alone would match nothing and the vision tower would be quantized with the decoder.
KEEP_16BIT = ["model.visual", "lm_head"]
# LLM.int8 casts fp32 activations to fp16 for its int8 matmul and says so on every call.
warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
FAMILIES = {"qwen3_vl": "qwen3-vl", "qwen2_5_vl": "lychee"}


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    folder: Path | None  # local folder of the checkpoint (None when loaded from the hub cache)
    source: str
    family: str  # "qwen3-vl" | "lychee"
    precision: str
    device: torch.device
    compute_dtype: torch.dtype


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise PrecisionUnsupported("device 'cuda' requested but no CUDA device is visible")
    return torch.device(device)


def compute_dtype_for(precision: str, device: torch.device) -> torch.dtype:
    """dtype of the unquantized parts (activations, ViT, lm_head)."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    # Quantized: 16-bit on GPU (bf16 where supported), fp32 on CPU where 16-bit matmuls are slow.
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse, with the reason, a precision this hardware or install cannot run."""
    if precision not in PRECISIONS:
        raise UnknownPrecision(f"precision: unknown {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp8":
        if device.type != "cuda":
            raise PrecisionUnsupported("precision: fp8 needs a CUDA GPU with compute capability >= 8.9; this device is CPU")
        cc = torch.cuda.get_device_capability(device)
        if cc < (8, 9):
            raise PrecisionUnsupported(f"precision: fp8 needs compute capability >= 8.9; this GPU has {cc[0]}.{cc[1]}")
        try:
            import kernels  # noqa: F401
        except ImportError:
            raise PrecisionUnsupported(
                "precision: fp8 on the transformers backend needs the `kernels` package: transformers 5.17's FineGrainedFP8 "
                "loads its matmul from the hub kernel kernels-community/finegrained-fp8 (use the vllm backend's fp8)"
            ) from None
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionUnsupported("precision: bf16 needs compute capability >= 8.0; use fp16 on this GPU")
    if precision == "w8a8":
        raise PrecisionUnsupported(
            "precision: w8a8 (int8 weights and activations) runs on the vllm backend's int8 kernels; the transformers "
            "backend has none (use int8, bitsandbytes LLM.int8, here)"
        )
    if precision in ("int8", "nf4"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise PrecisionUnsupported(f"precision: {precision} needs the bitsandbytes package") from None


def quantization_config(precision: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig, FineGrainedFP8Config

    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_skip_modules=KEEP_16BIT)
    if precision == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=KEEP_16BIT,
        )
    if precision == "fp8":
        return FineGrainedFP8Config(modules_to_not_convert=KEEP_16BIT)
    return None


def read_model_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{folder}: no readable config.json ({e})") from None


def awq_loading_kwargs(cfg: dict, device: torch.device) -> dict:
    """How an `awq` checkpoint loads here. compressed-tensors W4A16 runs its packed kernels on GPU;
    on CPU no 4-bit kernel exists, so the weights are decompressed once at load (dequantized to
    the compute dtype): same values the 4-bit kernel multiplies by, dense memory."""
    qcfg = cfg.get("quantization_config") or {}
    method = qcfg.get("quant_method")
    if method == "compressed-tensors":
        if device.type == "cpu":
            from transformers import CompressedTensorsConfig

            return {"quantization_config": CompressedTensorsConfig(dequantize=True)}
        return {}
    if method == "awq":
        if device.type == "cpu":
            raise PrecisionUnsupported(
                "precision: legacy AWQ-format checkpoints need GPU kernels (gptqmodel/awq); on CPU use a "
                "compressed-tensors W4A16 checkpoint made by `rerank-fleet quantize`"
            )
        return {}
    raise PrecisionUnsupported(
        f"precision: awq needs a pre-quantized W4A16 checkpoint (compressed-tensors or AWQ format); "
        f"this checkpoint's quantization_config is {method or 'absent'} — make one with `rerank-fleet quantize`"
    )


def load_model(source: str, precision: str, device: str = "auto") -> LoadedModel:
    """Load `source` (local folder or hub id) at `precision` on `device`."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    dev = pick_device(device)
    check_precision(precision, dev)
    folder = Path(source) if Path(source).is_dir() else None
    try:
        cfg_obj = AutoConfig.from_pretrained(source)
    except Exception as e:
        raise ModelLoadError(f"model: cannot read the config of {source!r}: {type(e).__name__}: {e}") from None
    family = FAMILIES.get(cfg_obj.model_type)
    if family is None:
        raise ModelLoadError(f"model: architecture {cfg_obj.model_type!r} is not a supported reranker (qwen3_vl, qwen2_5_vl)")
    compute_dtype = compute_dtype_for(precision, dev)
    kwargs: dict = {"dtype": compute_dtype}
    if precision == "awq":
        kwargs.update(awq_loading_kwargs(cfg_obj.to_dict(), dev))
    else:
        qc = quantization_config(precision, compute_dtype)
        if qc is not None:
            kwargs["quantization_config"] = qc
    if dev.type == "cuda":
        kwargs["device_map"] = {"": dev.index or 0}
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    except (PrecisionUnsupported, ModelLoadError):
        raise
    except Exception as e:
        raise ModelLoadError(f"model: cannot load {source!r} at {precision}: {type(e).__name__}: {e}") from None
    if dev.type != "cuda" and precision not in ("int8", "nf4"):
        model.to(dev)
    model.eval()
    return LoadedModel(model, folder, source, family, precision, dev, compute_dtype)


def chat_template_of(tokenizer, folder: Path | None, source: str) -> str:
    """The checkpoint's chat template: the tokenizer's, else a template file in its folder, else
    the built-in Qwen3-VL one (with a warning)."""
    from engine.prompt import QWEN3_VL_CHAT_TEMPLATE

    tpl = getattr(tokenizer, "chat_template", None)
    if tpl:
        return tpl
    if folder is not None:
        for name in ("chat_template.jinja", "chat_template.json"):
            p = folder / name
            if p.exists():
                return p.read_text() if name.endswith(".jinja") else json.loads(p.read_text())["chat_template"]
    logging.getLogger(__name__).warning("no chat template in %s; using the built-in Qwen3-VL template", source)
    return QWEN3_VL_CHAT_TEMPLATE


def checkpoint_folder(source: str) -> Path:
    """A local folder holding the checkpoint's config files: `source` itself, or (a hub id) its
    JSON files fetched into the hub cache."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=["*.json", "*.jinja"]))
