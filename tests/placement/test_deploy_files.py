"""The rendered deployment would serve: lint-clean (checkov), weights mounted where arms read them,
no secret in any file, no single point of failure, Redis split by job and really configured."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import redis
import yaml

from placement import feature_cache
from placement.inventory import Inventory
from placement.kuberay import render_rayservice, upgrade_strategy
from placement.outputs import render_outputs
from placement.planner import plan_placement
from placement.ray_up import WAIT_FOR_DRIVER, render_ray_up
from placement.redis_k8s import render_redis
from placement.render import RenderError, read_architecture_config
from serve.config import FleetConfig
from serve.local import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECKOV = REPO_ROOT / ".venv-checkov" / "bin" / "checkov"
INVENTORIES = ["configs/placement-example.yaml", "configs/placement-small.yaml"]
PINNED = "ghcr.io/acme/rerank-fleet@sha256:" + "0f" * 32
QUANTIZE_PINNED = "ghcr.io/acme/rerank-fleet-quantize@sha256:" + "1e" * 32

CHECKOV_CONFIG = REPO_ROOT / ".checkov.yaml"


def justified_skips() -> dict[str, str]:
    """The checks `.checkov.yaml` skips, each with the reason written on its line (a skip without one fails here)."""
    skips = {}
    for line in CHECKOV_CONFIG.read_text().splitlines():
        match = re.match(r"^\s*-\s*(CKV\w+)\s*(?:#\s*(.*))?$", line)
        if match:
            assert match.group(2), f".checkov.yaml: {match.group(1)} is skipped without a reason"
            skips[match.group(1)] = match.group(2)
    assert set(skips) == set(yaml.safe_load(CHECKOV_CONFIG.read_text())["skip-check"])
    return skips


def report_for(relative: str, **deployment):
    path = REPO_ROOT / relative
    data = yaml.safe_load(path.read_text())
    pinned = {"image": PINNED, **({"quantize_image": QUANTIZE_PINNED} if data.get("deployment", {}).get("quantize_image") else {})}
    data["deployment"] = {**data.get("deployment", {}), **pinned, **deployment}
    inventory = Inventory.from_dict(data)
    return plan_placement(inventory, read_architecture_config(inventory, path))


def _pods_of(rayservice: dict) -> list[dict]:
    """The RayService's pod templates as Pods, so checkov's Kubernetes checks (which skip custom resources) see them."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"]["template"])] + [(g["groupName"], g["template"]) for g in cluster["workerGroupSpecs"]]
    namespace = rayservice["metadata"]["namespace"]
    return [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"ray-{name}", "namespace": namespace, **t["metadata"]}, "spec": t["spec"]}
        for name, t in groups
    ]


def _checkov(folder: Path, framework: str, *, config: bool = False) -> dict:
    assert CHECKOV.is_file(), "run scripts/checkov-env.sh (scripts/test.sh does)"
    done = subprocess.run(
        [str(CHECKOV), "-d", str(folder), "--framework", framework, "--output", "json", "--quiet", "--skip-download", "--compact",
         *(["--config-file", str(CHECKOV_CONFIG)] if config else [])],
        capture_output=True, text=True, timeout=300, cwd=folder,  # (checkov also reads a .checkov.yaml in its working folder)
    )  # fmt: skip
    data = json.loads(done.stdout)
    return data[0] if isinstance(data, list) else data


# ---- linters -------------------------------------------------------------------------------


LINTED = [(INVENTORIES[0], {}), (INVENTORIES[1], {}), (INVENTORIES[1], {"weights": {"source": "object_store", "uri": "gs://acme-models/2b"}})]


