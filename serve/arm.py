"""One precision arm: a Serve deployment (`Arm-<name>`) whose replicas score through one
`engine.serving_engine.ServingEngine`, chosen once when the replica starts: `BatchedEngine` over the
transformers engine, or `VllmRerankEngine`.

A request flows one way through a replica:
0. it is admitted while the work queued ahead of it stays within the arm's `queue_budget_s` at the
   replica's measured pairs/s (`serve.admission.QueueBudget`), or refused at once
   (`ServiceUnavailable`, a 503 with Retry-After) before any work is done;
1. its images' features are looked up in the feature cache (in-replica LRU, then Redis); an
   image the ingress sent by digest only (a memoised URL) that no tier has is refused with
   `FeaturesMissing`, and the ingress sends the request again with its bytes (media are fetched
   in one place: the ingress);
2. the engine scores it (batched with the requests waiting beside it);
3. newly encoded features are stored in the cache.

Before its first request a replica measures its rate (`_calibrate`) and scores the canary set
recorded with its checkpoint (`run_canary`): one that ranks it unlike the reference refuses to start.

Errors travel one way: the engine raises, `score` raises, Ray carries it to the ingress, and the
ingress maps it to HTTP (`serve.errors`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from ray import serve
from ray.serve import metrics

from engine.errors import DeadlineExceeded, InputError
from engine.inputs import ScoreRequest
from engine.serving_engine import ServingEngine
from serve.admission import QueueBudget
from serve.arm_result import ArmResult
from serve.batched_engine import BatchedEngine, check_deadline
from serve.cache import FeatureCache, track_request_events
from serve.config import ArmConfig, BatchingConfig, FleetConfig
from serve.errors import FeaturesMissing, ServiceUnavailable

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
PAIR_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
# Scored when a replica starts, before it takes traffic: its pairs/s are the queue budget's first
# measurement (text of a typical request's size; the images a request may carry cost more, and
# the measured rate follows within a few busy seconds).
CALIBRATION = ScoreRequest.of("calibration query", [f"calibration document {i}" for i in range(8)])


class ArmMetrics:
    """Prometheus metrics of one arm through `ray.serve.metrics` (tagged arm and precision)."""

    def __init__(self, arm: str, precision: str):
        tags = {"arm": arm, "precision": precision}
        self.requests = metrics.Counter("rerank_arm_requests", "Rerank requests answered by an arm.", ("arm", "precision"))
        self.errors = metrics.Counter("rerank_arm_errors", "Failed rerank requests by kind.", ("arm", "precision", "kind"))
        self.cache = metrics.Counter(
            "rerank_image_cache_events",
            "Image-feature cache events: hit_local, hit_redis, miss, redis_error, corrupt, bypass, too_large.",
            ("arm", "precision", "event"),
        )
        self.latency = metrics.Histogram(
            "rerank_arm_latency_seconds", "Time in the arm per request (cache + prepare + queue + forward).", LATENCY_BUCKETS_S, ("arm", "precision")
        )
        self.batch_pairs = metrics.Histogram("rerank_arm_batch_pairs", "Pairs per merged forward call.", PAIR_BUCKETS, ("arm", "precision"))
        for m in (self.requests, self.errors, self.cache, self.latency, self.batch_pairs):
            m.set_default_tags(dict(tags))  # Serve adds its own tags to the dict it is given

    def cache_event(self, event: str, n: int) -> None:
        self.cache.inc(n, tags={"event": event})


def pick_device(arm: ArmConfig) -> str:
    if arm.device != "auto":
        return arm.device
    return "cuda" if arm.ray_actor_options.num_gpus > 0 else "cpu"


def torch_threads(arm: ArmConfig) -> int:
    """Forward-pass threads: the configured number, else the replica's CPU reservation. More
    threads than reserved cores make prepare and forward fight (p95 of seconds on 2 cores)."""
    if arm.torch_threads is not None:
        return arm.torch_threads
    return max(1, int(arm.ray_actor_options.num_cpus or 1))


def load_engine(fleet: FleetConfig, arm: ArmConfig, metrics: ArmMetrics) -> ServingEngine:
    """The arm's engine behind the one serving contract. Heavy imports (torch, vLLM) happen here,
    in the replica only."""
    source = arm.checkpoint or fleet.model.source
    model_id = fleet.model.name if arm.checkpoint is None else arm.checkpoint
    if arm.backend == "vllm":  # vLLM batches across requests itself (continuous batching)
        from engine.vllm_engine import VllmRerankEngine, VllmSettings

        settings = VllmSettings(**arm.vllm.model_dump())
        return VllmRerankEngine(source, arm.precision, config=fleet.engine_config(), settings=settings, device=pick_device(arm), model_id=model_id)
    from engine.engine import RerankEngine

    engine = RerankEngine.load(source, arm.precision, config=fleet.engine_config(), device=pick_device(arm), model_id=model_id)
    return BatchedEngine(engine, prepare_workers=arm.prepare_workers, name=arm.name, on_batch=metrics.batch_pairs.observe)


async def run_canary(engine: ServingEngine, arm: ArmConfig, source: str) -> dict:
    """Score the canary set recorded with the checkpoint (`engine/canary.py`) before the replica
    takes traffic; raise when its ranking disagrees with the reference beyond the bound (the
    replica does not start). Returns what `describe` reports. A checkpoint without a reference
    starts with a warning (`canary: if_present`), or not at all (`required`)."""
    if arm.canary == "off":
        return {"state": "off"}
    from engine.canary import CANARY_FILE, judge, read_reference
    from engine.model import checkpoint_folder

    try:
        folder = await asyncio.to_thread(checkpoint_folder, source)  # a hub id: its JSON files, from the hub cache
        reference = read_reference(folder)
    except Exception as e:  # noqa: BLE001 - no readable reference: the mode decides
        folder, reference = source, None
        log.warning("arm %s: cannot read a canary reference for %s: %s", arm.name, source, e)
    if reference is None:
        if arm.canary == "required":
            raise RuntimeError(f"canary: required, and {folder} has no {CANARY_FILE} (record one with `rerank-fleet eval` or `quantize`)")
        log.warning("arm %s: %s has no %s: starting without a canary", arm.name, folder, CANARY_FILE)
        return {"state": "no reference"}
    start = time.perf_counter()
    results = await asyncio.gather(*(engine.score_request(r, {}, None) for r in reference.requests()))
    seconds = time.perf_counter() - start
    verdict = judge(reference, [r.scores for r in results])
    against = f"the {reference.precision} reference of {reference.model} ({folder}/{CANARY_FILE})"
    if not verdict.passed:
        raise RuntimeError(f"canary {verdict.explain()}, against {against}")
    log.info("arm %s: canary passed against %s in %.3f s: %s", arm.name, against, seconds, verdict.summary())
    return {"state": "passed", **verdict.to_dict(), "seconds": round(seconds, 4)}


@serve.deployment(name="Arm")
class ArmReplica:
    """Serve replica of one arm. `build_app` names it `Arm-<arm>` and sets resources and batching."""

    async def __init__(self, config: dict, arm_name: str):
        import torch

        fleet = FleetConfig.from_dict(config).resolve_secrets()
        self.arm = fleet.arm(arm_name)
        if self.arm.cpu_nice:
            # Linux niceness is per thread and inherited: the prepare pool, the forward thread and
            # torch's intra-op threads all start after this, while Ray's own threads (which take
            # calls in) keep theirs. Where arms share cores with the proxy and ingress, scoring
            # then yields to them, and refusals and health checks stay fast under overload.
            os.nice(self.arm.cpu_nice)
        torch.set_num_threads(torch_threads(self.arm))
        # Preparation runs on `prepare_workers` threads by design; the tokenizer's own thread pool
        # (a batch encode per request) would take the cores the forward pass was given.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.metrics = ArmMetrics(self.arm.name, self.arm.precision)
        try:
            self.engine = load_engine(fleet, self.arm, self.metrics)
            self.reconfigure(self.arm.batching.model_dump())
            self.admission = QueueBudget(self.arm.queue_budget_s, await self._calibrate())
            self.canary = await run_canary(self.engine, self.arm, self.arm.checkpoint or fleet.model.source)
        except Exception as e:
            # The replica's start fails with the reason (loading, scoring its first request, or a
            # canary that disagrees with its reference), naming the arm and its backend (Serve
            # shows it in the deployment's status, the ingress in /ready; the main job prints it).
            # Serve tries a replica 3 times (min(3 x replicas, 20) for the deployment), then gives
            # up: the arm is out, the other arms serve.
            raise RuntimeError(f"arm {self.arm.name!r} (backend {self.arm.backend}, precision {self.arm.precision}) cannot start: {e}") from None
        self.cache = FeatureCache(fleet.cache.for_mode(self.arm.feature_cache), on_event=self.metrics.cache_event)
        # The name of this replica's scores in the ingress's score cache (engine/score_key.py): its
        # checkpoint hashed once, here, off the event loop.
        self.scorer = (await asyncio.to_thread(lambda: self.engine.score_spec)).digest
        self.scored = {"requests": 0, "pairs": 0}  # answered by this replica (describe: which replicas did a fanned-out request's work)

    def reconfigure(self, user_config: dict) -> None:
        batching = BatchingConfig.model_validate(user_config)
        if isinstance(self.engine, BatchedEngine):  # vLLM's batch limits are engine arguments, fixed at start
            self.engine.set_batching(batching.max_batch_size, batching.batch_wait_timeout_s)

    def describe(self) -> dict:
        import torch

        return {"arm": self.arm.name, **self.engine.describe(), "torch_threads": torch.get_num_threads(), "pid": os.getpid(), "cache": self.cache.snapshot(),
                "canary": self.canary, "scored": dict(self.scored)}

    async def score(self, request: ScoreRequest, budget_s: float | None = None) -> ArmResult:
        """Score one request. `budget_s`: seconds the caller still waits; work not started within
        them is refused (`DeadlineExceeded`, a 503). A budget, not a wall-clock time: the caller's
        node and this one have different clocks."""
        start = time.perf_counter()
        deadline = None if budget_s is None else time.monotonic() + budget_s
        events = track_request_events()
        pairs = len(request.documents)
        try:
            check_deadline(deadline, "before it reached the arm")
            self._admit(pairs)
            try:
                features = await self._features(request)
                result = await self.engine.score_request(request, features, deadline)
            except BaseException:  # also a caller's cancellation: the pairs leave the queue all the same
                self.admission.finished(pairs, scored=False)
                raise
            self.admission.finished(pairs, scored=True)
            await self.cache.put_many(result.new_features)
        except Exception as e:
            self.metrics.errors.inc(tags={"kind": type(e).__name__})
            if not isinstance(e, (InputError, DeadlineExceeded, FeaturesMissing, ServiceUnavailable)):
                log.exception("arm %s: request failed", self.arm.name)
            raise
        self.metrics.requests.inc()
        self.metrics.latency.observe(time.perf_counter() - start)
        self.scored["requests"] += 1
        self.scored["pairs"] += pairs
        hits = len(features)
        return ArmResult(
            scores=result.scores, arm=self.arm.name, precision=self.arm.precision, model=self.engine.model_id,
            cache_hits=hits, cache_misses=len({img.digest for img in request.images()}) - hits,
            batch_requests=result.batch_requests, cache_events=dict(events), tokens=result.tokens, replica_rate=self.admission.rate,
            scorer=self.scorer,
        )  # fmt: skip

    def _admit(self, pairs: int) -> None:
        """Refuse at once, before any work, when the wait ahead is over the budget: a burst within
        it is served, sustained overload is refused fast (and counts as refused, not as the arm's
        failure)."""
        if not self.admission.admit(pairs):
            raise ServiceUnavailable(self.admission.refusal(self.arm.name))

    async def _calibrate(self) -> tuple[int, float]:
        """(pairs, seconds) of `CALIBRATION` scored alone, after one warm-up run (first calls pay
        lazy initialisation): the queue budget's start, the replica's own rate before traffic
        measures it. Conservative where it matters, the work: a request alone gets no batching
        gain. It leaves out what a call through Serve adds (a few ms, which only the smallest
        models notice), and it weighs only its own seconds: the first busy second of real
        traffic outweighs it."""
        await self.engine.score_request(CALIBRATION, {}, None)
        start = time.perf_counter()
        await self.engine.score_request(CALIBRATION, {}, None)
        return len(CALIBRATION.documents), time.perf_counter() - start

    async def _features(self, request: ScoreRequest) -> dict:
        """Cached features of the request's images (cache key -> features). An image sent by digest
        only that no tier has raises `FeaturesMissing`: the ingress resends it with its bytes."""
        spec = self.engine.feature_spec  # None: image features never leave the backend
        digests = {img.digest for img in request.images()}
        keys = {} if spec is None else {d: spec.cache_key(d) for d in digests}
        features = await self.cache.get_many(list(keys.values())) if keys else {}
        missing = sorted({img.digest for img in request.images() if img.data is None and keys.get(img.digest) not in features})
        if missing:
            raise FeaturesMissing(missing)
        return features
