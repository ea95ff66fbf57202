"""`ray up` cluster configs for AWS and GCP: a head that runs no replicas, two CPU ingress nodes,
and one GPU worker node type per GPU type, each mounting its weights into the project's image."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from placement import k8s
from placement.hardware import GpuModel
from placement.inventory import Inventory, NodeType
from placement.planner import PlacementReport
from placement.render import INGRESS_RESOURCE, RAY_UP_SECRETS_DIR, Rendered, RenderError, check_weights
from placement.weights import copy_command, weights_env

AWS_HEAD_INSTANCE = ("m6i.2xlarge", 8)
GCP_HEAD_MACHINE = ("n2-standard-8", 8)
GCP_SOURCE_IMAGE = "projects/deeplearning-platform-release/global/images/family/common-cu124-ubuntu-2204-py310"
CONTAINER_HOME = "/home/ray"  # the rayproject/ray images' user home: where file_mounts' ~ lands in the container
HOST_WEIGHTS_DIR = "/mnt/rerank-weights"  # object_store and hub copies when weights.host_path is not given
# GCE installs the NVIDIA driver after boot (install-nvidia-driver metadata) and a fresh AMI may still
# be loading its module: a container that advertises GPUs must not start before nvidia-smi answers.
WAIT_FOR_DRIVER = "timeout 900 bash -c 'until nvidia-smi >/dev/null 2>&1; do sleep 10; done'"


@dataclass(frozen=True)
class CloudNode:
    instance: str  # EC2 instance type or GCE machine type
    vcpus: int


# vCPUs of the instance types the catalogue names, so the autoscaler knows a node's CPUs before launch.
INSTANCE_VCPUS: dict[str, int] = {
    "p5.48xlarge": 192, "p4de.24xlarge": 96, "p4d.24xlarge": 96,
    "g6e.xlarge": 4, "g6e.12xlarge": 48, "g6e.48xlarge": 192,
    "g6.xlarge": 4, "g6.12xlarge": 48, "g6.48xlarge": 192,
    "g5.xlarge": 4, "g5.12xlarge": 48, "g5.48xlarge": 192,
    "g4dn.xlarge": 4, "g4dn.12xlarge": 48, "g4dn.metal": 96,
    "p3.2xlarge": 8, "p3.8xlarge": 32, "p3.16xlarge": 64,
    "a3-highgpu-1g": 26, "a3-highgpu-2g": 52, "a3-highgpu-4g": 104, "a3-highgpu-8g": 208,
    "a2-ultragpu-1g": 12, "a2-ultragpu-2g": 24, "a2-ultragpu-4g": 48, "a2-ultragpu-8g": 96,
    "a2-highgpu-1g": 12, "a2-highgpu-2g": 24, "a2-highgpu-4g": 48, "a2-highgpu-8g": 96,
    "g2-standard-8": 8, "g2-standard-24": 24, "g2-standard-48": 48, "g2-standard-96": 96,
    "n1-standard-8": 8, "n1-standard-16": 16, "n1-standard-32": 32, "n1-standard-64": 64,
    "m6i.xlarge": 4, "m6i.2xlarge": 8, "n2-standard-4": 4, "n2-standard-8": 8,
}  # fmt: skip


def cloud_node(node: NodeType, cloud: str) -> CloudNode | None:
    """The instance that carries this node type's GPUs on `cloud`, or None if the cloud has none."""
    gpu = node.gpu_model
    if cloud == "aws":
        instance = node.aws_instance_type or gpu.aws_instances.get(node.gpus_per_node)
    else:
        instance = node.gcp_machine_type or gpu.gcp_machines.get(node.gpus_per_node)
    if instance is None:
        return None
    return CloudNode(instance, INSTANCE_VCPUS.get(instance, node.cpus_per_node))


def ray_node_type_name(node: NodeType) -> str:
    return f"gpu-{node.name}"


def _aws_node_config(instance: str, image_id: str | None) -> dict:
    config: dict = {
        "InstanceType": instance,
        "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 300, "VolumeType": "gp3", "Encrypted": True}}],
    }
    if image_id:
        config["ImageId"] = image_id
    return config


def _gcp_node_config(machine: str, gpu: GpuModel | None, gpus: int) -> dict:
    config: dict = {
        "machineType": machine,
        "disks": [
            {
                "boot": True,
                "autoDelete": True,
                "type": "PERSISTENT",
                "initializeParams": {"diskSizeGb": 300, "sourceImage": GCP_SOURCE_IMAGE},
            }
        ],
    }
    if gpu is not None:
        if gpu.gcp_attached_accelerator:
            # n1 machines take GPUs as attached accelerators; a2/a3/g2 machine types include theirs.
            config["guestAccelerators"] = [{"acceleratorType": gpu.gcp_attached_accelerator, "acceleratorCount": gpus}]
        config["scheduling"] = [{"onHostMaintenance": "TERMINATE"}]
        config["metadata"] = {"items": [{"key": "install-nvidia-driver", "value": "True"}]}
    return config


