"""The weights pipeline on Kubernetes, from an empty volume: the claim the GPU pods mount, a Job
that fills it (from the hub or object storage), a Job that writes each arm's quantized
checkpoint into it, and the init step of every GPU pod that waits until what its arms read is
there (`workshop.weights_volume` runs in all three; its markers say what is complete).

Rendered for node types whose `weights` are a `volume` with a `pvc` and a `fill` source. The
claim is ReadWriteMany: the Jobs write it once, every GPU pod reads it (EFS on EKS through the EFS
CSI driver's StorageClass, rendered here; Filestore on GKE, `standard-rwx`). Plain data, no I/O.
"""

from __future__ import annotations

import math
import posixpath
import shlex

from placement import k8s
from placement.inventory import Inventory, NodeType, WeightsSpec
from placement.machines import gpu_machine
from placement.planner import PlacementReport
from placement.pod_fit import check_pods_fit
from placement.weights import checkpoint_bytes, checkpoint_of, copy_command, hf_home, is_path

JOB_LABEL = "rerank-fleet/job"
WAIT_TIMEOUT_S = 4 * 3600  # a GPU pod waits this long for the Jobs before it fails, naming what is missing
EFS_STORAGE_CLASS = "rerank-fleet-efs"
GKE_RWX_STORAGE_CLASS = "standard-rwx"  # Filestore, with the Filestore CSI driver enabled


def filled_claims(inventory: Inventory) -> dict[str, WeightsSpec]:
    """claim name -> the weights spec of the node types that mount it and need it filled."""
    claims: dict[str, WeightsSpec] = {}
    for node in inventory.node_types:
        spec = inventory.weights_for(node)
        if spec.filled_claim:
            claims.setdefault(spec.pvc, spec)
    return claims


# The commands of the pipeline (workshop.weights_volume behind `rerank-fleet weights`), one place for
# the Jobs, the init containers and ray up's node commands.


def fill_command(source: str, mount: str) -> list[str]:
    return ["rerank-fleet", "weights", "fill", "--from", source, "--into", mount]


def mark_command(mount: str, done: list[str]) -> list[str]:
    return ["rerank-fleet", "weights", "mark", "--into", mount, *(x for d in done for x in ("--done", d))]


def wait_command(mount: str, needs: list[str], *, timeout_s: float = WAIT_TIMEOUT_S, staged: bool = False) -> list[str]:
    return ["rerank-fleet", "weights", "wait", *(["--staged"] if staged else []), "--into", mount, "--timeout", f"{timeout_s:g}",
            *(x for n in needs for x in ("--need", n))]  # fmt: skip


def quantize_command(source: str, awq: str, mount: str) -> str:
    """AWQ of the model on the volume into `awq`, then its marker (a shell line: two steps)."""
    return f"{shlex.join(['rerank-fleet', 'quantize', '--model', source, '--scheme', 'awq', '--out', awq])} && {shlex.join(mark_command(mount, [awq]))}"


def checkpoints_on(report: PlacementReport, node: NodeType) -> list[str]:
    """What the arms placed on this node type read, as `weights wait --need` names it."""
    precisions = sorted({p.precision for p in report.plan.placements if p.node_type == node.name})
    return sorted({checkpoint_of(report.inventory, p) for p in precisions})


def wait_container(report: PlacementReport, node: NodeType) -> dict | None:
    """The GPU pod's init step: wait for the checkpoints its arms read (None when nothing fills the volume)."""
    spec = report.inventory.weights_for(node)
    needs = checkpoints_on(report, node)
    if not spec.filled_claim or not needs:
        return None
    return {
        "name": "wait-for-weights",
        "image": report.inventory.deployment.image,
        "imagePullPolicy": "Always",
        "command": wait_command(spec.mount_path, needs),
        "securityContext": k8s.container_security(read_only_root=True),
        "resources": _sized("100m", "256Mi"),
        "volumeMounts": [{"name": "weights", "mountPath": spec.mount_path, "readOnly": True}],
    }


def claim_size_gib(report: PlacementReport) -> int:
    """Every checkpoint the arms read (the bf16 source and the quantized ones), + 20 %."""
    inventory = report.inventory
    checkpoints = {checkpoint_of(inventory, a.precision): a.precision for a in inventory.arms}
    total = sum(checkpoint_bytes(report.counts, p, nf4_double_quant=inventory.model.nf4_double_quant) for p in checkpoints.values())
    return max(10, math.ceil(total * 1.2 / 1024**3))


