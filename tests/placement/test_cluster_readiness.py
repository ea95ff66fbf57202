"""What makes a rendered plan come up where users deploy it, checked without a cluster: pods that
fit their node types, disruption budgets, the cloud's own cluster files, an upgrade KubeRay really
rolls out, the node-start driver check, and the weights pipeline's commands run on a local folder
standing in for the volume (docs/DEPLOY.md says what was and was not tried)."""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from cli.driver_check import check, required_driver
from placement.inventory import Inventory
from placement.kuberay import render_rayservice
from placement.machines import MACHINES, allocatable
from placement.outputs import render_outputs
from placement.planner import plan_placement
from placement.render import RenderError, read_architecture_config

from test_deploy_files import INVENTORIES, PINNED, QUANTIZE_PINNED, REPO_ROOT, report_for

K8S_VERSION = kubernetes_validate.utils.latest_version()


def _report_with(relative: str, mutate) -> object:
    path = REPO_ROOT / relative
    data = yaml.safe_load(path.read_text())
    data["deployment"] |= {"image": PINNED, **({"quantize_image": QUANTIZE_PINNED} if data["deployment"].get("quantize_image") else {})}
    mutate(data)
    inventory = Inventory.from_dict(data)
    return plan_placement(inventory, read_architecture_config(inventory, path))


# ---- pods fit their nodes ----------------------------------------------------------------------


def test_allocatable_follows_each_platforms_published_rule():
    # GKE, n2-standard-4 (16 GiB): 25 % of 4 + 20 % of 4 + 10 % of 8 = 2.6 GiB reserved, 100 MiB eviction; CPU 6 % + 1 % + 2 x 0.5 %.
    gke = allocatable(MACHINES["n2-standard-4"], "gke")
    assert gke.memory_gib == pytest.approx(16 - 2.6 - 100 / 1024 - 0.5) and gke.cpu == pytest.approx(4 - 0.08 - 0.4)
    # EKS, m6i.xlarge (58 pods): 7.5 % VM overhead, 11 MiB x 58 + 255 MiB kube-reserved, 100 MiB eviction.
    eks = allocatable(MACHINES["m6i.xlarge"], "eks")
    assert eks.memory_gib == pytest.approx(16 * 0.925 - (11 * 58 + 255) / 1024 - 100 / 1024 - 0.4)
    assert "kube-reserved 11 MiB x 58 pods" in eks.detail


def test_a_pod_too_large_for_its_node_type_is_refused_naming_pod_node_type_and_shortfall():
    def bigger_l4(data):
        next(n for n in data["node_types"] if n["name"] == "l4")["host_memory_gib"] = 15

    with pytest.raises(RenderError, match=r"worker group l4 does not fit node type node_types.l4 \(g6.xlarge\): short by 1.67 GiB \(asks 15.00, 13.33 allocatable\)"):
        render_rayservice(_report_with(INVENTORIES[0], bigger_l4))

    def four_cpu_ingress(data):  # 4 CPUs on a 4-vCPU node: the kubelet's reserve and the daemonsets leave ~3.5
        data["deployment"]["ingress"] = {"cpus_per_node": 4}

    with pytest.raises(RenderError, match=r"ingress pod does not fit node type deployment.ingress \(m6i.xlarge\): short by 0.\d\d CPU"):
        render_rayservice(_report_with(INVENTORIES[0], four_cpu_ingress))

    def small_system(data):  # the head (2 CPU) and KubeRay's autoscaler sidecar (0.5 CPU) on a 2-vCPU machine
        data["deployment"]["system"] = {"aws_instance_type": "m6i.xlarge", "head_cpus": 3.5}

    with pytest.raises(RenderError, match=r"head pod \(with KubeRay's autoscaler sidecar\) does not fit node type deployment.system \(m6i.xlarge\)"):
        render_rayservice(_report_with(INVENTORIES[0], small_system))

    def huge_cache(data):  # the cache Redis asks 1.25 x maxmemory: 80 GiB on a 64 GiB system node
        data["deployment"]["cache_max_memory_gib"] = 64

    with pytest.raises(RenderError, match=r"cache Redis pod does not fit node type deployment.system \(r6i.2xlarge\).*cache_max_memory_gib"):
        render_outputs(_report_with(INVENTORIES[0], huge_cache), "x")


