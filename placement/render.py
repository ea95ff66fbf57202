"""What deploys a plan: the Serve config, `ray up` cluster YAMLs for AWS and GCP, and a KubeRay
RayService with the Redis it uses.

Every arm of the plan is one (precision, node type) pair and becomes one Serve deployment
`Arm-<precision>-<node type>` whose replicas ask for one GPU of that node type's Ray accelerator
type, so Ray can only place them there. The serving app's arguments are a `serve.config.FleetConfig`
built with `FleetConfig.from_dict`, so they are valid by construction.

`regenerate_examples(repo_root)` rewrites the checked-in examples from configs/placement-example.yaml.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from placement.hardware import GpuModel
from placement.inventory import Inventory, NodeType
from placement.planner import PlacementReport, arm_name, arm_weights, plan_placement
from placement.solve import Plan

INGRESS_DEPLOYMENT = "Ingress"
SERVE_HTTP_PORT = 8000
K8S_REDIS_NAME = "redis"
# Ray's GCS fault tolerance keeps its tables in Redis DB 0; the feature cache uses DB 1 of the same server.
K8S_CACHE_REDIS_URL = f"redis://{K8S_REDIS_NAME}:6379/1"
AWS_HEAD_INSTANCE = ("m6i.2xlarge", 8)
GCP_HEAD_MACHINE = ("n2-standard-8", 8)
GCP_SOURCE_IMAGE = "projects/deeplearning-platform-release/global/images/family/common-cu124-ubuntu-2204-py310"
EXAMPLE_INVENTORY = "configs/placement-example.yaml"


def deployment_name(arm: str) -> str:
    return f"Arm-{arm}"


@dataclass(frozen=True)
class ArmDeployment:
    """The Serve settings of one arm, shared by the FleetConfig arm and the Serve config deployment."""

    name: str
    precision: str
    node_type: NodeType
    weight: float
    replicas: int
    max_replicas: int | None  # set when the inventory asks for autoscaling

    def actor_options(self, replica_cpus: float) -> dict:
        return {"num_cpus": replica_cpus, "num_gpus": 1, "accelerator_type": self.node_type.accelerator_type}


def arm_deployments(report: PlacementReport) -> list[ArmDeployment]:
    inventory = report.inventory
    plan = report.plan
    weights = arm_weights(plan)
    node_types = {n.name: n for n in inventory.node_types}
    arms = []
    for placement in plan.placements:
        node = node_types[placement.node_type]
        max_replicas = None
        if inventory.deployment.autoscaling:
            pool_gpus = node.gpus_per_node * node.node_ceiling
            max_replicas = max(
                placement.replicas,
                min(pool_gpus, math.ceil(placement.replicas * inventory.deployment.autoscaling_max_factor)),
            )
        arms.append(
            ArmDeployment(
                name=arm_name(placement.precision, placement.node_type),
                precision=placement.precision,
                node_type=node,
                weight=weights[(placement.precision, placement.node_type)],
                replicas=placement.replicas,
                max_replicas=max_replicas,
            )
        )
    return arms


def fleet_config(report: PlacementReport, *, redis_url: str | None):
    """The serving app's fleet configuration (a validated `serve.config.FleetConfig`) for this plan."""
    from serve.config import FleetConfig  # the serving app's schema; imported here to keep planning Ray-free

    inventory = report.inventory
    deployment = inventory.deployment
    arms = []
    for arm in arm_deployments(report):
        entry: dict = {
            "name": arm.name,
            "precision": arm.precision,
            "weight": arm.weight,
            "max_ongoing_requests": deployment.max_ongoing_requests,
            "ray_actor_options": arm.actor_options(deployment.replica_cpus),
        }
        spec = next(a for a in inventory.arms if a.precision == arm.precision)
        entry["backend"] = spec.backend
        if spec.backend == "vllm":
            entry["vllm"] = {"gpu_memory_utilization": spec.vllm_memory_fraction}
        if arm.precision == "awq":
            entry["checkpoint"] = inventory.model.awq_checkpoint
        if arm.max_replicas is None:
            entry["num_replicas"] = arm.replicas
        else:
            entry["autoscaling"] = {
                "min_replicas": arm.replicas,
                "max_replicas": arm.max_replicas,
                "target_ongoing_requests": deployment.target_ongoing_requests,
            }
        arms.append(entry)
    data = {
        "model": {"source": inventory.model.source, "max_batch_tokens": inventory.traffic.batch_token_budget},
        "arms": arms,
        "cache": {"redis_url": redis_url},
        "http": {"host": "0.0.0.0", "port": SERVE_HTTP_PORT, "route_prefix": deployment.route_prefix},
    }
    return FleetConfig.from_dict(data, source="placement plan")


