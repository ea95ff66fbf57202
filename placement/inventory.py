"""The planner's one input file: GPU inventory, model, traffic, arms and constraints.

`Inventory.from_yaml` is the only way a file becomes planner input; a bad file raises
`InventoryError` naming the field and the reason (e.g. `node_types.2.gpu: unknown GPU 'T5'`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from placement.hardware import GPU_CATALOGUE, PLANNED_PRECISIONS, GpuModel, PlannedPrecision
from serve.yaml_io import read_yaml_mapping, validated

# Agreement of each precision's top-10 ranking with the bf16 reference (NDCG@10), used when the
# inventory gives no measured figures. Conservative values from published reranker quantisation
# results; replace them with the project's own fidelity measurements in `constraints.fidelity`.
DEFAULT_FIDELITY: dict[str, float] = {
    "bf16": 1.0,
    "fp16": 0.999,
    "fp8": 0.995,
    "int8": 0.99,
    "awq": 0.985,
    "nf4": 0.975,
}


class InventoryError(ValueError):
    """An inventory file that cannot be planned from; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightsSpec(_Strict):
    """Where a node type's replicas find the model weights: mounted at `mount_path` in every pod
    (container), with `HF_HOME=<mount_path>/hf` so hub ids resolve there too."""

    source: Literal["volume", "object_store", "hub"] = Field(
        "hub", description="volume: an existing PersistentVolumeClaim or host folder already holding the weights (read-only, offline); "
        "object_store: copied from `uri` by an init step into local disk at start (offline afterwards); hub: downloaded "
        "from the Hugging Face hub at start into local disk (token from the fleet Secret when `hub_token`).",
    )
    mount_path: str = Field("/models", pattern=r"^/[A-Za-z0-9._/-]*$", description="Absolute folder the weights appear at in the container.")
    pvc: str | None = Field(None, pattern=r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$", description="volume on Kubernetes: the claim's name (ReadOnlyMany or ReadWriteMany).")
    host_path: str | None = Field(
        None, pattern=r"^/[A-Za-z0-9._/-]*$", description="volume: the node's folder (Kubernetes hostPath when no pvc; ray up mounts it into "
        "the container); object_store and hub on ray up: the host folder the weights are copied to.",
    )
    uri: str | None = Field(None, pattern=r"^(s3|gs)://[^\s]+$", description="object_store: s3://bucket/prefix or gs://bucket/prefix holding the weights.")
    hub_token: bool = Field(False, description="hub: read HF_TOKEN from the fleet Secret (gated or private repositories).")
    disk_gib: int | None = Field(
        None, ge=1, description="object_store and hub: local disk the copy may take (the pod's ephemeral-storage request); default: "
        "the checkpoints' size from the planner's model plus 20 %.",
    )
    fill: str | None = Field(
        None, pattern=r"^(hub|(s3|gs)://[^\s]+)$", description="volume: where its content comes from, so the deployment fills it "
        "from empty: `hub` (the model from the Hugging Face hub) or s3://... / gs://... (a prefix holding the checkpoints). "
        "Kubernetes: a claim, a fill Job, a quantize Job for the awq arm, and GPU pods that wait for them; ray up: each node "
        "fills host_path before Ray starts. Without it the volume must already hold the weights (checked before Ray starts).",
    )
    storage_class: str | None = Field(
        None, description="fill on Kubernetes: the ReadWriteMany StorageClass of the claim (default: one for EFS on eks, rendered "
        "with efs_file_system_id; Filestore's standard-rwx on gke).",
    )
    efs_file_system_id: str | None = Field(None, pattern=r"^fs-[0-9a-f]{8,17}$", description="fill on eks: the EFS file system the claim's access point lives in.")

    @model_validator(mode="after")
    def _source_fields(self) -> WeightsSpec:
        if self.source == "volume" and not (self.pvc or self.host_path):
            raise ValueError("source volume needs pvc (Kubernetes) or host_path")
        if self.source == "object_store" and not self.uri:
            raise ValueError("source object_store needs uri (s3://... or gs://...)")
        if self.source != "volume" and self.pvc:
            raise ValueError(f"pvc applies to source volume only, not {self.source}")
        if self.fill and self.source != "volume":
            raise ValueError(f"fill applies to source volume only, not {self.source}")
        return self

    @property
    def filled_claim(self) -> bool:
        """A Kubernetes claim the deployment fills from empty (its Jobs write it, GPU pods wait for them)."""
        return self.source == "volume" and bool(self.pvc) and bool(self.fill)


class NodeType(_Strict):
    name: str = Field(
        ...,
        pattern=r"^[a-z0-9]([a-z0-9-]{0,28}[a-z0-9])?$",
        description="Node type name (lowercase, digits, '-'); used in arm names, Ray node types and k8s groups.",
    )
    gpu: str = Field(..., description=f"GPU model, one of the catalogue: {sorted(GPU_CATALOGUE)}.")
    gpus_per_node: int = Field(..., ge=1, le=16, description="GPUs in one node of this type.")
    count: int | None = Field(
        None, ge=0, description="Nodes that exist (a fixed fleet); the plan may use 0..count. Exclusive with min/max."
    )
    min_nodes: int | None = Field(None, ge=0, description="Nodes that always run (an autoscaling pool's floor).")
    max_nodes: int | None = Field(None, ge=0, description="Most nodes this pool may grow to.")
    cost_per_hour: float = Field(..., ge=0, description="Price of one node per hour, in the fleet's currency.")
    memory_gib: float | None = Field(
        None, gt=0, description="Per-GPU memory override in GiB (default: the catalogue's figure for the GPU)."
    )
    compute_capability: float | None = Field(
        None, gt=0, description="CUDA compute capability override (default: the catalogue's figure)."
    )
    cpus_per_node: int = Field(
        8, ge=1, description="CPU cores a node gives Ray (the k8s worker pod's request; leave room for the kubelet)."
    )
    host_memory_gib: int = Field(32, ge=1, description="Host RAM a node gives Ray, GiB (the k8s worker pod's request).")
    aws_instance_type: str | None = Field(
        None, description="EC2 instance type override (default: the catalogue's instance with this many GPUs)."
    )
    gcp_machine_type: str | None = Field(
        None, description="GCE machine type override (default: the catalogue's machine with this many GPUs)."
    )
    k8s_node_selector: dict[str, str] | None = Field(
        None, description="Kubernetes node selector override (default: the label deployment.k8s_platform gives this GPU)."
    )
    weights: WeightsSpec | None = Field(None, description="Where this node type's replicas find the weights (default: deployment.weights).")
    vision_ms_per_image: float | None = Field(
        None, gt=0, description="Measured vision-tower time of one typical image on this GPU (ms); default: the roofline. "
        "Decides whether cached features are worth fetching over the network.",
    )

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, value: str) -> str:
        if value not in GPU_CATALOGUE:
            raise ValueError(f"unknown GPU {value!r}; known: {sorted(GPU_CATALOGUE)}")
        return value

    @model_validator(mode="after")
    def _sizes(self) -> NodeType:
        if self.count is not None and (self.min_nodes is not None or self.max_nodes is not None):
            raise ValueError("give either count (a fixed fleet) or min_nodes/max_nodes (a pool), not both")
        if self.count is None and self.max_nodes is None:
            raise ValueError("give count (a fixed fleet) or max_nodes (a pool)")
        if self.max_nodes is not None and (self.min_nodes or 0) > self.max_nodes:
            raise ValueError(f"min_nodes ({self.min_nodes}) exceeds max_nodes ({self.max_nodes})")
        return self

    @property
    def gpu_model(self) -> GpuModel:
        return GPU_CATALOGUE[self.gpu]

    @property
    def node_floor(self) -> int:
        return self.min_nodes or 0

    @property
    def node_ceiling(self) -> int:
        return self.count if self.count is not None else int(self.max_nodes or 0)

    @property
    def gpu_memory_bytes(self) -> int:
        if self.memory_gib is not None:
            return int(self.memory_gib * 1024**3)
        return self.gpu_model.memory_mib * 1024**2

    @property
    def effective_compute_capability(self) -> float:
        return self.compute_capability if self.compute_capability is not None else self.gpu_model.compute_capability

    @property
    def accelerator_type(self) -> str:
        return self.gpu_model.ray_accelerator_type


