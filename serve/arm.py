"""One precision arm: a Serve deployment (`Arm-<name>`) whose replicas run a `RerankEngine`.

Concurrent requests are merged by `@serve.batch`: the pairs of every request in a batch go
through ONE `score_pairs` call (one set of forward passes), and the scores are split back.
Before the engine, the batch's images are resolved through the feature cache (in-replica LRU,
then Redis): hits skip decode, resize and the ViT; misses are encoded together once and stored.

Failure isolation: an input error in one request fails only that request (the merged call is
retried per request to find it); any other failure fails every request of the batch. Every
future the batch holds is always resolved, so no caller waits forever.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from ray import serve
from ray.serve import metrics

from serve.cache import FeatureCache
from serve.config import ArmConfig, BatchingConfig, FleetConfig
from serve.engine.errors import InputError
from serve.engine.features import ImageFeatures
from serve.engine.inputs import ImageRef, ScorePair, image_digest

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
PAIR_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


@dataclass(frozen=True)
class ScoreJob:
    """One rerank request as the arm sees it: its pairs, in document order.

    Images are bytes, or `ImageRef` when the ingress skipped the download because the URL's
    content digest was memoised; `image_fields` maps each digest to the JSON path to blame.
    """

    pairs: tuple[ScorePair, ...]
    image_fields: dict[str, str] = field(default_factory=dict)
    max_tokens_per_doc: int | None = None


@dataclass(frozen=True)
class ArmResult:
    scores: list[float]
    arm: str
    precision: str
    model: str
    cache_hits: int
    cache_misses: int
    batch_requests: int  # requests merged into the engine call that produced these scores
    # Cache events (hit_local, redis_error, bypass, ...) of the batch; carried by one result per batch
    # so that summing over results counts each event once.
    cache_events: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ImagesNeeded:
    """The arm has no features for these digests and only refs for them: the ingress must send bytes."""

    digests: tuple[str, ...]


@dataclass(frozen=True)
class InputRejected:
    """A client error found in the arm, as a value: `InputError`s do not survive Ray's pickling
    (their constructor takes (field, problem), their args hold one message), and a client's bad
    input is not a replica failure worth a traceback in the replica log."""

    kind: str  # the InputError subclass name, e.g. ImageDecodeError
    field: str
    problem: str

    @classmethod
    def of(cls, err: InputError) -> InputRejected:
        return cls(kind=type(err).__name__, field=err.field, problem=err.problem)

    def to_error(self) -> InputError:
        from serve.engine import errors

        err_cls = getattr(errors, self.kind, InputError)
        if not (isinstance(err_cls, type) and issubclass(err_cls, InputError)):
            err_cls = InputError
        return err_cls(self.field, self.problem)


ArmOutcome = ArmResult | ImagesNeeded | InputRejected


def job_digests(job: ScoreJob) -> dict[str, bytes | None]:
    """Digest -> bytes (None when only refs were sent) of every image in the job, in order."""
    found: dict[str, bytes | None] = {}
    for pair in job.pairs:
        for item in (pair.query, pair.document):
            for img in item.images:
                if isinstance(img, ImageRef):
                    found.setdefault(img.digest, None)
                else:
                    d = image_digest(img)
                    if found.get(d) is None:
                        found[d] = img
    return found


def truncate_documents(pairs: Sequence[ScorePair], max_tokens: int | None, count_and_cut: Callable[[str, int], str]) -> tuple[ScorePair, ...]:
    """Documents' text cut to `max_tokens` tokens (Cohere `max_tokens_per_doc`)."""
    if max_tokens is None:
        return tuple(pairs)
    out = []
    for p in pairs:
        text = p.document.text
        if text:
            cut = count_and_cut(text, max_tokens)
            if cut != text:
                p = replace(p, document=replace(p.document, text=cut))
        out.append(p)
    return tuple(out)


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
            "rerank_arm_latency_seconds", "Time in the arm per request (queue + cache + engine).", LATENCY_BUCKETS_S, ("arm", "precision")
        )
        self.batch_pairs = metrics.Histogram("rerank_arm_batch_pairs", "Pairs per merged engine call.", PAIR_BUCKETS, ("arm", "precision"))
        for m in (self.requests, self.errors, self.cache, self.latency, self.batch_pairs):
            m.set_default_tags(dict(tags))  # Serve adds its own tags to the dict it is given

    def cache_event(self, event: str, n: int) -> None:
        self.cache.inc(n, tags={"event": event})


