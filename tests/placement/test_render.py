"""Generated artifacts validate against Ray, Serve, Kubernetes and KubeRay schemas, and stay in sync."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from placement.cli import main
from placement.inventory import Inventory
from placement.planner import PlacementReport, plan_placement
from placement.kuberay import render_network_policy, render_rayservice
from placement.outputs import expected_examples, render_outputs
from placement.redis_k8s import render_redis
from placement.render import read_architecture_config, render_serve_config
from serve.config import FleetConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
# CI clones the repo with shared/ beside it.
KUBERAY_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "kuberay"
# The newest Kubernetes version kubernetes-validate ships schemas for.
K8S_VERSION = kubernetes_validate.utils.latest_version()
INVENTORIES = ["configs/placement-example.yaml", "configs/placement-small.yaml"]


@cache
def report_for(relative: str, autoscaling: bool = False) -> PlacementReport:
    path = REPO_ROOT / relative
    data = yaml.safe_load(path.read_text())
    if autoscaling:
        data.setdefault("deployment", {})["autoscaling"] = True
    inventory = Inventory.from_dict(data)
    return plan_placement(inventory, read_architecture_config(inventory, path))


CASES = [(inv, autoscaling) for inv in INVENTORIES for autoscaling in (False, True)]


# ---- ray up ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("inventory", "autoscaling"), CASES)
@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_ray_up_yaml_passes_rays_own_validation(inventory, autoscaling, cloud):
    outputs = render_outputs(report_for(inventory, autoscaling), inventory)
    config = yaml.safe_load(outputs[cloud])
    prepared = prepare_config(copy.deepcopy(config))  # offline: fills defaults, no cloud calls
    validate_config(prepared)
    assert prepared["provider"]["type"] == cloud
    workers = {k: v for k, v in config["available_node_types"].items() if k != "head"}
    report = report_for(inventory, autoscaling)
    for node in report.inventory.node_types:
        entry = workers.get(f"gpu-{node.name}")
        if entry is None:  # not sold by this cloud: named in the header instead
            assert f"node type {node.name!r}" in outputs[cloud].split("\ncluster_name")[0]
            continue
        assert entry["resources"]["GPU"] == node.gpus_per_node
        assert entry["resources"][f"accelerator_type:{node.accelerator_type}"] == 1
        assert entry["min_workers"] == report.plan.nodes[node.name] <= entry["max_workers"] == node.node_ceiling


# ---- Serve config ---------------------------------------------------------------------------


@pytest.mark.parametrize(("inventory", "autoscaling"), CASES)
def test_serve_config_passes_serve_schema_and_pins_each_arm(inventory, autoscaling):
    report = report_for(inventory, autoscaling)
    config = render_serve_config(report)
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    fleet = FleetConfig.from_dict(app["args"]["config"])  # the app's own schema accepts the args
    deployments = {d["name"]: d for d in app["deployments"]}
    assert deployments["Ingress"]["ray_actor_options"]["num_gpus"] == 0
    accelerator = {n.name: n.accelerator_type for n in report.inventory.node_types}
    assert len(fleet.arms) == len(report.plan.placements)
    for placement, arm in zip(report.plan.placements, fleet.arms):
        assert arm.name == f"{placement.precision}-{placement.node_type}"
        assert arm.precision == placement.precision
        assert arm.ray_actor_options.num_gpus == 1
        assert arm.ray_actor_options.accelerator_type == accelerator[placement.node_type]
        deployed = deployments[f"Arm-{arm.name}"]
        assert deployed["ray_actor_options"]["accelerator_type"] == accelerator[placement.node_type]
        # Nodes join a cluster after the config: each arm starts at 0 and asks for its planned replicas (serve/arm_scaling.py).
        scaling = deployed["autoscaling_config"]
        assert fleet.cluster.elastic and (scaling["min_replicas"], scaling["initial_replicas"]) == (0, 0)
        assert scaling["policy"]["policy_kwargs"] == {"planned": placement.replicas}
        if autoscaling:
            assert arm.autoscaling.min_replicas == placement.replicas
            assert arm.autoscaling.max_replicas >= placement.replicas == scaling["policy"]["policy_kwargs"]["planned"]
            assert scaling["max_replicas"] == arm.autoscaling.max_replicas
        else:
            assert arm.num_replicas == placement.replicas == scaling["max_replicas"]
        if arm.precision == "awq":
            assert arm.checkpoint == report.inventory.model.awq_checkpoint
    # Weights honour the requested split between precisions and add up to 1.
    assert sum(a.weight for a in fleet.arms) == pytest.approx(1.0, abs=1e-3)
    for spec in report.inventory.arms:
        if spec.share is not None:
            assert sum(a.weight for a in fleet.arms if a.precision == spec.precision) == pytest.approx(spec.share, abs=1e-3)


# ---- Kubernetes -----------------------------------------------------------------------------


def _strict(schema):
    """The CRD schema with unknown fields forbidden where it lists properties.

    The API server silently prunes unknown fields, so a typo would deploy without effect; failing
    here catches it. Objects marked x-kubernetes-preserve-unknown-fields keep accepting anything.
    """
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def rayservice_validator() -> jsonschema.protocols.Validator:
    crd = yaml.safe_load((KUBERAY_DIR / "ray.io_rayservices.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


@pytest.mark.parametrize(("inventory", "autoscaling"), CASES)
def test_rayservice_validates_against_the_kuberay_crd(inventory, autoscaling):
    report = report_for(inventory, autoscaling)
    manifest = render_rayservice(report).data
    rayservice_validator().validate(manifest)
    # serveConfigV2 is a string in the CRD: the Serve config inside it is validated on its own.
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    cache = serve_config["applications"][0]["args"]["config"]["cache"]
    assert cache.get("redis_url") in (None, f"redis://{report.inventory.deployment.cluster_name}-cache-redis:6379/0")
    groups = {g["groupName"]: g for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    for node in report.inventory.node_types:
        group = groups.get(node.name)
        if group is None:  # a GPU the platform lacks, where the plan puts nothing: named in the notes
            assert not any(p.node_type == node.name for p in report.plan.placements)
            continue
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(node.gpus_per_node)
        assert group["template"]["spec"]["nodeSelector"] == _expected_selector(report, node)
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in group["template"]["spec"]["tolerations"]
        assert json.loads(json.loads(group["rayStartParams"]["resources"])) == {f"accelerator_type:{node.accelerator_type}": 1}
        # The pod template is a core PodTemplateSpec: check it with the Kubernetes schema too.
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": node.name}, "template": group["template"]}
        kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)


def _expected_selector(report, node):
    platform = report.inventory.deployment.k8s_platform
    if node.k8s_node_selector:
        return node.k8s_node_selector
    if platform == "gke":  # the accelerator, and the machine the plan sized the pod for
        return {"cloud.google.com/gke-accelerator": node.gpu_model.gke_accelerator,
                "node.kubernetes.io/instance-type": node.gpu_model.gcp_machines[node.gpus_per_node]}
    if platform == "eks":
        return {"node.kubernetes.io/instance-type": node.gpu_model.aws_instances[node.gpus_per_node]}
    return {"nvidia.com/gpu.product": node.gpu_model.k8s_gpu_product}


def test_rayservice_schema_check_catches_a_misspelt_field():
    manifest = render_rayservice(report_for(INVENTORIES[1])).data
    manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        rayservice_validator().validate(manifest)


@pytest.mark.parametrize("inventory", INVENTORIES)
def test_redis_manifests_validate_against_the_kubernetes_schemas(inventory):
    kubernetes_validate.validate(render_network_policy(report_for(inventory)), K8S_VERSION, strict=True)  # the Ray pods' policy too
    for manifest in render_redis(report_for(inventory)):
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    bad = render_redis(report_for(inventory))[0]
    bad["spec"]["ports"][0]["port"] = "six-three-seven-nine"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


# ---- checked-in examples --------------------------------------------------------------------


def test_checked_in_examples_equal_a_fresh_generation():
    stale = [
        str(path.relative_to(REPO_ROOT))
        for path, text in expected_examples(REPO_ROOT).items()
        if not path.exists() or path.read_text() != text
    ]
    assert not stale, (
        f"out of date: {stale}; run python -c \"from placement.outputs import regenerate_examples; regenerate_examples('.')\""
    )


def test_checked_in_examples_are_valid_files():
    aws = yaml.safe_load((REPO_ROOT / "cluster/aws-example.yaml").read_text())
    validate_config(prepare_config(aws))
    ServeDeploySchema.model_validate(yaml.safe_load((REPO_ROOT / "configs/serve-example.yaml").read_text()))
    for manifest in [*yaml.safe_load_all((REPO_ROOT / "k8s/redis.yaml").read_text()), yaml.safe_load((REPO_ROOT / "k8s/network-policy.yaml").read_text())]:
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    rayservice_validator().validate(yaml.safe_load((REPO_ROOT / "k8s/rayservice-example.yaml").read_text()))
    ServeDeploySchema.model_validate(yaml.safe_load(yaml.safe_load((REPO_ROOT / "k8s/rayservice-example.yaml").read_text())["spec"]["serveConfigV2"]))


# ---- CLI ------------------------------------------------------------------------------------


def test_cli_prints_the_table_and_writes_every_file(tmp_path, capsys):
    assert main(["plan", str(REPO_ROOT / INVENTORIES[1]), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for heading in ("Chosen arms", "Nodes", "Memory per replica", "Throughput per replica", "Feature cache per arm", "Rejected options"):
        assert heading in out
    assert "bf16 on t4: bf16 needs compute capability >= 8.0" in out
    assert "bf16-l4: off (no image traffic)" in out  # the small inventory is text only: no arm caches features
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "aws.yaml", "disruption-budgets.yaml", "gcp.yaml", "gke.sh", "grafana-dashboard.json", "grafana-dashboard.yaml", "network-policy.yaml",
        "pod-monitor.yaml", "rayservice.yaml", "redis.yaml", "serve.yaml"]  # gke: its script; no filled volume: no weights.yaml


def test_cli_image_replaces_the_inventorys_and_is_validated(tmp_path, capsys):
    pinned = "ghcr.io/acme/rerank-fleet@sha256:" + "ab" * 32
    assert main(["plan", str(REPO_ROOT / INVENTORIES[1]), "--image", pinned, "--out", str(tmp_path)]) == 0
    assert yaml.safe_load((tmp_path / "rayservice.yaml").read_text())["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["image"] == pinned  # fmt: skip
    assert f"image: {pinned}" in (tmp_path / "aws.yaml").read_text()
    capsys.readouterr()
    for bad, reason in [("rerank-fleet:0.1.0", "deployment.image"), ("ghcr.io/acme/rerank-fleet:latest", "version tag or an @sha256 digest"),
                        ("ghcr.io/acme/rerank-fleet", "version tag or an @sha256 digest")]:  # fmt: skip
        assert main(["plan", str(REPO_ROOT / INVENTORIES[1]), "--image", bad, "--out", str(tmp_path)]) == 2
        assert reason in capsys.readouterr().err


def test_cli_refuses_an_infeasible_inventory_with_the_reason(tmp_path, capsys):
    data = yaml.safe_load((REPO_ROOT / INVENTORIES[1]).read_text())
    data["model"]["architecture_config"] = str(REPO_ROOT / "configs/models/qwen3-vl-2b.json")
    data["traffic"]["target_qps"] = 500
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["plan", str(path)]) == 1
    err = capsys.readouterr().err
    assert "no feasible placement" in err and "needs" in err and "pairs/s but at most" in err


def test_cli_names_the_bad_field(tmp_path, capsys):
    path = tmp_path / "inv.yaml"
    path.write_text("model: {name: m, source: s}\nnode_types: [{name: a, gpu: T5, gpus_per_node: 1, count: 1, cost_per_hour: 1}]\n"
                    "traffic: {target_qps: 1, documents_per_request: 1, tokens_per_document: 1}\n")
    assert main(["plan", str(path)]) == 2
    assert "node_types.0.gpu" in capsys.readouterr().err


def test_cli_capacity_objective_needs_a_budget(capsys):
    assert main(["plan", str(REPO_ROOT / INVENTORIES[1]), "--objective", "capacity"]) == 2
    assert "--budget" in capsys.readouterr().err


def test_kuberay_crds_are_where_ci_puts_them():
    assert Path(KUBERAY_DIR / "ray.io_rayservices.yaml").is_file()