class ModelSpec(_Strict):
    name: str = Field(..., min_length=1, description="Display name of the model, e.g. qwen3-vl-reranker-8b.")
    source: str = Field(
        ..., min_length=1, description="What the serving app loads: a hub id (Qwen/Qwen3-VL-Reranker-8B) or a folder."
    )
    architecture_config: str | None = Field(
        None,
        description="config.json (or its folder) the planner reads, relative to the inventory file; default: "
        "config.json of `source` (a local folder, or fetched alone from the hub). Weights are never read.",
    )
    awq_checkpoint: str | None = Field(
        None, description="Pre-quantised AWQ W4A16 (group 128) checkpoint for awq arms; required when awq is an arm."
    )
    nf4_double_quant: bool = Field(True, description="Whether nf4 arms quantise their absmax values again (bitsandbytes).")


class TrafficSpec(_Strict):
    target_qps: float = Field(..., gt=0, description="Rerank requests per second the fleet must sustain.")
    documents_per_request: int = Field(..., ge=1, description="Documents scored per request (pairs = QPS x this).")
    tokens_per_document: int = Field(..., ge=1, description="Tokens of a text document.")
    query_tokens: int = Field(32, ge=1, description="Tokens of a query.")
    prompt_overhead_tokens: int = Field(64, ge=0, description="Instruction and chat-template tokens around each pair.")
    image_share: float = Field(0.0, ge=0, le=1, description="Fraction of documents that are images.")
    tokens_per_image: int = Field(
        1024, ge=1, description="Visual tokens of one image after the 2x2 merge (pixels / (32*32) for Qwen3-VL)."
    )
    new_image_fraction: float = Field(
        0.5, ge=0, le=1, description="Share of image documents not seen within cache_window_s (sizes the feature cache)."
    )
    cache_window_s: int = Field(3600, ge=1, description="How long a seen image's features are worth keeping in the shared cache.")
    score_cache: Literal["shared", "local", "off"] = Field(
        "off", description="The ingress's score cache (the serving app's score_cache.mode): shared puts it in the cache Redis "
        "(rendered for it, sized below), local keeps it in each ingress replica; it pays for repeated pairs (head queries).",
    )
    new_pair_fraction: float = Field(
        0.5, ge=0, le=1, description="Share of (query, document) pairs not seen within score_cache_window_s (sizes the score cache)."
    )
    score_cache_window_s: int = Field(86400, ge=1, description="How long a scored pair is kept: the score cache's ttl_s.")
    batch_token_budget: int = Field(
        16384, ge=64, description="Token budget of one engine micro-batch; the serving app's model.max_batch_tokens."
    )

    @model_validator(mode="after")
    def _pair_fits_batch(self) -> TrafficSpec:
        longest = self.prompt_overhead_tokens + self.query_tokens + max(
            self.tokens_per_document, self.tokens_per_image if self.image_share > 0 else 0
        )
        if longest > self.batch_token_budget:
            raise ValueError(f"one pair ({longest} tokens) does not fit the batch_token_budget ({self.batch_token_budget})")
        return self

    @property
    def target_pairs_per_s(self) -> float:
        return self.target_qps * self.documents_per_request

    @property
    def text_pair_tokens(self) -> int:
        return self.prompt_overhead_tokens + self.query_tokens + self.tokens_per_document

    @property
    def image_pair_tokens(self) -> int:
        return self.prompt_overhead_tokens + self.query_tokens + self.tokens_per_image