def pick_device(arm: ArmConfig) -> str:
    if arm.device != "auto":
        return arm.device
    return "cuda" if arm.ray_actor_options.num_gpus > 0 else "cpu"


@serve.deployment(name="Arm")
class ArmReplica:
    """Serve replica of one arm. `build_app` names it `Arm-<arm>` and sets resources and batching."""

    def __init__(self, config: dict, arm_name: str):
        from serve.engine.engine import RerankEngine  # heavy (torch): only where an engine runs

        fleet = FleetConfig.from_dict(config)
        self.arm = fleet.arm(arm_name)
        self.engine = RerankEngine.load(
            fleet.model,
            self.arm.precision,
            checkpoint=self.arm.checkpoint,
            device=pick_device(self.arm),
            max_image_bytes=fleet.limits.max_image_bytes,
            max_image_pixels=fleet.limits.max_image_pixels,
        )
        self.metrics = ArmMetrics(self.arm.name, self.arm.precision)
        self.cache = FeatureCache(fleet.cache, on_event=self.metrics.cache_event)
        # The engine is synchronous: run it on one dedicated thread so the event loop keeps
        # accepting (and batching) requests while a forward pass runs.
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{self.arm.name}")
        self.reconfigure(self.arm.batching.model_dump())

    def reconfigure(self, user_config: dict) -> None:
        batching = BatchingConfig.model_validate(user_config)
        self._score_batch.set_max_batch_size(batching.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    def describe(self) -> dict:
        import torch

        return {
            "arm": self.arm.name, **self.engine.describe(), "torch_threads": torch.get_num_threads(), "pid": os.getpid(),
            "max_batch_size": self._score_batch._get_max_batch_size(), "cache": self.cache.snapshot(),
        }  # fmt: skip

    async def score(self, job: ScoreJob) -> ArmOutcome:
        start = time.perf_counter()
        outcome = await self._score_batch(job)
        if isinstance(outcome, BaseException):
            self.metrics.errors.inc(tags={"kind": type(outcome).__name__})
            if isinstance(outcome, InputError):
                return InputRejected.of(outcome)
            raise outcome
        self.metrics.requests.inc()
        self.metrics.latency.observe(time.perf_counter() - start)
        return outcome

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _score_batch(self, jobs: list[ScoreJob]) -> list[ArmOutcome | BaseException]:
        try:
            return await self._run_batch(jobs)
        except Exception as e:  # noqa: BLE001 - one outcome per job, whatever happened
            log.exception("arm %s: batch of %d requests failed", self.arm.name, len(jobs))
            return [e] * len(jobs)

    # ------------------------------------------------------------------ batch internals

    async def _run_batch(self, jobs: list[ScoreJob]) -> list[ArmOutcome | BaseException]:
        outcomes: list[ArmOutcome | BaseException | None] = [None] * len(jobs)
        events_before = self.cache.snapshot()
        per_job = [job_digests(j) for j in jobs]

        # 1. Feature cache, once for the whole batch.
        all_digests: dict[str, bytes | None] = {}
        for digests in per_job:
            for d, data in digests.items():
                if all_digests.get(d) is None:
                    all_digests[d] = data
        keys = {d: self.engine.feature_spec.cache_key(d) for d in all_digests}
        cached = await self.cache.get_many(list(keys.values()))
        features: dict[str, ImageFeatures] = {d: cached[k] for d, k in keys.items() if k in cached}

        # 2. Jobs that sent only a ref for an image nobody has features for must resend bytes.
        for i, digests in enumerate(per_job):
            lacking = tuple(d for d in digests if d not in features and all_digests[d] is None)
            if lacking:
                outcomes[i] = ImagesNeeded(lacking)

        # 3. Encode the remaining misses together; a bad image fails only the jobs holding it.
        todo = [d for d in all_digests if d not in features and all_digests[d] is not None]
        if todo:
            fields = {d: next(j.image_fields.get(d, "image") for j, dg in zip(jobs, per_job) if d in dg) for d in todo}
            encoded, bad = await self._encode(todo, all_digests, fields)
            features.update(encoded)
            await self.cache.put_many(encoded.values())
            for i, digests in enumerate(per_job):
                failed = next((d for d in digests if d in bad), None)
                if outcomes[i] is None and failed is not None:
                    err = bad[failed]
                    outcomes[i] = type(err)(jobs[i].image_fields.get(failed, err.field), err.problem)

        # 4. Score every remaining job in one merged engine call.
        live = [i for i, o in enumerate(outcomes) if o is None]
        if live:
            views = [self._engine_view(jobs[i], features) for i in live]
            scores = await self._score_merged([v[0] for v in views], {k: f for v in views for k, f in v[1].items()})
            for i, result in zip(live, scores):
                if isinstance(result, BaseException):
                    outcomes[i] = result
                    continue
                hits = sum(1 for d in per_job[i] if keys[d] in cached)
                outcomes[i] = ArmResult(
                    scores=result, arm=self.arm.name, precision=self.arm.precision, model=self.engine.model_id,
                    cache_hits=hits, cache_misses=len(per_job[i]) - hits, batch_requests=len(live),
                )  # fmt: skip
        after = self.cache.snapshot()
        events = {e: after[e] - events_before[e] for e in after if after[e] != events_before[e]}
        first = next((i for i, o in enumerate(outcomes) if isinstance(o, ArmResult)), None)
        if first is not None and events:
            outcomes[first] = replace(outcomes[first], cache_events=events)  # type: ignore[arg-type]
        return outcomes  # type: ignore[return-value]

    async def _encode(
        self, digests: list[str], data: dict[str, bytes | None], fields: dict[str, str]
    ) -> tuple[dict[str, ImageFeatures], dict[str, InputError]]:
        images = [data[d] for d in digests]
        try:
            feats = await self._on_engine(self.engine.encode_images, images, [fields[d] for d in digests])
            return dict(zip(digests, feats)), {}
        except InputError:
            pass
        # Some image is bad: encode one by one to keep the good ones and blame the bad ones.
        good: dict[str, ImageFeatures] = {}
        bad: dict[str, InputError] = {}
        for d in digests:
            try:
                good[d] = (await self._on_engine(self.engine.encode_images, [data[d]], [fields[d]]))[0]
            except InputError as e:
                bad[d] = e
        return good, bad

    async def _score_merged(self, pair_lists: list[tuple[ScorePair, ...]], features: dict[str, ImageFeatures]) -> list[list[float] | BaseException]:
        merged = [p for pairs in pair_lists for p in pairs]
        self.metrics.batch_pairs.observe(len(merged))
        try:
            flat = await self._on_engine(self.engine.score_pairs, merged, features)
        except InputError:
            if len(pair_lists) == 1:
                raise
            # One request's input is bad: score each request alone so the error lands on it only.
            out: list[list[float] | BaseException] = []
            for pairs in pair_lists:
                try:
                    out.append(await self._on_engine(self.engine.score_pairs, list(pairs), features))
                except InputError as e:
                    out.append(e)
            return out
        out, start = [], 0
        for pairs in pair_lists:
            out.append(flat[start : start + len(pairs)])
            start += len(pairs)
        return out

    def _engine_view(self, job: ScoreJob, features: dict[str, ImageFeatures]) -> tuple[tuple[ScorePair, ...], dict[str, ImageFeatures]]:
        """The job's pairs (documents truncated) plus the features they need, by engine key.
        `ImageRef`s go to the engine as they are: it scores them from these features."""
        spec = self.engine.feature_spec
        needed = {
            spec.cache_key(digest): features[digest]
            for p in job.pairs
            for item in (p.query, p.document)
            for digest in map(image_digest, item.images)
        }
        pairs = truncate_documents(job.pairs, job.max_tokens_per_doc, self._cut_tokens)
        return pairs, needed

    def _cut_tokens(self, text: str, max_tokens: int) -> str:
        if len(text) <= max_tokens:  # a token is at least one character
            return text
        ids = self.engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= max_tokens else self.engine.tokenizer.decode(ids[:max_tokens])

    async def _on_engine(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._engine_thread, functools.partial(fn, *args))
