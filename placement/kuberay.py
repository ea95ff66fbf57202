"""The KubeRay RayService of a plan: a head that runs no replicas, an ingress group of CPU pods
spread over nodes, one GPU worker group per GPU type with its weights mounted, `/dev/shm`, the
fleet Secret as files, and an upgrade strategy that rolls out a new image.

Every pod names the node type it is meant for (`node.kubernetes.io/instance-type` on EKS and
GKE) and is checked against what that machine leaves it (`placement.pod_fit`), KubeRay's
autoscaler sidecar included. A GPU pod first checks the node's NVIDIA driver against the image's
CUDA build and waits until the weights its arms read are on the volume."""

from __future__ import annotations

import json
import math

from placement import feature_cache, k8s
from placement.grafana import RAY_METRICS_PORT
from placement.inventory import Inventory, NodeType
from placement.planner import PlacementReport
from placement.machines import cloud_node, gpu_machine
from placement.pod_fit import PodFitError, check_pods_fit
from placement.render import INGRESS_RESOURCE, SERVE_HTTP_PORT, Rendered, RenderError, ServeTarget, serve_application
from placement.weights import copy_command, disk_gib, weights_env
from placement.weights_jobs import wait_container
from serve.request_path import FAST_PATH_ENV
from serve.yaml_io import dump_yaml

SCRATCH_GIB = 10  # logs, Ray's session folder and spilled objects, besides any weights copy
SHM_FRACTION = 0.3  # Ray's object store defaults to 30 % of the pod's memory, in /dev/shm
# KubeRay's in-tree autoscaler runs beside the head with these requests (BuildAutoscalerContainer).
AUTOSCALER_SIDECAR = {"cpu": "500m", "memory": "512Mi"}
def check_driver_container(report: PlacementReport, node: NodeType) -> dict:
    """A GPU pod's first step: the node's NVIDIA driver against the image's CUDA build (cli/driver_check.py).
    It asks for the pod's GPUs so the container runtime gives it the driver."""
    resources = {"cpu": "100m", "memory": "512Mi"}
    limits = {**resources, "nvidia.com/gpu": str(node.gpus_per_node)}
    return {
        "name": "check-driver",
        "image": report.inventory.deployment.image,
        "imagePullPolicy": "Always",
        "command": ["rerank-fleet", "check-driver"],
        "securityContext": k8s.container_security(read_only_root=True),
        "resources": {"requests": {**limits}, "limits": limits},
    }


INGRESS_LABELS = {"rerank-fleet/group": "ingress"}


def cache_redis_url(inventory: Inventory) -> str:
    return f"redis://{k8s.redis_name(inventory.deployment, 'cache')}:6379/0"


def _ray_start_resources(resources: dict[str, int]) -> str:
    # KubeRay hands this to `ray start --resources=...` through a shell, hence the escaped quotes.
    return json.dumps(json.dumps(resources))


