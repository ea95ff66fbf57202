"""Application building from the fleet config: Serve options per arm (`serve.deploy_options`),
the standard Serve config, the offline model's resolution, the engine's view of the config, and
config errors naming the field. No Ray cluster needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from engine.config import VIDEO_TOTAL_PIXELS, EngineConfig, VllmSettings
from engine.errors import ConfigError
from serve.app import APP_NAME, IMPORT_PATH, build_app, load_fleet, resolve_model, serve_config
from serve.config import FleetConfig
from serve.deploy_options import INGRESS_ACTOR_OPTIONS, arm_options, ingress_options
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
    from serve.deploy_options import required_resources

    assert ray_cpus_for(fleet) >= required_resources(fleet)["CPU"] + 0.9  # the main job's Ray also fits Serve's own actors


def test_arm_options_follow_the_config():
    fleet = FleetConfig.from_dict(FLEET)
    fp32, nf4 = (arm_options(a, fleet.http.drain_grace_s) for a in fleet.arms)
    assert fp32["name"] == "Arm-fp32" and fp32["num_replicas"] == 2 and "autoscaling_config" not in fp32
    assert fp32["user_config"] == {"max_batch_size": 8, "batch_wait_timeout_s": 0.0}  # no idle wait by default
    assert nf4["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in nf4
    assert nf4["ray_actor_options"]["num_gpus"] == 0.5 and nf4["ray_actor_options"]["accelerator_type"] == "A10G"
    assert nf4["max_ongoing_requests"] == 32 and nf4["max_queued_requests"] == 32
    # The ingress admits twice what every arm replica can hold and queue: (32 + 32) x 2 fp32 replicas
    # + (32 + 32) x 4 nf4 replicas at most; past that Serve's proxy refuses (64 queued).
    ingress = ingress_options(fleet)
    assert ingress == {"name": "Ingress", "num_replicas": 1, "ray_actor_options": INGRESS_ACTOR_OPTIONS, "max_ongoing_requests": 2 * (64 * 2 + 64 * 4),
                       "max_queued_requests": 64, "backpressure_config": {"status_code": 503, "retry_after_s": 1},
                       "graceful_shutdown_timeout_s": fleet.http.drain_grace_s}  # fmt: skip
    assert fp32["backpressure_config"] == {"status_code": 503, "retry_after_s": 1}  # Serve's own refusals carry Retry-After too
    assert arm_options(fleet.arms[0], 12.5)["graceful_shutdown_timeout_s"] == 12.5  # Serve drains a stopping replica
    small = FleetConfig.from_dict({"arms": [{"name": "a", "precision": "fp32", "max_ongoing_requests": 4}]})
    assert ingress_options(small)["max_ongoing_requests"] == 256  # room for /health and /ready beside slow senders


def test_the_ingress_admission_limit_is_what_the_arms_hold_and_queue_split_over_ingress_replicas():
    fleet = FleetConfig.from_dict(FLEET)
    # (32 + 32) x 2 fp32 replicas + (32 + 32) x 4 nf4 replicas at most, one ingress replica.
    assert fleet.ingress.in_flight_limit(fleet.arms) == 64 * 2 + 64 * 4
    three = FleetConfig.from_dict({**FLEET, "ingress": {"num_replicas": 3}})
    assert three.ingress.in_flight_limit(three.arms) == 128  # 384 / 3
    five = FleetConfig.from_dict({**FLEET, "ingress": {"num_replicas": 5}})
    assert five.ingress.in_flight_limit(five.arms) == 77  # rounded up: 5 x 77 >= 384
    fixed = FleetConfig.from_dict({**FLEET, "ingress": {"max_in_flight": 10}})
    assert fixed.ingress.in_flight_limit(fixed.arms) == 10
    off = FleetConfig.from_dict({**FLEET, "ingress": {"max_in_flight": "off"}})
    assert off.ingress.in_flight_limit(off.arms) is None
    unbounded = FleetConfig.from_dict({"arms": [{"name": "a", "precision": "fp32", "max_queued_requests": -1}]})
    assert unbounded.ingress.in_flight_limit(unbounded.arms) is None  # an unbounded arm queue: no gate either
    with pytest.raises(ConfigError, match="ingress.max_in_flight"):
        FleetConfig.from_dict({**FLEET, "ingress": {"max_in_flight": "many"}})


def test_admission_is_bounded_in_time_and_serves_counts_are_the_outer_bound():
    assert FleetConfig.from_dict({"arms": [{"name": "a", "precision": "fp32"}]}).arms[0].queue_budget_s == 1.0
    local = FleetConfig.from_yaml(DEFAULT_CONFIG)
    for arm in local.arms:
        # Every request of a spike reaches the replica, whose queue budget decides; Serve's counts
        # (and the ingress's gate derived from them) stay far above what the budget admits on 2 cores.
        assert 0 < arm.queue_budget_s <= 1.0 and arm.max_ongoing_requests >= 48 and arm.max_queued_requests >= 1  # at most a second waits
    assert local.ingress.in_flight_limit(local.arms) == 2 * (64 + 32)


def test_deploy_options_need_no_ray():
    """The placement renderer imports the deployment options where Ray may not be installed."""
    code = "import sys, serve.deploy_options; print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "[]"


@pytest.fixture
def built_tiny(monkeypatch, tiny_model_dir):
    """`model.source: tiny` resolves to the tests' tiny model folder (no build in a unit test)."""
    import workshop.tiny

    monkeypatch.setattr(workshop.tiny, "ensure_tiny_model", lambda root=None: Path(tiny_model_dir))
    return Path(tiny_model_dir)