@pytest.mark.parametrize(("inventory", "changes"), LINTED)
def test_rendered_manifests_pass_checkov_with_the_checked_in_skips(inventory, changes, tmp_path):
    outputs = render_outputs(report_for(inventory, **changes), inventory)
    for kind in ("redis", "network", "disruption", "weights"):
        if kind in outputs:
            (tmp_path / f"{kind}.yaml").write_text(outputs[kind])
    (tmp_path / "ray-pods.yaml").write_text(yaml.safe_dump_all(_pods_of(yaml.safe_load(outputs["rayservice"]))))
    result = _checkov(tmp_path, "kubernetes", config=True)
    assert result["results"]["failed_checks"] == [], sorted({(c["check_id"], c["resource"]) for c in result["results"]["failed_checks"]})
    assert result["summary"]["passed"] > 100
    # Each skip is still needed (it fails somewhere without the file), and none touches the Redis servers but the image pin.
    failed = _checkov(tmp_path, "kubernetes")["results"]["failed_checks"]
    skips = justified_skips()
    assert {c["check_id"] for c in failed} == set(skips), {c["check_id"] for c in failed} ^ set(skips)
    assert {c["check_id"] for c in failed if "redis" in c["resource"]} <= {"CKV_K8S_43"}
    if "weights" in outputs:  # the weights Jobs keep read-only images: only the image's uid is skipped for them
        assert {c["check_id"] for c in failed if "Job" in c["resource"]} <= {"CKV_K8S_40", "CKV_K8S_43"}