def render_claims(report: PlacementReport) -> list[dict]:
    """The StorageClass (EKS) and the ReadWriteMany claim of every filled volume."""
    inventory = report.inventory
    deployment = inventory.deployment
    out: list[dict] = []
    for claim, spec in filled_claims(inventory).items():
        storage_class = spec.storage_class or (EFS_STORAGE_CLASS if deployment.k8s_platform == "eks" else GKE_RWX_STORAGE_CLASS)
        if storage_class == EFS_STORAGE_CLASS and not any(m.get("metadata", {}).get("name") == EFS_STORAGE_CLASS for m in out):
            out.append({
                "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": EFS_STORAGE_CLASS},
                "provisioner": "efs.csi.aws.com",
                "parameters": {"provisioningMode": "efs-ap", "fileSystemId": spec.efs_file_system_id, "directoryPerms": "750",
                               "uid": str(k8s.RAY_UID), "gid": str(k8s.RAY_UID)},
                "reclaimPolicy": "Retain",
            })  # fmt: skip
        out.append({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": deployment.namespace},
            "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": storage_class,
                     "resources": {"requests": {"storage": f"{claim_size_gib(report)}Gi"}}},
        })  # fmt: skip
    return out


def _job(report: PlacementReport, name: str, pod_spec: dict) -> dict:
    deployment = report.inventory.deployment
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": f"{deployment.cluster_name}-{name}", "namespace": deployment.namespace},
        "spec": {"backoffLimit": 3, "ttlSecondsAfterFinished": 86400,
                 "template": {"metadata": {"labels": {JOB_LABEL: name}},
                              "spec": {"restartPolicy": "OnFailure", "automountServiceAccountToken": False,
                                       "securityContext": k8s.pod_security(k8s.RAY_UID), **k8s.pull_secrets(deployment), **pod_spec}}},
    }  # fmt: skip


def _volume(claim: str) -> dict:
    return {"name": "weights", "persistentVolumeClaim": {"claimName": claim}}


def fill_job(report: PlacementReport, claim: str, spec: WeightsSpec) -> dict:
    """The Job that fills one claim: the model from the hub (into HF_HOME on the volume) or an
    object-store prefix (synced onto it), then its marker."""
    inventory = report.inventory
    deployment = inventory.deployment
    source = inventory.model.source
    mount = {"name": "weights", "mountPath": spec.mount_path}
    env = [{"name": "HF_HOME", "value": hf_home(spec)}]
    containers: list[dict] = []
    init: list[dict] = []
    if spec.fill == "hub":
        keys = [k8s.HF_TOKEN] if spec.hub_token else []
        command = fill_command(source, spec.mount_path)
        if spec.hub_token:
            env.append({"name": "HF_TOKEN_PATH", "value": f"{k8s.SECRETS_MOUNT}/{k8s.HF_TOKEN}"})
    else:
        keys = []
        copy = copy_command(spec.fill, spec.mount_path)
        init.append({"name": "sync", "image": copy.image, "imagePullPolicy": "Always", "command": copy.command,
                     "env": [{"name": "HOME", "value": "/tmp"}, {"name": "CLOUDSDK_CONFIG", "value": "/tmp/gcloud"}],
                     "securityContext": k8s.container_security(read_only_root=True),
                     "resources": _sized("2", "2Gi"), "volumeMounts": [mount, {"name": "tmp", "mountPath": "/tmp"}]})  # fmt: skip
        synced = sorted({checkpoint_of(inventory, a.precision) for a in inventory.arms})
        # The quantize Job writes (and marks) the awq checkpoint when there is one.
        command = mark_command(spec.mount_path, [c for c in synced if not (c == inventory.model.awq_checkpoint and deployment.quantize_image)])
    containers.append({"name": "fill", "image": deployment.image, "imagePullPolicy": "Always", "command": command, "env": env,
                       "securityContext": k8s.container_security(read_only_root=True),
                       "resources": _sized("2", "4Gi"), "volumeMounts": [mount, {"name": "tmp", "mountPath": "/tmp"}]})  # fmt: skip
    volumes = [_volume(claim), {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}}]
    if keys:
        volumes.append(k8s.secret_volume(deployment, keys))
        containers[0]["volumeMounts"].append({"name": "fleet-secrets", "mountPath": k8s.SECRETS_MOUNT, "readOnly": True})
    pod: dict = {"containers": containers, "volumes": volumes}
    if init:
        pod["initContainers"] = init
    return _job(report, f"fill-{claim}", pod)


def quantize_node(report: PlacementReport) -> NodeType:
    """The GPU node type the quantize Job runs on: the cheapest GPU that holds the 16-bit model with
    room for calibration (1.2x its weights: AWQ's calibration batches are small), else the largest."""
    need = 1.2 * checkpoint_bytes(report.counts, "bf16", nf4_double_quant=True)
    fits = [n for n in report.inventory.node_types if n.gpu_memory_bytes >= need]
    if not fits:
        return max(report.inventory.node_types, key=lambda n: n.gpu_memory_bytes)
    return min(fits, key=lambda n: (n.cost_per_hour / n.gpus_per_node, n.name))


