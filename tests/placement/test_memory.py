"""The memory model against a hand calculation, and its parameter counts against the real modules."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from placement.memory import (
    GIB,
    ArchitectureError,
    Workload,
    count_parameters,
    read_architecture,
    replica_memory,
)

# The workload the hand calculation assumes: a 16384-token micro-batch of 512-token pairs
# (32 pairs) with image documents, and 1 GiB of runtime overhead.
WORKLOAD = Workload(batch_tokens=16384, mean_pair_tokens=512, with_images=True)
OVERHEAD = 1 * GIB


# ---- Qwen3-VL-8B by hand ------------------------------------------------------------------
# Vision tower: hidden 1152, MLP 4304, 27 blocks, 3x3 -> 4608-wide mergers to 4096, 3 deepstack mergers.
V8_PATCH_EMBED = 1152 * 3 * 2 * 16 * 16 + 1152  # Conv3d weight + bias = 1,770,624
V8_POS_EMBED = 2304 * 1152  # 2,654,208
V8_BLOCK = (
    4 * 1152  # two LayerNorms, weight + bias
    + (3456 * 1152 + 3456)  # qkv
    + (1152 * 1152 + 1152)  # proj
    + (4304 * 1152 + 4304)  # fc1
    + (1152 * 4304 + 1152)  # fc2
)  # 15,239,504
V8_MERGER = 2 * 1152 + (4608 * 4608 + 4608) + (4096 * 4608 + 4096)  # 40,119,040
V8_DEEPSTACK = 2 * 4608 + (4608 * 4608 + 4608) + (4096 * 4608 + 4096)  # 40,125,952
V8_VISION = V8_PATCH_EMBED + V8_POS_EMBED + 27 * V8_BLOCK + V8_MERGER + 3 * V8_DEEPSTACK
# Decoder: hidden 4096, 32 q heads and 8 kv heads of 128, MLP 12288, 36 layers, vocab 151936, untied.
V8_LAYER_LINEARS = 4096 * 4096 + 1024 * 4096 + 1024 * 4096 + 4096 * 4096 + 3 * 12288 * 4096  # 192,937,984
V8_LINEARS = 36 * V8_LAYER_LINEARS  # 6,945,767,424
V8_SMALL = 36 * (2 * 4096 + 2 * 128) + 4096  # RMSNorms + q/k norms + final norm = 308,224
V8_EMBED = 151936 * 4096  # 622,329,856, and the same again for the untied lm_head
V8_TOTAL = V8_VISION + V8_LINEARS + V8_SMALL + 2 * V8_EMBED

# ---- Qwen3-VL-2B by hand ------------------------------------------------------------------
V2_PATCH_EMBED = 1024 * 3 * 2 * 16 * 16 + 1024
V2_POS_EMBED = 2304 * 1024
V2_BLOCK = 4 * 1024 + (3072 * 1024 + 3072) + (1024 * 1024 + 1024) + (4096 * 1024 + 4096) + (1024 * 4096 + 1024)
V2_MERGER = 2 * 1024 + (4096 * 4096 + 4096) + (2048 * 4096 + 2048)
V2_DEEPSTACK = 2 * 4096 + (4096 * 4096 + 4096) + (2048 * 4096 + 2048)
V2_VISION = V2_PATCH_EMBED + V2_POS_EMBED + 24 * V2_BLOCK + V2_MERGER + 3 * V2_DEEPSTACK
# Decoder: hidden 2048, 16 q heads and 8 kv heads of 128, MLP 6144, 28 layers, embeddings tied.
V2_LAYER_LINEARS = 2048 * 2048 + 1024 * 2048 + 1024 * 2048 + 2048 * 2048 + 3 * 6144 * 2048  # 50,331,648
V2_LINEARS = 28 * V2_LAYER_LINEARS
V2_SMALL = 28 * (2 * 2048 + 2 * 128) + 2048
V2_EMBED = 151936 * 2048
V2_TOTAL = V2_VISION + V2_LINEARS + V2_SMALL + V2_EMBED


def test_parameter_counts_match_the_hand_calculation(qwen3_vl_8b, qwen3_vl_2b):
    c8 = count_parameters(read_architecture(qwen3_vl_8b))
    assert (c8.vision_tower, c8.decoder_linears, c8.decoder_small, c8.embeddings, c8.lm_head) == (
        V8_VISION, V8_LINEARS, V8_SMALL, V8_EMBED, V8_EMBED
    )
    assert c8.total == V8_TOTAL == 8_767_123_696
    c2 = count_parameters(read_architecture(qwen3_vl_2b))
    assert (c2.vision_tower, c2.decoder_linears, c2.decoder_small, c2.embeddings, c2.lm_head) == (
        V2_VISION, V2_LINEARS, V2_SMALL, V2_EMBED, 0
    )
    assert c2.total == V2_TOTAL == 2_127_532_032


def _layer_rows(hidden: int, kv: int, intermediate: int) -> int:
    """Output rows of one layer's seven projections (q, k, v, o, gate, up, down)."""
    return hidden + kv + kv + hidden + intermediate + intermediate + hidden


