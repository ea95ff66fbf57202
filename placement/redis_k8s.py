"""The two Redis servers of a KubeRay fleet, split by job so one's trouble is never the other's:

- `<cluster>-gcs-redis`: Ray's GCS fault-tolerance tables. A StatefulSet on a persistent volume,
  append-only file, `noeviction` (losing a key is losing the control plane's state).
- `<cluster>-cache-redis` (only when some arm uses the shared feature cache, or the ingress's
  score cache is shared): image features and scores. `allkeys-lru`, no persistence (no fork
  under a tight memory limit, nothing to lose), `maxmemory` from the planner's feature-size
  model, the score cache's pairs and the traffic.

Both need a password (read from the fleet Secret as a file into a config file, never an argument
or environment variable) and admit connections only from this fleet's Ray pods (NetworkPolicy):
cached features' keys are computable hashes, so any pod that could write them could poison results.
Both run on the system nodes (`deployment.system`), checked to fit them, under a
PodDisruptionBudget.
"""

from __future__ import annotations

import math

from placement import feature_cache, k8s
from placement.planner import PlacementReport
from placement.pod_fit import PodFitError, check_pods_fit
from placement.render import RenderError

REDIS_UID = 10001  # any non-root uid works for the official image; a high one stays clear of host users
GCS_MAXMEMORY_MIB = 1024  # Ray's GCS tables are megabytes; a bound makes runaway growth an error, not an OOM kill
MIB = 1024**2


def _start_command(args: str) -> list[str]:
    # The password goes from the Secret's file into a config file on a memory volume: it never
    # appears in the pod spec, the process list or the environment.
    return [
        "sh",
        "-c",
        'printf "requirepass %s\\n" "$(cat /secrets/password)" > /conf/redis.conf && '
        f"exec redis-server /conf/redis.conf --port 6379 --dir /data {args}",
    ]


PING = ["sh", "-c", 'REDISCLI_AUTH="$(cat /secrets/password)" redis-cli ping | grep -q PONG']


def _labels(report: PlacementReport, job: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": k8s.redis_name(report.inventory.deployment, job),
        "app.kubernetes.io/part-of": report.inventory.deployment.cluster_name,
    }


def _pod_spec(report: PlacementReport, job: str, args: str, memory_mib: int, password_key: str, data_volume: dict | None) -> dict:
    deployment = report.inventory.deployment
    resources = {"cpu": "1", "memory": f"{memory_mib}Mi"}
    volumes = [
        {"name": "conf", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {
            "name": "password",
            "secret": {"secretName": deployment.secret_name, "defaultMode": 0o440, "items": [{"key": password_key, "path": "password"}]},
        },
    ]
    if data_volume is not None:
        volumes.append(data_volume)
    spec = {
        "securityContext": k8s.pod_security(REDIS_UID),
        "automountServiceAccountToken": False,
        "nodeSelector": k8s.pool_selector(k8s.system_machine(deployment)),
        "containers": [
            {
                "name": "redis",
                "image": deployment.redis_image,
                "imagePullPolicy": "Always",
                "command": _start_command(args),
                "ports": [{"containerPort": 6379, "name": "redis"}],
                "resources": {"limits": dict(resources), "requests": dict(resources)},
                "readinessProbe": {"exec": {"command": PING}, "periodSeconds": 5},
                "livenessProbe": {"exec": {"command": PING}, "periodSeconds": 10, "failureThreshold": 6},
                "securityContext": k8s.container_security(read_only_root=True),
                "volumeMounts": [
                    {"name": "conf", "mountPath": "/conf"},
                    {"name": "password", "mountPath": "/secrets", "readOnly": True},
                    {"name": "data", "mountPath": "/data"},
                ],
            }
        ],
        "volumes": volumes,
    }
    if not spec["nodeSelector"]:
        del spec["nodeSelector"]
    _check_fit(report, job, spec)
    return spec


def _check_fit(report: PlacementReport, job: str, spec: dict) -> None:
    deployment = report.inventory.deployment
    pods = [(f"{job} Redis pod", spec, "deployment.system", k8s.system_machine(deployment))]
    try:
        check_pods_fit(deployment.k8s_platform, deployment.cluster_name, pods)
    except PodFitError as e:
        raise RenderError(f"{e} (lower deployment.cache_max_memory_gib or choose a larger deployment.system machine)") from None


def _disruption_budget(report: PlacementReport, job: str) -> dict:
    """A voluntary eviction (a node drain, a cluster-autoscaler scale-down) waits until the operator
    moves this Redis on purpose (docs/DEPLOY.md); a Redis that is not healthy may still be evicted."""
    labels = _labels(report, job)
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": labels["app.kubernetes.io/name"], "namespace": report.inventory.deployment.namespace, "labels": labels},
        "spec": {
            "minAvailable": 1,
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
            "selector": {"matchLabels": {"app.kubernetes.io/name": labels["app.kubernetes.io/name"]}},
        },
    }


