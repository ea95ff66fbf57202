"""Pairs per second one replica sustains on one GPU at one precision: the profile table.

Each entry is either *measured* (`placement.profiles`: load-test capacity or engine benchmark
reports made on that GPU) or a *roofline* estimate, and says which. The roofline:

- FLOPs of one (query, document) pair: 2 x decoder projection parameters x pair tokens, plus
  causal attention 2 x layers x tokens^2 x heads x head_dim, plus the last-token lm_head; an image
  document adds the vision tower: 2 x ViT weights x patches, full attention 4 x depth x patches^2 x
  width, and the mergers.
- A micro-batch of `batch_tokens` holds `rows` pairs and reads every weight once, so its time is
  max(FLOPs / peak FLOP/s, weight bytes / bandwidth) / efficiency. The efficiency factor per
  precision (KERNEL_EFFICIENCY) is the share of the roofline that kind of kernel reaches in
  practice; it is stated in every entry.

Pure functions over plain data: no I/O and no pydantic (the GPU check imports them on a machine
that has neither Ray nor pydantic).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from placement.hardware import GpuModel
from placement.memory import Architecture, ParameterCounts

# Share of the roofline each kernel family reaches on prefill-sized batches.
KERNEL_EFFICIENCY: dict[str, float] = {
    "bf16": 0.50,  # cuBLAS 16-bit GEMMs inside an eager PyTorch forward
    "fp16": 0.50,
    "fp8": 0.45,  # scaled fp8 GEMMs plus the activation quantisation they need
    "awq": 0.40,  # AWQ-Marlin W4A16: 16-bit math, dequantisation fused into the GEMM
    "nf4": 0.30,  # bitsandbytes dequantises every weight to 16-bit before each matmul
    "int8": 0.20,  # LLM.int8 splits outlier columns into a separate fp16 matmul
}

ThroughputSource = Literal["measured", "roofline"]


@dataclass(frozen=True)
class PairShape:
    """The traffic's (query, document) pairs as token counts."""

    text_pair_tokens: int  # instruction + query + a text document
    image_pair_tokens: int  # instruction + query + an image's visual tokens
    image_tokens: int  # visual tokens of one image after the spatial merge
    image_share: float  # fraction of documents that are images

    @property
    def mean_pair_tokens(self) -> float:
        return (1 - self.image_share) * self.text_pair_tokens + self.image_share * self.image_pair_tokens


@dataclass(frozen=True)
class ThroughputEstimate:
    gpu: str
    precision: str
    pairs_per_s: float
    source: ThroughputSource
    detail: str


def _decoder_pair_flops(arch: Architecture, counts: ParameterCounts, tokens: int) -> float:
    t = arch.text
    projections = 2.0 * counts.decoder_linears * tokens
    causal_attention = 2.0 * t.layers * tokens * tokens * t.heads * t.head_dim
    last_token_head = 2.0 * t.vocab * t.hidden
    return projections + causal_attention + last_token_head


def vision_image_flops(arch: Architecture, image_tokens: int) -> float:
    v = arch.vision
    patches = image_tokens * v.merge * v.merge
    mlp_weights = (3 if v.gated_mlp else 2) * v.hidden * v.intermediate
    block_weights = 4 * v.hidden * v.hidden + mlp_weights  # qkv (3h^2) + proj (h^2) + MLP
    merged = v.hidden * v.merge * v.merge
    merger_weights = merged * merged + v.out_hidden * merged
    return (
        2.0 * v.depth * block_weights * patches
        + 4.0 * v.depth * patches * patches * v.hidden  # bidirectional attention within the image
        + 2.0 * (1 + v.deepstack_layers) * merger_weights * image_tokens
    )


def mean_pair_flops(arch: Architecture, counts: ParameterCounts, shape: PairShape) -> float:
    text = _decoder_pair_flops(arch, counts, shape.text_pair_tokens)
    image = _decoder_pair_flops(arch, counts, shape.image_pair_tokens) + vision_image_flops(arch, shape.image_tokens)
    return (1 - shape.image_share) * text + shape.image_share * image


def roofline_estimate(
    gpu: GpuModel,
    precision: str,
    arch: Architecture,
    counts: ParameterCounts,
    shape: PairShape,
    *,
    batch_tokens: int,
    weight_bytes: int,
) -> ThroughputEstimate:
    peak_tflops = gpu.peak_tflops(precision)
    efficiency = KERNEL_EFFICIENCY[precision]
    if peak_tflops is None:
        return ThroughputEstimate(gpu.key, precision, 0.0, "roofline", f"{gpu.key} has no {precision} tensor cores")
    rows = max(1, int(batch_tokens // shape.mean_pair_tokens))
    batch_flops = rows * mean_pair_flops(arch, counts, shape)
    compute_s = batch_flops / (peak_tflops * 1e12)
    memory_s = weight_bytes / (gpu.bandwidth_gbps * 1e9)
    bound = "compute" if compute_s >= memory_s else "bandwidth"
    pairs_per_s = rows * efficiency / max(compute_s, memory_s)
    detail = (
        f"roofline: {rows} pairs/batch x {batch_flops / rows / 1e12:.2f} TFLOP/pair at {peak_tflops:g} TFLOP/s "
        f"vs {weight_bytes / 1e9:.1f} GB weights at {gpu.bandwidth_gbps:g} GB/s -> {bound}-bound, "
        f"x {efficiency:.2f} {precision} kernel efficiency"
    )
    return ThroughputEstimate(gpu.key, precision, pairs_per_s, "roofline", detail)


def roofline_vision_ms(gpu: GpuModel, arch: Architecture, image_tokens: int) -> float:
    """Milliseconds of the vision tower on one `image_tokens` image by the roofline: the tower runs
    in 16-bit on every arm (quantised arms quantise the decoder only)."""
    return vision_image_flops(arch, image_tokens) / (gpu.fp16_tflops * 1e12 * KERNEL_EFFICIENCY["bf16"]) * 1e3