def test_serve_config_is_a_valid_standard_serve_config(tmp_path: Path, built_tiny):
    fleet = FleetConfig.from_dict(FLEET)
    cfg = serve_config(fleet)
    ServeDeploySchema.model_validate(cfg)
    app = cfg["applications"][0]
    assert app["name"] == APP_NAME and app["import_path"] == IMPORT_PATH and app["route_prefix"] == "/"
    assert FleetConfig.from_dict(app["args"]["config"]) == fleet  # args round-trip, secrets included
    # The same args build the application the way `serve run` / `serve deploy` would; every
    # deployment is bound to the resolved model folder, never to the word "tiny".
    application = build_app(app["args"])
    ingress = application._bound_deployment
    assert ingress.name == "Ingress" and ingress.max_ongoing_requests == ingress_options(fleet)["max_ongoing_requests"]
    config, arms, ledger = ingress.init_args
    assert config["model"]["source"] == str(built_tiny) and sorted(arms) == ["fp32", "nf4"]
    assert ledger._bound_deployment.name == "Ledger" and ledger._bound_deployment.init_args == (config,)
    for name, arm_app in arms.items():
        arm = arm_app._bound_deployment
        assert arm.name == f"Arm-{name}" and arm.init_args == (config, name)
        assert arm.user_config == arm_options(fleet.arm(name), fleet.http.drain_grace_s)["user_config"]
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(FLEET))
    assert load_fleet({"config_path": str(path)}) == fleet
    assert load_fleet({"config_path": str(path), "redis_url": "redis://h:1/2"}).cache.redis_url == "redis://h:1/2"


def test_resolve_model_replaces_tiny_with_the_built_folder(built_tiny):
    from workshop.tiny import TINY_MODEL_NAME

    fleet = FleetConfig.from_dict(FLEET)
    assert fleet.model.name == "tiny"  # served_name unset: the source
    resolved = resolve_model(fleet)
    assert resolved.model.source == str(built_tiny) and resolved.model.served_name == TINY_MODEL_NAME
    assert resolved.model.name == TINY_MODEL_NAME
    # Nothing else changes.
    assert resolved.model_copy(update={"model": fleet.model}) == fleet
    named = FleetConfig.from_dict({**FLEET, "model": {"source": "tiny", "served_name": "my-reranker"}})
    assert resolve_model(named).model.name == "my-reranker" and resolve_model(named).model.source == str(built_tiny)
    folder = FleetConfig.from_dict({**FLEET, "model": {"source": "/models/qwen3-vl-reranker-8b"}})
    assert resolve_model(folder) is folder and folder.model.name == "/models/qwen3-vl-reranker-8b"


