"""The GPU catalogue and the rules that say which precision runs on which GPU.

Every figure here is a public data-sheet number (dense, i.e. without 2:4 sparsity) and is
used only as a starting point: an inventory may override memory and compute capability per
node type, and measured throughput from `bench engine` replaces the roofline estimate built
from these peaks. Pure data and pure functions: no I/O, no Ray.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

# The precisions the planner can place on GPUs. The serving app also knows "fp32", which is a
# CPU reference precision for tests and is never planned onto a fleet.
PlannedPrecision = Literal["bf16", "fp16", "int8", "nf4", "awq", "fp8"]
PLANNED_PRECISIONS: tuple[str, ...] = ("bf16", "fp16", "int8", "nf4", "awq", "fp8")

# Which GPU tensor-core peak a precision's matmuls run at. bitsandbytes nf4 dequantises each
# weight to 16-bit before the matmul and AWQ W4A16 multiplies in 16-bit too, so both run at the
# 16-bit peak; LLM.int8 runs int8 tensor cores for most of the matrix but pays for its fp16
# outlier path, which the efficiency factor in throughput.py accounts for.
COMPUTE_UNIT: dict[str, str] = {
    "bf16": "fp16",
    "fp16": "fp16",
    "nf4": "fp16",
    "awq": "fp16",
    "int8": "int8",
    "fp8": "fp8",
}


@dataclass(frozen=True)
class GpuModel:
    """One GPU product, as the planner needs to know it."""

    key: str  # the name an inventory uses, e.g. "H100-80GB"
    description: str
    memory_mib: int  # total device memory as nvidia-smi reports it
    compute_capability: float
    fp16_tflops: float  # dense bf16/fp16 tensor-core peak (fp32 accumulate)
    int8_tops: float | None  # dense int8 tensor-core peak; None without int8 tensor cores
    fp8_tflops: float | None  # dense fp8 tensor-core peak; None below compute capability 8.9
    bandwidth_gbps: float  # device memory bandwidth, GB/s
    ray_accelerator_type: str  # the name Ray derives from NVML (resource "accelerator_type:<name>")
    k8s_gpu_product: str  # value of the `nvidia.com/gpu.product` node label (GPU feature discovery)
    aws_instances: dict[int, str] = field(default_factory=dict)  # GPUs per node -> EC2 instance type
    gcp_machines: dict[int, str] = field(default_factory=dict)  # GPUs per node -> GCE machine type
    # GCE machine families n1-* take GPUs as separately attached accelerators; a2/a3/g2 have them built in.
    gcp_attached_accelerator: str | None = None
    # GKE's node label `cloud.google.com/gke-accelerator`; None where GKE has no such GPU.
    gke_accelerator: str | None = None

    def peak_tflops(self, precision: str) -> float | None:
        """Dense tensor-core peak the given precision's matmuls can use, or None if absent."""
        unit = COMPUTE_UNIT[precision]
        if unit == "fp16":
            return self.fp16_tflops
        if unit == "int8":
            return self.int8_tops
        return self.fp8_tflops