@pytest.mark.parametrize("inventory", INVENTORIES)
def test_every_rendered_pod_names_its_pool_and_fits_it(inventory):
    outputs = render_outputs(report_for(inventory), inventory)
    platform = yaml.safe_load((REPO_ROOT / inventory).read_text())["deployment"]["k8s_platform"]
    cluster = yaml.safe_load(outputs["rayservice"])["spec"]["rayClusterConfig"]
    specs = [cluster["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]
    specs += [m["spec"]["template"]["spec"] for m in yaml.safe_load_all(outputs["redis"]) if m["kind"] in ("StatefulSet", "Deployment")]
    from placement.pod_fit import pod_requests

    for spec in specs:
        machine = spec["nodeSelector"]["node.kubernetes.io/instance-type"]
        room = allocatable(MACHINES[machine], platform)
        cpu, memory = pod_requests(spec)
        assert cpu <= room.cpu and memory <= room.memory_gib, (machine, cpu, memory, room)


def test_pods_of_the_projects_images_pull_with_the_registry_secret():
    outputs = render_outputs(report_for(INVENTORIES[0]), "x")
    cluster = yaml.safe_load(outputs["rayservice"])["spec"]["rayClusterConfig"]
    specs = [cluster["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]
    specs += [d["spec"]["template"]["spec"] for d in yaml.safe_load_all(outputs["weights"]) if d["kind"] == "Job"]
    assert all(spec["imagePullSecrets"] == [{"name": "registry-credentials"}] for spec in specs)


# ---- disruption budgets, cloud files -----------------------------------------------------------


@pytest.mark.parametrize("inventory", INVENTORIES)
def test_disruption_budgets_and_weights_manifests_validate_against_the_kubernetes_schemas(inventory):
    outputs = render_outputs(report_for(inventory), inventory)
    budgets = [yaml.safe_load(outputs["disruption"]), *(m for m in yaml.safe_load_all(outputs["redis"]) if m["kind"] == "PodDisruptionBudget")]
    assert {b["metadata"]["name"].rsplit("-", 1)[-1] for b in budgets} >= {"ingress", "redis"}
    for manifest in budgets + list(yaml.safe_load_all(outputs.get("weights", ""))):
        if manifest:
            kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    ingress = yaml.safe_load(outputs["disruption"])
    # A count, not a percentage: the RayCluster that owns the ingress pods has no scale subresource.
    assert ingress["spec"]["minAvailable"] == report_for(inventory).inventory.deployment.ingress.replicas - 1


def test_the_eksctl_file_validates_against_eksctls_schema_and_matches_the_plan():
    report = report_for(INVENTORIES[0])
    config = yaml.safe_load(render_outputs(report, "x")["eksctl"])
    schema = json.loads((REPO_ROOT / "tests/placement/data/eksctl-schema.json").read_text())
    jsonschema.validate(config, schema)
    groups = {g["name"]: g for g in config["managedNodeGroups"]}
    assert groups["system"]["instanceType"] == report.inventory.deployment.system.aws_instance_type
    for node in report.inventory.node_types:
        group = groups[f"gpu-{node.name}"]
        assert (group["minSize"], group["maxSize"], group["desiredCapacity"]) == (node.node_floor, node.node_ceiling, report.plan.nodes[node.name])
        assert group["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
        # What the cluster autoscaler reads to scale a group up from zero.
        assert group["tags"]["k8s.io/cluster-autoscaler/node-template/taint/nvidia.com/gpu"] == "present:NoSchedule"
    assert {a["name"] for a in config["addons"]} >= {"aws-ebs-csi-driver", "aws-efs-csi-driver"}
    bad = {**config, "managedNodeGroups": [{**groups["system"], "nodeTaints": "x"}]}
    with pytest.raises(jsonschema.ValidationError):  # the schema check can fail (what --node-taints would have been)
        jsonschema.validate(bad, schema)


def test_the_gke_script_creates_every_pool_the_pods_select():
    outputs = render_outputs(report_for(INVENTORIES[1]), "x")
    script = outputs["gke"]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    commands = [shlex.split(line) for line in script.splitlines() if line.startswith("gcloud ")]
    machines = {c[c.index("--machine-type") + 1] for c in commands}
    cluster = yaml.safe_load(outputs["rayservice"])["spec"]["rayClusterConfig"]
    selected = {g["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"] for g in cluster["workerGroupSpecs"]}
    assert selected <= machines
    gpu_pools = [c for c in commands if "--accelerator" in c]
    assert gpu_pools and all("gpu-driver-version=latest" in c[c.index("--accelerator") + 1] for c in gpu_pools)


# ---- upgrades, as KubeRay decides them ------------------------------------------------------------


def kuberay_cluster_hash(manifest: dict) -> str:
    """What KubeRay compares to decide that a RayService's cluster changed (and, with NewCluster,
    builds a new one): the RayCluster spec without each worker group's replicas, minReplicas,
    maxReplicas and workersToDelete (`GenerateHashWithoutReplicasAndWorkersToDelete`, kuberay
    ray-operator/controllers/ray/utils/util.go)."""
    spec = json.loads(json.dumps(manifest["spec"]["rayClusterConfig"]))
    for group in spec["workerGroupSpecs"]:
        for field in ("replicas", "minReplicas", "maxReplicas"):
            group.pop(field, None)
        group.pop("scaleStrategy", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def test_a_new_image_is_rolled_out_by_a_new_cluster_and_a_new_serve_config_in_place():
    before = render_rayservice(report_for(INVENTORIES[0])).data
    assert before["spec"]["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade")
    new_image = render_rayservice(report_for(INVENTORIES[0], image="ghcr.io/acme/rerank-fleet@sha256:" + "ab" * 32)).data
    assert kuberay_cluster_hash(new_image) != kuberay_cluster_hash(before)  # KubeRay builds a new cluster beside the old one ...
    assert new_image["spec"]["upgradeStrategy"] == before["spec"]["upgradeStrategy"]  # ... which the strategy allows
    # A new Serve config alone (more traffic: more replicas) changes serveConfigV2, which KubeRay applies in place.
    more = render_rayservice(_report_with(INVENTORIES[0], lambda d: d["traffic"].update(target_qps=6))).data
    assert more["spec"]["serveConfigV2"] != before["spec"]["serveConfigV2"]


# ---- node start: the NVIDIA driver ------------------------------------------------------------------


def test_the_driver_check_names_both_versions():
    assert required_driver("13.0") == "580.65.06" and required_driver("12.8") == "525.60.13"
    assert check("580.95.05", "13.0", "torch 2.14.0+cu130") is None
    problem = check("550.90.07", "13.0", "torch 2.14.0+cu130")
    assert "550.90.07" in problem and "580.65.06" in problem and "CUDA 13.0" in problem and "torch 2.14.0+cu130" in problem
    done = subprocess.run([sys.executable, "-m", "cli", "check-driver", "--driver", "550.90.07", "--cuda", "13.0"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1 and "older than 580.65.06" in done.stderr


@pytest.mark.parametrize("inventory", INVENTORIES)
def test_every_gpu_node_checks_its_driver_before_ray_starts(inventory):
    outputs = render_outputs(report_for(inventory), inventory)
    for group in yaml.safe_load(outputs["rayservice"])["spec"]["rayClusterConfig"]["workerGroupSpecs"][1:]:
        assert group["template"]["spec"]["initContainers"][0]["command"] == ["rerank-fleet", "check-driver"]
    for cloud in ("aws", "gcp"):
        for name, node_type in yaml.safe_load(outputs[cloud])["available_node_types"].items():
            if name.startswith("gpu-"):
                assert "rerank-fleet check-driver" in node_type["initialization_commands"][1]
    assert "nvidia-580" in yaml.safe_dump(yaml.safe_load(outputs["gcp"]))  # the image family with the R580 driver


# ---- the weights pipeline, its commands run here ------------------------------------------------------


def _run(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    exe = {"rerank-fleet": [sys.executable, "-m", "cli"]}
    argv = [*exe.get(command[0], [command[0]]), *command[1:]]
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_the_rendered_weights_jobs_fill_an_empty_volume_and_the_gpu_pods_then_start(tiny_model_dir, tmp_path):
    """The fill Job, the quantize Job and a GPU pod's wait step, as rendered, on a local folder
    standing in for the claim: the hub model replaced by the offline model's folder (no hub here),
    the mount path by the folder. The awq checkpoint they write loads in the engine."""
    from engine.engine import RerankEngine

    report = report_for(INVENTORIES[0])
    docs = list(yaml.safe_load_all(render_outputs(report, "x")["weights"]))
    jobs = {d["metadata"]["name"].split("-")[2]: d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Job"}
    mount, source = "/models", report.inventory.model.source
    volume = tmp_path / "claim"

    def here(args: list[str]) -> list[str]:
        return [str(volume) if a == mount else str(tiny_model_dir) if a == source else a.replace(mount + "/", f"{volume}/") for a in args]

    # A GPU pod's init step before anything is there: it fails at its timeout, naming what is missing.
    wait = next(c for c in render_rayservice(report).data["spec"]["rayClusterConfig"]["workerGroupSpecs"][2]["template"]["spec"]["initContainers"]
                if c["name"] == "wait-for-weights")["command"]  # fmt: skip
    timeout = wait.index("--timeout") + 1
    early = _run(here([*wait[:timeout], "1", *wait[timeout + 1:]]))
    assert early.returncode == 1 and "still lacks" in early.stderr
    # The fill Job (hub -> the offline model's folder).
    fill = _run(here(jobs["fill"]["containers"][0]["command"]))
    assert fill.returncode == 0, fill.stderr[-2000:]
    filled = volume / Path(tiny_model_dir).name
    assert (filled / "config.json").is_file()
    # The quantize Job: its wait step, then its command (AWQ on the offline model, on CPU here).
    quantize_pod = jobs["quantize"]
    source_in_volume = str(filled)
    wait_source = [source_in_volume if a == str(tiny_model_dir) else a for a in here(quantize_pod["initContainers"][0]["command"])]
    assert _run(wait_source).returncode == 0
    for part in quantize_pod["containers"][0]["command"][2].split(" && "):
        args = [source_in_volume if a == str(tiny_model_dir) else a for a in here(shlex.split(part))]
        done = _run(args)
        assert done.returncode == 0, (args, done.stderr[-3000:])
    # The GPU pod's wait step now passes (for what this node's arms read, as named by the fill and quantize markers).
    needs = [source_in_volume if n == source else n.replace(mount + "/", f"{volume}/") for n in wait[wait.index("--need") + 1 :: 2]]
    ready = _run(["rerank-fleet", "weights", "wait", "--into", str(volume), "--timeout", "5", *[x for n in needs for x in ("--need", n)]])
    assert ready.returncode == 0, ready.stderr
    awq = RerankEngine.load(str(volume / "Qwen3-VL-Reranker-8B-AWQ"), "awq", device="cpu")
    (score,) = awq.score("a red circle", ["a red circle"])
    assert 0.0 < score < 1.0
