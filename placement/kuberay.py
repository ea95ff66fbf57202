"""The KubeRay RayService of a plan: a head that runs no replicas, an ingress group of CPU pods
spread over nodes, one GPU worker group per GPU type with its weights mounted, `/dev/shm`, the
fleet Secret as files, and an upgrade strategy the GPU pools can afford."""

from __future__ import annotations

import json
import math

from placement import feature_cache, k8s
from placement.inventory import Inventory, NodeType
from placement.planner import PlacementReport
from placement.ray_up import cloud_node
from placement.render import INGRESS_RESOURCE, SERVE_HTTP_PORT, Rendered, RenderError, ServeTarget, dump_yaml, serve_application
from placement.weights import copy_command, disk_gib, weights_env

HEAD_RESOURCES = {"cpu": "4", "memory": "16Gi"}
SCRATCH_GIB = 10  # logs, Ray's session folder and spilled objects, besides any weights copy
SHM_FRACTION = 0.3  # Ray's object store defaults to 30 % of the pod's memory, in /dev/shm


def cache_redis_url(inventory: Inventory) -> str:
    return f"redis://{k8s.redis_name(inventory.deployment, 'cache')}:6379/0"


def _ray_start_resources(resources: dict[str, int]) -> str:
    # KubeRay hands this to `ray start --resources=...` through a shell, hence the escaped quotes.
    return json.dumps(json.dumps(resources))


def _secret_keys(report: PlacementReport, node: NodeType | None) -> list[str]:
    keys = [k8s.ADMIN_KEYS]
    if report.inventory.deployment.api_auth:
        keys.append(k8s.API_KEYS)
    if feature_cache.uses_shared_cache(report):
        keys.append(k8s.REDIS_CACHE_PASSWORD)
    if node is not None and report.inventory.weights_for(node).hub_token:
        keys.append(k8s.HF_TOKEN)
    return keys


def _pod(report: PlacementReport, container: dict, memory_gib: int, *, node: NodeType | None, extra_volumes=(), **spec) -> dict:
    """A Ray pod template: the container with /dev/shm, the fleet Secret as files and security contexts."""
    deployment = report.inventory.deployment
    shm_gib = max(1, math.ceil(memory_gib * SHM_FRACTION))
    container = {
        **container,
        "image": deployment.image,
        "imagePullPolicy": "Always",
        "securityContext": k8s.container_security(read_only_root=False),
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "fleet-secrets", "mountPath": k8s.SECRETS_MOUNT, "readOnly": True},
            *container.get("volumeMounts", []),
        ],
    }
    volumes = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gib}Gi"}},
        k8s.secret_volume(deployment, _secret_keys(report, node)),
        *extra_volumes,
    ]
    return {
        "metadata": {"labels": {**k8s.ray_pod_label(deployment), **spec.pop("labels", {})}},
        "spec": {"securityContext": k8s.pod_security(k8s.RAY_UID), **spec, "containers": [container], "volumes": volumes},
    }