GPU_CATALOGUE: dict[str, GpuModel] = {
    g.key: g
    for g in (
        GpuModel(
            key="H100-80GB",
            gke_accelerator="nvidia-h100-80gb",
            description="NVIDIA H100 SXM5 80 GB HBM3",
            memory_mib=81559,
            compute_capability=9.0,
            fp16_tflops=989.0,
            int8_tops=1979.0,
            fp8_tflops=1979.0,
            bandwidth_gbps=3350.0,
            ray_accelerator_type="H100",
            k8s_gpu_product="NVIDIA-H100-80GB-HBM3",
            aws_instances={8: "p5.48xlarge"},
            gcp_machines={1: "a3-highgpu-1g", 2: "a3-highgpu-2g", 4: "a3-highgpu-4g", 8: "a3-highgpu-8g"},
        ),
        GpuModel(
            key="H200",
            gke_accelerator="nvidia-h200-141gb",
            description="NVIDIA H200 SXM 141 GB HBM3e (the H100's tensor cores, 4.8 TB/s)",
            memory_mib=143771,  # as nvidia-smi reports it on the project's GPU machine
            compute_capability=9.0,
            fp16_tflops=989.0,
            int8_tops=1979.0,
            fp8_tflops=1979.0,
            bandwidth_gbps=4800.0,
            ray_accelerator_type="H200",
            k8s_gpu_product="NVIDIA-H200",
            aws_instances={8: "p5en.48xlarge"},
            gcp_machines={8: "a3-ultragpu-8g"},
        ),
        GpuModel(
            key="A100-80GB",
            gke_accelerator="nvidia-a100-80gb",
            description="NVIDIA A100 SXM4 80 GB",
            memory_mib=81920,
            compute_capability=8.0,
            fp16_tflops=312.0,
            int8_tops=624.0,
            fp8_tflops=None,
            bandwidth_gbps=2039.0,
            ray_accelerator_type="A100",
            k8s_gpu_product="NVIDIA-A100-SXM4-80GB",
            aws_instances={8: "p4de.24xlarge"},
            gcp_machines={1: "a2-ultragpu-1g", 2: "a2-ultragpu-2g", 4: "a2-ultragpu-4g", 8: "a2-ultragpu-8g"},
        ),
        GpuModel(
            key="A100-40GB",
            gke_accelerator="nvidia-tesla-a100",
            description="NVIDIA A100 SXM4 40 GB",
            memory_mib=40960,
            compute_capability=8.0,
            fp16_tflops=312.0,
            int8_tops=624.0,
            fp8_tflops=None,
            bandwidth_gbps=1555.0,
            ray_accelerator_type="A100",
            k8s_gpu_product="NVIDIA-A100-SXM4-40GB",
            aws_instances={8: "p4d.24xlarge"},
            gcp_machines={1: "a2-highgpu-1g", 2: "a2-highgpu-2g", 4: "a2-highgpu-4g", 8: "a2-highgpu-8g"},
        ),
        GpuModel(
            key="L40S",
            description="NVIDIA L40S 48 GB",
            memory_mib=46068,
            compute_capability=8.9,
            fp16_tflops=362.0,
            int8_tops=733.0,
            fp8_tflops=733.0,
            bandwidth_gbps=864.0,
            ray_accelerator_type="L40S",
            k8s_gpu_product="NVIDIA-L40S",
            aws_instances={1: "g6e.xlarge", 4: "g6e.12xlarge", 8: "g6e.48xlarge"},
        ),
        GpuModel(
            key="L4",
            gke_accelerator="nvidia-l4",
            description="NVIDIA L4 24 GB",
            memory_mib=23034,
            compute_capability=8.9,
            fp16_tflops=121.0,
            int8_tops=242.0,
            fp8_tflops=242.0,
            bandwidth_gbps=300.0,
            ray_accelerator_type="L4",
            k8s_gpu_product="NVIDIA-L4",
            aws_instances={1: "g6.xlarge", 4: "g6.12xlarge", 8: "g6.48xlarge"},
            gcp_machines={1: "g2-standard-8", 2: "g2-standard-24", 4: "g2-standard-48", 8: "g2-standard-96"},
        ),
        GpuModel(
            key="A10G",
            description="NVIDIA A10G 24 GB (AWS)",
            memory_mib=23028,
            compute_capability=8.6,
            fp16_tflops=70.0,
            int8_tops=140.0,
            fp8_tflops=None,
            bandwidth_gbps=600.0,
            ray_accelerator_type="A10G",
            k8s_gpu_product="NVIDIA-A10G",
            aws_instances={1: "g5.xlarge", 4: "g5.12xlarge", 8: "g5.48xlarge"},
        ),
        GpuModel(
            key="T4",
            gke_accelerator="nvidia-tesla-t4",
            description="NVIDIA T4 16 GB",
            memory_mib=15360,
            compute_capability=7.5,
            fp16_tflops=65.0,
            int8_tops=130.0,
            fp8_tflops=None,
            bandwidth_gbps=320.0,
            ray_accelerator_type="T4",
            k8s_gpu_product="Tesla-T4",
            aws_instances={1: "g4dn.xlarge", 4: "g4dn.12xlarge", 8: "g4dn.metal"},
            gcp_machines={1: "n1-standard-8", 2: "n1-standard-16", 4: "n1-standard-32"},
            gcp_attached_accelerator="nvidia-tesla-t4",
        ),
        GpuModel(
            key="V100-16GB",
            gke_accelerator="nvidia-tesla-v100",
            description="NVIDIA V100 SXM2 16 GB",
            memory_mib=16384,
            compute_capability=7.0,
            fp16_tflops=125.0,
            int8_tops=None,
            fp8_tflops=None,
            bandwidth_gbps=900.0,
            ray_accelerator_type="V100",
            k8s_gpu_product="Tesla-V100-SXM2-16GB",
            aws_instances={1: "p3.2xlarge", 4: "p3.8xlarge", 8: "p3.16xlarge"},
            gcp_machines={1: "n1-standard-8", 2: "n1-standard-16", 4: "n1-standard-32", 8: "n1-standard-64"},
            gcp_attached_accelerator="nvidia-tesla-v100",
        ),
        GpuModel(
            key="RTX-A4000",
            description="NVIDIA RTX A4000 16 GB",
            memory_mib=16376,
            compute_capability=8.6,
            fp16_tflops=76.7,
            int8_tops=153.4,
            fp8_tflops=None,
            bandwidth_gbps=448.0,
            ray_accelerator_type="RTX-A4000",
            k8s_gpu_product="NVIDIA-RTX-A4000",
        ),
        GpuModel(
            key="RTX-3060",
            description="NVIDIA GeForce RTX 3060 12 GB",
            memory_mib=12288,
            compute_capability=8.6,
            # GeForce cards run fp16 matmuls with fp32 accumulation (what PyTorch uses) at half rate.
            fp16_tflops=25.5,
            int8_tops=102.0,
            fp8_tflops=None,
            bandwidth_gbps=360.0,
            ray_accelerator_type="GeForce-RTX-3060",
            k8s_gpu_product="NVIDIA-GeForce-RTX-3060",
        ),
    )
}

