"""The fleet's one configuration model, loaded from YAML and validated once at the edge.

Everything that shapes serving lives here: the model, the precision arms, the router, the
image-feature cache, request limits and API keys. `FleetConfig.from_yaml` is the only way a
file becomes configuration; an invalid file raises `ConfigError` naming the field and reason.
The engine's settings are declared once, in `engine.config`, and reused here: `model:` is the
engine's `ModelSettings` plus the model's source and name, `limits:` holds the engine's
`DecodeBudgets` beside the serving layer's own limits, an arm's `vllm:` is `VllmSettings`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, model_validator

from engine.config import DecodeBudgets, EngineConfig, ModelSettings, Settings, VllmSettings
from engine.errors import ConfigError
from serve.yaml_io import read_yaml_mapping, validated

Precision = Literal["fp32", "bf16", "fp16", "int8", "nf4", "awq", "w8a8", "fp8"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8", "nf4", "awq", "w8a8", "fp8")
# Retry-After (seconds) of every 503 the fleet answers: its own refusals and Serve's backpressure.
RETRY_AFTER_S = 1


_Strict = Settings  # frozen, unknown names refused: every section alike, the engine's too


class SecretRef(_Strict):
    """Where a secret is read when a replica starts: an environment variable or a file (e.g. a
    Kubernetes Secret as env or volume). Configs then carry the reference, never the value."""

    env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Environment variable holding the secret.")
    file: str | None = Field(None, min_length=1, description="File holding the secret (surrounding whitespace is ignored; ~ is the replica's home).")

    @model_validator(mode="after")
    def _one_place(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of env or file")
        return self

    def read(self, field: str) -> str:
        """The secret's value; a ConfigError naming `field` when it is missing or empty."""
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise ConfigError(f"{field}: environment variable {self.env} is not set")
            where = f"environment variable {self.env}"
        else:
            try:
                value = Path(self.file).expanduser().read_text()
            except OSError as e:
                raise ConfigError(f"{field}: cannot read {self.file}: {e.strerror or e}") from None
            where = self.file
        value = value.strip()
        if not value:
            raise ConfigError(f"{field}: {where} is empty")
        return value


class _ModelSource(_Strict):
    source: str = Field(
        "tiny",
        description="'tiny' for the project's trained offline model, a local folder, or a hub id "
        "such as Qwen/Qwen3-VL-Reranker-8B or vec-ai/lychee-rerank-mm.",
    )
    served_name: str | None = Field(None, description="Model id reported in responses; default: the source.")


# pydantic orders fields from the last base: source and served_name come first, as they always have.
class ModelConfig(ModelSettings, _ModelSource):
    """The model: where its weights come from, its served name, and the engine's `ModelSettings`."""

    @property
    def name(self) -> str:
        return self.served_name or self.source


class ActorOptions(_Strict):
    """The subset of Ray's `ray_actor_options` an arm may set (pins replicas to GPU types)."""

    num_cpus: float | None = Field(None, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0, ge=0, description="GPUs reserved per replica (fractions share a GPU).")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. H100, A10G, T4.")
    memory: int | None = Field(None, ge=0, description="Heap memory reserved per replica, in bytes.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per replica.")

    def to_ray(self) -> dict:
        return self.model_dump(exclude_none=True, exclude_defaults=False)


class AutoscalingConfig(_Strict):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas.")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(8, gt=0, description="Requests per replica the autoscaler aims for.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class BatchingConfig(_Strict):
    max_batch_size: int = Field(32, ge=1, description="Most requests merged into one engine call (every prepared request waiting when the engine is free, up to this).")
    # 0: a request alone starts at once; under load the requests prepared while a batch runs form
    # the next one, so batching costs no idle wait.
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="How long a request prepared while the engine is idle waits for others to join (never under load)."
    )


