"""What the planner predicts for a workload that was measured: the `predicted_*` figures the GPU
check (`scripts/gpu-check.sh`) writes beside each measurement, made by the very functions the
planner plans with (`placement.memory`, `placement.throughput`), so a ratio far from 1 points at
the model to fix.

Pure functions of plain data: no I/O, no pydantic, no torch (the GPU machine has no pydantic).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from placement.hardware import GPU_CATALOGUE, PLANNED_PRECISIONS, GpuModel, gpu_for_device_name
from placement.memory import GIB, WEIGHT_ITEMS, Workload, count_parameters, read_architecture, replica_memory
from placement.throughput import PairShape, roofline_estimate, roofline_vision_ms


@dataclass(frozen=True)
class MeasuredCall:
    """One engine call as measured: what the predictions are made for."""

    pairs: int
    pair_tokens: int  # tokens of every whole pair (the roofline knows no shared prefix)
    decoder_tokens: int  # tokens the decoder ran (each shared prefix once)
    image_share: float  # share of documents that were images
    image_tokens: float  # visual tokens of one image document (0 without images)
    max_batch_tokens: int  # the engine's micro-batch budget

    @property
    def mean_pair_tokens(self) -> float:
        return self.pair_tokens / self.pairs


def gpu_of(device_name: str) -> GpuModel | None:
    key = gpu_for_device_name(device_name)
    return GPU_CATALOGUE[key] if key else None


def predict_weights(config: Mapping, precision: str, *, on_cpu: bool) -> dict[str, float]:
    """GiB per weight component (`placement.memory.WEIGHT_ITEMS`) and their total, as the planner's memory model says."""
    arch = read_architecture(config)
    memory = replica_memory(arch, precision, Workload(1, 1.0, False), runtime_overhead_bytes=0, on_cpu=on_cpu)
    out = {name: memory.item_bytes(name) / GIB for name in WEIGHT_ITEMS}
    out["total"] = memory.weight_bytes / GIB
    return out


def predict_call(config: Mapping, precision: str, device_name: str, call: MeasuredCall) -> dict[str, float | str | None]:
    """The planner's figures for one measured call: weights, activation peak (one micro-batch of
    the call's decoder tokens, at most the engine's budget), and on a catalogued GPU the roofline's
    pairs/s (None, with the reason, where it has none)."""
    arch = read_architecture(config)
    gpu = gpu_of(device_name)
    batch_tokens = min(call.decoder_tokens, call.max_batch_tokens)
    workload = Workload(batch_tokens=batch_tokens, mean_pair_tokens=call.mean_pair_tokens, with_images=call.image_share > 0)
    memory = replica_memory(arch, precision, workload, runtime_overhead_bytes=0, on_cpu=gpu is None)
    activations = memory.item_bytes("activations") + memory.item_bytes("kernel scratch")
    out: dict[str, float | str | None] = {
        "predicted_weights_gib": memory.weight_bytes / GIB,
        "predicted_activation_gib": activations / GIB,
        "predicted_pairs_per_s": None,
    }
    if gpu is None or precision not in PLANNED_PRECISIONS:
        out["predicted_note"] = f"the planner has no throughput model for {precision} on {device_name}"
        return out
    shape = PairShape(
        text_pair_tokens=round(call.mean_pair_tokens),
        image_pair_tokens=round(call.mean_pair_tokens),
        image_tokens=round(call.image_tokens),
        image_share=call.image_share,
    )
    estimate = roofline_estimate(gpu, precision, arch, count_parameters(arch), shape, batch_tokens=call.pair_tokens, weight_bytes=memory.weight_bytes)
    out["predicted_pairs_per_s"] = estimate.pairs_per_s or None
    out["predicted_note"] = estimate.detail
    return out


def predict_vision_ms(config: Mapping, device_name: str, image_tokens: int) -> float | None:
    """The roofline's vision-tower milliseconds for one image on this GPU (None off the catalogue)."""
    gpu = gpu_of(device_name)
    return roofline_vision_ms(gpu, read_architecture(config), image_tokens) if gpu else None


def datasheet_tflops(device_name: str, precision: str) -> float | None:
    """The catalogue's dense peak for `precision`'s matmuls on this CUDA device (None off the catalogue)."""
    gpu = gpu_of(device_name)
    return gpu.peak_tflops(precision) if gpu and precision in PLANNED_PRECISIONS else None