class ArmSpec(_Strict):
    precision: PlannedPrecision = Field(..., description=f"Precision of this arm, one of {list(PLANNED_PRECISIONS)}.")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="Engine of this arm's replicas: transformers (the project's) or vllm (vLLM's async engine)."
    )
    vllm_memory_fraction: float = Field(
        0.9, gt=0, le=1, description="backend vllm: the share of the GPU vLLM reserves (weights, activations and its KV-cache pool)."
    )
    share: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Fraction of traffic this precision must serve; leave out to let the planner decide how much.",
    )
    fan_out_above: int | None = Field(
        None, ge=1, description="Rendered as the arm's fan_out_above (serve/config.py): requests of more documents are split "
        "over the arm's replicas. None: off.",
    )
    fan_out_chunk: int | None = Field(None, ge=1, description="Rendered as the arm's fan_out_chunk (documents per chunk; default: fan_out_above).")


class CascadeSpec(_Strict):
    """A cascade arm (serve/cascade.py): the `first` precision's arm scores every document of its
    requests, the `then` precision's arm that order's top `k`. It needs no GPU of its own, but its
    traffic lands on both arms' capacity (`placement.planner.cascade_loads`), and it is rendered as
    a cascade over their Serve arms."""

    first: PlannedPrecision = Field(..., description="Precision of the arm that scores every document of the cascade's requests (the cheap one, e.g. nf4); one of the arms.")
    then: PlannedPrecision = Field(..., description="Precision of the arm that rescores the first's top k (the expensive one, e.g. bf16); one of the arms.")
    k: int = Field(10, ge=1, description="Documents of the first arm's order the then arm rescores per request.")
    share: float = Field(
        ..., gt=0, le=1, description="Fraction of requests the cascade answers: the first arm scores all their pairs, the then arm "
        "min(k, documents_per_request) of each.",
    )

    @property
    def name(self) -> str:
        """Its Serve name (one cascade per first/then/k: numbered when its precisions run on several node types)."""
        return f"cascade-{self.first}-{self.then}-k{self.k}"