# Minimum compute capability per precision, with the reason shown when a GPU falls short.
MIN_COMPUTE_CAPABILITY: dict[str, tuple[float, str]] = {
    "bf16": (8.0, "bf16 needs compute capability >= 8.0 (Ampere); use fp16 on older GPUs"),
    "fp16": (5.3, "fp16 needs compute capability >= 5.3"),
    "int8": (5.0, "bitsandbytes int8 needs a CUDA GPU (compute capability >= 5.0)"),
    "nf4": (5.0, "bitsandbytes nf4 needs a CUDA GPU (compute capability >= 5.0)"),
    "awq": (8.0, "AWQ W4A16 kernels on vLLM need compute capability >= 8.0"),
    "fp8": (8.9, "fp8 tensor cores need compute capability >= 8.9 (Ada/Hopper)"),
}


def hardware_support(precision: str, compute_capability: float) -> str | None:
    """None when `precision` runs on a GPU of this compute capability, else the reason it does not."""
    minimum, reason = MIN_COMPUTE_CAPABILITY[precision]
    if compute_capability + 1e-9 < minimum:
        return f"{reason}; this GPU has {compute_capability:.1f}"
    return None


# How CUDA names each catalogue GPU (torch.cuda.get_device_name), checked in this order.
_DEVICE_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    ("H200", r"\bH200\b"),
    ("H100-80GB", r"\bH100\b"),
    ("A100-80GB", r"\bA100\b.*\b80\s?GB\b"),
    ("A100-40GB", r"\bA100\b"),
    ("L40S", r"\bL40S\b"),
    ("L4", r"\bL4\b"),
    ("A10G", r"\bA10G\b"),
    ("T4", r"\bT4\b"),
    ("V100-16GB", r"\bV100\b(?!.*32\s?GB)"),
    ("RTX-A4000", r"\bRTX A4000\b"),
    ("RTX-3060", r"\bRTX 3060\b"),
)


def gpu_for_device_name(device_name: str) -> str | None:
    """The catalogue key of a CUDA device name such as 'NVIDIA L4' or 'Tesla T4'; None if unknown."""
    for key, pattern in _DEVICE_NAME_PATTERNS:
        if re.search(pattern, device_name):
            return key
    return None
