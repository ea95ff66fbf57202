"""Serve deployment options of a fleet: pure functions of `FleetConfig`, no Ray import.

`serve.app.build_app` applies them; the placement renderer writes the same values into the
Serve configs it generates, so an operator reads there exactly what the app sets.
"""

from __future__ import annotations

from typing import Any

from serve.config import RETRY_AFTER_S, ArmConfig, AutoscalingConfig, FleetConfig

IMPORT_PATH = "serve.app:build_app"
APP_NAME = "rerank"
# The ingress only parses, fetches and routes; it reserves a fraction of a CPU so small nodes
# keep their cores for arm replicas.
INGRESS_ACTOR_OPTIONS = {"num_cpus": 0.1}
INGRESS_MAX_QUEUED = 64
# What Serve answers for a request past a deployment's max_queued_requests: the fleet's own 503
# with Retry-After (Serve's default sends none), so its proxy's refusals read like the ingress's.
BACKPRESSURE = {"status_code": 503, "retry_after_s": RETRY_AFTER_S}
# The experiment ledger does bookkeeping only (a few merges a second per ingress replica).
LEDGER_OPTIONS = {"name": "Ledger", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 1000}
# The autoscaling policy of an arm on an elastic cluster (serve/arm_scaling.py says why).
PLANNED_REPLICAS_POLICY = "serve.arm_scaling:PlannedReplicas"
ARM_PREFIX = "Arm-"
INGRESS_NAME = "Ingress"  # the app's ingress deployment (serve/ingress.py)


def arm_deployment_name(arm: str) -> str:
    """The Serve deployment of an arm (its replicas' actor names and Serve's status use it)."""
    return f"{ARM_PREFIX}{arm}"


def ledger_options(fleet: FleetConfig) -> dict[str, Any]:
    """The ledger goes where the ingress goes (`ingress.resources`): off the head and the GPU nodes."""
    return {**LEDGER_OPTIONS, "ray_actor_options": {**LEDGER_OPTIONS["ray_actor_options"], **_ingress_resources(fleet)}}


def _ingress_resources(fleet: FleetConfig) -> dict[str, Any]:
    return {"resources": dict(fleet.ingress.resources)} if fleet.ingress.resources else {}


def deferred_autoscaling(planned: int, most: int, target_ongoing_requests: float) -> dict[str, Any]:
    """Serve's `autoscaling_config` of an arm that starts at 0 replicas and asks for `planned` at
    once (at most `most`): the application is RUNNING while the replicas wait for their nodes."""
    return {
        "min_replicas": 0,
        "initial_replicas": 0,
        "max_replicas": most,
        "target_ongoing_requests": target_ongoing_requests,
        "policy": {"policy_function": PLANNED_REPLICAS_POLICY, "policy_kwargs": {"planned": planned}},
    }


def arm_options(arm: ArmConfig, drain_grace_s: float, *, elastic: bool = False) -> dict[str, Any]:
    """Serve deployment options of one arm (also what a Serve config's `deployments` entry overrides).
    A replica being stopped (shutdown, redeploy, downscale) gets `drain_grace_s` to finish its
    in-flight requests: Serve's own graceful shutdown. On an `elastic` cluster the arm asks for its
    replicas after the application runs (`deferred_autoscaling`)."""
    opts: dict[str, Any] = {
        "name": arm_deployment_name(arm.name),
        "ray_actor_options": arm.ray_actor_options.to_ray(),
        "max_ongoing_requests": arm.max_ongoing_requests,
        "max_queued_requests": arm.max_queued_requests,
        "backpressure_config": BACKPRESSURE,
        "user_config": arm.batching.model_dump(),  # applied by ArmReplica.reconfigure; changeable live
        "graceful_shutdown_timeout_s": drain_grace_s,
    }
    if elastic:
        planned = arm.autoscaling.min_replicas if arm.autoscaling else arm.num_replicas
        target = arm.autoscaling.target_ongoing_requests if arm.autoscaling else AutoscalingConfig().target_ongoing_requests
        opts["autoscaling_config"] = deferred_autoscaling(planned, arm.max_replicas, target)
    elif arm.autoscaling is not None:
        opts["autoscaling_config"] = arm.autoscaling.model_dump()
    else:
        opts["num_replicas"] = arm.num_replicas
    return opts


def ingress_options(fleet: FleetConfig) -> dict[str, Any]:
    """The ingress admits twice what the arms can hold and queue (Serve's default of a few would
    cap every arm's batches; a request waiting in the async ingress costs little, and past the
    arms' own bounds it is refused there at once), and never fewer than 256, so `/health` and
    `/ready` find a slot while slow clients send their bodies. Past that, Serve's proxy refuses
    with 503 instead of queueing without bound."""
    capacity = sum(a.max_held for a in fleet.arms)
    opts = {
        "name": INGRESS_NAME, "num_replicas": fleet.ingress.num_replicas,
        "ray_actor_options": {**INGRESS_ACTOR_OPTIONS, **_ingress_resources(fleet)},
        "max_ongoing_requests": max(256, 2 * capacity),
        "max_queued_requests": INGRESS_MAX_QUEUED, "backpressure_config": BACKPRESSURE,
        "graceful_shutdown_timeout_s": fleet.http.drain_grace_s,
    }  # fmt: skip
    if fleet.ingress.max_replicas_per_node is not None:
        opts["max_replicas_per_node"] = fleet.ingress.max_replicas_per_node
    return opts


def required_resources(fleet: FleetConfig) -> dict[str, float]:
    """Ray resources the whole fleet reserves at its largest (every arm at its most replicas, plus
    the ingress): CPU, GPU, accelerator types and custom resources. Ray's default of 1 CPU per
    replica applies where an arm sets none."""
    need: dict[str, float] = {"CPU": fleet.ingress.num_replicas * float(INGRESS_ACTOR_OPTIONS["num_cpus"])}
    for key, value in fleet.ingress.resources.items():  # the ledger's share is too small to count
        need[key] = need.get(key, 0.0) + fleet.ingress.num_replicas * value
    for arm in fleet.arms:
        n = arm.max_replicas
        opts = arm.ray_actor_options
        per = {"CPU": 1.0 if opts.num_cpus is None else opts.num_cpus, "GPU": opts.num_gpus, **opts.resources}
        if opts.accelerator_type:
            per[f"accelerator_type:{opts.accelerator_type}"] = 0.001  # what Ray reserves per actor pinned to a type
        for key, value in per.items():
            if value:
                need[key] = need.get(key, 0.0) + n * value
    return need


def missing_resources(need: dict[str, float], cluster: dict[str, float]) -> dict[str, tuple[float, float]]:
    """resource -> (needed, the cluster's total) for every resource the cluster has too little of."""
    return {k: (v, cluster.get(k, 0.0)) for k, v in need.items() if cluster.get(k, 0.0) + 1e-9 < v}