def _secret_keys(report: PlacementReport, node: NodeType | None) -> list[str]:
    keys = [k8s.ADMIN_KEYS]
    if report.inventory.deployment.api_auth:
        keys.append(k8s.API_KEYS)
    if feature_cache.uses_cache_redis(report):
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
        # Serve's fast request path, in every Ray process of the pod from its start (serve/request_path.py).
        "env": [*({"name": k, "value": v} for k, v in FAST_PATH_ENV.items()), *container.get("env", [])],
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
    metadata = {"labels": {**k8s.ray_pod_label(deployment), **spec.pop("labels", {})}}
    if "annotations" in spec:
        metadata["annotations"] = spec.pop("annotations")
    if not spec.get("nodeSelector"):
        spec.pop("nodeSelector", None)
    return {
        "metadata": metadata,
        "spec": {"securityContext": k8s.pod_security(k8s.RAY_UID), **k8s.pull_secrets(deployment), **spec, "containers": [container], "volumes": volumes},
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
    """KubeRay's upgrade strategy and why. KubeRay rolls out a changed cluster spec (a new image)
    only by building a new cluster beside the old one: with type `None` it ignores the change
    entirely (docs/DEPLOY.md, "Upgrades"). So it is always a new cluster: incremental
    (`NewClusterWithIncrementalUpgrade`, traffic moved in steps through the Gateway API) where a
    gateway class is given and every GPU pool has headroom, else `NewCluster` (traffic switches
    once the new cluster's application is RUNNING, which its ingress reports once its arms answer
    or `arm_grace_s` after the first did: serve.arm_arrival). The new cluster's GPU pods
    need room beside the old ones: the note says how much of the plan each pool can double."""
    deployment = report.inventory.deployment
    headroom = {}
    for node in report.inventory.node_types:
        planned = report.plan.nodes[node.name]
        if planned:
            headroom[node.name] = 100 * (node.node_ceiling - planned) // planned
    surge = min([100, *headroom.values()])
    room = ", ".join(f"{name} {min(100, pct)} %" for name, pct in headroom.items()) or "no GPU pool in use"
    if deployment.upgrade.gateway_class is not None and surge >= 1:
        options = {
            "maxSurgePercent": surge,
            "stepSizePercent": min(deployment.upgrade.step_percent, surge),
            "intervalSeconds": deployment.upgrade.interval_s,
            "gatewayClassName": deployment.upgrade.gateway_class,
        }
        return {"type": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": options}, (
            f"incremental upgrade (KubeRay >= 1.5), surge {surge} % of the GPU pools; headroom per pool: {room}"
        )
    why = "no deployment.upgrade.gateway_class" if deployment.upgrade.gateway_class is None else "a GPU pool has no headroom for an incremental step"
    if not headroom or max(headroom.values()) < 1:
        return {"type": "NewCluster"}, (
            f"new-cluster upgrade ({why}); NO GPU pool can grow beside the running one ({room}): the new cluster gets no arm "
            "until max_nodes is raised, and traffic stays on the old one; see docs/DEPLOY.md"
        )
    return {"type": "NewCluster"}, f"new-cluster upgrade ({why}); room for the new cluster's GPU pods per pool: {room}; see docs/DEPLOY.md"


def render_rayservice(report: PlacementReport) -> Rendered:
    """A KubeRay RayService: head group, an ingress group, one worker group per GPU type, the Serve config inline."""
    inventory = report.inventory
    deployment = inventory.deployment
    plan = report.plan
    notes: list[str] = []
    target = ServeTarget(redis_url=cache_redis_url(inventory), secrets_dir=k8s.SECRETS_MOUNT)
    serve_config = {"applications": [serve_application(report, target)]}
    ingress = deployment.ingress
    pods: list[tuple[str, dict, str, str | None]] = []  # (pod, spec, node type, machine): checked against their nodes below
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
                labels=INGRESS_LABELS,
                automountServiceAccountToken=False,
                nodeSelector=k8s.pool_selector(k8s.ingress_machine(deployment)),
                # One ingress pod per Kubernetes node: a node lost never takes the endpoint with it.
                affinity={
                    "podAntiAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": [
                            {"labelSelector": {"matchLabels": INGRESS_LABELS}, "topologyKey": "kubernetes.io/hostname"}
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
        machine = gpu_machine(node, deployment.k8s_platform)
        template = _pod(
            report,
            container,
            node.host_memory_gib,
            node=node,
            extra_volumes=volumes,
            automountServiceAccountToken=False,
            nodeSelector={**selector, **k8s.pool_selector(machine)},
            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        )
        waits = wait_container(report, node)
        template["spec"]["initContainers"] = [check_driver_container(report, node), *init, *([waits] if waits else [])]
        pods.append((f"worker group {node.name}", template["spec"], f"node_types.{node.name}", machine))
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
    pods.insert(0, ("ingress pod", worker_groups[0]["template"]["spec"], "deployment.ingress", k8s.ingress_machine(deployment)))
    strategy, why = upgrade_strategy(report)
    notes.append(why)
    head_resources = {"cpu": f"{deployment.system.head_cpus:g}", "memory": f"{deployment.system.head_memory_gib}Gi"}
    # The autoscaler grows GPU groups toward their ceilings for the arms' pending replicas (and a new cluster's).
    autoscaling = any(n.node_ceiling > plan.nodes[n.name] for n in inventory.node_types)
    head = _pod(
        report,
        {
            "name": "ray-head",
            "resources": {"limits": dict(head_resources), "requests": dict(head_resources)},
            "ports": [
                {"containerPort": 6379, "name": "gcs-server"},
                {"containerPort": 8265, "name": "dashboard"},
                {"containerPort": 10001, "name": "client"},
                {"containerPort": SERVE_HTTP_PORT, "name": "serve"},
            ],
        },
        deployment.system.head_memory_gib,
        node=None,
        nodeSelector=k8s.pool_selector(k8s.system_machine(deployment)),
        # The cluster autoscaler must not move the head to consolidate nodes (Ray's own advice).
        annotations={"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
    )
    head_spec = head["spec"]
    if autoscaling:  # KubeRay adds its autoscaler beside the head: the node must hold both
        head_spec = {**head_spec, "containers": [*head_spec["containers"], {"name": "autoscaler", "resources": {"requests": dict(AUTOSCALER_SIDECAR)}}]}
    pods.insert(0, ("head pod (with KubeRay's autoscaler sidecar)" if autoscaling else "head pod", head_spec, "deployment.system", k8s.system_machine(deployment)))
    try:
        notes += check_pods_fit(deployment.k8s_platform, f"rayservice {deployment.cluster_name}", pods)
    except PodFitError as e:
        raise RenderError(str(e)) from None
    manifest = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": deployment.cluster_name, "namespace": deployment.namespace},
        "spec": {
            "upgradeStrategy": strategy,
            "serveConfigV2": dump_yaml(serve_config),
            "rayClusterConfig": {
                "rayVersion": deployment.ray_version,
                "enableInTreeAutoscaling": autoscaling,
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
    and agent ports (Serve config, health); Prometheus on the metrics agents' port (read-only
    metrics: `placement.grafana`); anyone on the Serve HTTP port (clients come through the Service
    or a load balancer). Nothing else reaches the dashboard, whose job API runs code."""
    deployment = report.inventory.deployment
    ray_pods = k8s.ray_pod_label(deployment)
    operator = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": deployment.kuberay_namespace}}}
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": deployment.monitoring_namespace}}}
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
                {"from": [prometheus], "ports": [{"protocol": "TCP", "port": RAY_METRICS_PORT}]},
                {"ports": [{"protocol": "TCP", "port": SERVE_HTTP_PORT}]},
            ],
        },
    }


def render_ingress_budget(report: PlacementReport) -> dict:
    """The ingress pods' PodDisruptionBudget: a node drain or scale-down takes one ingress pod at a
    time, so the endpoint keeps answering. `minAvailable` is a count: KubeRay's RayCluster has no
    scale subresource, which a percentage or `maxUnavailable` would need."""
    deployment = report.inventory.deployment
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": f"{deployment.cluster_name}-ingress", "namespace": deployment.namespace},
        "spec": {
            "minAvailable": max(1, deployment.ingress.replicas - 1),
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
            "selector": {"matchLabels": {**k8s.ray_pod_label(deployment), **INGRESS_LABELS}},
        },
    }
