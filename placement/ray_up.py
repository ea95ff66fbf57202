"""`ray up` cluster configs for AWS and GCP: a head that runs no replicas, two CPU ingress nodes,
and one GPU worker node type per GPU type, each mounting its weights into the project's image."""

from __future__ import annotations

import posixpath
import shlex

from placement import k8s
from placement.hardware import GpuModel
from placement.inventory import NodeType
from placement.machines import CloudNode, cloud_node, vcpus_of
from placement.planner import PlacementReport
from placement.render import INGRESS_RESOURCE, RAY_UP_SECRETS_DIR, Rendered, RenderError, check_weights
from placement.weights import copy_command, hf_home, weights_env
from placement.weights_jobs import checkpoints_on, fill_command, mark_command, quantize_command, wait_command
from serve.request_path import FAST_PATH_ENV

# The image's CUDA 13 build needs an NVIDIA driver >= 580 (cli/driver_check.py): Google's Deep Learning VM
# family with the R580 driver (the cu124 families ship 550).
GCP_SOURCE_IMAGE = "projects/deeplearning-platform-release/global/images/family/common-cu129-ubuntu-2204-nvidia-580"
CONTAINER_HOME = "/home/ray"  # the rayproject/ray images' user home: where file_mounts' ~ lands in the container
HOST_WEIGHTS_DIR = "/mnt/rerank-weights"  # object_store and hub copies when weights.host_path is not given
# GCE installs the NVIDIA driver after boot (install-nvidia-driver metadata) and a fresh AMI may still
# be loading its module: a container that advertises GPUs must not start before nvidia-smi answers.
WAIT_FOR_DRIVER = "timeout 900 bash -c 'until nvidia-smi >/dev/null 2>&1; do sleep 10; done'"


def in_image(image: str, command: str, *, gpus: bool = False, mounts: tuple[str, ...] = (), env: tuple[str, ...] = ()) -> str:
    """A host command that runs `command` in the project's image (before Ray's container starts)."""
    options = ["--rm", *(["--gpus all"] if gpus else []), *(f"-v {m}" for m in mounts), *(f"-e {e}" for e in env)]
    return f"docker run {' '.join(options)} {image} {command}"


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


def weights_mount(report: PlacementReport, node: NodeType) -> tuple[list[str], list[str]]:
    """(host commands run before Ray starts on the node, docker run options) that put this node
    type's weights at its mount path in the container, with HF_HOME and the hub token set. A
    volume with a `fill` source is filled on the host first (the model from the hub or an
    object-store prefix, and the awq arm's checkpoint quantized when the source lacks it); one
    without is checked: Ray never starts on a node whose arms' weights are missing."""
    inventory = report.inventory
    deployment = inventory.deployment
    spec = inventory.weights_for(node)
    commands: list[str] = []
    token_file = posixpath.join(CONTAINER_HOME, RAY_UP_SECRETS_DIR.removeprefix("~/"), k8s.HF_TOKEN)
    env = weights_env(spec, token_file)
    if spec.source == "volume":
        if not spec.host_path:
            raise RenderError(
                f"node_types.{node.name}.weights: a pvc is Kubernetes only; give host_path (a folder on the node holding the weights) for ray up"
            )
        host, mount = spec.host_path, f"{spec.host_path}:{spec.mount_path}"
        needs = checkpoints_on(report, node)
        if spec.fill:
            commands += _fill_host(report, node, spec, host, mount, needs)
        elif needs:
            check = shlex.join(wait_command(spec.mount_path, needs, timeout_s=0, staged=True))
            commands.append(in_image(deployment.image, check, mounts=(f"{mount}:ro",), env=tuple(f"{k}={v}" for k, v in env.items())))
        options = [f"-v {mount}:ro"]
    elif spec.source == "object_store":
        host = spec.host_path or HOST_WEIGHTS_DIR
        copy = copy_command(spec.uri, host)  # the AWS and GCP host images carry the aws and gcloud CLIs
        commands.append(f"sudo mkdir -p {host} && sudo chown $(id -u) {host} && {' '.join(copy.command)}")
        options = [f"-v {host}:{spec.mount_path}:ro"]
    else:
        host = spec.host_path or HOST_WEIGHTS_DIR
        commands.append(f"sudo mkdir -p {host} && sudo chown {k8s.RAY_UID}:{k8s.RAY_UID} {host}")  # the container's user writes the download
        options = [f"-v {host}:{spec.mount_path}"]
    options += [f"-e {k}={v}" for k, v in env.items()]
    return commands, options


