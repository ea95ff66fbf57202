"""GPU memory one reranker replica needs, derived from the model's architecture config alone.

The planner never reads weights: parameter counts come from the dimensions in `config.json`
(Qwen3-VL, and Qwen2.5-VL for lychee-rerank-mm), split by component because precisions treat
components differently. Only the decoder's attention and MLP projection weights are quantised;
the vision tower, the token embeddings, the lm_head, norms and biases stay in the compute dtype
(16-bit on a GPU, as the engine loads them) in every precision (quantising the vision tower costs ranking quality for little memory, and embedding
tables are lookups, not matmuls). Every figure carries a sentence saying how it was computed.

Pure functions over plain data: no I/O, no Ray, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

GIB = 1024**3
BYTES_16BIT = 2  # bf16 and fp16 are both two bytes
BYTES_32BIT = 4

# bitsandbytes nf4: 64 weights share one absmax; with double quantisation those absmax values are
# themselves quantised to 8 bits in blocks of 256, each block keeping one fp32 scale.
NF4_BLOCK = 64
NF4_DOUBLE_QUANT_BLOCK = 256
# AWQ W4A16 checkpoints as produced by AutoAWQ / llm-compressor for vLLM: group size 128.
AWQ_GROUP = 128


@dataclass(frozen=True)
class TextDims:
    """Decoder dimensions read from `text_config` (or the top level for older Qwen2.5-VL files)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool  # Qwen2.5 has biases on q/k/v; Qwen3 does not
    qk_norm: bool  # Qwen3 normalises q and k per head


@dataclass(frozen=True)
class VisionDims:
    """Vision tower dimensions read from `vision_config`."""

    depth: int
    hidden: int
    intermediate: int
    heads: int
    patch: int
    temporal_patch: int
    merge: int  # spatial merge: merge x merge patches become one decoder token
    in_channels: int
    out_hidden: int
    position_embeddings: int  # learned position table (Qwen3-VL); 0 for Qwen2.5-VL
    deepstack_layers: int  # extra mergers feeding intermediate ViT features to the decoder (Qwen3-VL)
    gated_mlp: bool  # Qwen2.5-VL's ViT MLP is SwiGLU (gate, up, down); Qwen3-VL's is fc1/fc2
    layer_norm: bool  # LayerNorm (weight and bias, Qwen3-VL) or RMSNorm (weight only, Qwen2.5-VL)
    patch_bias: bool  # Qwen3-VL's patch embedding convolution has a bias


@dataclass(frozen=True)
class Architecture:
    model_type: str
    text: TextDims
    vision: VisionDims


@dataclass(frozen=True)
class LinearShape:
    """A group of identical decoder projection matrices (one per layer)."""

    name: str
    out_features: int
    in_features: int
    count: int

    @property
    def parameters(self) -> int:
        return self.out_features * self.in_features * self.count


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters by component; `total` matches the real module's numel exactly."""

    vision_tower: int
    decoder_linears: int  # attention q/k/v/o and MLP gate/up/down weights: what quantisation touches
    decoder_small: int  # decoder norms and q/k/v biases (stay 16-bit)
    embeddings: int
    lm_head: int  # 0 when tied to the embeddings
    decoder_linear_shapes: tuple[LinearShape, ...]

    @property
    def total(self) -> int:
        return self.vision_tower + self.decoder_linears + self.decoder_small + self.embeddings + self.lm_head


@dataclass(frozen=True)
class MemoryItem:
    name: str
    bytes: int
    explanation: str

    @property
    def gib(self) -> float:
        return self.bytes / GIB


WEIGHT_ITEMS = ("decoder linears", "vision tower", "embeddings", "lm_head", "norms and biases")