def test_the_dockerfile_passes_checkovs_dockerfile_checks(tmp_path):
    (tmp_path / "Dockerfile").write_text((REPO_ROOT / "Dockerfile").read_text())
    result = _checkov(tmp_path, "dockerfile")
    assert result["results"]["failed_checks"] == [] and result["summary"]["passed"] >= 40
    text = (REPO_ROOT / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py311-gpu" in text and "vllm==0.33" in text and "\nUSER ray" in text


def test_checkov_catches_what_the_renderer_avoids(tmp_path):
    """The lint can fail: the GCS Redis with a privileged container is flagged."""
    (manifest,) = [m for m in render_redis(report_for(INVENTORIES[1])) if m["kind"] == "StatefulSet"]
    bad = copy.deepcopy(manifest)
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"] = {"privileged": True}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    failed = {c["check_id"] for c in _checkov(tmp_path, "kubernetes")["results"]["failed_checks"]}
    assert {"CKV_K8S_16", "CKV_K8S_20"} <= failed  # privileged, privilege escalation


# ---- weights ---------------------------------------------------------------------------------


@pytest.mark.parametrize("inventory", INVENTORIES)
def test_every_arms_checkpoint_is_mounted_in_its_worker_group(inventory):
    report = report_for(inventory)
    manifest = render_rayservice(report).data
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    fleet = FleetConfig.from_dict(serve_config["applications"][0]["args"]["config"])
    groups = {g["groupName"]: g for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    by_accelerator = {n.accelerator_type: n.name for n in report.inventory.node_types}
    for arm in fleet.arms:
        group = groups[by_accelerator[arm.ray_actor_options.accelerator_type]]
        container = group["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        checkpoint = arm.checkpoint or fleet.model.source
        weights_dir = next(p for p, m in mounts.items() if m["name"] == "weights")
        if checkpoint.startswith("/"):
            assert checkpoint.startswith(weights_dir + "/"), (arm.name, checkpoint, weights_dir)
        assert env["HF_HOME"].startswith(weights_dir + "/")  # hub ids resolve on the weights volume too
        source = volumes["weights"]
        if "emptyDir" in source:  # a copy or a download: local disk asked for and bounded
            need = int(source["emptyDir"]["sizeLimit"].removesuffix("Gi"))
            assert need >= 4  # Qwen3-VL-2B in bf16 is ~4.3 GB
            assert int(container["resources"]["requests"]["ephemeral-storage"].removesuffix("Gi")) >= need
        else:
            assert mounts[weights_dir]["readOnly"] and env["HF_HUB_OFFLINE"] == "1"


def test_a_checkpoint_no_volume_provides_is_refused_naming_arm_and_group():
    data = yaml.safe_load((REPO_ROOT / INVENTORIES[1]).read_text())
    data["model"]["source"] = "/models/qwen3-vl-reranker-2b"  # every arm reads this folder
    data["deployment"] |= {"image": PINNED, "weights": {"source": "volume", "pvc": "w", "mount_path": "/weights"}}
    inventory = Inventory.from_dict(data)
    report = plan_placement(inventory, read_architecture_config(inventory, REPO_ROOT / INVENTORIES[1]))
    with pytest.raises(RenderError, match=r"arm bf16-l4 reads /models/qwen3-vl-reranker-2b, but node type l4 mounts its weights at /weights"):
        render_outputs(report, "x")
    data["deployment"]["weights"] = {"source": "hub"}
    inventory = Inventory.from_dict(data)
    report = plan_placement(inventory, read_architecture_config(inventory, REPO_ROOT / INVENTORIES[1]))
    with pytest.raises(RenderError, match="downloads its weights from the hub"):
        render_rayservice(report)
    data["deployment"]["weights"] = {"source": "volume", "pvc": "w", "mount_path": "/models"}  # mounted: renders
    inventory = Inventory.from_dict(data)
    render_rayservice(plan_placement(inventory, read_architecture_config(inventory, REPO_ROOT / INVENTORIES[1])))


def test_object_store_weights_are_copied_by_an_init_container_into_bounded_disk():
    report = report_for(INVENTORIES[1], weights={"source": "object_store", "uri": "s3://acme-models/qwen3-vl-2b"})
    group = render_rayservice(report).data["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]
    check, init = group["template"]["spec"]["initContainers"]  # the node's driver is checked first (cli/driver_check.py)
    assert check["command"] == ["rerank-fleet", "check-driver"] and check["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert init["command"][:3] == ["aws", "s3", "sync"] and init["command"][-1] == "/models"
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    # ... so the CLI's home is a writable scratch volume of its own.
    assert {"name": "HOME", "value": "/tmp"} in init["env"] and {"name": "copy-tmp", "mountPath": "/tmp"} in init["volumeMounts"]
    assert {"name": "copy-tmp", "emptyDir": {"sizeLimit": "1Gi"}} in group["template"]["spec"]["volumes"]


# ---- secrets ---------------------------------------------------------------------------------


def test_no_secret_value_appears_in_any_rendered_file(tmp_path, monkeypatch):
    values = {"api-keys": "sk-live-0123456789abcdef", "admin-keys": "ops=adm-9876543210fedcba", "redis-cache-password": "cachepw-5555aaaa"}
    for name, value in values.items():  # present where the renderer runs: it must still never write them
        monkeypatch.setenv(name.upper().replace("-", "_"), value)
    texts = {}
    for inventory in INVENTORIES:
        texts.update({f"{inventory}:{k}": v for k, v in render_outputs(report_for(inventory), inventory).items()})
    for where, text in texts.items():
        for value in values.values():
            assert value not in text, where
        assert "requirepass " not in text.replace('requirepass %s', "")  # only the template filled from the file
        (tmp_path / where.replace("/", "_").replace(":", "_")).write_text(text)
    # The Serve configs carry references only, and the replicas read them (files under the Secret's mount).
    serve = yaml.safe_load(texts["configs/placement-example.yaml:serve"])["applications"][0]["args"]["config"]
    assert "api_keys" not in serve and "admin_keys" not in serve and "redis_password" not in serve["cache"]
    assert serve["api_keys_from"] == {"file": "~/rerank-fleet-secrets/api-keys"}
    # checkov's secret scanner agrees, and flags a planted key (so it does look).
    (tmp_path / "planted.yaml").write_text('aws_secret_access_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"\n')
    flagged = {Path(c["file_path"]).name for c in _checkov(tmp_path, "secrets")["results"]["failed_checks"]}
    assert flagged == {"planted.yaml"}


def test_replicas_read_the_referenced_secrets(tmp_path, monkeypatch):
    (tmp_path / "api-keys").write_text("key-one,\nkey-two\n")
    (tmp_path / "admin-keys").write_text("ops=adm-1\nsre=adm-2\n")
    monkeypatch.setenv("CACHE_PW", "s3cret")
    fleet = FleetConfig.from_dict({
        "arms": [{"name": "a", "precision": "fp32"}],
        "api_keys_from": {"file": str(tmp_path / "api-keys")},
        "admin_keys_from": {"file": str(tmp_path / "admin-keys")},
        "cache": {"redis_password_from": {"env": "CACHE_PW"}},
    })  # fmt: skip
    resolved = fleet.resolve_secrets()
    assert [k.get_secret_value() for k in resolved.api_keys] == ["key-one", "key-two"]
    assert {n: k.get_secret_value() for n, k in resolved.admin_keys.items()} == {"ops": "adm-1", "sre": "adm-2"}
    assert resolved.cache.redis_password.get_secret_value() == "s3cret"
    assert "s3cret" not in json.dumps(fleet.model_dump(mode="json"))
    monkeypatch.delenv("CACHE_PW")
    with pytest.raises(Exception, match="cache.redis_password_from: environment variable CACHE_PW is not set"):
        fleet.resolve_secrets()
    (tmp_path / "admin-keys").write_text("no-name-here")
    with pytest.raises(Exception, match="admin_keys_from: each entry must be name=key"):
        FleetConfig.from_dict({"arms": [{"name": "a", "precision": "fp32"}], "admin_keys_from": {"file": str(tmp_path / "admin-keys")}}).resolve_secrets()


# ---- availability ------------------------------------------------------------------------------


@pytest.mark.parametrize("inventory", INVENTORIES)
def test_no_single_point_of_failure_in_the_serving_path(inventory):
    report = report_for(inventory)
    manifest = render_rayservice(report).data
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
    ingress = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "ingress")
    assert ingress["replicas"] == ingress["minReplicas"] >= 2
    anti = ingress["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    app = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]
    deployments = {d["name"]: d for d in app["deployments"]}
    assert deployments["Ingress"]["num_replicas"] >= 2 and deployments["Ingress"]["max_replicas_per_node"] == 1
    assert "rerank_ingress" in deployments["Ingress"]["ray_actor_options"]["resources"]
    assert "rerank_ingress" in deployments["Ledger"]["ray_actor_options"]["resources"]
    assert '\\"rerank_ingress\\": 1' in ingress["rayStartParams"]["resources"]
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        shm = next(v for v in template["spec"]["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in template["spec"]["containers"][0]["volumeMounts"]
    gcs = cluster["gcsFaultToleranceOptions"]
    assert gcs["redisAddress"].startswith(f"{report.inventory.deployment.cluster_name}-gcs-redis")
    assert gcs["redisPassword"]["valueFrom"]["secretKeyRef"]["key"] == "redis-gcs-password"


def test_upgrade_strategy_rolls_out_a_new_cluster_within_the_gpu_pools():
    """KubeRay rolls out a new image only by a new cluster (with `None` it ignores the change): always a
    new cluster, incremental where a gateway class and headroom allow, the note saying the pools' room."""
    report = report_for(INVENTORIES[1], upgrade={"gateway_class": "istio"})
    strategy, why = upgrade_strategy(report)
    assert strategy == {"type": "NewCluster"}  # the small inventory's nodes are all in use (count 1 each) ...
    assert "NO GPU pool can grow" in why and "traffic stays on the old one" in why  # ... and the note says what that means
    data = yaml.safe_load((REPO_ROOT / INVENTORIES[1]).read_text())
    data["node_types"] = [{**n, "count": 3} for n in data["node_types"]]
    data["deployment"]["upgrade"] = {"gateway_class": "istio", "step_percent": 25}
    inventory = Inventory.from_dict(data)
    report = plan_placement(inventory, read_architecture_config(inventory, REPO_ROOT / INVENTORIES[1]))
    strategy, why = upgrade_strategy(report)
    surge = min(100, *(100 * (n.node_ceiling - report.plan.nodes[n.name]) // report.plan.nodes[n.name] for n in inventory.node_types if report.plan.nodes[n.name]))
    assert strategy["type"] == "NewClusterWithIncrementalUpgrade" and strategy["clusterUpgradeOptions"]["maxSurgePercent"] == surge > 0
    assert strategy["clusterUpgradeOptions"]["stepSizePercent"] == min(25, surge) and "surge" in why
    data["deployment"]["upgrade"] = {}
    inventory = Inventory.from_dict(data)
    strategy, why = upgrade_strategy(plan_placement(inventory, read_architecture_config(inventory, REPO_ROOT / INVENTORIES[1])))
    assert strategy == {"type": "NewCluster"} and "room for the new cluster's GPU pods per pool" in why


@pytest.mark.parametrize("platform", ["gke", "eks", "gpu-feature-discovery"])
def test_gpu_node_selection_follows_the_platform(platform):
    report = report_for(INVENTORIES[1], k8s_platform=platform)
    if platform == "eks":  # EC2 sells no two-T4 instance (g4dn has 1, 4 or 8): refused, naming the way out
        with pytest.raises(RenderError, match="node_types.t4: k8s_platform eks has no T4 nodes; give node_types.t4.k8s_node_selector"):
            render_rayservice(report)
        data = yaml.safe_load((REPO_ROOT / INVENTORIES[1]).read_text())
        data["node_types"][1]["gpus_per_node"] = 4
        data["node_types"][1]["cpus_per_node"] = 8
        data["deployment"] |= {"image": PINNED, "k8s_platform": "eks"}
        inventory = Inventory.from_dict(data)
        report = plan_placement(inventory, read_architecture_config(inventory, REPO_ROOT / INVENTORIES[1]))
    groups = {g["groupName"]: g for g in render_rayservice(report).data["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    expected = {
        "eks": {"l4": {"node.kubernetes.io/instance-type": "g6.xlarge"}, "t4": {"node.kubernetes.io/instance-type": "g4dn.12xlarge"}},
        # GKE: the accelerator label, and the machine type the plan sized the pods for
        "gke": {"l4": {"cloud.google.com/gke-accelerator": "nvidia-l4", "node.kubernetes.io/instance-type": "g2-standard-8"},
                "t4": {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4", "node.kubernetes.io/instance-type": "n1-standard-16"}},
        "gpu-feature-discovery": {"l4": {"nvidia.com/gpu.product": "NVIDIA-L4"}, "t4": {"nvidia.com/gpu.product": "Tesla-T4"}},
    }[platform]
    assert {name: groups[name]["template"]["spec"]["nodeSelector"] for name in expected} == expected


def test_a_gpu_the_platform_lacks_is_refused_where_the_plan_needs_it():
    data = yaml.safe_load((REPO_ROOT / INVENTORIES[0]).read_text())
    data["deployment"]["k8s_platform"] = "gke"
    # Workstations with a GPU no cloud sells, cheap enough that the plan uses them.
    data["node_types"].append({"name": "rtx3060", "gpu": "RTX-3060", "gpus_per_node": 1, "count": 4, "cost_per_hour": 0.12,
                               "cpus_per_node": 6, "host_memory_gib": 28})  # fmt: skip
    inventory = Inventory.from_dict(data)
    report = plan_placement(inventory, read_architecture_config(inventory, REPO_ROOT / INVENTORIES[0]))
    assert "rtx3060" in {p.node_type for p in report.plan.placements}  # the awq arm goes to the workstations
    with pytest.raises(RenderError, match="k8s_platform gke has no RTX-3060 nodes"):
        render_rayservice(report)
    # Without workstations to place on, the group is left out and the file's header says why.
    data["node_types"] = [{**n, "count": 0} if n["name"] == "rtx3060" else n for n in data["node_types"]]
    inventory = Inventory.from_dict(data)
    report = plan_placement(inventory, read_architecture_config(inventory, REPO_ROOT / INVENTORIES[0]))
    rendered = render_rayservice(report)
    assert "rtx3060" not in {g["groupName"] for g in rendered.data["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert any("node type 'rtx3060' (RTX-3060) is left out" in note for note in rendered.notes)


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_ray_up_head_runs_no_replica_and_gpu_nodes_wait_for_their_driver(cloud):
    rendered = render_ray_up(report_for(INVENTORIES[0]), cloud).data
    assert "--num-cpus=0" in rendered["head_start_ray_commands"][1] and "--dashboard-host=127.0.0.1" in rendered["head_start_ray_commands"][1]
    ingress = rendered["available_node_types"]["cpu-ingress"]
    assert ingress["min_workers"] >= 2 and ingress["resources"]["rerank_ingress"] == 1
    gpu = {k: v for k, v in rendered["available_node_types"].items() if k.startswith("gpu-")}
    for entry in gpu.values():
        assert entry["initialization_commands"][0] == WAIT_FOR_DRIVER
        assert any(o.startswith("-v /mnt/rerank-weights:/models:ro") for o in entry["docker"]["worker_run_options"])
    if cloud == "aws":
        assert rendered["available_node_types"]["head"]["node_config"]["ImageId"].startswith("ami-")
    with pytest.raises(Exception, match="aws_image_id: required"):
        data = yaml.safe_load((REPO_ROOT / INVENTORIES[0]).read_text())
        del data["deployment"]["aws_image_id"]
        Inventory.from_dict(data)


# ---- feature cache ---------------------------------------------------------------------------


def test_feature_cache_choice_follows_the_cost_model(qwen3_vl_8b):
    from placement.memory import read_architecture

    arch = read_architecture(qwen3_vl_8b)
    assert feature_cache.image_feature_bytes(arch, 1024) == 4 * 1024 * 4096 * 2 == 32 * 1024**2
    assert feature_cache.max_item_bytes(arch) >= feature_cache.image_feature_bytes(arch, 1800)  # the largest image fits
    data = yaml.safe_load((REPO_ROOT / INVENTORIES[0]).read_text())
    inventory = Inventory.from_dict(data)
    nodes = {n.name: n for n in inventory.node_types}
    h100 = feature_cache.choose(inventory, arch, nodes["h100"], "bf16")
    t4 = feature_cache.choose(inventory, arch, nodes["t4"], "fp16")
    assert h100.mode == "local" and h100.fetch_ms > 0.5 * h100.vision_ms  # the ViT is about as cheap as the transfer
    assert t4.mode == "shared" and t4.fetch_ms <= 0.5 * t4.vision_ms
    measured = feature_cache.choose(inventory, arch, nodes["t4"].model_copy(update={"vision_ms_per_image": 20.0}), "fp16")
    assert measured.mode == "local" and "measured" in measured.reason
    text_only = Inventory.from_dict({**data, "traffic": {**data["traffic"], "image_share": 0}})
    assert feature_cache.choose(text_only, arch, nodes["t4"], "fp16").mode == "off"
    sizing = feature_cache.size_shared_cache(inventory, arch)
    traffic = inventory.traffic
    expected = traffic.target_qps * traffic.documents_per_request * traffic.image_share * traffic.new_image_fraction * traffic.cache_window_s * 32 * 1024**2 * 1.1
    assert sizing.working_set_bytes == pytest.approx(expected, rel=1e-6)
    # The example's window (1.2 TiB of new images an hour) is over the 32 GiB cap: Redis gets the cap, and says what share fits.
    assert sizing.working_set_bytes > 32 * 1024**3 and sizing.maxmemory_bytes == 32 * 1024**3
    assert sizing.fits_fraction == pytest.approx(32 * 1024**3 / sizing.working_set_bytes) and "capped at 32 GiB" in sizing.detail
    small = Inventory.from_dict({**data, "traffic": {**data["traffic"], "target_qps": 0.01, "cache_window_s": 600}})
    small_sizing = feature_cache.size_shared_cache(small, arch)
    assert small_sizing.maxmemory_bytes == max(256 * 1024**2, -(-small_sizing.working_set_bytes // 1024**2) * 1024**2)
    assert small_sizing.fits_fraction == 1.0


def test_a_bench_engine_vision_time_replaces_the_roofline_for_its_gpu_and_precision(qwen3_vl_8b):
    """`bench engine` measures the tower per precision; the plan rescales it to the traffic's image
    by the tower's FLOPs and decides the arm's tier with it (and renders that)."""
    from placement.memory import read_architecture
    from placement.profiles import BenchEngineReport
    from placement.throughput import vision_image_flops

    arch = read_architecture(qwen3_vl_8b)
    bench = BenchEngineReport.model_validate({
        "model": "Qwen/Qwen3-VL-Reranker-8B", "device": "NVIDIA L4", "rows": [],
        "vision": [{"precision": "bf16", "image_tokens": 256, "ms_per_image": 4.0}],
    })  # fmt: skip
    data = yaml.safe_load((REPO_ROOT / INVENTORIES[0]).read_text())
    inventory = Inventory.from_dict(data)
    l4 = next(n for n in inventory.node_types if n.name == "l4")
    choice = feature_cache.choose(inventory, arch, l4, "bf16", [bench])
    assert choice.vision_ms == pytest.approx(4.0 * vision_image_flops(arch, 1024) / vision_image_flops(arch, 256))
    assert "measured by bench engine on NVIDIA L4" in choice.reason and choice.mode == "local"  # 4 ms at 256 tokens: the tower is cheap there
    assert feature_cache.choose(inventory, arch, l4, "int8", [bench]).reason.endswith("(roofline) on L4: the shared Redis pays")  # no int8 figure
    report = plan_placement(inventory, read_architecture_config(inventory, REPO_ROOT / INVENTORIES[0]), bench=[bench])
    assert feature_cache.cache_choices(report)["bf16-l4"].mode == "local"


def test_the_rendered_arms_carry_their_cache_choice_and_no_cache_redis_without_a_shared_arm():
    report = report_for(INVENTORIES[0])
    serve = yaml.safe_load(yaml.safe_load(render_outputs(report, "x")["rayservice"])["spec"]["serveConfigV2"])
    config = serve["applications"][0]["args"]["config"]
    modes = {a["name"]: a["feature_cache"] for a in config["arms"]}
    assert all(m == ("local" if name.endswith("-h100") else "shared") for name, m in modes.items()), modes
    assert config["cache"]["max_item_bytes"] >= 32 * 1024**2
    small = report_for(INVENTORIES[1])  # text only: no arm caches, no cache Redis, no password reference
    assert [(m["kind"], m["metadata"]["name"]) for m in render_redis(small) if m["kind"] != "Service"] == [
        ("StatefulSet", "rerank-small-gcs-redis"), ("NetworkPolicy", "rerank-small-gcs-redis"), ("PodDisruptionBudget", "rerank-small-gcs-redis")]


def test_a_shared_score_cache_brings_the_cache_redis_sized_for_its_pairs():
    """Text only, so no arm shares image features: the shared score cache alone brings the cache
    Redis, sized for the new pairs of its window, and the app's score cache points at it."""
    path = REPO_ROOT / INVENTORIES[1]
    data = yaml.safe_load(path.read_text())
    data["deployment"] = {**data["deployment"], "image": PINNED}

    def inventory_with(**traffic) -> Inventory:
        return Inventory.from_dict({**data, "traffic": {**data["traffic"], "score_cache": "shared", **traffic}})

    def report_with(**traffic):
        inventory = inventory_with(**traffic)
        return plan_placement(inventory, read_architecture_config(inventory, path))

    report = report_with(new_pair_fraction=0.4, score_cache_window_s=3600)
    (cache,) = [m for m in render_redis(report) if m["kind"] == "Deployment"]
    assert cache["metadata"]["name"] == "rerank-small-cache-redis"
    sizing = feature_cache.cache_redis_sizing(report)
    assert sizing.working_set_bytes == int(2 * 20 * 0.4 * 3600 * feature_cache.SCORE_PAIR_BYTES)  # qps x documents x new x window x bytes
    assert sizing.maxmemory_bytes == 256 * 1024**2 and "--maxmemory 256mb" in cache["spec"]["template"]["spec"]["containers"][0]["command"][2]
    serve = yaml.safe_load(yaml.safe_load(render_outputs(report, "x")["rayservice"])["spec"]["serveConfigV2"])
    fleet = FleetConfig.from_dict(serve["applications"][0]["args"]["config"])
    assert (fleet.score_cache.mode, fleet.score_cache.ttl_s) == ("shared", 3600) and all(a.feature_cache == "off" for a in fleet.arms)
    assert fleet.cache.redis_url == "redis://rerank-small-cache-redis:6379/0" and fleet.cache.redis_password_from is not None
    busy = feature_cache.size_shared_cache(inventory_with(target_qps=100), report.architecture, features=False)  # a day at 100 QPS: 17.3 GB
    assert busy.working_set_bytes == int(100 * 20 * 0.5 * 86400 * feature_cache.SCORE_PAIR_BYTES) and busy.maxmemory_bytes >= busy.working_set_bytes
    assert "new pairs/s" in busy.detail
    local = report_with(score_cache="local")  # in each ingress replica: no Redis
    assert not [m for m in render_redis(local) if m["kind"] == "Deployment"]
    assert FleetConfig.from_dict(yaml.safe_load(render_outputs(local, "x")["serve"])["applications"][0]["args"]["config"]).cache.redis_url is None


# ---- the Redis servers as rendered, run for real ---------------------------------------------


@pytest.mark.parametrize("job", ["gcs", "cache"])
def test_the_rendered_redis_command_really_configures_redis(job, tmp_path):
    """The manifest's own start command, run by a real redis-server with its folders and port
    moved to this machine: the password from the file is required, and each job's policy holds."""
    report = report_for(INVENTORIES[0])
    manifests = render_redis(report)
    (workload,) = [m for m in manifests if m["kind"] in ("StatefulSet", "Deployment") and f"-{job}-" in m["metadata"]["name"]]
    command = workload["spec"]["template"]["spec"]["containers"][0]["command"]
    port = free_port()
    for folder in ("conf", "secrets", "data"):
        (tmp_path / folder).mkdir()
    (tmp_path / "secrets" / "password").write_text("pw-from-secret-file")
    script = command[2].replace("/conf", str(tmp_path / "conf")).replace("/secrets", str(tmp_path / "secrets"))
    script = script.replace("--dir /data", f"--dir {tmp_path / 'data'}").replace("--port 6379", f"--port {port} --bind 127.0.0.1")
    proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, password="pw-from-secret-file", socket_timeout=2)
        for _ in range(50):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=2).set("k", "v")
        config = client.config_get("*")
        if job == "gcs":
            assert config["maxmemory-policy"] == "noeviction" and config["appendonly"] == "yes"
        else:
            assert config["maxmemory-policy"] == "allkeys-lru" and config["appendonly"] == "no" and config["save"] == ""
            assert int(config["maxmemory"]) == feature_cache.size_shared_cache(report.inventory, report.architecture).maxmemory_bytes
        assert b"requirepass" not in subprocess.run(["ps", "-o", "args=", "-p", str(proc.pid)], capture_output=True).stdout
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ---- Serve's fast request path ------------------------------------------------------------------


@pytest.mark.parametrize("inventory", INVENTORIES)
def test_every_ray_pod_and_node_starts_on_serves_fast_path(inventory):
    # Serve reads these when Ray's processes start: they must be in every pod's and node's
    # environment from the start, not set by the app. Written out here, not imported: the test
    # holds the values the issue asked for (HAProxy ingress, throughput mode).
    wanted = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
    report = report_for(inventory)
    cluster = render_rayservice(report).data["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    for template in templates:
        for container in template["spec"]["containers"]:
            if container["name"] == "autoscaler":  # KubeRay's sidecar runs no Serve process
                continue
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert {k: env.get(k) for k in wanted} == wanted, container["name"]
    for cloud in ("aws", "gcp"):
        rendered = render_ray_up(report_for(INVENTORIES[0]), cloud).data
        options = rendered["docker"]["run_options"]
        assert all(f"-e {k}={v}" in options for k, v in wanted.items()), options
