"""The Serve application: one `Arm-<name>` deployment per arm, composed into `Ingress` by handles.

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

from serve.arm import ArmReplica
from serve.config import ArmConfig, FleetConfig
from serve.engine.errors import ConfigError
from serve.ingress import Ingress

IMPORT_PATH = "serve.app:build_app"
APP_NAME = "rerank"
# The ingress only parses, fetches and routes; it reserves a fraction of a CPU so small nodes
# keep their cores for arm replicas.
INGRESS_ACTOR_OPTIONS = {"num_cpus": 0.1}


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


def arm_options(arm: ArmConfig) -> dict[str, Any]:
    """Serve deployment options of one arm (also what a Serve config's `deployments` entry overrides)."""
    opts: dict[str, Any] = {
        "name": f"Arm-{arm.name}",
        "ray_actor_options": arm.ray_actor_options.to_ray(),
        "max_ongoing_requests": arm.max_ongoing_requests,
        "max_queued_requests": arm.max_queued_requests,
        "user_config": arm.batching.model_dump(),  # applied by ArmReplica.reconfigure; changeable live
    }
    if arm.autoscaling is not None:
        opts["autoscaling_config"] = arm.autoscaling.model_dump()
    else:
        opts["num_replicas"] = arm.num_replicas
    return opts


def ingress_options(fleet: FleetConfig) -> dict[str, Any]:
    """The ingress must admit as many concurrent requests as the arms can hold (Serve's default of
    a few would cap every arm's batches at that number)."""
    capacity = sum(
        a.max_ongoing_requests * (a.autoscaling.max_replicas if a.autoscaling else a.num_replicas) for a in fleet.arms
    )
    return {"name": "Ingress", "ray_actor_options": INGRESS_ACTOR_OPTIONS, "max_ongoing_requests": max(64, capacity)}


def build_app(args: dict[str, Any]) -> Application:
    fleet = load_fleet(args)
    config = fleet.to_dict()
    arms = {arm.name: ArmReplica.options(**arm_options(arm)).bind(config, arm.name) for arm in fleet.arms}
    return Ingress.options(**ingress_options(fleet)).bind(config, arms)


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