def _service(report: PlacementReport, job: str) -> dict:
    labels = _labels(report, job)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": labels["app.kubernetes.io/name"], "namespace": report.inventory.deployment.namespace, "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "selector": {"app.kubernetes.io/name": labels["app.kubernetes.io/name"]},
            "ports": [{"name": "redis", "port": 6379, "targetPort": 6379}],
        },
    }


def _network_policy(report: PlacementReport, job: str) -> dict:
    deployment = report.inventory.deployment
    labels = _labels(report, job)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": labels["app.kubernetes.io/name"], "namespace": deployment.namespace, "labels": labels},
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": labels["app.kubernetes.io/name"]}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": k8s.ray_pod_label(deployment)}}], "ports": [{"protocol": "TCP", "port": 6379}]}],
        },
    }


def render_gcs_redis(report: PlacementReport) -> list[dict]:
    deployment = report.inventory.deployment
    labels = _labels(report, "gcs")
    args = f"--appendonly yes --appendfsync everysec --maxmemory {GCS_MAXMEMORY_MIB}mb --maxmemory-policy noeviction"
    # Room for the append-only file's rewrite, which forks: copy-on-write pages count against the limit.
    spec = _pod_spec(report, "gcs", args, 3 * GCS_MAXMEMORY_MIB, k8s.REDIS_GCS_PASSWORD, None)
    stateful_set = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": labels["app.kubernetes.io/name"], "namespace": deployment.namespace, "labels": labels},
        "spec": {
            "serviceName": labels["app.kubernetes.io/name"],
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": labels["app.kubernetes.io/name"]}},
            "template": {"metadata": {"labels": labels}, "spec": spec},
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "data"},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": f"{deployment.gcs_storage_gib}Gi"}}},
                }
            ],
        },
    }
    return [_service(report, "gcs"), stateful_set, _network_policy(report, "gcs"), _disruption_budget(report, "gcs")]


def render_cache_redis(report: PlacementReport) -> list[dict]:
    deployment = report.inventory.deployment
    labels = _labels(report, "cache")
    sizing = feature_cache.cache_redis_sizing(report)
    maxmemory_mib = sizing.maxmemory_bytes // MIB
    args = f'--save "" --appendonly no --maxmemory {maxmemory_mib}mb --maxmemory-policy allkeys-lru'
    limit_mib = math.ceil(maxmemory_mib * 1.25) + 256  # allocator fragmentation and client buffers over maxmemory
    spec = _pod_spec(report, "cache", args, limit_mib, k8s.REDIS_CACHE_PASSWORD, {"name": "data", "emptyDir": {"sizeLimit": "1Gi"}})
    cache = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": labels["app.kubernetes.io/name"],
            "namespace": deployment.namespace,
            "labels": labels,
            "annotations": {"rerank-fleet/sizing": sizing.detail},
        },
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": labels["app.kubernetes.io/name"]}},
            "template": {"metadata": {"labels": labels}, "spec": spec},
        },
    }
    return [_service(report, "cache"), cache, _network_policy(report, "cache"), _disruption_budget(report, "cache")]


def render_redis(report: PlacementReport) -> list[dict]:
    """GCS fault-tolerance Redis, and the cache Redis when an arm shares image features or the score cache is shared."""
    manifests = render_gcs_redis(report)
    if feature_cache.uses_cache_redis(report):
        manifests += render_cache_redis(report)
    return manifests