def serve_application(report: PlacementReport, *, redis_url: str | None) -> dict:
    """One Serve application: the app's args, plus each deployment's settings spelled out for operators.

    The `deployments` entries are exactly what `serve.app.build_app` sets from the same arms
    (`serve.deploy_options.arm_options`), so the file shows the replicas and GPU pinning without changing them.
    """
    from serve.deploy_options import IMPORT_PATH, INGRESS_ACTOR_OPTIONS, LEDGER_OPTIONS, arm_options

    fleet = fleet_config(report, redis_url=redis_url)
    deployments = [{"name": INGRESS_DEPLOYMENT, "ray_actor_options": {**INGRESS_ACTOR_OPTIONS, "num_gpus": 0}}]
    deployments += [arm_options(arm, fleet.http.drain_grace_s) for arm in fleet.arms]
    deployments.append({**LEDGER_OPTIONS, "ray_actor_options": {**LEDGER_OPTIONS["ray_actor_options"], "num_gpus": 0}})
    deployment = report.inventory.deployment
    return {
        "name": deployment.app_name,
        "route_prefix": deployment.route_prefix,
        "import_path": IMPORT_PATH,
        "args": {"config": fleet.model_dump(mode="json", exclude_unset=True)},
        "deployments": deployments,
    }


def render_serve_config(report: PlacementReport) -> dict:
    """`serve deploy` config for a Ray cluster started with `ray up` (feature cache: deployment.redis_url)."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": SERVE_HTTP_PORT},
        "applications": [serve_application(report, redis_url=report.inventory.deployment.redis_url)],
    }


# --- ray up ---------------------------------------------------------------------------------


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


def _ray_worker_resources(node: NodeType, vcpus: int) -> dict:
    return {"CPU": vcpus, "GPU": node.gpus_per_node, f"accelerator_type:{node.accelerator_type}": 1}


def _aws_node_config(instance: str, image_id: str | None) -> dict:
    config: dict = {
        "InstanceType": instance,
        "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 300, "VolumeType": "gp3"}}],
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


@dataclass(frozen=True)
class RenderedYaml:
    data: dict
    notes: tuple[str, ...]  # lines for the header comment (e.g. node types a cloud cannot host)


def render_ray_up(report: PlacementReport, cloud: str) -> RenderedYaml:
    """A `ray up` cluster config for `cloud` ("aws" or "gcp"): one worker node type per GPU type."""
    if cloud not in ("aws", "gcp"):
        raise ValueError(f"unknown cloud {cloud!r}")
    inventory = report.inventory
    deployment = inventory.deployment
    plan = report.plan
    notes = []
    if cloud == "aws":
        head_instance, head_cpus = AWS_HEAD_INSTANCE
        provider = {"type": "aws", "region": deployment.aws_region, "cache_stopped_nodes": False}
        head_config = _aws_node_config(head_instance, deployment.aws_image_id)
    else:
        head_instance, head_cpus = GCP_HEAD_MACHINE
        provider = {
            "type": "gcp",
            "region": deployment.gcp_region,
            "availability_zone": deployment.gcp_zone,
            "project_id": deployment.gcp_project,
        }
        head_config = _gcp_node_config(head_instance, None, 0)
    node_types: dict = {
        "head": {"node_config": head_config, "resources": {"CPU": head_cpus, "GPU": 0}, "min_workers": 0, "max_workers": 0}
    }
    max_workers = 0
    for node in inventory.node_types:
        instance = cloud_node(node, cloud)
        if instance is None:
            notes.append(
                f"node type {node.name!r} ({node.gpu} x{node.gpus_per_node}) has no {cloud.upper()} instance: "
                f"join such machines with `ray start --address=<head>:6379` (Ray detects "
                f"accelerator_type:{node.accelerator_type}); the plan puts {_planned_replicas(plan, node.name)} "
                "replica(s) there"
            )
            continue
        node_config = (
            _aws_node_config(instance.instance, deployment.aws_image_id)
            if cloud == "aws"
            else _gcp_node_config(instance.instance, node.gpu_model, node.gpus_per_node)
        )
        node_types[ray_node_type_name(node)] = {
            "node_config": node_config,
            "resources": _ray_worker_resources(node, instance.vcpus),
            # The plan's node count stays up; the autoscaler may add nodes up to the inventory's limit.
            "min_workers": plan.nodes[node.name],
            "max_workers": node.node_ceiling,
        }
        max_workers += node.node_ceiling
    data = {
        "cluster_name": deployment.cluster_name,
        "max_workers": max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,
        "provider": provider,
        "auth": {"ssh_user": "ubuntu"},
        # One image for every node: the project installed on top of rayproject/ray:<version>-py311-gpu.
        "docker": {
            "image": deployment.image,
            "container_name": "ray_container",
            "pull_before_run": True,
            "run_options": ["--ulimit nofile=65536:65536"],
        },
        "available_node_types": node_types,
        "head_node_type": "head",
        # Ray 2.60 enables token authentication: every node gets the token made by `ray get-auth-token --generate`.
        "file_mounts": {"~/.ray/auth_token": "~/.ray/auth_token"},
        "setup_commands": [],
        "head_start_ray_commands": [
            "ray stop",
            "ulimit -n 65536; ray start --head --port=6379 --object-manager-port=8076 "
            "--autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-host=0.0.0.0",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            "ulimit -n 65536; ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076",
        ],
    }
    return RenderedYaml(data, tuple(notes))


def _planned_replicas(plan: Plan, node_type: str) -> int:
    return sum(p.replicas for p in plan.placements if p.node_type == node_type)


# --- KubeRay ---------------------------------------------------------------------------------


def _ray_start_resources(node: NodeType) -> str:
    # KubeRay hands this to `ray start --resources=...` through a shell, hence the escaped quotes.
    return json.dumps(json.dumps({f"accelerator_type:{node.accelerator_type}": 1}))


def render_rayservice(report: PlacementReport) -> dict:
    """A KubeRay RayService: head group, one worker group per GPU type, the Serve config inline."""
    inventory = report.inventory
    deployment = inventory.deployment
    plan = report.plan
    serve_config = {"applications": [serve_application(report, redis_url=K8S_CACHE_REDIS_URL)]}
    worker_groups = []
    for node in inventory.node_types:
        resources = {
            "cpu": str(node.cpus_per_node),
            "memory": f"{node.host_memory_gib}Gi",
            "nvidia.com/gpu": str(node.gpus_per_node),
        }
        worker_groups.append(
            {
                "groupName": node.name,
                "replicas": plan.nodes[node.name],
                "minReplicas": plan.nodes[node.name],
                "maxReplicas": node.node_ceiling,
                "rayStartParams": {"resources": _ray_start_resources(node)},
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "name": "ray-worker",
                                "image": deployment.image,
                                "resources": {"limits": dict(resources), "requests": dict(resources)},
                            }
                        ],
                        "nodeSelector": node.k8s_node_selector or {"nvidia.com/gpu.product": node.gpu_model.k8s_gpu_product},
                        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    }
                },
            }
        )
    head_resources = {"cpu": "4", "memory": "16Gi"}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": deployment.cluster_name, "namespace": deployment.namespace},
        "spec": {
            "serveConfigV2": _dump_yaml(serve_config),
            "rayClusterConfig": {
                "rayVersion": deployment.ray_version,
                "enableInTreeAutoscaling": any(n.node_ceiling > plan.nodes[n.name] for n in inventory.node_types),
                "authOptions": {"mode": "token"},
                "gcsFaultToleranceOptions": {"redisAddress": f"{K8S_REDIS_NAME}:6379"},
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
                    "template": {
                        "spec": {
                            "containers": [
                                {
                                    "name": "ray-head",
                                    "image": deployment.image,
                                    "resources": {"limits": dict(head_resources), "requests": dict(head_resources)},
                                    "ports": [
                                        {"containerPort": 6379, "name": "gcs-server"},
                                        {"containerPort": 8265, "name": "dashboard"},
                                        {"containerPort": 10001, "name": "client"},
                                        {"containerPort": SERVE_HTTP_PORT, "name": "serve"},
                                    ],
                                }
                            ]
                        }
                    },
                },
                "workerGroupSpecs": worker_groups,
            },
        },
    }


def render_redis(report: PlacementReport) -> list[dict]:
    """Redis Deployment and Service: GCS fault tolerance (DB 0) and the image-feature cache (DB 1)."""
    namespace = report.inventory.deployment.namespace
    labels = {"app.kubernetes.io/name": K8S_REDIS_NAME, "app.kubernetes.io/part-of": report.inventory.deployment.cluster_name}
    resources = {"cpu": "1", "memory": "3Gi"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": K8S_REDIS_NAME, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": K8S_REDIS_NAME}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "redis",
                            "image": "redis:7.4-alpine",
                            # Only keys with a TTL (cache entries) are evicted, never Ray's GCS tables.
                            "args": ["--appendonly", "yes", "--maxmemory", "2gb", "--maxmemory-policy", "volatile-lru"],
                            "ports": [{"containerPort": 6379, "name": "redis"}],
                            "resources": {"limits": dict(resources), "requests": dict(resources)},
                            "readinessProbe": {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 5},
                            "livenessProbe": {"tcpSocket": {"port": 6379}, "periodSeconds": 10},
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                        }
                    ],
                    "volumes": [{"name": "data", "emptyDir": {}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": K8S_REDIS_NAME, "namespace": namespace, "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "selector": {"app.kubernetes.io/name": K8S_REDIS_NAME},
            "ports": [{"name": "redis", "port": 6379, "targetPort": 6379}],
        },
    }
    return [deployment, service]


# --- files -------------------------------------------------------------------------------------


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (serveConfigV2) as readable literal blocks, and no YAML aliases."""

    def ignore_aliases(self, data) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_representer)


