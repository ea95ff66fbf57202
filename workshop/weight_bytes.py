"""What a loaded model actually holds, by component, in the planner's memory model's terms.

Every parameter and persistent buffer is counted once (a tied lm_head shares the embedding's
storage), and so is the quantization state bitsandbytes keeps beside its packed weights: NF4's
absmax (quantized again with double quantization: `state2`) and code tables, LLM.int8's per-row
scales (`SCB`). Components: the names `placement.memory.weight_items` gives its predictions.
"""

from __future__ import annotations

import torch

DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COMPONENTS = ("decoder linears", "vision tower", "embeddings", "lm_head", "norms and biases")


def component_of(name: str) -> str:
    """The memory model's component of a parameter of Qwen3-VL / Qwen2.5-VL, by its name."""
    if ".visual." in f".{name}":
        return "vision tower"
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in DECODER_PROJECTIONS and parts[-1] == "weight":
        return "decoder linears"
    return "norms and biases"


def _quant_state_tensors(param) -> list[torch.Tensor]:
    """The tensors bitsandbytes keeps beside a packed weight (none for a plain tensor)."""
    found = []
    scb = getattr(param, "SCB", None)  # LLM.int8: one fp32 absmax per output row
    if isinstance(scb, torch.Tensor):
        found.append(scb)
    state = getattr(param, "quant_state", None)  # NF4: absmax, code, offset, and state2 under double quantization
    while state is not None:
        for attr in ("absmax", "code", "offset"):
            value = getattr(state, attr, None)
            if isinstance(value, torch.Tensor):
                found.append(value)
        state = getattr(state, "state2", None)
    return found


def held_weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes held per component, plus "quantization state" (counted inside "decoder linears" too,
    as the memory model counts it) and "buffers" (rotary tables and the like, in no component)."""
    held = dict.fromkeys(COMPONENTS, 0)
    held["quantization state"] = 0
    seen: set = set()

    def once(t: torch.Tensor) -> int:
        key = (t.data_ptr(), t.numel()) if t.device.type != "meta" else id(t)
        if key in seen or t.numel() == 0:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    for name, param in model.named_parameters():
        component = component_of(name)
        held[component] += once(param)
        state = sum(once(t) for t in _quant_state_tensors(param))
        held[component] += state
        held["quantization state"] += state
    held["buffers"] = sum(once(b) for _, b in model.named_buffers())
    return held


def decoder_matmul_parameters(model: torch.nn.Module) -> int:
    """Weights the decoder multiplies each token by (its projections; quantized ones counted
    by shape, not by packed storage): FLOPs per decoder token = 2 x this."""
    language_model = model.model.language_model
    return sum(m.in_features * m.out_features for name, m in language_model.named_modules() if name.split(".")[-1] in DECODER_PROJECTIONS)