@dataclass(frozen=True)
class ReplicaMemory:
    """Device memory of one replica at one precision, as a list of explained items."""

    precision: str
    label: str  # the precision as shown, e.g. "nf4 (double quant)"
    items: tuple[MemoryItem, ...]

    @property
    def total_bytes(self) -> int:
        return sum(item.bytes for item in self.items)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    @property
    def weight_bytes(self) -> int:
        """The weights alone (every `weight_items` component): what a forward pass reads once."""
        return sum(item.bytes for item in self.items if item.name in WEIGHT_ITEMS)

    def item_bytes(self, name: str) -> int:
        return sum(item.bytes for item in self.items if item.name == name)

    def explain(self) -> str:
        lines = [f"{self.label}: {self.total_gib:.2f} GiB per replica"]
        for item in self.items:
            lines.append(f"  {item.name:<24} {item.gib:7.2f} GiB  {item.explanation}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Workload:
    """What one engine micro-batch looks like, which sizes the activation workspace."""

    batch_tokens: int  # token budget of one micro-batch (padded length x rows)
    mean_pair_tokens: float  # tokens of one (query, document) pair on average
    with_images: bool  # whether image documents occur (the vision tower runs)

    @property
    def rows(self) -> int:
        return max(1, int(self.batch_tokens // self.mean_pair_tokens))


class ArchitectureError(ValueError):
    """The config.json is not a Qwen3-VL / Qwen2.5-VL architecture this model understands."""


SUPPORTED_MODEL_TYPES = ("qwen3_vl", "qwen2_5_vl")


def read_architecture(config: Mapping) -> Architecture:
    """Dimensions from a Hugging Face `config.json` dict of Qwen3-VL or Qwen2.5-VL."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ArchitectureError(
            f"model_type {model_type!r} is not supported; the memory model knows {list(SUPPORTED_MODEL_TYPES)}"
        )
    # Older Qwen2.5-VL files keep the decoder fields at the top level instead of in text_config.
    text = config.get("text_config") or config
    vision = config.get("vision_config")
    if not isinstance(vision, Mapping):
        raise ArchitectureError("config has no vision_config")
    try:
        heads = int(text["num_attention_heads"])
        hidden = int(text["hidden_size"])
        qwen3 = model_type == "qwen3_vl"
        tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
        text_dims = TextDims(
            hidden=hidden,
            intermediate=int(text["intermediate_size"]),
            layers=int(text["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(text.get("num_key_value_heads", heads)),
            head_dim=int(text.get("head_dim") or hidden // heads),
            vocab=int(text["vocab_size"]),
            tied_embeddings=tied,
            qkv_bias=not qwen3,
            qk_norm=qwen3,
        )
        vision_dims = VisionDims(
            depth=int(vision["depth"]),
            hidden=int(vision["hidden_size"]),
            intermediate=int(vision["intermediate_size"]),
            heads=int(vision["num_heads"]),
            patch=int(vision["patch_size"]),
            temporal_patch=int(vision.get("temporal_patch_size", 2)),
            merge=int(vision.get("spatial_merge_size", 2)),
            in_channels=int(vision.get("in_channels", vision.get("in_chans", 3))),
            out_hidden=int(vision.get("out_hidden_size", hidden)),
            position_embeddings=int(vision.get("num_position_embeddings", 0)) if qwen3 else 0,
            deepstack_layers=len(vision.get("deepstack_visual_indexes", ())) if qwen3 else 0,
            gated_mlp=not qwen3,
            layer_norm=qwen3,
            patch_bias=qwen3,
        )
    except KeyError as missing:
        raise ArchitectureError(f"config is missing {missing.args[0]!r}") from None
    return Architecture(model_type=model_type, text=text_dims, vision=vision_dims)


def _linear(out_features: int, in_features: int, bias: bool) -> int:
    return out_features * in_features + (out_features if bias else 0)


def _vision_parameters(v: VisionDims) -> int:
    norm = 2 * v.hidden if v.layer_norm else v.hidden
    mlp = (
        2 * _linear(v.intermediate, v.hidden, True) + _linear(v.hidden, v.intermediate, True)
        if v.gated_mlp
        else _linear(v.intermediate, v.hidden, True) + _linear(v.hidden, v.intermediate, True)
    )
    block = 2 * norm + _linear(3 * v.hidden, v.hidden, True) + _linear(v.hidden, v.hidden, True) + mlp
    patch_embed = v.hidden * v.in_channels * v.temporal_patch * v.patch * v.patch + (v.hidden if v.patch_bias else 0)
    merged = v.hidden * v.merge * v.merge
    # The final merger normalises before the 2x2 shuffle (width `hidden`); deepstack mergers after it.
    merger = norm + _linear(merged, merged, True) + _linear(v.out_hidden, merged, True)
    deepstack_merger = 2 * merged + _linear(merged, merged, True) + _linear(v.out_hidden, merged, True)
    return (
        patch_embed
        + v.position_embeddings * v.hidden
        + v.depth * block
        + merger
        + v.deepstack_layers * deepstack_merger
    )


def count_parameters(arch: Architecture) -> ParameterCounts:
    t = arch.text
    q_out = t.heads * t.head_dim
    kv_out = t.kv_heads * t.head_dim
    shapes = (
        LinearShape("q_proj", q_out, t.hidden, t.layers),
        LinearShape("k_proj", kv_out, t.hidden, t.layers),
        LinearShape("v_proj", kv_out, t.hidden, t.layers),
        LinearShape("o_proj", t.hidden, q_out, t.layers),
        LinearShape("gate_proj", t.intermediate, t.hidden, t.layers),
        LinearShape("up_proj", t.intermediate, t.hidden, t.layers),
        LinearShape("down_proj", t.hidden, t.intermediate, t.layers),
    )
    per_layer_small = 2 * t.hidden  # input and post-attention RMSNorm
    if t.qk_norm:
        per_layer_small += 2 * t.head_dim
    if t.qkv_bias:
        per_layer_small += q_out + 2 * kv_out
    embeddings = t.vocab * t.hidden
    return ParameterCounts(
        vision_tower=_vision_parameters(arch.vision),
        decoder_linears=sum(s.parameters for s in shapes),
        decoder_small=t.layers * per_layer_small + t.hidden,  # + the final norm
        embeddings=embeddings,
        lm_head=0 if t.tied_embeddings else embeddings,
        decoder_linear_shapes=shapes,
    )


def quantized_matrix_bytes(precision: str, out_features: int, in_features: int, *, nf4_double_quant: bool) -> int:
    """Bytes one decoder weight matrix occupies at `precision`, scales and absmax included."""
    n = out_features * in_features
    if precision == "fp32":
        return n * BYTES_32BIT
    if precision in ("bf16", "fp16"):
        return n * BYTES_16BIT
    if precision == "int8":
        # LLM.int8: one int8 per weight plus one fp32 absmax per output row (`SCB`).
        return n + 4 * out_features
    if precision == "nf4":
        blocks = math.ceil(n / NF4_BLOCK)
        packed = math.ceil(n / 2)
        if nf4_double_quant:
            # 8-bit absmax per block, one fp32 scale per 256 blocks, and one fp32 offset.
            return packed + blocks + 4 * math.ceil(blocks / NF4_DOUBLE_QUANT_BLOCK) + 4
        return packed + 4 * blocks
    if precision == "awq":
        groups = math.ceil(in_features / AWQ_GROUP)
        # 4-bit weights packed into int32, an fp16 scale and a 4-bit zero point per group and column.
        return math.ceil(n / 2) + groups * out_features * BYTES_16BIT + math.ceil(groups * out_features / 2)
    if precision == "fp8":
        # float8_e4m3 weights with one fp32 scale per matrix (per-tensor scaling, as vLLM's fp8).
        return n + 4
    raise ValueError(f"no memory rule for precision {precision!r}")


def unquantized_bytes(precision: str, *, on_cpu: bool = False) -> int:
    """Bytes per parameter of what no precision quantises (vision tower, embeddings, lm_head,
    norms): the engine's compute dtype (engine.model.compute_dtype_for): 32-bit at fp32, and on
    CPU for the quantised precisions too (16-bit matmuls are slow there); 16-bit otherwise."""
    if precision == "fp32" or (on_cpu and precision not in ("bf16", "fp16")):
        return BYTES_32BIT
    return BYTES_16BIT


_QUANT_RULE = {
    "fp32": "4 bytes per weight (a CPU reference precision)",
    "bf16": "2 bytes per weight",
    "fp16": "2 bytes per weight",
    "int8": "1 byte per weight + a 4-byte fp32 absmax per output row",
    "nf4": None,  # depends on double quantisation, filled in below
    "awq": f"4-bit weights + per {AWQ_GROUP}-input group an fp16 scale and a 4-bit zero (~0.52 B/weight)",
    "fp8": "1 byte per weight + one fp32 scale per matrix",
}


def _nf4_rule(double_quant: bool) -> str:
    if double_quant:
        return (
            f"4-bit weights + an 8-bit absmax per {NF4_BLOCK} weights + an fp32 scale per "
            f"{NF4_DOUBLE_QUANT_BLOCK} blocks (double quant, ~0.516 B/weight)"
        )
    return f"4-bit weights + an fp32 absmax per {NF4_BLOCK} weights (~0.5625 B/weight)"


def weight_items(counts: ParameterCounts, precision: str, *, nf4_double_quant: bool, on_cpu: bool = False) -> list[MemoryItem]:
    """The weights at `precision`, by component; `on_cpu`: as the engine holds them on a CPU."""
    width = unquantized_bytes(precision, on_cpu=on_cpu)
    kept = f"kept {8 * width}-bit ({width} bytes)"
    linear_bytes = sum(
        s.count * quantized_matrix_bytes(precision, s.out_features, s.in_features, nf4_double_quant=nf4_double_quant)
        for s in counts.decoder_linear_shapes
    )
    rule = _nf4_rule(nf4_double_quant) if precision == "nf4" else _QUANT_RULE[precision]
    items = [
        MemoryItem(
            "decoder linears",
            linear_bytes,
            f"{counts.decoder_linears:,} attention/MLP projection weights at {precision}: {rule}",
        ),
        MemoryItem(
            "vision tower",
            counts.vision_tower * width,
            f"{counts.vision_tower:,} ViT + merger parameters, {kept}",
        ),
        MemoryItem(
            "embeddings",
            counts.embeddings * width,
            f"{counts.embeddings:,} token-embedding parameters, {kept} (a lookup, not a matmul)",
        ),
        MemoryItem(
            "lm_head",
            counts.lm_head * width,
            f"{counts.lm_head:,} output-projection parameters, {kept}"
            if counts.lm_head
            else "tied to the embeddings: no extra memory",
        ),
        MemoryItem(
            "norms and biases",
            counts.decoder_small * width,
            f"{counts.decoder_small:,} decoder norm/bias parameters, {kept}",
        ),
    ]
    return items


def kernel_scratch_item(counts: ParameterCounts, precision: str, workload: Workload) -> MemoryItem:
    """Transient buffers the quantised matmul kernels need on top of the activations."""
    largest = max(counts.decoder_linear_shapes, key=lambda s: s.out_features * s.in_features)
    widest_in = max(s.in_features for s in counts.decoder_linear_shapes)
    widest_out = max(s.out_features for s in counts.decoder_linear_shapes)
    tokens = workload.batch_tokens
    if precision == "nf4":
        return MemoryItem(
            "kernel scratch",
            largest.out_features * largest.in_features * BYTES_16BIT,
            f"bitsandbytes dequantises one weight to 16-bit per matmul: largest is {largest.name} "
            f"{largest.out_features}x{largest.in_features}",
        )
    if precision == "int8":
        return MemoryItem(
            "kernel scratch",
            tokens * widest_in + tokens * widest_out * 4,
            f"LLM.int8 quantises the input ({tokens} tokens x {widest_in} x 1 byte) and accumulates "
            f"in int32 ({tokens} x {widest_out} x 4 bytes)",
        )
    if precision == "fp8":
        return MemoryItem(
            "kernel scratch",
            tokens * widest_in,
            f"fp8 GEMMs quantise the input: {tokens} tokens x {widest_in} x 1 byte",
        )
    if precision == "awq":
        return MemoryItem("kernel scratch", 0, "AWQ-Marlin kernels read packed weights directly: no dequantised copy")
    return MemoryItem("kernel scratch", 0, "16-bit matmuls need no extra buffers beyond the activations")


def activation_item(arch: Architecture, workload: Workload) -> MemoryItem:
    """Peak activation memory of one micro-batch, forward only (no KV cache: a reranker scores, never decodes)."""
    t, v = arch.text, arch.vision
    a = BYTES_16BIT
    b = workload.batch_tokens
    residual = 2 * b * t.hidden * a  # residual stream + its normalised copy
    attention = b * (t.heads + 2 * t.kv_heads) * t.head_dim * a + b * t.heads * t.head_dim * a  # q,k,v + output
    mlp = 3 * b * t.intermediate * a  # gate, up, and act(gate)*up
    decoder_peak = residual + max(attention, mlp)
    logits = workload.rows * t.vocab * 4  # fp32 logits of each pair's last token only
    parts = [
        f"decoder {b} tokens: residual 2x{t.hidden} + max(attention, MLP 3x{t.intermediate}) at 2 bytes",
        f"last-token fp32 logits for {workload.rows} pairs",
    ]
    peak = decoder_peak
    visual_hold = 0
    if workload.with_images:
        patches = b * v.merge * v.merge  # worst case: the whole batch budget is image tokens
        v_residual = 2 * patches * v.hidden * a
        v_attention = 4 * patches * v.hidden * a
        v_mlp = (3 if v.gated_mlp else 2) * patches * v.intermediate * a
        peak = max(decoder_peak, v_residual + max(v_attention, v_mlp))
        # The merged image features (and the deepstack features) live until the decoder has used them.
        visual_hold = (1 + v.deepstack_layers) * b * t.hidden * a
        parts.append(f"ViT over {patches} patches (batch all images) and {1 + v.deepstack_layers} held feature maps")
    return MemoryItem(
        "activations",
        peak + visual_hold + logits,
        "; ".join(parts) + " (flash/SDPA attention: no score matrix)",
    )


def replica_memory(
    arch: Architecture,
    precision: str,
    workload: Workload,
    *,
    runtime_overhead_bytes: int,
    nf4_double_quant: bool = True,
    on_cpu: bool = False,
) -> ReplicaMemory:
    counts = count_parameters(arch)
    items = weight_items(counts, precision, nf4_double_quant=nf4_double_quant, on_cpu=on_cpu)
    items.append(kernel_scratch_item(counts, precision, workload))
    items.append(activation_item(arch, workload))
    items.append(
        MemoryItem(
            "runtime overhead",
            runtime_overhead_bytes,
            "CUDA context, kernel images, cuBLAS workspaces and allocator fragmentation (a planner input)",
        )
    )
    label = precision if precision != "nf4" else ("nf4 (double quant)" if nf4_double_quant else "nf4 (no double quant)")
    return ReplicaMemory(precision=precision, label=label, items=tuple(items))
