"""Pairs per second one replica sustains on one GPU at one precision: the profile table.

Each entry is either *measured* or a *roofline* estimate, and says which. Measured, in order of
preference: a `rerank-fleet loadtest --capacity` report made on that GPU (requests/s the arm
served end to end with p95 within its SLO, times documents per request), or a `rerank-fleet
bench engine --out` report (the engine alone: the best pairs/s over its batch sizes). The roofline:

- FLOPs of one (query, document) pair: 2 x decoder projection parameters x pair tokens, plus
  causal attention 2 x layers x tokens^2 x heads x head_dim, plus the last-token lm_head; an image
  document adds the vision tower: 2 x ViT weights x patches, full attention 4 x depth x patches^2 x
  width, and the mergers.
- A micro-batch of `batch_tokens` holds `rows` pairs and reads every weight once, so its time is
  max(FLOPs / peak FLOP/s, weight bytes / bandwidth) / efficiency. The efficiency factor per
  precision (KERNEL_EFFICIENCY) is the share of the roofline that kind of kernel reaches in
  practice; it is stated in every entry.

The pure functions take plain data; `BenchEngineReport` parses the JSON that `bench engine` writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from placement.hardware import GpuModel, gpu_for_device_name
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


class BenchEngineRow(BaseModel):
    """One row of a `bench engine` report: one precision at one batch size, or why it was skipped."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    precision: str = Field(..., description="Precision measured.")
    batch_size: int | None = Field(None, ge=1, description="Pairs per engine call.")
    pairs_per_s: float | None = Field(None, gt=0, description="Pairs per second at this batch size.")
    skipped: str | None = Field(None, description="Why this precision did not run on the device.")


class BenchVisionRow(BaseModel):
    """The vision tower's time on one image, as `bench engine` measures it per precision."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    precision: str = Field(..., description="Precision of the arm whose tower ran.")
    image_tokens: int = Field(..., ge=1, description="Merged visual tokens of the image.")
    ms_per_image: float = Field(..., gt=0, description="Milliseconds of the tower alone (no decoding or resizing).")


class BenchEngineReport(BaseModel):
    """The JSON `rerank-fleet bench engine --out FILE` writes: one model on one device."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str = Field(..., description="Model benchmarked (hub id, folder, or 'tiny'), matched against the inventory.")
    device: str = Field(..., description="Device name as CUDA reports it, e.g. 'NVIDIA L4'.")
    image_share: float | None = Field(None, ge=0, le=1, description="Share of image documents in the bench workload.")
    mean_pair_tokens: float | None = Field(
        None, gt=0, description="Mean tokens per pair in the bench workload; when given, figures are rescaled to the traffic."
    )
    rows: list[BenchEngineRow] = Field(..., description="Measured rows per precision and batch size.")
    vision: list[BenchVisionRow] = Field(default_factory=list, description="Vision-tower time per image, per precision.")

    def best_pairs_per_s(self, precision: str) -> BenchEngineRow | None:
        """The row with the highest pairs/s for `precision`: the batcher fills batches under load."""
        measured = [r for r in self.rows if r.precision == precision and r.pairs_per_s]
        return max(measured, key=lambda r: r.pairs_per_s) if measured else None


def measured_estimate(report: BenchEngineReport, row: BenchEngineRow, gpu: GpuModel, shape: PairShape) -> ThroughputEstimate:
    """A measured figure, rescaled by tokens per pair when the report says its pair length."""
    rate = row.pairs_per_s
    detail = f"measured by bench engine on {report.device}: {row.pairs_per_s:.1f} pairs/s at batch {row.batch_size}"
    if report.mean_pair_tokens is not None:
        # Prefill cost is close to linear in tokens, so pairs/s scale inversely with pair length.
        rate = row.pairs_per_s * report.mean_pair_tokens / shape.mean_pair_tokens
        detail += f" with {report.mean_pair_tokens:g} tokens/pair, rescaled to {shape.mean_pair_tokens:.0f}"
    else:
        detail += " (bench workload; the report gives no tokens per pair to rescale by)"
    return ThroughputEstimate(gpu.key, row.precision, rate, "measured", detail)


def find_vision_ms(
    reports: Sequence[BenchEngineReport], gpu: GpuModel, precision: str, model_ids: set[str], arch: Architecture, image_tokens: int
) -> tuple[float, str] | None:
    """(ms, detail) of the vision tower on an `image_tokens` image for this GPU, precision and model,
    from a measured report, rescaled from the measured image by the tower's FLOPs; None if none has it."""
    for report in reports:
        if report.model in model_ids and gpu_for_device_name(report.device) == gpu.key:
            for row in report.vision:
                if row.precision == precision:
                    ms = row.ms_per_image * vision_image_flops(arch, image_tokens) / vision_image_flops(arch, row.image_tokens)
                    return ms, f"measured by bench engine on {report.device} ({row.ms_per_image:.1f} ms at {row.image_tokens} tokens)"
    return None


def find_measured(
    reports: list[BenchEngineReport], gpu: GpuModel, precision: str, model_ids: set[str], shape: PairShape
) -> ThroughputEstimate | None:
    """The measured entry for this GPU, precision and model, if a report has one."""
    for report in reports:
        if report.model in model_ids and gpu_for_device_name(report.device) == gpu.key:
            row = report.best_pairs_per_s(precision)
            if row is not None:
                return measured_estimate(report, row, gpu, shape)
    return None


class CapacityArm(BaseModel):
    """One arm of a `loadtest --capacity` report."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    arm: str = Field(..., description="Arm name in the measured fleet.")
    precision: str | None = Field(None, description="The arm's precision.")
    device: str | None = Field(None, description="What its replicas ran on, as CUDA names it (or 'cpu').")
    replicas: int = Field(1, ge=1, description="Replicas the arm had while measured.")
    capacity_rps: float = Field(..., ge=0, description="Highest requests/s of the whole arm with p95 within the SLO.")
    pairs_per_s: float = Field(..., ge=0, description="capacity_rps x documents per request (the whole arm).")


class CapacityReport(BaseModel):
    """The `capacity.json` that `rerank-fleet loadtest --capacity` writes."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str = Field(..., description="Model served (its id), matched against the inventory.")
    slo_p95_ms: float = Field(..., gt=0, description="The p95 latency each arm had to keep.")
    docs_per_request: int = Field(..., ge=1, description="Documents per request of the load.")
    arms: list[CapacityArm] = Field(..., description="Measured arms.")


def find_capacity(reports: list[CapacityReport], gpu: GpuModel, precision: str, model_ids: set[str]) -> ThroughputEstimate | None:
    """The load-tested capacity of this precision on this GPU and model, if a report has one."""
    for report in reports:
        if report.model not in model_ids:
            continue
        for arm in report.arms:
            if arm.precision == precision and arm.device and gpu_for_device_name(arm.device) == gpu.key and arm.pairs_per_s > 0:
                detail = (f"measured by loadtest --capacity on {arm.device} (arm {arm.arm}, {arm.replicas} replica(s)): {arm.capacity_rps:.2f} req/s x "
                          f"{report.docs_per_request} docs with p95 <= {report.slo_p95_ms:g} ms, served end to end (load-test traffic, not rescaled)")  # fmt: skip
                return ThroughputEstimate(gpu.key, precision, arm.pairs_per_s / arm.replicas, "measured", detail)
    return None