class ConstraintsSpec(_Strict):
    memory_headroom: float = Field(0.10, ge=0, lt=1, description="Fraction of each GPU's memory kept free.")
    capacity_headroom: float = Field(0.20, ge=0, description="Extra capacity over the target (0.2 plans for 120%).")
    runtime_overhead_gib: float = Field(
        1.0, ge=0, description="Per-replica CUDA context, kernels, library workspaces and fragmentation, GiB."
    )
    fidelity_floor: float = Field(
        0.0, ge=0, le=1, description="Lowest fidelity (NDCG@10 agreement with bf16) a precision may have to be placed."
    )
    fidelity_floors: dict[PlannedPrecision, float] = Field(
        default_factory=dict, description="Per-precision floors that replace fidelity_floor for those precisions."
    )
    fidelity: dict[PlannedPrecision, float] = Field(
        default_factory=lambda: dict(DEFAULT_FIDELITY),
        description="Fidelity per precision (measured ones replace the defaults); missing precisions use defaults.",
    )

    @field_validator("fidelity")
    @classmethod
    def _fidelity_range(cls, value: dict[str, float]) -> dict[str, float]:
        for precision, score in value.items():
            if not 0 <= score <= 1:
                raise ValueError(f"fidelity of {precision} must be within [0, 1], got {score}")
        return {**DEFAULT_FIDELITY, **value}

    def floor_for(self, precision: str) -> float:
        return self.fidelity_floors.get(precision, self.fidelity_floor)

    def below_floor(self, precision: str) -> bool:
        return self.fidelity[precision] < self.floor_for(precision)


# registry host (with a dot or a port, or localhost) / path [:tag] [@sha256:digest]
IMAGE_PATTERN = (
    r"^(?:[a-z0-9-]+(?:\.[a-z0-9-]+)+(?::[0-9]+)?|[a-z0-9-]+:[0-9]+|localhost)/[a-z0-9]+(?:[._/-][a-z0-9]+)*"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@sha256:(?P<digest>[0-9a-f]{64}))?$"
)
TARGETS = ("aws", "gcp", "kuberay")


