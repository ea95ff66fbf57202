"""The cloud machines a plan's pods land on, and what Kubernetes leaves a pod of each.

A pod fits a node when its requests fit the node's *allocatable* resources less what the
platform's daemonsets take. Allocatable is the machine less the kubelet's reserve and eviction
threshold, by each platform's published rule:

- EKS (the EKS-optimized AMIs, `amazon-eks-ami` nodeadm): CPU reserve 6 % of the first core,
  1 % of the second, 0.5 % of cores 3-4, 0.25 % above; memory reserve 11 MiB x max pods + 255 MiB;
  eviction at 100 MiB; and the kernel sees about 7.5 % less memory than the instance's size
  (Karpenter's VM_MEMORY_OVERHEAD_PERCENT).
- GKE (cloud.google.com/kubernetes-engine/docs/concepts/plan-node-sizes): the same CPU bands;
  memory 25 % of the first 4 GiB, 20 % of the next 4, 10 % of the next 8, 6 % of the next 112,
  2 % above 128 GiB; eviction at 100 MiB.

Daemonsets (CNI, kube-proxy, CSI node plugins, the NVIDIA device plugin and driver installer,
logging) are an estimate per node, `DAEMONSET_RESERVE` (check it against what `kubectl describe
node` shows). Also which machine carries a node type's GPUs on each cloud (`cloud_node`). Pure
data and arithmetic: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from placement.inventory import NodeType

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class Machine:
    name: str
    cloud: str  # "aws" | "gcp"
    vcpus: int
    memory_gib: float
    gpus: int = 0
    max_pods: int = 110  # EKS: ENIs x (IPs per ENI - 1) + 2 (the AMI's table); GKE: 110


def _aws(name, vcpus, memory_gib, gpus=0, max_pods=110) -> Machine:
    return Machine(name, "aws", vcpus, memory_gib, gpus, max_pods)


def _gcp(name, vcpus, memory_gib, gpus=0) -> Machine:
    return Machine(name, "gcp", vcpus, memory_gib, gpus)


MACHINES: dict[str, Machine] = {
    m.name: m
    for m in (
        # AWS (docs.aws.amazon.com/ec2/latest/instancetypes; max pods from amazon-eks-ami's eni-max-pods)
        _aws("m6i.xlarge", 4, 16, max_pods=58), _aws("m6i.2xlarge", 8, 32, max_pods=58), _aws("m6i.4xlarge", 16, 64, max_pods=234),
        _aws("m7i.xlarge", 4, 16, max_pods=58), _aws("m7i.2xlarge", 8, 32, max_pods=58),
        _aws("r6i.xlarge", 4, 32, max_pods=58), _aws("r6i.2xlarge", 8, 64, max_pods=58),
        _aws("g6.xlarge", 4, 16, 1, 58), _aws("g6.2xlarge", 8, 32, 1, 58), _aws("g6.4xlarge", 16, 64, 1, 234),
        _aws("g6.12xlarge", 48, 192, 4, 234), _aws("g6.48xlarge", 192, 768, 8, 737),
        _aws("g5.xlarge", 4, 16, 1, 58), _aws("g5.2xlarge", 8, 32, 1, 58), _aws("g5.12xlarge", 48, 192, 4, 737),
        _aws("g4dn.xlarge", 4, 16, 1, 29), _aws("g4dn.2xlarge", 8, 32, 1, 29), _aws("g4dn.12xlarge", 48, 192, 4, 234),
        _aws("p4d.24xlarge", 96, 1152, 8, 737), _aws("p4de.24xlarge", 96, 1152, 8, 737),
        _aws("p5.48xlarge", 192, 2048, 8, 100), _aws("p5en.48xlarge", 192, 2048, 8, 198),
        _aws("g6e.xlarge", 4, 32, 1, 58), _aws("g6e.12xlarge", 48, 384, 4, 234), _aws("g6e.48xlarge", 192, 1536, 8, 737),
        _aws("g5.48xlarge", 192, 768, 8, 345), _aws("g4dn.metal", 96, 384, 8, 737),
        _aws("p3.2xlarge", 8, 61, 1, 58), _aws("p3.8xlarge", 32, 244, 4, 234), _aws("p3.16xlarge", 64, 488, 8, 234),
        # GCP (cloud.google.com/compute/docs/machine-resource; memory in GiB)
        _gcp("e2-standard-4", 4, 16), _gcp("e2-standard-8", 8, 32), _gcp("n2-standard-4", 4, 16), _gcp("n2-standard-8", 8, 32),
        _gcp("n2-highmem-4", 4, 32), _gcp("n2-highmem-8", 8, 64),
        _gcp("g2-standard-4", 4, 16, 1), _gcp("g2-standard-8", 8, 32, 1), _gcp("g2-standard-12", 12, 48, 1),
        _gcp("g2-standard-16", 16, 64, 1), _gcp("g2-standard-24", 24, 96, 2), _gcp("g2-standard-48", 48, 192, 4),
        _gcp("n1-standard-4", 4, 15, 1), _gcp("n1-standard-8", 8, 30, 1), _gcp("n1-standard-16", 16, 60, 2),
        _gcp("a2-highgpu-1g", 12, 85, 1), _gcp("a2-highgpu-2g", 24, 170, 2), _gcp("a2-highgpu-4g", 48, 340, 4),
        _gcp("a2-highgpu-8g", 96, 680, 8), _gcp("a2-ultragpu-1g", 12, 170, 1), _gcp("a2-ultragpu-8g", 96, 1360, 8),
        _gcp("a3-highgpu-1g", 26, 234, 1), _gcp("a3-highgpu-2g", 52, 468, 2), _gcp("a3-highgpu-4g", 104, 936, 4),
        _gcp("a3-highgpu-8g", 208, 1872, 8), _gcp("a3-ultragpu-8g", 224, 2952, 8),
        _gcp("a2-ultragpu-2g", 24, 340, 2), _gcp("a2-ultragpu-4g", 48, 680, 4), _gcp("g2-standard-96", 96, 384, 8),
        _gcp("n1-standard-32", 32, 120, 4), _gcp("n1-standard-64", 64, 240, 8),
    )
}  # fmt: skip

# (CPU cores, GiB) the platform's own daemonsets request on a node, by whether it has GPUs: an
# estimate (aws-node, kube-proxy, EBS/EFS CSI node plugins, NVIDIA device plugin / GKE's driver
# installer and device plugin, logging agents).
DAEMONSET_RESERVE = {("eks", False): (0.3, 0.4), ("eks", True): (0.4, 0.5), ("gke", False): (0.4, 0.5), ("gke", True): (0.6, 0.7)}


def _banded(amount: float, bands: list[tuple[float, float]], above: float) -> float:
    """A reserve charged in bands: `share` of each band's `size`, then `above` of the rest."""
    reserve, left = 0.0, amount
    for size, share in bands:
        take = min(left, size)
        reserve += take * share
        left -= take
    return reserve + left * above


