"""What deploys a plan: the Serve config here, and through `placement.ray_up` and
`placement.kuberay` the `ray up` cluster YAMLs and the KubeRay RayService with its Redis servers,
for the targets the inventory names (`deployment.targets`).

Every arm of the plan is one (precision, node type) pair and becomes one Serve deployment
`Arm-<precision>-<node type>` whose replicas ask for one GPU of that node type's Ray accelerator
type, so Ray can only place them there. The serving app's arguments are a `serve.config.FleetConfig`
built with `FleetConfig.from_dict`, so they are valid by construction. Secrets appear only as
references (files the replicas read at start), never as values.

`placement.outputs` turns all of it into files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from placement import feature_cache, k8s
from placement.inventory import Inventory, NodeType
from placement.planner import PlacementReport, arm_name, arm_weights, cascade_routes
from placement.weights import WeightsPlanError, check_arm_weights

SERVE_HTTP_PORT = 8000
# Ingress nodes declare one unit; each ingress replica (and the ledger) asks for a sliver of it, so
# they land on those nodes only (never the head or a GPU node), and Serve's max_replicas_per_node
# spreads the ingress one per node.
INGRESS_RESOURCE = "rerank_ingress"
INGRESS_RESOURCE_PER_REPLICA = 0.01


class RenderError(ValueError):
    """A plan that cannot be deployed as asked; the message names the arm, node type or field."""


@dataclass(frozen=True)
class ServeTarget:
    """What differs between the Serve config of a `ray up` cluster and of a KubeRay one."""

    redis_url: str | None  # the shared feature cache, when some arm uses it
    secrets_dir: str  # folder the replicas read secret files from (one file per key of the fleet Secret)


@dataclass(frozen=True)
class Rendered:
    """A rendered cluster file's data and the lines for its header comment (e.g. node types left out)."""

    data: dict
    notes: tuple[str, ...]


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


def check_weights(report: PlacementReport) -> None:
    """Every arm's checkpoint is where its node type's pods mount weights (RenderError otherwise)."""
    nodes = {n.name: n for n in report.inventory.node_types}
    try:
        check_arm_weights(report.inventory, [(p.precision, nodes[p.node_type]) for p in report.plan.placements])
    except WeightsPlanError as e:
        raise RenderError(str(e)) from None


def fleet_config(report: PlacementReport, target: ServeTarget):
    """The serving app's fleet configuration (a validated `serve.config.FleetConfig`) for this plan."""
    from serve.config import FleetConfig  # the serving app's schema; imported here to keep planning Ray-free

    check_weights(report)
    inventory = report.inventory
    deployment = inventory.deployment
    choices = feature_cache.cache_choices(report)
    redis_url = target.redis_url if feature_cache.uses_cache_redis(report) else None
    arms = []
    for arm in arm_deployments(report):
        entry: dict = {
            "name": arm.name,
            "precision": arm.precision,
            "weight": arm.weight,
            "max_ongoing_requests": deployment.max_ongoing_requests,
            "ray_actor_options": arm.actor_options(deployment.replica_cpus),
            "feature_cache": choices[arm.name].mode,
        }
        spec = next(a for a in inventory.arms if a.precision == arm.precision)
        entry["backend"] = spec.backend
        entry.update({k: v for k, v in (("fan_out_above", spec.fan_out_above), ("fan_out_chunk", spec.fan_out_chunk)) if v is not None})
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

    def secret(key: str) -> dict:
        return {"file": f"{target.secrets_dir}/{key}"}

    cache: dict = {"redis_url": redis_url, "max_item_bytes": feature_cache.max_item_bytes(report.architecture)}
    if redis_url:
        cache["redis_password_from"] = secret(k8s.REDIS_CACHE_PASSWORD)
    traffic = inventory.traffic
    cascades = [{"name": c.name, "first": arm_name(*c.first), "then": arm_name(*c.then), "k": c.k, "weight": c.weight}
                for c in cascade_routes(inventory, report.plan)]  # fmt: skip
    data = {
        "model": {"source": inventory.model.source, "max_batch_tokens": traffic.batch_token_budget},
        "arms": arms,
        # A cascade composes two of the arms above (serve/cascade.py): no deployment, no GPU of its own.
        **({"cascades": cascades} if cascades else {}),
        "cache": cache,
        **({"score_cache": {"mode": traffic.score_cache, "ttl_s": traffic.score_cache_window_s}} if traffic.score_cache != "off" else {}),
        # Inside the cluster the proxy must answer the load balancer / Service, so it binds every interface.
        "http": {"host": "0.0.0.0", "port": SERVE_HTTP_PORT, "route_prefix": deployment.route_prefix},
        "ingress": {
            "num_replicas": deployment.ingress.replicas,
            "max_replicas_per_node": 1,
            "resources": {INGRESS_RESOURCE: INGRESS_RESOURCE_PER_REPLICA},
        },
        "admin_keys_from": secret(k8s.ADMIN_KEYS),
        # Ray clusters whose GPU nodes join after the config is submitted (KubeRay, ray up): never
        # refused for what is missing now, and an arm whose nodes never come holds back no other.
        "cluster": {"elastic": True, "arm_grace_s": deployment.arm_grace_s},
    }
    if deployment.api_auth:
        data["api_keys_from"] = secret(k8s.API_KEYS)
    return FleetConfig.from_dict(data, source="placement plan")


def serve_application(report: PlacementReport, target: ServeTarget) -> dict:
    """One Serve application: the app's args, plus each deployment's settings spelled out for operators.

    The `deployments` entries are exactly what `serve.app.build_app` sets from the same arms
    (`serve.deploy_options`), so the file shows the replicas and GPU pinning without changing them.
    """
    from serve.deploy_options import IMPORT_PATH, arm_options, ingress_options, ledger_options

    fleet = fleet_config(report, target)

    def without_gpu(options: dict) -> dict:  # spelled out, so operators see the ingress and ledger take none
        return {**options, "ray_actor_options": {**options["ray_actor_options"], "num_gpus": 0}}

    deployments = [
        without_gpu(ingress_options(fleet)),
        *(arm_options(arm, fleet.http.drain_grace_s, elastic=fleet.cluster.elastic) for arm in fleet.arms),
        without_gpu(ledger_options(fleet)),
    ]
    deployment = report.inventory.deployment
    return {
        "name": deployment.app_name,
        "route_prefix": deployment.route_prefix,
        "import_path": IMPORT_PATH,
        "args": {"config": fleet.model_dump(mode="json", exclude_unset=True)},  # references only: it holds no secret
        "deployments": deployments,
    }


# Where a `ray up` node's container finds the secrets: file_mounts copy the operator's folder there.
RAY_UP_SECRETS_DIR = "~/rerank-fleet-secrets"


def render_serve_config(report: PlacementReport) -> dict:
    """`serve deploy` config for a Ray cluster started with `ray up` (feature cache: deployment.redis_url)."""
    target = ServeTarget(redis_url=report.inventory.deployment.redis_url, secrets_dir=RAY_UP_SECRETS_DIR)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": SERVE_HTTP_PORT},
        "applications": [serve_application(report, target)],
    }


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