def _dump_yaml(data) -> str:
    return yaml.dump(data, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False, width=4096)


def _header(source: str, what: str, notes: tuple[str, ...] = ()) -> str:
    lines = [
        f"# {what}",
        f"# Generated by `rerank-fleet plan {source}` (placement.render); do not edit by hand.",
    ]
    lines += [f"# NOTE: {note}" for note in notes]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class PlanOutputs:
    """The text of every file a plan produces, keyed by kind."""

    serve: str
    aws: str
    gcp: str
    rayservice: str
    redis: str


def render_outputs(report: PlacementReport, source: str) -> PlanOutputs:
    aws = render_ray_up(report, "aws")
    gcp = render_ray_up(report, "gcp")
    return PlanOutputs(
        serve=_header(source, "Ray Serve config (serve deploy) for the planned arms.") + _dump_yaml(render_serve_config(report)),
        aws=_header(source, "ray up cluster config for AWS.", aws.notes) + _dump_yaml(aws.data),
        gcp=_header(source, "ray up cluster config for GCP.", gcp.notes) + _dump_yaml(gcp.data),
        rayservice=_header(source, "KubeRay RayService for the planned arms (apply k8s/redis.yaml first).")
        + _dump_yaml(render_rayservice(report)),
        redis=_header(source, "Redis for GCS fault tolerance and the image-feature cache.")
        + yaml.dump_all(render_redis(report), Dumper=_BlockDumper, sort_keys=False, width=4096),
    )