def _cpu_reserve_cores(vcpus: int) -> float:
    return _banded(vcpus, [(1, 0.06), (1, 0.01), (2, 0.005)], 0.0025)


def _gke_memory_reserve_gib(memory_gib: float) -> float:
    return _banded(memory_gib, [(4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06)], 0.02)


@dataclass(frozen=True)
class Allocatable:
    """What pods of ours may request on one node: CPU cores and GiB, and how it was worked out."""

    cpu: float
    memory_gib: float
    detail: str


def allocatable(machine: Machine, platform: str) -> Allocatable:
    """A node's allocatable resources less the platform's daemonsets, for pods of ours."""
    cpu = machine.vcpus - _cpu_reserve_cores(machine.vcpus)
    if platform == "eks":
        memory = machine.memory_gib * (1 - 0.075) - (11 * machine.max_pods + 255) * MIB / GIB - 100 * MIB / GIB
        rule = f"EKS: 7.5 % VM overhead, kube-reserved 11 MiB x {machine.max_pods} pods + 255 MiB"
    elif platform == "gke":
        memory = machine.memory_gib - _gke_memory_reserve_gib(machine.memory_gib) - 100 * MIB / GIB
        rule = "GKE: tiered kube-reserved memory"
    else:
        raise ValueError(f"no allocatable rule for platform {platform!r}")
    ds_cpu, ds_memory = DAEMONSET_RESERVE[(platform, machine.gpus > 0)]
    return Allocatable(
        cpu - ds_cpu,
        memory - ds_memory,
        f"{machine.name} ({machine.vcpus} vCPU, {machine.memory_gib:g} GiB): {rule}, eviction 100 MiB, daemonsets ~{ds_cpu:g} CPU / {ds_memory:g} GiB",
    )


@dataclass(frozen=True)
class CloudNode:
    instance: str  # EC2 instance type or GCE machine type
    vcpus: int


def cloud_node(node: NodeType, cloud: str) -> CloudNode | None:
    """The instance that carries this node type's GPUs on `cloud`, or None if the cloud has none."""
    gpu = node.gpu_model
    if cloud == "aws":
        instance = node.aws_instance_type or gpu.aws_instances.get(node.gpus_per_node)
    else:
        instance = node.gcp_machine_type or gpu.gcp_machines.get(node.gpus_per_node)
    if instance is None:
        return None
    return CloudNode(instance, vcpus_of(instance, node.cpus_per_node))


def vcpus_of(instance: str, otherwise: int) -> int:
    """The machine's vCPUs, so the autoscaler knows a node's CPUs before it launches one."""
    machine = MACHINES.get(instance)
    return machine.vcpus if machine else otherwise


def gpu_machine(node: NodeType, platform: str) -> str | None:
    """The machine of a GPU node type's nodes on a Kubernetes platform (eks: EC2, gke: GCE), or None."""
    cloud = {"eks": "aws", "gke": "gcp"}.get(platform)
    found = cloud_node(node, cloud) if cloud else None
    return found.instance if found else None
