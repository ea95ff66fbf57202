"""`rerank-fleet quantize`: AWQ W4A16, W8A8 int8 (SmoothQuant + GPTQ) or FP8 checkpoints with llm-compressor.

AutoAWQ is deprecated and has no Qwen3-VL support; llm-compressor is its maintained successor.
Calibration runs rerank pairs in the official prompt layout, text and image documents mixed
like real traffic, so the activation statistics AWQ protects are the ones serving will see.
The vision tower and lm_head are excluded (kept 16-bit), as the engine's other quantized
precisions do. The output is a compressed-tensors checkpoint that transformers, vLLM
(awq_marlin / machete kernels) and the engine's `awq` precision load, with the source's canary
reference (`canary.json`, scored at full precision): a replica of the checkpoint that ranks the
canary set unlike its source does not start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

IGNORE = ["lm_head", "re:.*visual.*"]
COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "video_preprocessor_config.json")


def awq_mappings():
    """Qwen2/3 decoder smoothing pairs (llm-compressor's defaults; Qwen3-VL is not in its registry)."""
    from llmcompressor.modifiers.transform.awq.mappings import default_mappings

    return default_mappings


def calibration_pairs(n: int, seed: int = 0):
    """Rerank pairs shaped like traffic: text->image, image->text, text->text, matching and not."""
    from workshop.tiny import training_pairs

    stream = training_pairs(random.Random(seed))
    return [next(stream)[:2] for _ in range(n)]


def quantize(model: str, out: str | Path, *, scheme: str = "awq", num_samples: int = 64, device: str = "auto") -> Path:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    from engine.engine import RerankEngine
    from workshop.canary import score_reference
    from workshop.tiny import resolve_source

    out = Path(out)
    engine = RerankEngine.load(resolve_source(model), "fp32" if not torch.cuda.is_available() else "bf16", device=device)
    source = Path(engine.loaded.source)
    # The checkpoint's canary reference (workshop/canary.py): the source's own scores at full
    # precision, taken before oneshot quantizes the model in place.
    canary = score_reference(engine, recorded_by=f"rerank-fleet quantize --scheme {scheme} from {model}")
    if scheme == "fp8":
        recipe = [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=IGNORE)]
        dataset, collate = None, None
    elif scheme == "w8a8":
        # int8 weights (per channel) and activations (per token, dynamic): vLLM's int8 tensor-core
        # kernels, for 16 GB cards (bitsandbytes LLM.int8 is 2-3x slower than BF16). SmoothQuant
        # moves activation outliers into the weights first; GPTQ rounds the weights.
        recipe = [SmoothQuantModifier(smoothing_strength=0.8, ignore=IGNORE), GPTQModifier(targets="Linear", scheme="W8A8", ignore=IGNORE)]
        dataset = _calibration_dataset(engine, calibration_pairs(num_samples))
        collate = _collate
    else:
        recipe = [
            AWQModifier(mappings=awq_mappings(), duo_scaling=True),
            QuantizationModifier(targets="Linear", scheme="W4A16", ignore=IGNORE),
        ]
        dataset = _calibration_dataset(engine, calibration_pairs(num_samples))
        collate = _collate
    kwargs = {}
    if dataset is not None:
        kwargs.update(dataset=dataset, data_collator=collate, num_calibration_samples=len(dataset), pipeline="basic")
    # The stock Qwen3-VL processor needs torchvision (video); calibration rows are already tensors,
    # so the tokenizer stands in as the processor llm-compressor asks for.
    with _no_pinning_without_accelerator():
        oneshot(model=engine.model, recipe=recipe, processor=engine.tokenizer, **kwargs)
    out.mkdir(parents=True, exist_ok=True)
    engine.model.save_pretrained(out, save_compressed=True)
    for name in COPY_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    canary.write(out)
    (out / "rerank_fleet_quantize.json").write_text(json.dumps({"base": str(model), "scheme": scheme, "ignore": IGNORE, "calibration_pairs": num_samples}, indent=2))
    return out


@contextlib.contextmanager
def _no_pinning_without_accelerator():
    """llm-compressor 0.14's AWQ pins cached activations for faster host-to-device copies, which
    raises on a machine without an accelerator. Pinning changes no value, so on CPU it is skipped."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.cuda.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *a, **k: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def _calibration_dataset(engine, pairs):
    """One row per pair: the exact tensors the model's forward takes (batch size 1, no padding)."""
    from datasets import Dataset

    from workshop.tiny import training_batch

    rows = []
    for query, document in pairs:
        batch, _ = training_batch(engine, [(query, document, 0.0)])
        rows.append({k: v[0].tolist() if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v.tolist() for k, v in batch.items()})
    return Dataset.from_list(rows)


def _collate(rows):
    (row,) = rows
    out = {k: torch.tensor([row[k]]) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "pixel_values" in row and row["pixel_values"] is not None:
        out["pixel_values"] = torch.tensor(row["pixel_values"], dtype=torch.float32)
        out["image_grid_thw"] = torch.tensor(row["image_grid_thw"])
    return out