class IngressNodesSpec(_Strict):
    replicas: int = Field(2, ge=1, description="Ingress replicas, one per CPU node (>= 2: losing a node never loses the endpoint).")
    cpus_per_node: float = Field(3, gt=0, description="CPUs of one ingress pod (the k8s pod's request; it must fit the node's allocatable).")
    memory_gib: int = Field(8, ge=1, description="Memory of one ingress pod, GiB.")
    aws_instance_type: str = Field("m6i.xlarge", description="EC2 instance of an ingress node (eks and ray up).")
    gcp_machine_type: str = Field("n2-standard-4", description="GCE machine of an ingress node (gke and ray up).")


class SystemNodesSpec(_Strict):
    """The CPU nodes that hold the Ray head, both Redis servers and the weights fill Job (Kubernetes)."""

    aws_instance_type: str = Field("r6i.2xlarge", description="EC2 instance of a system node (eks; ray up's head).")
    gcp_machine_type: str = Field("n2-highmem-8", description="GCE machine of a system node (gke; ray up's head).")
    head_cpus: float = Field(2, gt=0, description="CPUs of the Ray head pod (it runs no replica: GCS, dashboard, Serve's controller).")
    head_memory_gib: int = Field(8, ge=2, description="Memory of the Ray head pod, GiB.")


class UpgradeSpec(_Strict):
    gateway_class: str | None = Field(
        None, description="Gateway API class for KubeRay's incremental upgrade (NewClusterWithIncrementalUpgrade); without one, "
        "upgrades are in place (type None): Serve config changes roll replica by replica, image changes are applied as docs/DEPLOY.md says.",
    )
    step_percent: int = Field(25, ge=1, le=100, description="Incremental upgrade: traffic moved to the new cluster per step.")
    interval_s: int = Field(60, ge=1, description="Incremental upgrade: seconds between steps.")


