"""Deliberately broken checkpoints, as quantization breaks them silently, for the canary's tests
(importable from any test folder: pytest puts this one on sys.path for its conftest).

- `zeroed`: the "yes" and "no" rows of lm_head set to 0, so every pair's yes-no logit is 0 and its
  score sigmoid(0) = 0.5 (a lost or zeroed score head: an FP8 reranker answering all zeros, a
  checkpoint stuck at 0.5);
- `scaled`: the decoder's MLP down-projections 100x off (wrong quantization scales).

The copy keeps every other file of the folder, its canary reference (`canary.json`) included: the
reference of the model the broken checkpoint claims to be.
"""

from __future__ import annotations

import shutil
from pathlib import Path

BROKEN = ("zeroed", "scaled")


def broken_copy(model: Path, out: Path, how: str) -> Path:
    """A copy of the checkpoint folder `model` at `out`, broken `how` (one of `BROKEN`)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    model, out = Path(model), Path(out)
    shutil.copytree(model, out, ignore=shutil.ignore_patterns("*.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(model)
    yes_no = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "no")]
    for f in model.glob("*.safetensors"):
        tensors = load_file(f)
        for name, tensor in tensors.items():
            if how == "zeroed" and name == "lm_head.weight":
                tensor[yes_no] = 0
            elif how == "scaled" and name.startswith("model.language_model.layers.") and name.endswith("mlp.down_proj.weight"):
                tensor *= 100.0
            elif how not in BROKEN:
                raise ValueError(f"how: one of {BROKEN}")
        save_file(tensors, out / f.name, metadata={"format": "pt"})
    return out