class ArmConfig(_Strict):
    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$", description="Arm name, used in URLs, headers and metrics.")
    precision: Precision = Field(..., description="Numeric precision of this arm's engine.")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers: the project's own engine (the parity reference; bitsandbytes int8/nf4 on CPU too); "
        "vllm: vLLM's async engine in the replica (continuous batching, prefix caching, FP8/AWQ kernels).",
    )
    vllm: VllmSettings = Field(default_factory=VllmSettings, description="vLLM engine arguments (backend: vllm only).")
    checkpoint: str | None = Field(
        None, description="Model folder or hub id for this arm (e.g. a pre-quantized AWQ checkpoint); defaults to model.source."
    )
    canary: Literal["required", "if_present", "off"] = Field(
        "if_present", description="Canary at start: a replica scores the canary set recorded with its checkpoint (canary.json, "
        "written by `rerank-fleet quantize`, `eval` and `build-tiny`) before it takes traffic, and refuses to start, naming the "
        "agreement it reached, when its ranking disagrees with the reference scores beyond the bound (engine/canary.py). "
        "if_present: checkpoints without a canary.json start with a warning; required: they do not start; off: no canary.",
    )
    weight: float = Field(1.0, ge=0, description="Share of routed traffic (relative to the other arms).")
    num_replicas: int = Field(1, ge=1, description="Fixed replica count, unless autoscaling is set.")
    autoscaling: AutoscalingConfig | None = Field(None, description="Autoscaling bounds; overrides num_replicas.")
    queue_budget_s: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="Seconds of work a request may find queued ahead of it in a replica (the pairs "
        "admitted and not finished, over the replica's measured pairs per second); past that it is refused at once with 503 + "
        "Retry-After, before any work is done. Bursts within it are served; sustained overload is refused fast.",
    )
    max_ongoing_requests: int = Field(
        32, ge=1, description="Requests one replica holds (batching draws from them): Serve's outer bound. Keep it above what "
        "queue_budget_s admits (the budget x the replica's pairs/s, over the documents per request), so the time bound decides: "
        "requests Serve holds back wait unseen by the budget.",
    )
    max_queued_requests: Annotated[int, Field(ge=1)] | Literal[-1] = Field(
        32, description="Requests queued per ingress handle beyond those (at least 1, as Serve requires); more are refused at once "
        "with 503 + Retry-After (-1: unbounded).",
    )
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions, description="Resources per replica.")
    cost_per_replica_hour: float | None = Field(None, ge=0, description="What one replica costs per hour (any currency): experiments report cost per 1000 requests.")
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Dynamic batching limits.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the engine runs; auto picks cuda when a GPU is assigned.")
    torch_threads: int | None = Field(
        None, ge=1, description="Intra-op threads of the forward pass; default: the replica's CPU reservation (at least 1)."
    )
    cpu_nice: int = Field(
        0, ge=0, le=19, description="Linux niceness of the replica's scoring threads: on nodes where arms share CPU cores with the "
        "HTTP proxy and ingress (CPU-only, small nodes), > 0 lets those answer first, so overload is refused fast.",
    )
    prepare_workers: int = Field(
        1, ge=1, description="CPU threads preparing requests (decode, resize, tokenize) while the forward pass runs."
    )
    feature_cache: Literal["shared", "local", "off"] = Field(
        "shared", description="Image-feature caching of this arm: shared (in-replica LRU, then cache.redis_url), local (the LRU only: "
        "where fetching features over the network costs about as much as the vision tower), off (neither).",
    )
    fan_out_above: int | None = Field(
        None, ge=1, description="A request with more documents than this is split into chunks scored at once on the arm's replicas "
        "(each chunk a request of its own with the same query and instruction: each runs the query's shared prefix) and merged "
        "into one answer; limits, the deadline, errors, admission and top_n apply to the whole request. Pays for large candidate "
        "lists on idle replicas (GPU arms with spare replicas); on a loaded fleet it only adds calls and prefixes. None: off.",
    )
    fan_out_chunk: int | None = Field(
        None, ge=1, description="Most documents per chunk of a fanned-out request (as few chunks as will do, of sizes within one "
        "of each other); default: fan_out_above. A good size: a large request's documents over the arm's replicas (a chunk each).",
    )

    @model_validator(mode="after")
    def _fan_out(self) -> ArmConfig:
        if self.fan_out_chunk is not None and self.fan_out_above is None:
            raise ValueError("fan_out_chunk needs fan_out_above (fan-out is off without it)")
        return self

    @property
    def max_replicas(self) -> int:
        """Replicas this arm runs at its largest (autoscaling's bound, else the fixed count)."""
        return self.autoscaling.max_replicas if self.autoscaling else self.num_replicas

    @property
    def max_held(self) -> int:
        """Requests this arm holds and queues at its largest (an unbounded queue counts none)."""
        return (self.max_ongoing_requests + max(0, self.max_queued_requests)) * self.max_replicas