# Decoder-linear bytes per precision, by hand. Every matrix size divides by 64 (nf4 blocks) and
# every input width by 128 (AWQ groups), so the per-weight factors are exact.
def _hand_linear_bytes(n: int, layers: int, rows_per_layer: int, nf4_blocks: list[int]) -> dict[str, int]:
    second_level = sum(-(-b // 256) for b in nf4_blocks)  # one fp32 per 256 absmax blocks, per matrix
    return {
        "bf16": 2 * n,
        "fp16": 2 * n,
        "int8": n + 4 * rows_per_layer * layers,  # 1 byte/weight + fp32 absmax per output row
        "nf4": n // 2 + n // 64 + layers * (4 * second_level + 7 * 4),  # double quant: 8-bit absmax + fp32 + offsets
        "nf4-plain": n // 2 + 4 * (n // 64),  # fp32 absmax per 64 weights
        "awq": n // 2 + (n // 128) * 2 + (n // 128) // 2,  # 4-bit weights + fp16 scale + 4-bit zero per 128
        "fp8": n + 7 * 4 * layers,  # 1 byte/weight + one fp32 scale per matrix
    }


V8_LINEAR_BYTES = _hand_linear_bytes(
    V8_LINEARS,
    36,
    _layer_rows(4096, 1024, 12288),
    [4096 * 4096 // 64, 1024 * 4096 // 64, 1024 * 4096 // 64, 4096 * 4096 // 64] + [12288 * 4096 // 64] * 3,
)
V2_LINEAR_BYTES = _hand_linear_bytes(
    V2_LINEARS,
    28,
    _layer_rows(2048, 1024, 6144),
    [2048 * 2048 // 64, 1024 * 2048 // 64, 1024 * 2048 // 64, 2048 * 2048 // 64] + [6144 * 2048 // 64] * 3,
)

# Activations at 16384 tokens: residual (2 copies) + the larger of attention and the MLP, or the
# ViT over 4 x 16384 patches when that is larger, plus the held image/deepstack features (4 maps)
# and fp32 last-token logits for 32 pairs.
T = 16384
V8_DECODER_PEAK = 2 * T * 4096 * 2 + max(T * (32 + 16) * 128 * 2 + T * 4096 * 2, 3 * T * 12288 * 2)
V8_VIT_PEAK = 2 * 4 * T * 1152 * 2 + max(4 * 4 * T * 1152 * 2, 2 * 4 * T * 4304 * 2)
V8_ACTIVATIONS = max(V8_DECODER_PEAK, V8_VIT_PEAK) + 4 * T * 4096 * 2 + 32 * 151936 * 4
V2_DECODER_PEAK = 2 * T * 2048 * 2 + max(T * (16 + 16) * 128 * 2 + T * 2048 * 2, 3 * T * 6144 * 2)
V2_VIT_PEAK = 2 * 4 * T * 1024 * 2 + max(4 * 4 * T * 1024 * 2, 2 * 4 * T * 4096 * 2)
V2_ACTIVATIONS = max(V2_DECODER_PEAK, V2_VIT_PEAK) + 4 * T * 2048 * 2 + 32 * 151936 * 4

# Kernel scratch: nf4 dequantises the largest weight to 16-bit; int8 quantises the input (1 byte)
# and accumulates in int32 (4 bytes) at the widest in/out; fp8 quantises the input.
V8_SCRATCH = {"nf4": 12288 * 4096 * 2, "nf4-plain": 12288 * 4096 * 2, "int8": T * 12288 + T * 12288 * 4, "fp8": T * 12288}
V2_SCRATCH = {"nf4": 6144 * 2048 * 2, "nf4-plain": 6144 * 2048 * 2, "int8": T * 6144 + T * 6144 * 4, "fp8": T * 6144}

V8_SIXTEEN_BIT_REST = 2 * (V8_VISION + V8_SMALL + 2 * V8_EMBED)
V2_SIXTEEN_BIT_REST = 2 * (V2_VISION + V2_SMALL + V2_EMBED)

CASES = [
    (name, variant)
    for name in ("8b", "2b")
    for variant in ("bf16", "fp16", "int8", "nf4", "nf4-plain", "awq", "fp8")
]


@pytest.mark.parametrize(("model", "variant"), CASES)
def test_replica_memory_matches_the_hand_calculation(model, variant, qwen3_vl_8b, qwen3_vl_2b):
    config = qwen3_vl_8b if model == "8b" else qwen3_vl_2b
    linear_bytes = (V8_LINEAR_BYTES if model == "8b" else V2_LINEAR_BYTES)[variant]
    rest = V8_SIXTEEN_BIT_REST if model == "8b" else V2_SIXTEEN_BIT_REST
    scratch = (V8_SCRATCH if model == "8b" else V2_SCRATCH).get(variant, 0)
    activations = V8_ACTIVATIONS if model == "8b" else V2_ACTIVATIONS
    precision = "nf4" if variant.startswith("nf4") else variant
    memory = replica_memory(
        read_architecture(config),
        precision,
        WORKLOAD,
        runtime_overhead_bytes=OVERHEAD,
        nf4_double_quant=variant != "nf4-plain",
    )
    items = {item.name: item.bytes for item in memory.items}
    assert items["decoder linears"] == linear_bytes
    assert items["kernel scratch"] == scratch
    assert items["activations"] == activations
    assert memory.total_bytes == linear_bytes + rest + scratch + activations + OVERHEAD
    assert all(item.explanation for item in memory.items)


def test_headline_figures(qwen3_vl_8b, qwen3_vl_2b):
    """The figures docs/PLACEMENT.md quotes, rounded as it rounds them."""

    def total(config, precision, **kw):
        return round(replica_memory(read_architecture(config), precision, WORKLOAD, runtime_overhead_bytes=OVERHEAD, **kw).total_gib, 2)

    # 8B bf16 weights alone are 16.33 GiB: 8,767,123,696 parameters x 2 bytes.
    assert round(2 * V8_TOTAL / GIB, 2) == 16.33
    assert total(qwen3_vl_8b, "bf16") == 19.22
    assert total(qwen3_vl_8b, "nf4") == 9.72
    assert total(qwen3_vl_2b, "bf16") == 6.48


def _components(model) -> dict[str, int]:
    out = {"vision": 0, "linears": 0, "small": 0, "embeddings": 0, "lm_head": 0}
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # a tied lm_head is the embedding table itself
            continue
        seen.add(id(p))
        if name.startswith("model.visual"):
            out["vision"] += p.numel()
        elif "embed_tokens" in name:
            out["embeddings"] += p.numel()
        elif name.startswith("lm_head"):
            out["lm_head"] += p.numel()
        elif name.endswith("proj.weight"):
            out["linears"] += p.numel()
        else:
            out["small"] += p.numel()
    return out


QWEN25_VL_7B = {  # lychee-rerank-mm's base architecture (Qwen2.5-VL-7B), decoder fields at the top level
    "model_type": "qwen2_5_vl",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
}


@pytest.mark.parametrize("which", ["qwen3-vl-8b", "qwen3-vl-2b", "qwen2.5-vl-7b"])
def test_counts_equal_the_real_modules_numel_per_component(which, qwen3_vl_8b, qwen3_vl_2b):
    """Instantiate the transformers model on the meta device (no memory) and compare exactly."""
    if which == "qwen2.5-vl-7b":
        config, hf_config, cls = QWEN25_VL_7B, Qwen2_5_VLConfig.from_dict(QWEN25_VL_7B), Qwen2_5_VLForConditionalGeneration
    else:
        config = qwen3_vl_8b if which == "qwen3-vl-8b" else qwen3_vl_2b
        hf_config, cls = Qwen3VLConfig.from_dict(config), Qwen3VLForConditionalGeneration
    with torch.device("meta"):
        model = cls(hf_config)
    counts = count_parameters(read_architecture(config))
    assert _components(model) == {
        "vision": counts.vision_tower,
        "linears": counts.decoder_linears,
        "small": counts.decoder_small,
        "embeddings": counts.embeddings,
        "lm_head": counts.lm_head,
    }
    assert sum(p.numel() for p in model.parameters()) == counts.total


def test_model_configs_are_the_published_architectures(qwen3_vl_8b, qwen3_vl_2b):
    for config in (qwen3_vl_8b, qwen3_vl_2b):
        assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]
        assert config["model_type"] == "qwen3_vl"
        assert Qwen3VLConfig.from_dict(config).text_config.rope_parameters["mrope_section"] == [24, 20, 20]
    assert qwen3_vl_8b["tie_word_embeddings"] is False and qwen3_vl_2b["tie_word_embeddings"] is True
    assert qwen3_vl_8b["vision_config"]["deepstack_visual_indexes"] == [8, 16, 24]
    assert qwen3_vl_2b["vision_config"]["deepstack_visual_indexes"] == [5, 11, 17]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "llama"}, "not supported"),
        ({"model_type": "qwen3_vl", "text_config": {"hidden_size": 8}}, "vision_config"),
        ({"model_type": "qwen3_vl", "text_config": {"hidden_size": 8}, "vision_config": {"depth": 1}}, "missing"),
    ],
)
def test_unreadable_architectures_are_refused(config, message):
    with pytest.raises(ArchitectureError, match=message):
        read_architecture(config)
