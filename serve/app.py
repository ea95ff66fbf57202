"""The Serve application: one `Arm-<name>` deployment per arm and the experiment `Ledger`,
composed into `Ingress` by handles.

`build_app` is the application builder Serve calls for `serve run` / `serve deploy`:

    serve run serve.app:build_app config_path=configs/local.yaml

and `serve_config` writes the equivalent standard Serve config file for a cluster. Both validate
the fleet configuration (`FleetConfig`) once, here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from engine.errors import ConfigError
from serve.arm import ArmReplica
from serve.config import FleetConfig
from serve.deploy_options import APP_NAME, IMPORT_PATH, arm_options, ingress_options, ledger_options, missing_resources, required_resources
from serve.ingress import Ingress
from serve.ledger_replica import LedgerReplica

__all__ = ["APP_NAME", "IMPORT_PATH", "build_app", "load_fleet", "resolve_model", "serve_config"]


def load_fleet(args: dict[str, Any]) -> FleetConfig:
    """`args` holds `config` (a FleetConfig dict or its JSON) or `config_path` (a YAML file);
    optional `redis_url` overrides `cache.redis_url` (handy with `serve run ... redis_url=...`)."""
    if "config" in args:
        data = args["config"]
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as e:
                raise ConfigError(f"args.config: not a JSON object ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError("args.config: must be a mapping")
        fleet = FleetConfig.from_dict(data, source="args.config")
    elif "config_path" in args:
        fleet = FleetConfig.from_yaml(Path(args["config_path"]))
    else:
        raise ConfigError("build_app args need 'config' (a fleet config mapping) or 'config_path' (a YAML file)")
    if args.get("redis_url"):
        data = fleet.to_dict()
        data["cache"]["redis_url"] = args["redis_url"]
        fleet = FleetConfig.from_dict(data, source="args.redis_url")
    return fleet


def resolve_model(fleet: FleetConfig) -> FleetConfig:
    """The fleet with `model.source: tiny` replaced by the built offline model's folder, building
    it here (with progress) if needed, with its canary reference: replicas only ever load a model
    that exists."""
    if fleet.model.source != "tiny":
        return fleet
    from workshop.canary import ensure_reference
    from workshop.tiny import TINY_MODEL_NAME, ensure_tiny_model

    folder = ensure_tiny_model()
    ensure_reference(folder, recorded_by="rerank-fleet up")
    data = fleet.to_dict()
    data["model"]["source"] = str(folder)
    data["model"]["served_name"] = fleet.model.served_name or TINY_MODEL_NAME
    return FleetConfig.from_dict(data, source="model.source")


def build_app(args: dict[str, Any]) -> Application:
    """The application of `args` (see `load_fleet`). On a fixed cluster (`cluster.elastic: false`)
    with Ray running, a fleet that needs more than the cluster has is refused at once, naming what
    is missing (replicas that can never be placed would hang every request); an elastic cluster's
    nodes join later, so nothing is checked and each arm asks for its replicas once the
    application runs (`serve.arm_scaling`)."""
    fleet = resolve_model(load_fleet(args))
    fleet.resolve_secrets()  # a missing or malformed secret fails the deploy here, naming it, not each replica
    elastic = fleet.cluster.elastic
    if not elastic:
        check_cluster_resources(fleet)
    config = fleet.to_dict()
    arms = {
        arm.name: ArmReplica.options(**arm_options(arm, fleet.http.drain_grace_s, elastic=elastic)).bind(config, arm.name)
        for arm in fleet.arms
    }
    ledger = LedgerReplica.options(**ledger_options(fleet)).bind(config)
    return Ingress.options(**ingress_options(fleet)).bind(config, arms, ledger)


def check_cluster_resources(fleet: FleetConfig) -> None:
    import ray

    if not ray.is_initialized():
        return
    missing = missing_resources(required_resources(fleet), ray.cluster_resources())
    if missing:
        lacks = ", ".join(f"{k}: needs {need:g}, the cluster has {have:g}" for k, (need, have) in sorted(missing.items()))
        raise ConfigError(
            f"this fleet cannot be placed on this cluster ({lacks}); lower arms' ray_actor_options / replicas, add nodes, "
            "or set cluster.elastic: true if nodes join the cluster later"
        )


def serve_config(fleet: FleetConfig, *, app_name: str = APP_NAME) -> dict[str, Any]:
    """A standard Serve config (for `serve deploy`) that builds this fleet via `build_app`."""
    config = {
        "http_options": {"host": fleet.http.host, "port": fleet.http.port},
        "applications": [
            {
                "name": app_name,
                "import_path": IMPORT_PATH,
                "route_prefix": fleet.http.route_prefix,
                "args": {"config": fleet.to_dict()},
            }
        ],
    }
    ServeDeploySchema.model_validate(config)
    return config