def test_settings_given_in_yaml_reach_the_engine(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({
        **FLEET, "model": {"source": "tiny", "max_length": 512, "min_pixels": 1024, "share_prefix": False},
        "limits": {"max_video_file_frames": 40, "max_video_frames": 7},
        "arms": [{"name": "v", "precision": "bf16", "backend": "vllm", "vllm": {"block_size": 16, "vision_encoder": "vllm"}}],
        "router": {},
    }))  # fmt: skip
    fleet = FleetConfig.from_yaml(path)
    engine = fleet.engine_config()
    assert (engine.max_length, engine.min_pixels, engine.share_prefix) == (512, 1024, False)
    # limits.max_video_file_frames bounds the video files the engine decodes; limits.max_video_frames
    # (frames given as a list) is the serving layer's own.
    assert engine.max_video_file_frames == 40 and fleet.limits.max_video_frames == 7
    # What the arm hands its vLLM engine (serve.arm.load_engine).
    assert VllmSettings(**fleet.arms[0].vllm.model_dump()) == VllmSettings(block_size=16, vision_encoder="vllm")
    default = FleetConfig.from_dict({"arms": [{"name": "a", "precision": "fp32"}]})
    assert default.engine_config() == EngineConfig()
    # Image limits unset: the engine takes the model family's official ones (Qwen3-VL-Reranker's
    # constants, lychee's from its checkpoint), so a lychee fleet never gets Qwen3-VL's.
    assert (default.model.min_pixels, default.model.max_pixels) == (None, None)
    assert default.model.video_total_pixels == VIDEO_TOTAL_PIXELS == 10 * 768 * 32 * 32
    assert (default.limits.max_image_pixels, default.limits.max_request_pixels) == (32 * 1024 * 1024, 128 * 1024 * 1024)
    assert default.arms[0].batching.batch_wait_timeout_s == 0.0
    assert (default.arms[0].torch_threads, default.arms[0].prepare_workers) == (None, 1)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d["arms"][0].update(precision="int3"), "arms.0.precision"),
        (lambda d: d["arms"][1].update(weight=-1), "arms.1.weight"),
        (lambda d: d["router"]["shadow"].update(arm="nope"), "router.shadow.arm"),
        (lambda d: d.update(cache={"ttl_s": 0}), "cache.ttl_s"),
        (lambda d: d.update(colour="red"), "colour"),
        (lambda d: d["arms"][0].update(prepare_workers=0), "arms.0.prepare_workers"),
        (lambda d: d["arms"][0].update(torch_threads=0), "arms.0.torch_threads"),
        (lambda d: d.update(limits={"max_request_pixels": 0}), "limits.max_request_pixels"),
        (lambda d: d.update(model={"max_length": 10}), "model.max_length"),  # declared by the engine (engine.config)
        (lambda d: d.update(model={"min_pixels": 4096, "max_pixels": 1024}), "min_pixels"),
        (lambda d: d["arms"][0].update(vllm={"vision_encoder": "vit"}), "arms.0.vllm.vision_encoder"),
        (lambda d: d["arms"][0].update(max_queued_requests=0), "arms.0.max_queued_requests"),  # Serve takes -1 or >= 1
        (lambda d: d["arms"][0].update(queue_budget_s=0), "arms.0.queue_budget_s"),
        (lambda d: d["arms"][0].update(queue_budget_s=float("inf")), "arms.0.queue_budget_s"),
        (lambda d: d.update(ingress={"max_in_flight": 0}), "ingress.max_in_flight"),
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


def test_the_local_configs_fit_two_cores_and_what_a_fleet_needs_is_counted():
    from serve.deploy_options import missing_resources, required_resources

    for name in ("local.yaml", "local-vllm.yaml"):
        need = required_resources(FleetConfig.from_yaml(Path(__file__).resolve().parents[2] / "configs" / name))
        assert need["CPU"] <= 2.0, (name, need)  # `serve run` on a 2-core machine places every replica
    fleet = FleetConfig.from_dict(FLEET)
    need = required_resources(fleet)
    assert need["GPU"] == 4 * 0.5 and need["accelerator_type:A10G"] == pytest.approx(4 * 0.001)
    assert missing_resources(need, {"CPU": 100, "GPU": 1}) == {"GPU": (2.0, 1), "accelerator_type:A10G": (pytest.approx(0.004), 0.0)}


@pytest.mark.ray
def test_a_fleet_the_cluster_cannot_place_is_refused_at_once_naming_what_is_missing(ray_serve, tiny_model):
    from engine.errors import ConfigError
    from serve.app import build_app

    fleet = {"model": {"source": str(tiny_model)}, "arms": [{"name": "big", "precision": "fp32", "ray_actor_options": {"num_cpus": 64}}]}
    with pytest.raises(ConfigError, match=r"CPU: needs 64.1, the cluster has 4"):
        build_app({"config": fleet})
    build_app({"config": {**fleet, "cluster": {"elastic": True}}})  # nodes may join an elastic cluster later
