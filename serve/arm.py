"""One precision arm: a Serve deployment (`Arm-<name>`) whose replicas run a `RerankEngine`.

A request flows one way through a replica:
1. its images' features are looked up in the feature cache (in-replica LRU, then Redis); an
   image the ingress sent by digest only (a memoised URL) that no tier has is downloaded here,
   with the same safe fetcher the ingress uses;
2. `@serve.batch` merges the requests that are waiting; the batch prepares each of them on the
   CPU pool (`engine.prepare`: decode, resize, tokenize), concurrently, and a bad input fails
   its own request only; then `engine.forward` scores the prepared ones in one call on the
   forward thread. Two batches are in flight (`max_concurrent_batches=2`): while batch k is on
   the forward thread, batch k+1 prepares;
3. newly encoded features are stored in the cache.

Errors travel one way: the engine raises, `score` raises (an input error found in a batch is
handed to its own request's caller and raised there), Ray carries it to the ingress, and the
ingress maps it to HTTP (`serve.errors`). A forward failure fails the requests of that batch;
no future is ever left unresolved.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from ray import serve
from ray.serve import metrics

from engine.errors import InputError
from engine.inputs import ImageInput, RerankItem, ScoreRequest
from serve.arm_result import ArmResult
from serve.cache import FeatureCache, track_request_events
from serve.config import ArmConfig, BatchingConfig, FleetConfig
from serve.errors import DeadlineExceeded
from serve.fetch import MediaFetcher

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
PAIR_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


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


def _check_deadline(deadline: float | None, where: str) -> None:
    if deadline is not None and time.time() > deadline:
        raise DeadlineExceeded(f"the request's deadline passed {where} (the arm is overloaded); retry later")


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


def load_engine(fleet: FleetConfig, arm: ArmConfig):
    """The arm's engine on its backend: `RerankEngine` (transformers) or `VllmRerankEngine`.
    Heavy imports (torch, vLLM) happen here, in the replica only."""
    source = arm.checkpoint or fleet.model.source
    model_id = fleet.model.name if arm.checkpoint is None else arm.checkpoint
    if arm.backend == "vllm":
        from engine.vllm_engine import VllmRerankEngine, VllmSettings

        settings = VllmSettings(**arm.vllm.model_dump())
        return VllmRerankEngine(source, arm.precision, config=fleet.engine_config(), settings=settings, device=pick_device(arm), model_id=model_id)
    from engine.engine import RerankEngine

    return RerankEngine.load(source, arm.precision, config=fleet.engine_config(), device=pick_device(arm), model_id=model_id)


@serve.deployment(name="Arm")
class ArmReplica:
    """Serve replica of one arm. `build_app` names it `Arm-<arm>` and sets resources and batching."""

    def __init__(self, config: dict, arm_name: str):
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
        try:
            self.engine = load_engine(fleet, self.arm)
        except Exception as e:
            # The replica's start fails with the reason, naming the arm and its backend (Serve
            # shows it in the application's status; the main job prints it).
            raise RuntimeError(f"arm {self.arm.name!r} (backend {self.arm.backend}, precision {self.arm.precision}) cannot start: {e}") from None
        self.metrics = ArmMetrics(self.arm.name, self.arm.precision)
        self.cache = FeatureCache(fleet.cache.for_mode(self.arm.feature_cache), on_event=self.metrics.cache_event)
        self.fetcher = MediaFetcher(fleet.limits)
        name = self.arm.name
        self._prepare_pool = ThreadPoolExecutor(self.arm.prepare_workers, thread_name_prefix=f"prepare-{name}")
        self._forward_thread = ThreadPoolExecutor(1, thread_name_prefix=f"forward-{name}")
        self.reconfigure(self.arm.batching.model_dump())

    def reconfigure(self, user_config: dict) -> None:
        batching = BatchingConfig.model_validate(user_config)
        self._score_batch.set_max_batch_size(batching.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    def describe(self) -> dict:
        import torch

        return {
            "arm": self.arm.name, **self.engine.describe(), "torch_threads": torch.get_num_threads(), "pid": os.getpid(),
            "prepare_workers": self.arm.prepare_workers, "max_batch_size": self._score_batch._get_max_batch_size(),
            "cache": self.cache.snapshot(),
        }  # fmt: skip

    async def score(self, request: ScoreRequest, deadline: float | None = None) -> ArmResult:
        """Score one request. `deadline` (epoch seconds): work not started by then is refused
        (`DeadlineExceeded`, a 503): the caller has given up on it, and running it would only
        delay the requests queued behind it."""
        start = time.perf_counter()
        events = track_request_events()
        try:
            _check_deadline(deadline, "before it reached the arm")
            request, features = await self._features(request)
            if self.arm.backend == "vllm":  # vLLM batches across requests itself (continuous batching)
                result, batch_requests = await self.engine.score(request, features), 1
            else:
                outcome = await self._score_batch((request, features, deadline))
                if isinstance(outcome, BaseException):  # this request's own input error
                    raise outcome
                result, batch_requests = outcome
            await self.cache.put_many(result.new_features)
        except Exception as e:
            self.metrics.errors.inc(tags={"kind": type(e).__name__})
            if not isinstance(e, (InputError, DeadlineExceeded)):
                log.exception("arm %s: request failed", self.arm.name)
            raise
        self.metrics.requests.inc()
        self.metrics.latency.observe(time.perf_counter() - start)
        hits = len(features)
        return ArmResult(
            scores=result.scores, arm=self.arm.name, precision=self.arm.precision, model=self.engine.model_id,
            cache_hits=hits, cache_misses=len({img.digest for img in request.images()}) - hits,
            batch_requests=batch_requests, cache_events=dict(events), tokens=result.tokens,
        )  # fmt: skip

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0, max_concurrent_batches=2)
    async def _score_batch(self, items: list) -> list:
        """[(request, cached features, deadline)] -> per request (RequestScores, requests
        forwarded together) or the exception its preparation raised or its passed deadline (that
        request's alone). A failure of the forward pass itself raises, for all."""
        prepared = await asyncio.gather(
            *(self._prepare(request, features, deadline) for request, features, deadline in items), return_exceptions=True
        )
        good = [p for p in prepared if not isinstance(p, BaseException)]
        self.metrics.batch_pairs.observe(sum(len(p.rows) for p in good))
        results = iter(await self._run(self._forward_thread, self.engine.forward, good) if good else [])
        return [p if isinstance(p, BaseException) else (next(results), len(good)) for p in prepared]

    async def _prepare(self, request: ScoreRequest, features: dict, deadline: float | None):
        _check_deadline(deadline, "while it waited for a batch")
        return await self._run(self._prepare_pool, self.engine.prepare, request, features)

    async def _features(self, request: ScoreRequest) -> tuple[ScoreRequest, dict]:
        """Cached features of the request's images; images sent by digest only that no cache tier
        has are downloaded here (the request then carries their bytes)."""
        spec = self.engine.feature_spec
        if spec is None:  # an engine whose image features never leave it (vLLM's own vision tower)
            return await self._with_bytes(request, set()), {}
        keys = {img.digest: spec.cache_key(img.digest) for img in request.images()}
        features = await self.cache.get_many(list(dict.fromkeys(keys.values())))
        known = {digest for digest, key in keys.items() if key in features}
        return await self._with_bytes(request, known), features

    async def _with_bytes(self, request: ScoreRequest, known: set[str]) -> ScoreRequest:
        """The request with the bytes of every image sent by digest only (a memoised URL) whose
        digest is not in `known`, downloaded here with the ingress's safe fetcher."""
        lacking: dict[str, ImageInput] = {}
        for img in request.images():
            if img.data is None and img.url and img.digest not in known:
                lacking.setdefault(img.url, img)
        if not lacking:
            return request
        fetched = await asyncio.gather(*(self.fetcher.download_image(url, img.field) for url, img in lacking.items()))
        by_url = {img.url: img for img in fetched}

        def swap(item: RerankItem) -> RerankItem:
            if not any(img.data is None and img.url in by_url for img in item.images):
                return item
            # Each reference keeps its own JSON path, for its error messages.
            images = tuple(replace(by_url[img.url], field=img.field) if img.data is None and img.url in by_url else img for img in item.images)
            return replace(item, images=images)

        return replace(request, query=swap(request.query), documents=tuple(map(swap, request.documents)))

    async def _run(self, pool: ThreadPoolExecutor, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))