def quantize_job(report: PlacementReport, claim: str, spec: WeightsSpec, node: NodeType, node_selector: dict[str, str]) -> dict | None:
    """The Job that writes the AWQ checkpoint the awq arms read, once the source is on the volume
    (None without an awq arm). Its image is `deployment.quantize_image` (the Dockerfile's
    `quantize` stage: llm-compressor, which the serving image cannot hold beside vLLM)."""
    inventory = report.inventory
    awq = inventory.model.awq_checkpoint
    if not awq or not any(a.precision == "awq" for a in inventory.arms) or not is_path(awq):
        return None
    source = inventory.model.source
    mount = {"name": "weights", "mountPath": spec.mount_path}
    env = [{"name": "HF_HOME", "value": hf_home(spec)}, {"name": "HF_HUB_OFFLINE", "value": "1"}]
    wait = wait_command(spec.mount_path, [source])
    quantize = quantize_command(source, awq, spec.mount_path)
    share = node.gpus_per_node  # one GPU's share of the node's pod resources
    gpu = _sized(f"{max(1, node.cpus_per_node // share)}", f"{max(1, node.host_memory_gib // share)}Gi")
    gpu["requests"]["nvidia.com/gpu"] = gpu["limits"]["nvidia.com/gpu"] = "1"
    pod = {
        "nodeSelector": node_selector,
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "initContainers": [{"name": "wait-for-source", "image": inventory.deployment.image, "imagePullPolicy": "Always", "command": wait,
                            "securityContext": k8s.container_security(read_only_root=True), "resources": _sized("100m", "256Mi"),
                            "volumeMounts": [{**mount, "readOnly": True}]}],
        # Caches (torch, Triton, llm-compressor) go to /tmp, a scratch volume: the image stays read-only.
        "containers": [{"name": "quantize", "image": inventory.deployment.quantize_image, "imagePullPolicy": "Always",
                        "command": ["sh", "-c", quantize], "env": [*env, {"name": "HOME", "value": "/tmp"}, {"name": "TMPDIR", "value": "/tmp"}],
                        "securityContext": k8s.container_security(read_only_root=True), "resources": gpu,
                        "volumeMounts": [mount, {"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]}],
        "volumes": [_volume(claim), {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}}],
    }  # fmt: skip
    return _job(report, f"quantize-{posixpath.basename(awq.rstrip('/')).lower()}", pod)


def _sized(cpu: str, memory: str) -> dict:
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}


def render_weights(report: PlacementReport) -> tuple[list[dict], list[str]]:
    """Every filled volume's StorageClass, claim, fill Job and quantize Job, and notes; raises
    WeightsPipelineError for a pipeline that could not complete (naming the field to set)."""
    inventory = report.inventory
    deployment = inventory.deployment
    manifests, notes, pods = [], [], []
    for claim, spec in filled_claims(inventory).items():
        if deployment.k8s_platform == "eks" and not spec.storage_class and not spec.efs_file_system_id:
            raise WeightsPipelineError(f"weights.efs_file_system_id: needed on eks to create the ReadWriteMany claim {claim} (or give weights.storage_class)")
        job = fill_job(report, claim, spec)
        job_spec = job["spec"]["template"]["spec"]
        machine = k8s.system_machine(deployment)
        if machine:
            job_spec["nodeSelector"] = k8s.pool_selector(machine)
        pods.append((f"Job {job['metadata']['name']}", job_spec, "deployment.system", machine))
        manifests.append(job)
        if any(a.precision == "awq" for a in inventory.arms):
            if not deployment.quantize_image:
                raise WeightsPipelineError(f"deployment.quantize_image: needed to write the awq arm's checkpoint into {claim} "
                                           "(the Dockerfile's quantize stage, pushed)")  # fmt: skip
            node = quantize_node(report)
            gpu = gpu_machine(node, deployment.k8s_platform)
            selector = {**(k8s.gpu_node_selector(node, deployment.k8s_platform, gpu) or {}), **k8s.pool_selector(gpu)}
            quantize = quantize_job(report, claim, spec, node, selector)
            if quantize is not None:
                pods.append((f"Job {quantize['metadata']['name']}", quantize["spec"]["template"]["spec"], f"node_types.{node.name}", gpu))
                manifests.append(quantize)
    notes += check_pods_fit(deployment.k8s_platform, deployment.cluster_name, pods)
    if manifests:
        manifests.append(jobs_network_policy(report))
    return render_claims(report) + manifests, notes


def jobs_network_policy(report: PlacementReport) -> dict:
    """The weights Jobs serve nothing: no connection reaches their pods (they reach out to the hub or the object store)."""
    deployment = report.inventory.deployment
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": f"{deployment.cluster_name}-weights-jobs", "namespace": deployment.namespace},
        "spec": {"podSelector": {"matchExpressions": [{"key": JOB_LABEL, "operator": "Exists"}]}, "policyTypes": ["Ingress"], "ingress": []},
    }  # fmt: skip


class WeightsPipelineError(ValueError):
    """A weights pipeline that could not complete as rendered; the message names the field."""