def weights_mount(inventory: Inventory, node: NodeType) -> tuple[list[str], list[str]]:
    """(host commands run before the container starts, docker run options) that put this node
    type's weights at its mount path in the container, with HF_HOME and the hub token set."""
    spec = inventory.weights_for(node)
    commands: list[str] = []
    if spec.source == "volume":
        if not spec.host_path:
            raise RenderError(
                f"node_types.{node.name}.weights: a pvc is Kubernetes only; give host_path (a folder on the node holding the weights) for ray up"
            )
        options = [f"-v {spec.host_path}:{spec.mount_path}:ro"]
    elif spec.source == "object_store":
        host = spec.host_path or HOST_WEIGHTS_DIR
        copy = copy_command(spec.uri, host)  # the AWS and GCP host images carry the aws and gcloud CLIs
        commands.append(f"sudo mkdir -p {host} && sudo chown $(id -u) {host} && {' '.join(copy.command)}")
        options = [f"-v {host}:{spec.mount_path}:ro"]
    else:
        host = spec.host_path or HOST_WEIGHTS_DIR
        commands.append(f"sudo mkdir -p {host} && sudo chown {k8s.RAY_UID}:{k8s.RAY_UID} {host}")  # the container's user writes the download
        options = [f"-v {host}:{spec.mount_path}"]
    token_file = posixpath.join(CONTAINER_HOME, RAY_UP_SECRETS_DIR.removeprefix("~/"), k8s.HF_TOKEN)
    options += [f"-e {k}={v}" for k, v in weights_env(spec, token_file).items()]
    return commands, options


def render_ray_up(report: PlacementReport, cloud: str) -> Rendered:
    """A `ray up` cluster config for `cloud` ("aws" or "gcp"): one worker node type per GPU type."""
    if cloud not in ("aws", "gcp"):
        raise ValueError(f"unknown cloud {cloud!r}")
    check_weights(report)
    inventory = report.inventory
    deployment = inventory.deployment
    plan = report.plan
    notes = []
    if cloud == "aws":
        head_instance, head_cpus = AWS_HEAD_INSTANCE
        provider = {"type": "aws", "region": deployment.aws_region, "cache_stopped_nodes": False}
        head_config = _aws_node_config(head_instance, deployment.aws_image_id)
        ingress = CloudNode(deployment.ingress.aws_instance_type, INSTANCE_VCPUS.get(deployment.ingress.aws_instance_type, deployment.ingress.cpus_per_node))
        ingress_config = _aws_node_config(ingress.instance, deployment.aws_image_id)
    else:
        head_instance, head_cpus = GCP_HEAD_MACHINE
        provider = {
            "type": "gcp",
            "region": deployment.gcp_region,
            "availability_zone": deployment.gcp_zone,
            "project_id": deployment.gcp_project,
        }
        head_config = _gcp_node_config(head_instance, None, 0)
        ingress = CloudNode(deployment.ingress.gcp_machine_type, INSTANCE_VCPUS.get(deployment.ingress.gcp_machine_type, deployment.ingress.cpus_per_node))
        ingress_config = _gcp_node_config(ingress.instance, None, 0)
    # The head runs Ray's control plane and Serve's controller only (`--num-cpus=0` there): losing it
    # must not take the ingress with it.
    node_types: dict = {
        "head": {"node_config": head_config, "resources": {"CPU": 0, "GPU": 0}, "min_workers": 0, "max_workers": 0},
        "cpu-ingress": {
            "node_config": ingress_config,
            "resources": {"CPU": ingress.vcpus, "GPU": 0, INGRESS_RESOURCE: 1},
            "min_workers": deployment.ingress.replicas,
            "max_workers": deployment.ingress.replicas,
        },
    }
    max_workers = deployment.ingress.replicas
    for node in inventory.node_types:
        instance = cloud_node(node, cloud)
        if instance is None:
            notes.append(
                f"node type {node.name!r} ({node.gpu} x{node.gpus_per_node}) has no {cloud.upper()} instance: "
                f"join such machines with `ray start --address=<head>:6379` (Ray detects "
                f"accelerator_type:{node.accelerator_type}); the plan puts {_planned_replicas(report, node.name)} "
                "replica(s) there"
            )
            continue
        node_config = (
            _aws_node_config(instance.instance, deployment.aws_image_id)
            if cloud == "aws"
            else _gcp_node_config(instance.instance, node.gpu_model, node.gpus_per_node)
        )
        commands, run_options = weights_mount(inventory, node)
        node_types[ray_node_type_name(node)] = {
            "node_config": node_config,
            "resources": {"CPU": instance.vcpus, "GPU": node.gpus_per_node, f"accelerator_type:{node.accelerator_type}": 1},
            # The plan's node count stays up; the autoscaler may add nodes up to the inventory's limit.
            "min_workers": plan.nodes[node.name],
            "max_workers": node.node_ceiling,
            "initialization_commands": [WAIT_FOR_DRIVER, *commands],
            "docker": {"worker_run_options": run_options},
        }
        max_workers += node.node_ceiling
    data = {
        "cluster_name": deployment.cluster_name,
        "max_workers": max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,
        "provider": provider,
        "auth": {"ssh_user": "ubuntu"},
        # One image for every node: the project's Dockerfile, pushed and pinned (deployment.image).
        "docker": {
            "image": deployment.image,
            "container_name": "ray_container",
            "pull_before_run": True,
            "run_options": ["--ulimit nofile=65536:65536"],
        },
        "available_node_types": node_types,
        "head_node_type": "head",
        # Ray 2.60 enables token authentication: every node gets the token made by `ray get-auth-token --generate`.
        # The fleet's secrets (API keys, Redis and hub credentials) travel the same way, from a folder
        # on the operator's machine: the configs name the files, never their contents.
        "file_mounts": {"~/.ray/auth_token": "~/.ray/auth_token", RAY_UP_SECRETS_DIR: RAY_UP_SECRETS_DIR},
        "setup_commands": [],
        "head_start_ray_commands": [
            "ray stop",
            "ulimit -n 65536; ray start --head --num-cpus=0 --port=6379 --object-manager-port=8076 "
            "--autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-host=127.0.0.1",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            "ulimit -n 65536; ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076",
        ],
    }
    return Rendered(data, tuple(notes))


def _planned_replicas(report: PlacementReport, node_type: str) -> int:
    return sum(p.replicas for p in report.plan.placements if p.node_type == node_type)