class CascadeConfig(_Strict):
    """A cascade arm: `first` (a cheap arm) scores every document, `then` (an expensive arm) the
    first's top `k`; the answer ranks those k by `then` above the rest in `first`'s order
    (serve/cascade.py). It runs no replicas of its own: it calls the two arms' deployments, and
    is routed, pinned, shadowed and judged in experiments under its own name like any arm."""

    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$", description="Cascade name, used like an arm's in URLs, headers, pins and metrics.")
    first: str = Field(..., description="The arm that scores every document (the cheap one, e.g. nf4); an arm of `arms`, not a cascade.")
    then: str = Field(..., description="The arm that rescores the first's top k (the expensive one, e.g. fp32 or bf16); an arm of `arms`, not a cascade.")
    k: int = Field(10, ge=1, description="Documents of the first arm's order the then arm rescores (a request of k or fewer: all of them).")
    weight: float = Field(1.0, ge=0, description="Share of routed traffic (relative to the arms' and the other cascades' weights).")


class ShadowConfig(_Strict):
    arm: str = Field(..., description="Arm that receives mirrored traffic.")
    fraction: float = Field(0.1, ge=0, le=1, description="Share of primary requests mirrored.")
    top_k: int = Field(10, ge=1, description="k for top-k overlap and NDCG@k agreement.")
    max_in_flight: int = Field(
        4, ge=1, description="Shadow calls in flight per ingress replica; more are dropped (and counted), so mirrored traffic "
        "never takes more than this many of the shadow arm's slots from its routed traffic.",
    )


class InterleaveConfig(_Strict):
    arms: tuple[str, str] = Field(..., description="The two arms whose rankings are interleaved.")
    fraction: float = Field(0.1, ge=0, le=1, description="Share of unpinned requests answered interleaved (both arms score them).")


class RouterConfig(_Strict):
    sticky_header: str = Field("x-rerank-user", description="Header whose value keeps a user on one arm.")
    pin_header: str = Field("x-rerank-arm", description="Header that pins a request to a named arm.")
    shadow: ShadowConfig | None = Field(None, description="Mirror traffic to a second arm and compare rankings.")
    failure_threshold: int = Field(3, ge=1, description="Failed or timed-out calls in a row that take an arm out of routed traffic (a dead replica does at once).")
    probe_interval_s: float = Field(0.5, gt=0, description="How often an arm out of routed traffic is probed; it is back when a probe answers.")
    interleave: InterleaveConfig | None = Field(None, description="Team-draft interleaving of two arms' rankings in one response, credited by clicks.")


class GuardrailsConfig(_Strict):
    """Limits that take an arm out of routed traffic (weight 0; pins and shadow still reach it).
    Each trips only on significant evidence: the 99 % interval lies past the limit (they look again every flush; results report 95 %)."""

    min_agreement: float | None = Field(0.9, ge=-1, le=1, description="Agreement with the reference arm (the metric below) an arm must keep; None: no limit.")
    # Not NDCG by default: with the reference's ranks as graded gains it is lenient (a random-weight
    # model scored 0.963 against the trained one over 8 documents, Spearman 0.68).
    agreement_metric: Literal["spearman", "ndcg", "topk_overlap", "rbo"] = Field(
        "spearman", description="Agreement metric judged (ndcg and topk_overlap at router.shadow.top_k); it is also the one verdicts use."
    )
    max_error_rate: float | None = Field(0.05, gt=0, le=1, description="Share of an arm's requests that may fail (5xx); None: no limit.")
    p95_slo_ms: float | None = Field(None, gt=0, description="p95 latency an arm must keep (more than 5 % of its requests slower trips it); None: no limit.")
    min_requests: int = Field(20, ge=2, description="Requests (or shadow comparisons) an arm needs before any guardrail judges it.")


