"""Random-weight checkpoints of real architectures (Qwen3-VL-8B, -2B) for throughput and memory
measurements without downloading weights.

The weights are random, so scores are meaningless, but every matrix has its real shape: speed
and memory at each precision are those of the real model (one exception: LLM.int8's outlier
path, which real activations use more than random ones). The tokenizer is the offline model's
(built here in a second, no training; its ids all fall inside the real vocabulary) and the
config's special-token ids are pointed at it.

The checkpoint is written tensor by tensor from a model built on the meta device, so building
the 8B (17 GB in bf16) holds one shard in memory, not the model, and runs where the model
itself would not fit twice (a 24 GiB CPU machine) or on a GPU in seconds.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

SHARD_BYTES = 2 * 1024**3
INDEX_FILE = "model.safetensors.index.json"


def build_random_model(config_json: str | Path, out: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str = "cpu", overrides: dict | None = None) -> Path:
    """Write a loadable checkpoint of the architecture in `config_json` with random weights
    (generated on `device`); a finished folder (its DONE file) is reused as it is."""
    from transformers import AutoConfig, AutoTokenizer

    from workshop.tiny import SPECIAL_TOKENS, build_tokenizer, write_preprocessor_config

    out = Path(out)
    if (out / "DONE").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        build_tokenizer(tmp)
        write_preprocessor_config(tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        cfg = json.loads(Path(config_json).read_text())
        for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                           ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):  # fmt: skip
            cfg[key] = ids[token]
        for key, value in (overrides or {}).items():  # e.g. {"text_config": {"num_hidden_layers": 2}} for tests
            if isinstance(value, dict):
                cfg.setdefault(key, {}).update(value)
            else:
                cfg[key] = value
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        write_random_weights(AutoConfig.from_pretrained(tmp), tmp, dtype=dtype, device=device)
        (tmp / "DONE").write_text("ok\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def random_tensor(name: str, shape: torch.Size, dtype: torch.dtype, device: str, generator: torch.Generator) -> torch.Tensor:
    """Norm scales 1, biases 0, matrices N(0, 0.02): the scale transformers initialises with,
    so activations stay finite through every layer."""
    if len(shape) == 1:
        fill = 1.0 if "norm" in name and name.endswith("weight") else 0.0
        return torch.full(shape, fill, dtype=dtype, device=device)
    return (torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * 0.02).to(dtype)


def write_random_weights(config, folder: Path, *, dtype: torch.dtype, device: str) -> None:
    """The model's tensors, random, as safetensors shards of at most SHARD_BYTES plus their index."""
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    # named_parameters() lists a tied weight once (the embedding; lm_head reads it), and the
    # state dict's names leave out non-persistent buffers (rotary tables are computed, not loaded).
    saved = set(model.state_dict())
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n in saved)]
    shapes = {name: (t.shape, t.dtype) for name, t in tensors}
    del model, tensors
    generator = torch.Generator(device=device).manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    files: list[str] = []

    def flush() -> None:
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, folder / name, metadata={"format": "pt"})
            files.append(name)
            weight_map.update(dict.fromkeys(shard, name))
            shard.clear()

    held = 0
    for name, (shape, tensor_dtype) in shapes.items():
        tensor = random_tensor(name, shape, tensor_dtype, device, generator).cpu()
        if held + tensor.nbytes > SHARD_BYTES:
            flush()
            held = 0
        shard[name] = tensor
        held += tensor.nbytes
    flush()
    total = sum((folder / f).stat().st_size for f in files)
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
