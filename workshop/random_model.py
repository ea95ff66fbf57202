"""Random-weight checkpoints of real architectures (Qwen3-VL-8B, -2B) for throughput and memory
measurements without downloading weights.

The weights are random, so scores are meaningless, but every matrix has its real shape: speed
and memory at each precision are those of the real model. The tokenizer is the tiny model's
(its ids all fall inside the real vocabulary); the config's special-token ids are pointed at it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "preprocessor_config.json")


def build_random_model(config_json: str | Path, out: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str = "cpu", overrides: dict | None = None) -> Path:
    """Write a loadable checkpoint of the architecture in `config_json` with random weights."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from workshop.tiny import ensure_tiny_model

    out = Path(out)
    if (out / "DONE").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tiny = ensure_tiny_model()
    for name in TOKENIZER_FILES:
        if (tiny / name).exists():
            shutil.copy(tiny / name, out / name)
    tiny_cfg = json.loads((tiny / "config.json").read_text())
    cfg = json.loads(Path(config_json).read_text())
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        cfg[key] = tiny_cfg[key]
    for key, value in (overrides or {}).items():  # e.g. {"text_config": {"num_hidden_layers": 2}} for tests
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    config = AutoConfig.from_pretrained(out)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.save_pretrained(out, max_shard_size="5GB")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))  # keep the original (token-patched) config text
    (out / "DONE").write_text("ok\n")
    del model
    return out