def _fill_host(report: PlacementReport, node: NodeType, spec, host: str, mount: str, needs: list[str]) -> list[str]:
    """Host commands that fill an empty `host` folder as the Kubernetes Jobs fill the claim (each
    step skipped when its marker is there: a node that restarts keeps its disk)."""
    inventory = report.inventory
    deployment = inventory.deployment
    env = (f"HF_HOME={hf_home(spec)}",)
    commands = [f"sudo mkdir -p {host} && sudo chown {k8s.RAY_UID}:{k8s.RAY_UID} {host}"]
    source = inventory.model.source
    if spec.fill == "hub":
        commands.append(in_image(deployment.image, shlex.join(fill_command(source, spec.mount_path)), mounts=(mount,), env=env))
    else:
        copy = copy_command(spec.fill, host)
        commands.append(f"{' '.join(copy.command)} && " + in_image(deployment.image, shlex.join(mark_command(spec.mount_path, needs)), mounts=(mount,)))
    awq = inventory.model.awq_checkpoint
    if spec.fill == "hub" and awq and awq in needs:
        if not deployment.quantize_image:
            raise RenderError(f"deployment.quantize_image: node type {node.name} fills its weights from the hub and runs the awq arm, "
                              "whose checkpoint must be written there (or fill from an object-store prefix that holds it)")  # fmt: skip
        done_already = shlex.join(wait_command(spec.mount_path, [awq], timeout_s=0))
        quantize = "sh -c " + shlex.quote(f"{done_already} 2>/dev/null || ({quantize_command(source, awq, spec.mount_path)})")
        commands.append(in_image(deployment.quantize_image, quantize, gpus=True, mounts=(mount,), env=(*env, "HF_HUB_OFFLINE=1")))
    return commands


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
        head_instance = deployment.system.aws_instance_type
        provider = {"type": "aws", "region": deployment.aws_region, "cache_stopped_nodes": False}
        head_config = _aws_node_config(head_instance, deployment.aws_image_id)
        ingress = CloudNode(deployment.ingress.aws_instance_type, vcpus_of(deployment.ingress.aws_instance_type, 4))
        ingress_config = _aws_node_config(ingress.instance, deployment.aws_image_id)
    else:
        head_instance = deployment.system.gcp_machine_type
        provider = {
            "type": "gcp",
            "region": deployment.gcp_region,
            "availability_zone": deployment.gcp_zone,
            "project_id": deployment.gcp_project,
        }
        head_config = _gcp_node_config(head_instance, None, 0)
        ingress = CloudNode(deployment.ingress.gcp_machine_type, vcpus_of(deployment.ingress.gcp_machine_type, 4))
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
        commands, run_options = weights_mount(report, node)
        # The node's driver must run the image's CUDA build, or no arm replica could: fail the node, naming both versions.
        check_driver = in_image(deployment.image, "rerank-fleet check-driver", gpus=True)
        node_types[ray_node_type_name(node)] = {
            "node_config": node_config,
            "resources": {"CPU": instance.vcpus, "GPU": node.gpus_per_node, f"accelerator_type:{node.accelerator_type}": 1},
            # The plan's node count stays up; the autoscaler may add nodes up to the inventory's limit.
            "min_workers": plan.nodes[node.name],
            "max_workers": node.node_ceiling,
            "initialization_commands": [WAIT_FOR_DRIVER, check_driver, *commands],
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
            # Serve's fast request path, in every Ray process of every node (serve/request_path.py).
            "run_options": ["--ulimit nofile=65536:65536", *(f"-e {k}={v}" for k, v in FAST_PATH_ENV.items())],
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
