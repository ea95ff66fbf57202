"""Measured figures the planner prefers to its roofline: the reports `plan --profile` and
`plan --capacity` read, and how an entry is looked up in them.

In order of preference: a `rerank-fleet loadtest --capacity` report made on that GPU (requests/s
the arm served end to end with p95 within its SLO, times documents per request), then an engine
benchmark report (`rerank-fleet bench engine --out`, or the GPU check's `gpu-check.json`, which
holds one report per architecture): the engine alone, at its best batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from placement.hardware import GpuModel, gpu_for_device_name
from placement.memory import Architecture
from placement.throughput import PairShape, ThroughputEstimate, vision_image_flops


class BenchEngineRow(BaseModel):
    """One row of a `bench engine` report: one precision at one batch size, or why it was skipped."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    precision: str = Field(..., description="Precision measured.")
    case: str | None = Field(None, description="The workload's name (short text, long query, image documents, ...).")
    batch_size: int | None = Field(None, ge=1, description="Pairs per engine call.")
    pairs_per_s: float | None = Field(None, gt=0, description="Pairs per second of serial calls: preparation, then the device step.")
    forward_pairs_per_s: float | None = Field(
        None, gt=0, description="Pairs per second of the device step alone: what a replica reaches when its CPU preparation pool keeps up."
    )
    mean_pair_tokens: float | None = Field(None, gt=0, description="Tokens of one pair in this row's workload (the whole pair, shared prefix included).")
    image_share: float | None = Field(None, ge=0, le=1, description="Share of image documents in this row's workload.")
    skipped: str | None = Field(None, description="Why this precision did not run on the device.")

    @property
    def replica_pairs_per_s(self) -> float | None:
        """A replica overlaps CPU preparation with the device step, so the device rate is its rate when given."""
        return self.forward_pairs_per_s or self.pairs_per_s


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

    def row_tokens(self, row: BenchEngineRow) -> float | None:
        return row.mean_pair_tokens or self.mean_pair_tokens

    def row_image_share(self, row: BenchEngineRow) -> float | None:
        return row.image_share if row.image_share is not None else self.image_share

    def best_row(self, precision: str, shape: PairShape) -> BenchEngineRow | None:
        """The row that says most about this traffic: among the rows whose image share is nearest
        the traffic's, the highest rate once rescaled to the traffic's pair length (the batcher
        fills batches under load, so the best batch size is the replica's rate)."""
        measured = [r for r in self.rows if r.precision == precision and r.replica_pairs_per_s]
        if not measured:
            return None
        shares = [self.row_image_share(r) for r in measured]
        if all(s is not None for s in shares):
            nearest = min(abs(s - shape.image_share) for s in shares)
            measured = [r for r, s in zip(measured, shares) if abs(s - shape.image_share) == nearest]
        return max(measured, key=lambda r: r.replica_pairs_per_s * (self.row_tokens(r) or shape.mean_pair_tokens))


class GpuCheckFile(BaseModel):
    """`scripts/gpu-check.sh`'s `gpu-check.json`: one engine report per architecture measured."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    reports: list[BenchEngineReport] = Field(..., description="One report per model, in the `bench engine` shape.")


def read_bench_reports(data: object) -> list[BenchEngineReport]:
    """The engine reports in a `--profile` file: one `bench engine` report, or a GPU check's several."""
    if isinstance(data, dict) and "reports" in data:
        return list(GpuCheckFile.model_validate(data).reports)
    return [BenchEngineReport.model_validate(data)]


def measured_estimate(report: BenchEngineReport, row: BenchEngineRow, gpu: GpuModel, shape: PairShape) -> ThroughputEstimate:
    """A measured figure, rescaled by tokens per pair when the report says its pair length."""
    rate = row.replica_pairs_per_s
    what = "device step alone" if row.forward_pairs_per_s else "serial calls"
    case = f" ({row.case})" if row.case else ""
    detail = f"measured by bench engine on {report.device}{case}: {rate:.1f} pairs/s at batch {row.batch_size}, {what}"
    tokens = report.row_tokens(row)
    if tokens is not None:
        # Prefill cost is close to linear in tokens, so pairs/s scale inversely with pair length.
        rate = rate * tokens / shape.mean_pair_tokens
        detail += f", {tokens:g} tokens/pair, rescaled to {shape.mean_pair_tokens:.0f}"
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
    reports: Sequence[BenchEngineReport], gpu: GpuModel, precision: str, model_ids: set[str], shape: PairShape
) -> ThroughputEstimate | None:
    """The measured entry for this GPU, precision and model, if a report has one."""
    for report in reports:
        if report.model in model_ids and gpu_for_device_name(report.device) == gpu.key:
            row = report.best_row(precision, shape)
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


def find_capacity(reports: Sequence[CapacityReport], gpu: GpuModel, precision: str, model_ids: set[str]) -> ThroughputEstimate | None:
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