class DeploymentSpec(_Strict):
    cluster_name: str = Field("rerank-fleet", pattern=r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$", description="Ray cluster and RayService name.")
    app_name: str = Field("reranker", min_length=1, description="Serve application name.")
    route_prefix: str = Field("/", description="HTTP route prefix of the Serve application.")
    replica_cpus: float = Field(2, gt=0, description="CPUs reserved per arm replica (image decoding, tokenising).")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one arm replica accepts before Serve queues them.")
    autoscaling: bool = Field(False, description="Give arms autoscaling bounds instead of fixed replica counts.")
    autoscaling_max_factor: float = Field(
        2.0, ge=1, description="With autoscaling: max_replicas = planned replicas x this, capped by the pool's GPUs."
    )
    target_ongoing_requests: float = Field(8, gt=0, description="With autoscaling: requests per replica Serve aims for.")
    arm_grace_s: float = Field(
        300, ge=0, description="How long after the first arm answers the ingress waits for the others before it starts with "
        "those that answered (the serving app's cluster.arm_grace_s): an arm whose GPU nodes never come delays the fleet, or an upgrade's switch, by at most this.",
    )
    redis_url: str | None = Field(
        None, description="Feature-cache Redis for `ray up` clusters (e.g. a managed Redis; its password comes from the secrets "
        "file, never this URL); k8s renders its own.",
    )
    ray_version: str = Field("2.60.0", description="Ray version installed on every node.")
    image: str | None = Field(
        None, pattern=IMAGE_PATTERN,
        description="The project's image (Dockerfile) in a registry the nodes pull from: registry/path:tag, ideally pinned "
        "with @sha256:<digest> (`rerank-fleet plan --image` overrides it). Not :latest. Required to write deployment files.",
    )
    targets: list[Literal["aws", "gcp", "kuberay"]] = Field(
        default_factory=lambda: ["kuberay"], min_length=1, description=f"What to render besides the Serve config, of {list(TARGETS)}."
    )
    k8s_platform: Literal["gke", "eks", "gpu-feature-discovery"] = Field(
        "gpu-feature-discovery", description="How GPU nodes are labelled: gke (cloud.google.com/gke-accelerator), eks "
        "(node.kubernetes.io/instance-type), gpu-feature-discovery (nvidia.com/gpu.product).",
    )
    weights: WeightsSpec = Field(default_factory=WeightsSpec, description="Where replicas find the weights (node types may override).")
    ingress: IngressNodesSpec = Field(default_factory=IngressNodesSpec, description="CPU nodes for the HTTP ingress and the experiment ledger.")
    system: SystemNodesSpec = Field(default_factory=SystemNodesSpec, description="CPU nodes for the Ray head, the Redis servers and the weights fill Job.")
    image_pull_secret: str | None = Field(
        None, pattern=r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$", description="Kubernetes: the docker-registry Secret the pods pull the "
        "project's images with (a private registry; docs/DEPLOY.md shows how to create it).",
    )
    quantize_image: str | None = Field(
        None, pattern=IMAGE_PATTERN, description="The Dockerfile's `quantize` stage pushed (llm-compressor, which the serving image "
        "cannot hold beside vLLM): runs the Job that writes the awq arm's checkpoint into a filled volume.",
    )
    upgrade: UpgradeSpec = Field(default_factory=UpgradeSpec, description="How a KubeRay deployment takes a new image or cluster spec.")
    api_auth: bool = Field(True, description="Require client API keys (read by replicas from the fleet Secret, never rendered).")
    cache_max_memory_gib: float = Field(32, gt=0, description="Most memory the shared feature-cache Redis may take.")
    cache_network_gbps: float = Field(10, gt=0, description="Throughput one replica gets from the cache Redis, Gbit/s.")
    cache_rtt_ms: float = Field(0.5, ge=0, description="Round trip to the cache Redis, ms.")
    kuberay_namespace: str = Field(
        "kuberay-system", pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", description="Namespace of the KubeRay operator: "
        "the Ray pods' NetworkPolicy admits it to the dashboard (Serve config, health) and nobody else outside the fleet.",
    )
    monitoring_namespace: str = Field(
        "monitoring", pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", description="Namespace of Prometheus (kube-prometheus-stack): "
        "the Ray pods' NetworkPolicy admits it to each pod's metrics port (8080), which the rendered PodMonitor scrapes.",
    )
    gcs_storage_gib: int = Field(2, ge=1, description="Persistent volume of the GCS fault-tolerance Redis (k8s).")
    redis_image: str = Field(
        "docker.io/library/redis:7.4.2-alpine", pattern=IMAGE_PATTERN, description="Redis image of both k8s Redis servers (pin a digest where your registry mirrors it).",
    )
    aws_image_id: str | None = Field(
        None, pattern=r"^ami-[0-9a-f]{8,17}$", description="Pinned AMI for ray up on AWS, with an NVIDIA driver recent enough for the "
        "image's CUDA (e.g. the Deep Learning Base OSS Nvidia Driver GPU AMI; docs/DEPLOY.md shows how to look it up). Required for aws.",
    )
    namespace: str = Field("rerank-fleet", pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", description="Kubernetes namespace.")
    aws_region: str = Field("us-west-2", description="AWS region of the ray-up cluster.")
    gcp_project: str | None = Field(None, pattern=r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$", description="GCP project id of the ray-up cluster; required for gcp.")
    gcp_region: str = Field("us-central1", description="GCP region of the ray-up cluster.")
    gcp_zone: str = Field("us-central1-a", description="GCP zone of the ray-up cluster.")

    @field_validator("image", "quantize_image")
    @classmethod
    def _pinned_image(cls, value: str | None) -> str | None:
        if value is None:
            return value
        match = re.match(IMAGE_PATTERN, value)
        if match and not match.group("digest") and match.group("tag") in (None, "latest"):
            raise ValueError("give a version tag or an @sha256 digest: an untagged or :latest image changes under a running cluster")
        return value

    @model_validator(mode="after")
    def _target_inputs(self) -> DeploymentSpec:
        if "aws" in self.targets and not self.aws_image_id:
            raise ValueError("aws_image_id: required to render for aws (Ray's default AMI's driver is too old for H100 and CUDA 12 images)")
        if "gcp" in self.targets and not self.gcp_project:
            raise ValueError("gcp_project: required to render for gcp")
        return self

    @property
    def secret_name(self) -> str:
        """The Kubernetes Secret whose keys replicas read as files (`placement.k8s` names them)."""
        return f"{self.cluster_name}-secrets"


class Inventory(_Strict):
    node_types: list[NodeType] = Field(..., min_length=1, description="The GPU node types the fleet may use.")
    model: ModelSpec = Field(..., description="The reranker to place.")
    traffic: TrafficSpec = Field(..., description="The load to plan for.")
    arms: list[ArmSpec] = Field(
        ...,
        min_length=1,
        description="Precisions that may serve traffic, each with a required share or left to the planner; "
        "default: every precision, left to the planner (awq only with model.awq_checkpoint).",
    )
    cascades: list[CascadeSpec] = Field(
        default_factory=list, description="Cascade arms over two of the arms' precisions, each answering a fixed share of the requests.",
    )
    constraints: ConstraintsSpec = Field(default_factory=ConstraintsSpec, description="Headroom and fidelity floor.")
    deployment: DeploymentSpec = Field(default_factory=DeploymentSpec, description="How the plan is deployed.")

    @model_validator(mode="before")
    @classmethod
    def _default_arms(cls, data):
        if isinstance(data, dict) and "arms" not in data:
            model = data.get("model")
            has_awq = isinstance(model, dict) and bool(model.get("awq_checkpoint"))
            data = {**data, "arms": [{"precision": p} for p in PLANNED_PRECISIONS if p != "awq" or has_awq]}
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> Inventory:
        names = [n.name for n in self.node_types]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"node_types: names must be unique, repeated: {repeated}")
        # Replicas are pinned by Ray accelerator type, so two node types with the same one could not be told apart.
        by_accelerator: dict[str, list[str]] = {}
        for node in self.node_types:
            by_accelerator.setdefault(node.accelerator_type, []).append(node.name)
        clashes = {acc: ns for acc, ns in by_accelerator.items() if len(ns) > 1}
        if clashes:
            raise ValueError(
                f"node_types: one node type per GPU type, but these share a Ray accelerator type: {clashes}"
            )
        precisions = [a.precision for a in self.arms]
        repeated = sorted({p for p in precisions if precisions.count(p) > 1})
        if repeated:
            raise ValueError(f"arms: each precision once, repeated: {repeated}")
        for i, c in enumerate(self.cascades):
            for stage in ("first", "then"):
                if getattr(c, stage) not in precisions:
                    raise ValueError(f"cascades.{i}.{stage}: {getattr(c, stage)} is not one of the arms' precisions {precisions}")
            if c.first == c.then:
                raise ValueError(f"cascades.{i}: first and then are the same precision {c.first}")
        names = [c.name for c in self.cascades]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"cascades: each first/then/k once, repeated: {repeated}")
        shares = [a.share for a in self.arms if a.share is not None] + [c.share for c in self.cascades]
        what = "arms' and cascades'" if self.cascades else "arms:"
        if sum(shares) > 1 + 1e-9:
            raise ValueError(f"{what} shares add up to {sum(shares):g}, more than 1")
        if all(a.share is not None for a in self.arms) and not math.isclose(sum(shares), 1.0, abs_tol=1e-9):
            raise ValueError(f"{what} every arm has a share, so they must add up to 1 (got {sum(shares):g})")
        if "awq" in precisions and not self.model.awq_checkpoint:
            raise ValueError("model.awq_checkpoint: required because awq is one of the arms")
        for node in self.node_types:
            # Every GPU of a node must be usable: each replica also reserves deployment.replica_cpus.
            if node.gpus_per_node * self.deployment.replica_cpus > node.cpus_per_node:
                raise ValueError(
                    f"node_types.{node.name}.cpus_per_node: {node.cpus_per_node} CPUs cannot host "
                    f"{node.gpus_per_node} replicas of deployment.replica_cpus={self.deployment.replica_cpus:g}"
                )
        return self

    def weights_for(self, node: NodeType) -> WeightsSpec:
        return node.weights or self.deployment.weights

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "inventory") -> Inventory:
        return validated(cls, data, InventoryError, source, "inventory")

    @classmethod
    def from_yaml(cls, path: str | Path) -> Inventory:
        data = read_yaml_mapping(path, InventoryError)
        return cls.from_dict(data, source=str(path))
