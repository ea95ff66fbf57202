"""Application building from the fleet config: Serve options per arm, the standard Serve
config, and config errors naming the field. No Ray cluster needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve.app import IMPORT_PATH, arm_options, build_app, load_fleet, serve_config
from serve.config import FleetConfig
from serve.engine.errors import ConfigError
from serve.local import DEFAULT_CONFIG, local_fleet, ray_cpus_for

FLEET = {
    "model": {"source": "tiny"},
    "arms": [
        {"name": "fp32", "precision": "fp32", "weight": 0.5, "num_replicas": 2, "batching": {"max_batch_size": 8}},
        {"name": "nf4", "precision": "nf4", "weight": 0.5, "autoscaling": {"min_replicas": 1, "max_replicas": 4},
         "ray_actor_options": {"num_gpus": 0.5, "accelerator_type": "A10G"}},
    ],
    "router": {"shadow": {"arm": "nf4", "fraction": 0.2}},
    "api_keys": ["k"],
}  # fmt: skip


def test_default_config_is_two_tiny_arms_without_redis():
    fleet = FleetConfig.from_yaml(DEFAULT_CONFIG)
    assert fleet.model.source == "tiny"
    assert [(a.name, a.precision, a.weight) for a in fleet.arms] == [("fp32", "fp32", 0.5), ("nf4", "nf4", 0.5)]
    assert fleet.router.shadow.arm == "nf4" and fleet.router.shadow.fraction == 0.2
    assert fleet.cache.redis_url is None and (fleet.http.host, fleet.http.port) == ("127.0.0.1", 8000)
    overridden = local_fleet(None, "redis://127.0.0.1:6379/3", 8123)
    assert overridden.cache.redis_url == "redis://127.0.0.1:6379/3" and overridden.http.port == 8123
    assert ray_cpus_for(fleet) >= 3


def test_arm_options_follow_the_config():
    fleet = FleetConfig.from_dict(FLEET)
    fp32, nf4 = (arm_options(a) for a in fleet.arms)
    assert fp32["name"] == "Arm-fp32" and fp32["num_replicas"] == 2 and "autoscaling_config" not in fp32
    assert fp32["user_config"] == {"max_batch_size": 8, "batch_wait_timeout_s": 0.01}
    assert nf4["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in nf4
    assert nf4["ray_actor_options"]["num_gpus"] == 0.5 and nf4["ray_actor_options"]["accelerator_type"] == "A10G"
    assert nf4["max_ongoing_requests"] == 64 and nf4["max_queued_requests"] == 256


def test_serve_config_is_a_valid_standard_serve_config(tmp_path: Path):
    fleet = FleetConfig.from_dict(FLEET)
    cfg = serve_config(fleet)
    ServeDeploySchema.model_validate(cfg)
    app = cfg["applications"][0]
    assert app["import_path"] == IMPORT_PATH and app["route_prefix"] == "/"
    assert FleetConfig.from_dict(app["args"]["config"]) == fleet  # args round-trip, secrets included
    # The same args build the application the way `serve run` / `serve deploy` would.
    assert build_app(app["args"]) is not None
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(FLEET))
    assert load_fleet({"config_path": str(path)}) == fleet
    assert load_fleet({"config_path": str(path), "redis_url": "redis://h:1/2"}).cache.redis_url == "redis://h:1/2"


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d["arms"][0].update(precision="int3"), "arms.0.precision"),
        (lambda d: d["arms"][1].update(weight=-1), "arms.1.weight"),
        (lambda d: d["router"]["shadow"].update(arm="nope"), "router.shadow.arm"),
        (lambda d: d.update(cache={"ttl_s": 0}), "cache.ttl_s"),
        (lambda d: d.update(colour="red"), "colour"),
    ],
)
def test_invalid_config_names_field_and_reason(mutate, field):
    import copy

    data = copy.deepcopy(FLEET)
    mutate(data)
    with pytest.raises(ConfigError) as e:
        load_fleet({"config": data})
    assert field.split(".")[-1] in str(e.value)


def test_build_app_args_errors():
    with pytest.raises(ConfigError, match="config_path"):
        load_fleet({})
    with pytest.raises(ConfigError, match="args.config"):
        load_fleet({"config": "{not json"})