class RampConfig(_Strict):
    arm: str = Field(..., description="The candidate arm whose share of routed traffic ramps up.")
    steps: list[float] = Field([0.01, 0.05, 0.25, 0.5], min_length=1, description="Shares of routed traffic, in order; the last one is held.")
    min_requests: int = Field(200, ge=1, description="Requests the arm answers at a step, guardrails holding, before the next step.")

    @model_validator(mode="after")
    def _steps(self) -> RampConfig:
        if any(not 0 < x < 1 for x in self.steps) or self.steps != sorted(self.steps):
            raise ValueError("ramp.steps must rise and lie strictly between 0 and 1")
        return self


class ExperimentConfig(_Strict):
    name: str = Field("default", min_length=1, max_length=100, description="Name of the experiment that starts with the app.")
    reference: str | None = Field(None, description="The arm others are judged against; default: the first arm.")
    noise_floor_fraction: float = Field(
        0.05, ge=0, le=1, description="Share of the reference arm's routed requests scored again by the reference arm itself (in another batch): "
        "how much the same precision disagrees with itself, shown beside every arm's agreement.",
    )
    equivalence_margin: float = Field(0.02, gt=0, le=1, description="How far below the noise floor an arm's agreement may lie and still rank 'like the reference'.")
    latency_margin: float = Field(0.1, gt=0, description="p95 latency ratio above 1 + this counts as slower.")
    guardrails: GuardrailsConfig = Field(default_factory=GuardrailsConfig, description="Automatic removal of an arm from routed traffic.")
    ramp: RampConfig | None = Field(None, description="Canary ramp of one arm's share, advancing while the guardrails hold.")
    flush_interval_s: float = Field(0.25, gt=0, le=10, description="How often each ingress replica sends its records to the ledger and reads the live control state.")
    feedback_window: int = Field(100_000, ge=1, description="Most recent answered requests that feedback can still join to (older ids are forgotten).")