def _weights(report: PlacementReport, node: NodeType) -> tuple[list[dict], list[dict], list[dict], list[dict], int]:
    """(volumes, volume mounts, env, init containers, local disk GiB) that put the weights in place."""
    inventory = report.inventory
    spec = inventory.weights_for(node)
    precisions = {p.precision for p in report.plan.placements if p.node_type == node.name} or {a.precision for a in inventory.arms}
    env = [{"name": k, "value": v} for k, v in weights_env(spec, f"{k8s.SECRETS_MOUNT}/{k8s.HF_TOKEN}").items()]
    init: list[dict] = []
    disk = 0
    if spec.source == "volume":
        source = (
            {"persistentVolumeClaim": {"claimName": spec.pvc, "readOnly": True}}
            if spec.pvc
            else {"hostPath": {"path": spec.host_path, "type": "Directory"}}
        )
        volumes = [{"name": "weights", **source}]
        mounts = [{"name": "weights", "mountPath": spec.mount_path, "readOnly": True}]
    else:
        disk = disk_gib(inventory, report.counts, node, precisions)
        volumes = [{"name": "weights", "emptyDir": {"sizeLimit": f"{disk}Gi"}}]
        read_only = spec.source == "object_store"
        mounts = [{"name": "weights", "mountPath": spec.mount_path, "readOnly": read_only}]
        if spec.source == "object_store":
            copy = copy_command(spec.uri, spec.mount_path)
            # Credentials come from the pod's service account (IRSA on EKS, Workload Identity on GKE).
            init.append(
                {
                    "name": "fetch-weights",
                    "image": copy.image,
                    "imagePullPolicy": "Always",
                    "command": copy.command,
                    "securityContext": k8s.container_security(read_only_root=True),
                    "resources": {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
                    # The root filesystem is read-only: the CLIs keep their config and credential caches in /tmp.
                    "env": [{"name": "HOME", "value": "/tmp"}, {"name": "CLOUDSDK_CONFIG", "value": "/tmp/gcloud"}],
                    "volumeMounts": [{"name": "weights", "mountPath": spec.mount_path}, {"name": "copy-tmp", "mountPath": "/tmp"}],
                }
            )
            volumes.append({"name": "copy-tmp", "emptyDir": {"sizeLimit": "1Gi"}})
    return volumes, mounts, env, init, disk


def _group_resources(cpus: int, memory_gib: int, disk_gib: int, gpus: int = 0) -> dict:
    resources = {"cpu": str(cpus), "memory": f"{memory_gib}Gi", "ephemeral-storage": f"{disk_gib + SCRATCH_GIB}Gi"}
    if gpus:
        resources["nvidia.com/gpu"] = str(gpus)
    return {"limits": dict(resources), "requests": dict(resources)}


def upgrade_strategy(report: PlacementReport) -> tuple[dict, str]:
    """KubeRay's upgrade strategy and why. A new cluster at full size (NewCluster) doubles the GPU
    fleet during an upgrade; the incremental upgrade needs only `maxSurgePercent` of it, which must
    fit every GPU pool's headroom up to its ceiling; without a gateway class or headroom: in place."""
    deployment = report.inventory.deployment
    surges = []
    for node in report.inventory.node_types:
        planned = report.plan.nodes[node.name]
        if planned:
            surges.append(100 * (node.node_ceiling - planned) // planned)
    surge = min([100, *surges])
    if deployment.upgrade.gateway_class is None:
        return {"type": "None"}, "upgrades in place (no deployment.upgrade.gateway_class for an incremental upgrade); see docs/DEPLOY.md"
    if surge < 1:
        return {"type": "None"}, "upgrades in place: a GPU pool is at its ceiling, so no new cluster can grow beside it; see docs/DEPLOY.md"
    options = {
        "maxSurgePercent": surge,
        "stepSizePercent": min(deployment.upgrade.step_percent, surge),
        "intervalSeconds": deployment.upgrade.interval_s,
        "gatewayClassName": deployment.upgrade.gateway_class,
    }
    return {"type": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": options}, f"incremental upgrade, surge {surge} % of the GPU pools"


def render_rayservice(report: PlacementReport) -> Rendered:
    """A KubeRay RayService: head group, an ingress group, one worker group per GPU type, the Serve config inline."""
    inventory = report.inventory
    deployment = inventory.deployment
    plan = report.plan
    notes: list[str] = []
    target = ServeTarget(redis_url=cache_redis_url(inventory), secrets_dir=k8s.SECRETS_MOUNT)
    serve_config = {"applications": [serve_application(report, target)]}
    ingress = deployment.ingress
    ingress_labels = {"rerank-fleet/group": "ingress"}
    worker_groups = [
        {
            "groupName": "ingress",
            "replicas": ingress.replicas,
            "minReplicas": ingress.replicas,
            "maxReplicas": ingress.replicas,
            "rayStartParams": {"resources": _ray_start_resources({INGRESS_RESOURCE: 1}), "num-gpus": "0"},
            "template": _pod(
                report,
                {"name": "ray-worker", "resources": _group_resources(ingress.cpus_per_node, ingress.memory_gib, 0)},
                ingress.memory_gib,
                node=None,
                labels=ingress_labels,
                automountServiceAccountToken=False,
                # One ingress pod per Kubernetes node: a node lost never takes the endpoint with it.
                affinity={
                    "podAntiAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": [
                            {"labelSelector": {"matchLabels": ingress_labels}, "topologyKey": "kubernetes.io/hostname"}
                        ]
                    }
                },
            ),
        }
    ]
    for node in inventory.node_types:
        aws = cloud_node(node, "aws")
        selector = k8s.gpu_node_selector(node, deployment.k8s_platform, aws.instance if aws else None)
        planned = sum(p.replicas for p in plan.placements if p.node_type == node.name)
        if selector is None:
            if planned:
                raise RenderError(
                    f"node_types.{node.name}: k8s_platform {deployment.k8s_platform} has no {node.gpu} nodes; "
                    f"give node_types.{node.name}.k8s_node_selector (the labels of the nodes that have them)"
                )
            notes.append(f"node type {node.name!r} ({node.gpu}) is left out: {deployment.k8s_platform} has no such nodes and the plan puts no replica there")
            continue
        volumes, mounts, env, init, disk = _weights(report, node)
        container = {
            "name": "ray-worker",
            "env": env,
            "resources": _group_resources(node.cpus_per_node, node.host_memory_gib, disk, node.gpus_per_node),
            "volumeMounts": mounts,
        }
        template = _pod(
            report,
            container,
            node.host_memory_gib,
            node=node,
            extra_volumes=volumes,
            automountServiceAccountToken=False,
            nodeSelector=selector,
            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        )
        if init:
            template["spec"]["initContainers"] = init
        worker_groups.append(
            {
                "groupName": node.name,
                "replicas": plan.nodes[node.name],
                "minReplicas": plan.nodes[node.name],
                "maxReplicas": node.node_ceiling,
                "rayStartParams": {"resources": _ray_start_resources({f"accelerator_type:{node.accelerator_type}": 1})},
                "template": template,
            }
        )
    strategy, why = upgrade_strategy(report)
    notes.append(why)
    head = _pod(
        report,
        {
            "name": "ray-head",
            "resources": {"limits": dict(HEAD_RESOURCES), "requests": dict(HEAD_RESOURCES)},
            "ports": [
                {"containerPort": 6379, "name": "gcs-server"},
                {"containerPort": 8265, "name": "dashboard"},
                {"containerPort": 10001, "name": "client"},
                {"containerPort": SERVE_HTTP_PORT, "name": "serve"},
            ],
        },
        int(HEAD_RESOURCES["memory"].removesuffix("Gi")),
        node=None,
    )
    manifest = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": deployment.cluster_name, "namespace": deployment.namespace},
        "spec": {
            "upgradeStrategy": strategy,
            "serveConfigV2": dump_yaml(serve_config),
            "rayClusterConfig": {
                "rayVersion": deployment.ray_version,
                "enableInTreeAutoscaling": strategy["type"] != "None"
                or any(n.node_ceiling > plan.nodes[n.name] for n in inventory.node_types),
                "authOptions": {"mode": "token"},
                "gcsFaultToleranceOptions": {
                    "redisAddress": f"{k8s.redis_name(deployment, 'gcs')}:6379",
                    "redisPassword": {"valueFrom": {"secretKeyRef": {"name": deployment.secret_name, "key": k8s.REDIS_GCS_PASSWORD}}},
                },
                "headGroupSpec": {
                    # No replica runs on the head: losing it (with GCS fault tolerance) never takes the ingress or an arm.
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0", "num-gpus": "0"},
                    "template": head,
                },
                "workerGroupSpecs": worker_groups,
            },
        },
    }
    return Rendered(manifest, tuple(notes))


def render_network_policy(report: PlacementReport) -> dict:
    """The Ray pods' NetworkPolicy: each other on every port; the KubeRay operator on the dashboard
    and agent ports (Serve config, health); anyone on the Serve HTTP port (clients come through the
    Service or a load balancer). Nothing else reaches the dashboard, whose job API runs code."""
    deployment = report.inventory.deployment
    ray_pods = k8s.ray_pod_label(deployment)
    operator = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": deployment.kuberay_namespace}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{deployment.cluster_name}-ray", "namespace": deployment.namespace},
        "spec": {
            "podSelector": {"matchLabels": ray_pods},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": ray_pods}}]},
                {"from": [operator], "ports": [{"protocol": "TCP", "port": 8265}, {"protocol": "TCP", "port": 52365}]},
                {"ports": [{"protocol": "TCP", "port": SERVE_HTTP_PORT}]},
            ],
        },
    }
