"""Kubernetes pieces every rendered manifest shares: names, labels, security contexts, the fleet
Secret's keys, and GPU node selection per platform. Plain data, no I/O."""

from __future__ import annotations

from placement.inventory import DeploymentSpec, NodeType

# The fleet's secrets, one file each: the keys of the Kubernetes Secret `<cluster>-secrets` and the
# file names in ray up's secrets folder. The operator creates them (docs/DEPLOY.md); the renderer
# only ever names them.
API_KEYS = "api-keys"
ADMIN_KEYS = "admin-keys"
REDIS_CACHE_PASSWORD = "redis-cache-password"
REDIS_GCS_PASSWORD = "redis-gcs-password"
HF_TOKEN = "hf-token"
SECRETS_MOUNT = "/etc/rerank-fleet/secrets"  # where Ray pods see the Secret's keys as files
RAY_UID = 1000  # the `ray` user of the rayproject/ray images
REDIS_UID = 999  # the `redis` user of the official Redis images


def ray_pod_label(deployment: DeploymentSpec) -> dict[str, str]:
    """The label on every Ray pod of this fleet: the Redis NetworkPolicies admit these pods only
    (KubeRay's own `ray.io/cluster` label changes with each cluster an upgrade creates)."""
    return {"rerank-fleet/ray-pods": deployment.cluster_name}


def redis_name(deployment: DeploymentSpec, job: str) -> str:
    return f"{deployment.cluster_name}-{job}-redis"


def pod_security(uid: int) -> dict:
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid, "seccompProfile": {"type": "RuntimeDefault"}}


def container_security(*, read_only_root: bool) -> dict:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": read_only_root,
        "capabilities": {"drop": ["ALL"]},
    }


def secret_volume(deployment: DeploymentSpec, keys: list[str]) -> dict:
    return {
        "name": "fleet-secrets",
        "secret": {"secretName": deployment.secret_name, "defaultMode": 0o440, "items": [{"key": k, "path": k} for k in keys]},
    }


def gpu_node_selector(node: NodeType, platform: str, aws_instance: str | None) -> dict[str, str] | None:
    """The node selector of a GPU worker group, or None where the platform has no such nodes."""
    if node.k8s_node_selector:
        return dict(node.k8s_node_selector)
    if platform == "gke":
        label = node.gpu_model.gke_accelerator
        return {"cloud.google.com/gke-accelerator": label} if label else None
    if platform == "eks":
        return {"node.kubernetes.io/instance-type": aws_instance} if aws_instance else None
    return {"nvidia.com/gpu.product": node.gpu_model.k8s_gpu_product}


INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"  # set by EKS and GKE on every node


def platform_machine(deployment: DeploymentSpec, aws: str, gcp: str) -> str | None:
    """The machine of a node pool on this Kubernetes platform (None where the plan cannot know it)."""
    return {"eks": aws, "gke": gcp}.get(deployment.k8s_platform)


def system_machine(deployment: DeploymentSpec) -> str | None:
    """The nodes of the Ray head, the Redis servers and the fill Job."""
    return platform_machine(deployment, deployment.system.aws_instance_type, deployment.system.gcp_machine_type)


def ingress_machine(deployment: DeploymentSpec) -> str | None:
    return platform_machine(deployment, deployment.ingress.aws_instance_type, deployment.ingress.gcp_machine_type)


def pool_selector(machine: str | None) -> dict[str, str]:
    """The node selector that keeps a pod on its pool's machines ({} where the machine is unknown)."""
    return {INSTANCE_TYPE_LABEL: machine} if machine else {}


def pull_secrets(deployment: DeploymentSpec) -> dict:
    """The pod spec's imagePullSecrets for the project's images ({} for a public registry)."""
    return {"imagePullSecrets": [{"name": deployment.image_pull_secret}]} if deployment.image_pull_secret else {}