class IngressConfig(_Strict):
    num_replicas: int = Field(1, ge=1, description="Ingress replicas (spread over nodes by Serve); experiment totals are fleet-wide whichever answers.")
    max_replicas_per_node: int | None = Field(
        None, ge=1, description="Serve's bound on ingress replicas per node: 1 with num_replicas >= 2 means losing a node never loses the ingress.",
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources the ingress and the experiment ledger ask for (e.g. one only CPU "
        "ingress nodes declare), so they never land on the head or take a GPU node's CPUs.",
    )
    max_in_flight: Annotated[int, Field(ge=1)] | Literal["auto", "off"] = Field(
        "auto", description="Rerank requests one ingress replica works on at once; more are refused with 503 + Retry-After before "
        "their body is read or parsed (the cheapest refusal there is). A safety bound on count: each arm's queue_budget_s "
        "decides admission in time. auto: what the arms' Serve bounds hold and queue at their largest "
        "(max_ongoing_requests + max_queued_requests per replica), split over the ingress replicas; off: no gate (each arm's "
        "budget and Serve bounds still refuse).",
    )

    def in_flight_limit(self, arms: list[ArmConfig]) -> int | None:
        """The gate's bound per ingress replica (None: no gate; also auto with an arm whose queue is unbounded)."""
        if self.max_in_flight == "off":
            return None
        if self.max_in_flight != "auto":
            return self.max_in_flight
        if any(a.max_queued_requests < 0 for a in arms):
            return None
        return max(1, -(-sum(a.max_held for a in arms) // self.num_replicas))


class CacheConfig(_Strict):
    redis_url: str | None = Field(None, description="redis://host:port/db for the shared tier; None keeps only the in-replica LRU.")
    ttl_s: int = Field(24 * 3600, ge=1, description="Lifetime of a cached entry in Redis.")
    local_max_bytes: int = Field(256 * 1024 * 1024, ge=0, description="Byte bound of the in-replica LRU (0 disables it).")
    max_item_bytes: int = Field(16 * 1024 * 1024, ge=1, description="Entries larger than this are not cached.")
    redis_timeout_s: float = Field(0.05, gt=0, description="Per-operation Redis timeout; slower means bypass.")
    retry_after_s: float = Field(5.0, ge=0, description="After a Redis failure, skip Redis for this long.")
    redis_password: SecretStr | None = Field(None, description="Password of the cache Redis (prefer redis_password_from in deployed configs).")
    redis_password_from: SecretRef | None = Field(None, description="Where replicas read the cache Redis's password (env or file).")

    def for_mode(self, mode: str) -> CacheConfig:
        """The tiers an arm with `feature_cache: mode` uses (shared: both; local: the LRU; off: none)."""
        if mode == "shared":
            return self
        return self.model_copy(update={"redis_url": None, **({"local_max_bytes": 0} if mode == "off" else {})})


class ScoreCacheConfig(_Strict):
    """The ingress's score cache (serve/score_cache.py): a pair scored before is answered from it
    instead of by the arm. Its Redis tier is the cache Redis (`cache.redis_url`, with its timeout,
    retry and password), its keys under `rerank:score:`."""

    mode: Literal["shared", "local", "off"] = Field(
        "off", description="shared: the ingress's in-process LRU, then cache.redis_url (shared by every ingress replica); local: "
        "the LRU only; off: every pair goes to the arm. It pays for repeated pairs (head queries, the same candidate lists); "
        "traffic of unique pairs pays a lookup (a Redis round trip) per request for nothing.",
    )
    ttl_s: int = Field(24 * 3600, ge=1, description="Lifetime of a cached score, in Redis and in the LRU.")
    local_max_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="Byte bound of the in-process LRU of one ingress replica, split evenly among the arms "
        "(about 330 bytes per cached pair; 0 disables it).",
    )

    def tiers(self, cache: CacheConfig) -> CacheConfig:
        """The tier settings of the score cache: the cache Redis's connection (none unless shared), its own size and lifetime."""
        return cache.for_mode(self.mode).model_copy(update={"ttl_s": self.ttl_s, "local_max_bytes": self.local_max_bytes})


class LimitsConfig(DecodeBudgets):
    """Request limits and URL safety; the engine's `DecodeBudgets` (image bytes and pixels, video file
    frames, a request's pixels) are among them."""

    max_documents: int = Field(1000, ge=1, description="Documents per request.")
    max_text_chars: int = Field(32_000, ge=1, description="Characters per text field.")
    max_images_per_item: int = Field(8, ge=0, description="Images in one query or document.")
    max_video_frames: int = Field(256, ge=1, description="Frames given in one video.")
    max_video_bytes: int = Field(200 * 1024 * 1024, ge=1, description="Encoded bytes of one video file.")
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1, description="Bytes of one HTTP request body.")
    fetch_timeout_s: float = Field(10.0, gt=0, description="Time limit of one URL fetch.")
    max_redirects: int = Field(3, ge=0, description="Redirects followed per fetch, each re-checked.")
    allow_private_urls: bool = Field(False, description="Allow URLs resolving to loopback, private or link-local addresses.")
    allowed_hosts: list[str] = Field(default_factory=list, description="Hosts allowed even when private (e.g. an internal CDN).")
    request_timeout_s: float = Field(
        30.0, gt=0, description="Deadline of one rerank request (a client may ask for less with the x-rerank-timeout-ms header); "
        "work whose deadline has passed is not started.",
    )
    body_read_timeout_s: float = Field(10.0, gt=0, description="Time a client has to send its whole request body (slow senders get 408).")
    max_downloads: int = Field(64, ge=1, description="URL downloads in flight in one ingress replica, all requests together.")
    max_downloads_per_request: int = Field(4, ge=1, description="URL downloads in flight for one request (one request cannot take every slot).")
    download_deadline_s: float = Field(20.0, gt=0, description="Time limit of all of one request's downloads together.")


class HttpConfig(_Strict):
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP proxy.")
    route_prefix: str = Field("/", description="Serve route prefix of the app.")
    drain_grace_s: float = Field(
        30.0, ge=0, description="On shutdown or redeploy: time in-flight requests get to finish after new ones are refused."
    )


class ClusterConfig(_Strict):
    """What the application may assume of the Ray cluster it is deployed on."""

    elastic: bool = Field(
        False, description="The cluster's nodes join after the application is submitted, or never (KubeRay, ray up, GPU groups "
        "that scale from zero): the application is never refused for resources the cluster lacks now, and each arm asks for its "
        "replicas once the application runs, so an arm whose GPU type never arrives holds back no other (its traffic fails "
        "over; /health and /ready name it and say why). Off (a local cluster, which has what it will ever have): a fleet that "
        "needs more than the cluster has is refused at once, and the application runs when every arm does.",
    )
    arm_grace_s: float = Field(
        300, ge=0, description="elastic: the ingress starts (and the application reports RUNNING, which KubeRay waits for "
        "before it sends traffic) once every arm answers, or this long after the first one did: an arm whose nodes never "
        "come delays the fleet by at most this.",
    )


class FleetConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig, description="The reranker model.")
    arms: list[ArmConfig] = Field(..., min_length=1, description="Precision arms, one Serve deployment each.")
    cascades: list[CascadeConfig] = Field(
        default_factory=list, description="Cascade arms: a cheap arm's order with an expensive arm's scores on its top k; no replicas of their own.",
    )
    router: RouterConfig = Field(default_factory=RouterConfig, description="Traffic split, pins, sticky A/B, shadow.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="Image-feature cache (and the cache Redis the score cache shares).")
    score_cache: ScoreCacheConfig = Field(default_factory=ScoreCacheConfig, description="Scores of pairs seen before, answered by the ingress.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Request limits and URL safety.")
    http: HttpConfig = Field(default_factory=HttpConfig, description="Where the HTTP endpoint listens.")
    api_keys: list[SecretStr] = Field(default_factory=list, description="Bearer keys accepted; empty (and no api_keys_from) means no auth.")
    api_keys_from: SecretRef | None = Field(
        None, description="Where replicas read more client keys at start (env or file; keys separated by commas or newlines).",
    )
    admin_keys: dict[str, SecretStr] = Field(
        default_factory=dict, description="Named Bearer keys for the experiment admin endpoints (the name is logged with each change); "
        "distinct from api_keys; empty: every admin call is refused with 403.",
    )
    admin_keys_from: SecretRef | None = Field(
        None, description="Where replicas read more admin keys at start (env or file; `name=key` entries separated by commas or newlines).",
    )
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig, description="A/B experiment: reference arm, noise floor, guardrails, ramp.")
    ingress: IngressConfig = Field(default_factory=IngressConfig, description="The HTTP ingress deployment.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="What the application may assume of its Ray cluster.")

    @model_validator(mode="after")
    def _cross_checks(self) -> FleetConfig:
        deployed = [a.name for a in self.arms]
        for i, c in enumerate(self.cascades):
            for stage in ("first", "then"):
                arm = getattr(c, stage)
                if arm not in deployed:
                    kind = "a cascade; a cascade's stages are arms" if arm in [x.name for x in self.cascades] else "not one of the arms"
                    raise ValueError(f"cascades.{i}.{stage}: {arm!r} is {kind} {deployed}")
            if c.first == c.then:
                raise ValueError(f"cascades.{i}: first and then are the same arm {c.first!r}")
        names = self.arm_names
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"arm names must be unique (arms and cascades together), repeated: {dupes}")
        if sum(a.weight for a in self.arms) + sum(c.weight for c in self.cascades) <= 0:
            raise ValueError("at least one arm needs a weight > 0")
        if self.router.shadow is not None and self.router.shadow.arm not in names:
            raise ValueError(f"router.shadow.arm {self.router.shadow.arm!r} is not one of the arms {names}")
        named = {
            "experiment.reference": [self.experiment.reference] if self.experiment.reference else [],
            "experiment.ramp.arm": [self.experiment.ramp.arm] if self.experiment.ramp else [],
            "router.interleave.arms": list(self.router.interleave.arms) if self.router.interleave else [],
        }
        for where, arms in named.items():
            for arm in arms:
                if arm not in names:
                    raise ValueError(f"{where}: {arm!r} is not one of the arms {names}")
        if self.router.interleave and len(set(self.router.interleave.arms)) != 2:
            raise ValueError("router.interleave.arms: two different arms")
        if self.experiment.ramp and self.experiment.ramp.arm == self.reference_arm:
            raise ValueError("experiment.ramp.arm: the reference arm cannot be ramped against itself")
        api = {k.get_secret_value() for k in self.api_keys}
        if any(k.get_secret_value() in api for k in self.admin_keys.values()):
            raise ValueError("admin_keys: an admin key must differ from every client API key")
        return self

    def resolve_secrets(self) -> FleetConfig:
        """This configuration with every secret reference read (api_keys_from, admin_keys_from,
        cache.redis_password_from): what a replica uses. Never dumped into a config or Serve args."""
        api = list(self.api_keys)
        if self.api_keys_from is not None:
            api += [SecretStr(k) for k in _entries(self.api_keys_from.read("api_keys_from"))]
        admin = dict(self.admin_keys)
        if self.admin_keys_from is not None:
            for entry in _entries(self.admin_keys_from.read("admin_keys_from")):
                name, sep, key = entry.partition("=")
                if not sep or not name.strip() or not key.strip():
                    raise ConfigError("admin_keys_from: each entry must be name=key (the key's value is not shown)")
                admin[name.strip()] = SecretStr(key.strip())
        cache = self.cache
        if cache.redis_password_from is not None:
            cache = cache.model_copy(update={"redis_password": SecretStr(cache.redis_password_from.read("cache.redis_password_from"))})
        data = {**self.model_dump(), "api_keys": api, "admin_keys": admin, "cache": cache.model_dump()}
        return FleetConfig.from_dict(data, source="secrets")  # e.g. an admin key equal to a client key is refused

    @property
    def arm_names(self) -> list[str]:
        """Every name routing knows: the arms (deployments), then the cascades (compositions of two arms)."""
        return [a.name for a in self.arms] + [c.name for c in self.cascades]

    @property
    def weights(self) -> dict[str, float]:
        """Configured routing weight of every arm and cascade."""
        return {a.name: a.weight for a in self.arms} | {c.name: c.weight for c in self.cascades}

    def cascade(self, name: str) -> CascadeConfig | None:
        """The cascade of that name; None for an arm (or an unknown name)."""
        return next((c for c in self.cascades if c.name == name), None)

    @property
    def reference_arm(self) -> str:
        return self.experiment.reference or self.arms[0].name

    def engine_config(self) -> EngineConfig:
        """What the engine needs of this configuration: `model:`'s settings and `limits:`'s decode budgets."""
        return EngineConfig.of(self.model, self.limits)

    def arm(self, name: str) -> ArmConfig:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(name)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> FleetConfig:
        return validated(cls, data, ConfigError, source, "configuration")

    @classmethod
    def from_yaml(cls, path: str | Path) -> FleetConfig:
        return cls.from_dict(read_yaml_mapping(path, ConfigError), source=str(path))

    def to_dict(self) -> dict:
        """Plain data (secrets revealed) for Serve's `args`, which must be JSON-serialisable."""
        data = self.model_dump(mode="json")
        data["api_keys"] = [k.get_secret_value() for k in self.api_keys]
        data["admin_keys"] = {name: k.get_secret_value() for name, k in self.admin_keys.items()}
        if self.cache.redis_password is not None:
            data["cache"]["redis_password"] = self.cache.redis_password.get_secret_value()
        return data


def _entries(text: str) -> list[str]:
    return [part.strip() for part in text.replace("\n", ",").split(",") if part.strip()]