OUTPUT_FILES = {"serve": "serve.yaml", "aws": "aws.yaml", "gcp": "gcp.yaml", "rayservice": "rayservice.yaml", "redis": "redis.yaml"}
EXAMPLE_FILES = {
    "serve": "configs/serve-example.yaml",
    "aws": "cluster/aws-example.yaml",
    "gcp": "cluster/gcp-example.yaml",
    "rayservice": "k8s/rayservice-example.yaml",
    "redis": "k8s/redis.yaml",
}


def write_outputs(outputs: PlanOutputs, paths: dict[str, Path]) -> list[Path]:
    written = []
    for kind, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(getattr(outputs, kind))
        written.append(path)
    return written


def read_architecture_config(inventory: Inventory, inventory_path: Path) -> dict:
    """The model's config.json: the inventory's architecture_config, else `source` (folder or hub id)."""
    reference = inventory.model.architecture_config or inventory.model.source
    path = (inventory_path.parent / reference).resolve()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    # A hub id: fetch config.json alone (never the weights).
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(reference, "config.json")).read_text())


def example_report(repo_root: Path) -> PlacementReport:
    inventory_path = repo_root / EXAMPLE_INVENTORY
    inventory = Inventory.from_yaml(inventory_path)
    return plan_placement(inventory, read_architecture_config(inventory, inventory_path))


def expected_examples(repo_root: Path) -> dict[Path, str]:
    """Every checked-in example file and the text a fresh generation gives it."""
    from placement.report import memory_table_markdown, replace_generated_block

    repo_root = Path(repo_root)
    outputs = render_outputs(example_report(repo_root), EXAMPLE_INVENTORY)
    files = {repo_root / rel: getattr(outputs, kind) for kind, rel in EXAMPLE_FILES.items()}
    docs = repo_root / "docs" / "PLACEMENT.md"
    files[docs] = replace_generated_block(docs.read_text(), memory_table_markdown(repo_root / "configs" / "models"))
    return files


def regenerate_examples(repo_root: str | Path) -> list[Path]:
    """Rewrite the checked-in examples (cluster/, k8s/, configs/serve-example.yaml, the docs table)."""
    written = []
    for path, text in expected_examples(Path(repo_root)).items():
        path.write_text(text)
        written.append(path)
    return written
