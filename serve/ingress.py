"""The HTTP front door (`Ingress` deployment): parse, route, fetch media, call an arm, answer.

Data flow: request -> protocol model -> `RerankRequest` -> router decision -> media fetched
concurrently -> `ScoreJob` -> the chosen arm's handle -> ranked response. A shadowed request is
mirrored to the shadow arm by a background task started after the primary answer is in hand,
so it never delays the primary response; its ranking agreement with the primary feeds
`/v1/experiments`.

Errors are raised as typed exceptions and turned into HTTP by `error_response`, the one place
that decides status codes; a 500 never carries the exception text.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at
# runtime, and through Serve's class-based ingress string annotations are not resolved.
import asyncio
import hmac
import logging
import re
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field, replace

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.arm import ArmResult, ImagesNeeded, InputRejected, ScoreJob
from serve.cache import FeatureCache
from serve.config import FleetConfig
from serve.engine.errors import InputError, ServiceUnavailable
from serve.engine.inputs import RerankItem, ScorePair, image_digest
from serve.fetch import ImageRef, MediaFetcher, ResolvedMedia
from serve.protocol import (
    ArmCard,
    CohereRerankRequest,
    CohereRerankResponse,
    ErrorDetail,
    ErrorResponse,
    ImageCacheUse,
    JinaRerankRequest,
    JinaRerankResponse,
    ModelCard,
    ModelList,
    RerankOutcome,
    RerankRequest,
    ServingMeta,
    TEIRerankRequest,
    TEIRerankResponse,
)
from serve.ranking import agreement
from serve.router import ArmRouter, resolve_pin

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
MAX_SHADOW_IN_FLIGHT = 64
LATENCY_WINDOW = 4096
_UNAVAILABLE = (ServiceUnavailable, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError,
                ActorDiedError, ActorUnavailableError, RayActorError)  # fmt: skip


class RequestTooLarge(InputError):
    status = 413


class Unauthorized(InputError):
    status = 401


# ------------------------------------------------------------------------ error mapping


def error_response(exc: BaseException, request_id: str | None = None) -> JSONResponse:
    """The one mapping from exceptions to HTTP: 4xx naming the field, 503/504 for capacity, else 500.

    Pure (no logging): callers log what maps to 500 via `log_if_internal`."""
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    headers: dict[str, str] = {}  # Serve's proxy sets x-request-id on every response itself
    if isinstance(exc, InputError):
        status, kind, fld, message = exc.status, _snake(type(exc).__name__), exc.field, str(exc)
        if isinstance(exc, Unauthorized):
            headers["www-authenticate"] = "Bearer"
    elif isinstance(exc, RequestValidationError):
        status, kind = 422, "invalid_request"
        fld, message = _describe_validation(exc)
    elif isinstance(exc, StarletteHTTPException):
        status, kind, fld, message = exc.status_code, "http_error", None, str(exc.detail)
    elif isinstance(exc, _UNAVAILABLE):
        status, kind, fld, message = 503, "overloaded", None, "no replica can take this request now; retry later"
        headers["retry-after"] = "1"
    elif isinstance(exc, TimeoutError):
        status, kind, fld, message = 504, "timeout", None, "the request did not finish within the time limit"
    else:
        status, kind, fld = 500, "internal_error", None
        message = "internal error" + (f" (request {request_id})" if request_id else "")
    body = ErrorResponse(error=ErrorDetail(type=kind, field=fld, message=message, code=status))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def log_if_internal(resp: JSONResponse, exc: BaseException, request_id: str | None) -> JSONResponse:
    if resp.status_code == 500:
        log.error("internal error (request %s)", request_id, exc_info=(type(exc), exc, exc.__traceback__))
    return resp


def _describe_validation(exc: RequestValidationError) -> tuple[str, str]:
    errors = exc.errors()
    if not errors:
        return "body", "invalid request body"
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ())]
    if loc and loc[0] == "body":
        loc = loc[1:]
    fld = ".".join(loc) or "body"
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        fld, msg = "body", f"not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return fld, f"{fld}: {msg}{more}"


def _snake(name: str) -> str:
    out = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()
    return {"input_error": "invalid_input", "image_too_large": "too_large"}.get(out, out)


# ------------------------------------------------------------------------- experiments


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


@dataclass
class ArmStats:
    requests: int = 0
    client_errors: int = 0
    server_errors: int = 0
    routed_by: Counter = field(default_factory=Counter)
    latencies_s: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    cache_hits: int = 0
    cache_misses: int = 0
    cache_events: Counter = field(default_factory=Counter)
    batch_requests_sum: int = 0
    shadow_requests: int = 0
    shadow_errors: int = 0
    shadow_dropped: int = 0
    agreement_n: int = 0
    agreement_sums: Counter = field(default_factory=Counter)
    agreement_against: Counter = field(default_factory=Counter)


class ExperimentStats:
    """Per-arm counters for `/v1/experiments`: kept by one ingress replica, latency over a bounded window."""

    def __init__(self, arms: list[str]):
        self.arms = {a: ArmStats() for a in arms}

    def record_answer(self, arm: str, reason: str, latency_s: float, result: ArmResult) -> None:
        s = self.arms[arm]
        s.requests += 1
        s.routed_by[reason] += 1
        s.latencies_s.append(latency_s)
        s.batch_requests_sum += result.batch_requests
        self._record_cache(s, result)

    def record_error(self, arm: str, status: int) -> None:
        if status >= 500:
            self.arms[arm].server_errors += 1
        else:
            self.arms[arm].client_errors += 1

    def record_shadow(self, arm: str, primary: str, scores: dict[str, float], result: ArmResult) -> None:
        s = self.arms[arm]
        s.shadow_requests += 1
        s.agreement_n += 1
        s.agreement_sums.update(scores)
        s.agreement_against[primary] += 1
        self._record_cache(s, result)

    def record_shadow_failure(self, arm: str, *, dropped: bool = False) -> None:
        if dropped:
            self.arms[arm].shadow_dropped += 1
        else:
            self.arms[arm].shadow_errors += 1

    @staticmethod
    def _record_cache(s: ArmStats, result: ArmResult) -> None:
        s.cache_hits += result.cache_hits
        s.cache_misses += result.cache_misses
        s.cache_events.update(result.cache_events)

    def snapshot(self) -> dict[str, dict]:
        out = {}
        for name, s in self.arms.items():
            lat = sorted(s.latencies_s)
            looked_up = s.cache_hits + s.cache_misses
            out[name] = {
                "requests": s.requests,
                "errors": {"client": s.client_errors, "server": s.server_errors},
                "routed_by": dict(s.routed_by),
                "latency_ms": {
                    "window": len(lat),
                    **{f"p{q}": None if (v := percentile(lat, q)) is None else round(v * 1000, 3) for q in (50, 95, 99)},
                },
                "mean_batch_requests": round(s.batch_requests_sum / s.requests, 3) if s.requests else None,
                "image_cache": {
                    "hits": s.cache_hits,
                    "misses": s.cache_misses,
                    "hit_rate": round(s.cache_hits / looked_up, 4) if looked_up else None,
                    "events": dict(s.cache_events),
                },
                "shadow": {
                    "requests": s.shadow_requests,
                    "errors": s.shadow_errors,
                    "dropped": s.shadow_dropped,
                    "agreement": {
                        "n": s.agreement_n,
                        "against": dict(s.agreement_against),
                        **({k: round(v / s.agreement_n, 6) for k, v in sorted(s.agreement_sums.items())} if s.agreement_n else {}),
                    },
                },
            }
        return out


class IngressMetrics:
    """Prometheus metrics of the front door (per arm and API shape) through `ray.serve.metrics`."""

    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter("rerank_requests", "Rerank requests by arm, API and status.", ("arm", "api", "status"))
        self.latency = metrics.Histogram(
            "rerank_request_latency_seconds", "End-to-end time in the ingress per answered request.",
            [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60], ("arm",),
        )  # fmt: skip
        self.shadow_agreement = metrics.Histogram(
            "rerank_shadow_agreement",
            "Ranking agreement of a shadow arm with the primary (spearman, ndcg@k, topk_overlap); "
            "negative Spearman values fall in the lowest bucket.",
            [0.1, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0], ("arm", "metric"),
        )  # fmt: skip
        self.shadow_failures = metrics.Counter("rerank_shadow_failures", "Shadow calls failed or dropped.", ("arm", "reason"))
        self.memo_events = metrics.Counter("rerank_url_memo_events", "URL-memo cache events of the ingress.", ("event",))


# --------------------------------------------------------------------------- pure glue


def build_job(req: RerankRequest, media: list[ResolvedMedia]) -> ScoreJob:
    """The arm's view of a request: one pair per document, sharing the query item."""
    query, docs = media[0], media[1:]
    pairs = tuple(
        ScorePair(query.item, d.item, req.instruction, req.query.field, spec.field) for d, spec in zip(docs, req.documents)
    )
    fields: dict[str, str] = {}
    for m in media:
        for digest, path in m.image_fields.items():
            fields.setdefault(digest, path)
    return ScoreJob(pairs=pairs, image_fields=fields, max_tokens_per_doc=req.max_tokens_per_doc)


async def replace_refs(job: ScoreJob, digests: set[str], fetcher: MediaFetcher) -> ScoreJob:
    """The job with every `ImageRef` among `digests` downloaded (for an arm that lacks their features)."""
    refs: dict[str, ImageRef] = {}
    for p in job.pairs:
        for item in (p.query, p.document):
            for img in item.images:
                if isinstance(img, ImageRef) and img.digest in digests:
                    refs.setdefault(img.url, img)
    urls = list(refs)
    data = await asyncio.gather(*(fetcher.fetch_url(u, refs[u].field, fetcher.limits.max_image_bytes) for u in urls))
    by_url = dict(zip(urls, data))
    fields = dict(job.image_fields)
    for u, b in by_url.items():
        fields.setdefault(image_digest(b), refs[u].field)
        if fetcher.memo is not None:
            await fetcher.memo.put_url_digest(u, image_digest(b))

    def swap(item: RerankItem) -> RerankItem:
        if not any(isinstance(i, ImageRef) and i.url in by_url for i in item.images):
            return item
        return replace(item, images=tuple(by_url.get(i.url, i) if isinstance(i, ImageRef) else i for i in item.images))

    pairs = tuple(replace(p, query=swap(p.query), document=swap(p.document)) for p in job.pairs)
    return replace(job, pairs=pairs, image_fields=fields)


# --------------------------------------------------------------------------------- HTTP


class GuardMiddleware:
    """API-key check and request-body cap, before any body is parsed (pure ASGI)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        guard: "Guard | None" = getattr(scope.get("app").state, "guard", None) if scope.get("app") else None
        if scope["type"] != "http" or guard is None:
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if guard.api_keys and not path.endswith(tuple(PUBLIC_PATHS)):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            if not guard.authorized(headers.get("authorization")):
                return await error_response(Unauthorized("authorization", "missing or invalid Bearer API key"))(scope, receive, send)
        declared = next((v for k, v in scope.get("headers", []) if k.lower() == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > guard.max_request_bytes:
            err = RequestTooLarge("body", f"request body is {int(declared)} bytes, over the limit of {guard.max_request_bytes}")
            return await error_response(err)(scope, receive, send)
        # Read the body up to the cap before the app parses it (FastAPI would turn an exception
        # raised mid-read into a generic 400); then replay it.
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > guard.max_request_bytes:
                err = RequestTooLarge("body", f"request body is over the limit of {guard.max_request_bytes} bytes")
                return await error_response(err)(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


@dataclass(frozen=True)
class Guard:
    api_keys: tuple[str, ...]
    max_request_bytes: int

    def authorized(self, header: str | None) -> bool:
        if not header or not header.lower().startswith("bearer "):
            return False
        given = header[7:].strip().encode()
        # Compare against every key (no early exit) so timing says nothing about which matched.
        return sum(hmac.compare_digest(given, k.encode()) for k in self.api_keys) > 0


app = FastAPI(
    title="rerank-fleet",
    version="1",
    description="Multimodal reranking (Qwen3-VL-Reranker, lychee-rerank-mm) across precision arms. "
    "Cohere v2 (`/v2/rerank`), Jina (`/v1/rerank`) and TEI (`/rerank`) request shapes.",
)
app.add_middleware(GuardMiddleware)


async def _handle_any(request: Request, exc: Exception) -> JSONResponse:
    request_id = request.headers.get("x-request-id")
    return log_if_internal(error_response(exc, request_id), exc, request_id)


for _exc_type in (RequestValidationError, StarletteHTTPException, InputError, Exception):
    app.add_exception_handler(_exc_type, _handle_any)

_ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
           422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}, 504: {"model": ErrorResponse}}  # fmt: skip


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict, arms: dict[str, DeploymentHandle]):
        self.fleet = FleetConfig.from_dict(config)
        self.router = ArmRouter.from_config(self.fleet)
        self.stats = ExperimentStats([a.name for a in self.fleet.arms])
        self._arms = {name: handle.options(method_name="score") for name, handle in arms.items()}
        self._describe = {name: handle.options(method_name="describe") for name, handle in arms.items()}
        self._arm_info: dict[str, dict] = {}
        self.metrics = IngressMetrics()
        self.memo = FeatureCache(
            self.fleet.cache, key_prefix="rerank:", on_event=lambda e, n: self.metrics.memo_events.inc(n, tags={"event": e})
        )
        self.fetcher = MediaFetcher(self.fleet.limits, memo=self.memo)
        self._shadow_tasks: set[asyncio.Task] = set()
        app.state.guard = Guard(
            api_keys=tuple(k.get_secret_value() for k in self.fleet.api_keys),
            max_request_bytes=self.fleet.limits.max_request_bytes,
        )

    # ------------------------------------------------------------------ endpoints

    @app.post("/v2/rerank", response_model=CohereRerankResponse, response_model_exclude_none=True, responses=_ERRORS)
    async def rerank_cohere(self, body: CohereRerankRequest, request: Request, response: Response):
        """Cohere v2 rerank."""
        return await self._rerank(body, CohereRerankResponse, request, response)

    @app.post("/v1/rerank", response_model=JinaRerankResponse, response_model_exclude_none=True, responses=_ERRORS)
    async def rerank_jina(self, body: JinaRerankRequest, request: Request, response: Response):
        """Jina rerank."""
        return await self._rerank(body, JinaRerankResponse, request, response)

    @app.post("/rerank", response_model=TEIRerankResponse, response_model_exclude_none=True, responses=_ERRORS)
    async def rerank_tei(self, body: TEIRerankRequest, request: Request, response: Response):
        """Text Embeddings Inference rerank (bare list; arm and precision in x-rerank-* headers)."""
        return await self._rerank(body, TEIRerankResponse, request, response)

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "arms": list(self._arms)}

    @app.get("/v1/models", response_model=ModelList)
    async def models(self) -> ModelList:
        total = sum(a.weight for a in self.fleet.arms)
        model_id = (await self._arm_description(self.fleet.arms[0].name)).get("model", self.fleet.model.source)
        arms = [ArmCard(name=a.name, precision=a.precision, weight=a.weight / total) for a in self.fleet.arms]
        return ModelList(data=[ModelCard(id=model_id, arms=arms)])

    @app.get("/v1/experiments")
    async def experiments(self) -> dict:
        shadow = self.fleet.router.shadow
        snapshot = self.stats.snapshot()
        for a in self.fleet.arms:
            snapshot[a.name] = {"precision": a.precision, "share": self.router.shares[a.name], **snapshot[a.name]}
        return {
            "router": {
                "sticky_header": self.fleet.router.sticky_header,
                "pin_header": self.fleet.router.pin_header,
                "shadow": shadow.model_dump() if shadow else None,
            },
            "arms": snapshot,
            "url_memo_cache": self.memo.snapshot(),
            "scope": "this ingress replica since it started",
        }

    # ------------------------------------------------------------------ the one rerank path

    async def _rerank(self, body, shape, request: Request, response: Response):
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        try:
            answer = await self._answer(body, shape, request, response, request_id)
            self.metrics.requests.inc(tags={"arm": response.headers["x-rerank-arm"], "api": shape.__name__, "status": "200"})
            return answer
        except Exception as e:  # noqa: BLE001 - every failure becomes a typed HTTP answer here
            resp = log_if_internal(error_response(e, request_id), e, request_id)
            self.metrics.requests.inc(tags={"arm": "", "api": shape.__name__, "status": str(resp.status_code)})
            return resp

    async def _answer(self, body, shape, request: Request, response: Response, request_id: str):
        started = time.perf_counter()
        req = body.to_internal()
        req.check_limits(self.fleet.limits)
        pin_header = self.fleet.router.pin_header
        pin, pin_field = resolve_pin(request.headers.get(pin_header), req.arm, pin_header)
        sticky_key = request.headers.get(self.fleet.router.sticky_header) or req.user
        decision = self.router.route(pin=pin, pin_field=pin_field, sticky_key=sticky_key)

        media = await self.fetcher.resolve_items([req.query, *req.documents])
        job = build_job(req, media)
        try:
            result = await self._call_arm(decision.arm, job)
        except Exception as e:
            self.stats.record_error(decision.arm, error_response(e).status_code)
            raise
        elapsed = time.perf_counter() - started
        self.stats.record_answer(decision.arm, decision.reason, elapsed, result)
        self.metrics.latency.observe(elapsed, tags={"arm": decision.arm})
        if decision.shadow_arm is not None:
            self._start_shadow(decision.shadow_arm, decision.arm, job, result.scores)

        outcome = RerankOutcome(
            scores=result.scores,
            meta=ServingMeta(
                arm=result.arm, precision=result.precision, model=result.model, routed_by=decision.reason,
                image_cache=ImageCacheUse(hits=result.cache_hits, misses=result.cache_misses),
            ),
        )  # fmt: skip
        response.headers["x-rerank-arm"] = result.arm
        response.headers["x-rerank-precision"] = result.precision
        response.headers["x-rerank-routed-by"] = decision.reason
        return shape.build(req, outcome, request_id)

    async def _call_arm(self, arm: str, job: ScoreJob) -> ArmResult:
        """Call an arm under the request time limit; resend bytes once if it lacks memoised images."""
        timeout = self.fleet.limits.request_timeout_s
        async with asyncio.timeout(timeout):
            outcome = await self._arms[arm].remote(job)
            if isinstance(outcome, ImagesNeeded):
                job = await replace_refs(job, set(outcome.digests), self.fetcher)
                outcome = await self._arms[arm].remote(job)
        if isinstance(outcome, InputRejected):
            raise outcome.to_error()
        if not isinstance(outcome, ArmResult):
            raise ServiceUnavailable(f"arm {arm} did not accept the resent images")
        return outcome

    def _start_shadow(self, arm: str, primary: str, job: ScoreJob, primary_scores: list[float]) -> None:
        if len(self._shadow_tasks) >= MAX_SHADOW_IN_FLIGHT:
            self.stats.record_shadow_failure(arm, dropped=True)  # shadowing must not pile up under load
            self.metrics.shadow_failures.inc(tags={"arm": arm, "reason": "dropped"})
            return
        task = asyncio.get_running_loop().create_task(self._shadow(arm, primary, job, primary_scores))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, arm: str, primary: str, job: ScoreJob, primary_scores: list[float]) -> None:
        try:
            result = await self._call_arm(arm, job)
            k = self.fleet.router.shadow.top_k if self.fleet.router.shadow else 10
            scores = agreement(primary_scores, result.scores, k)
            self.stats.record_shadow(arm, primary, scores, result)
            for name, value in scores.items():
                self.metrics.shadow_agreement.observe(value, tags={"arm": arm, "metric": name})
        except Exception as e:  # noqa: BLE001 - a shadow failure is counted, never surfaced
            log.warning("shadow call to arm %s failed: %s", arm, type(e).__name__)
            self.stats.record_shadow_failure(arm)
            self.metrics.shadow_failures.inc(tags={"arm": arm, "reason": "error"})

    async def _arm_description(self, arm: str) -> dict:
        if arm not in self._arm_info:
            try:
                async with asyncio.timeout(10):
                    self._arm_info[arm] = await self._describe[arm].remote()
            except Exception:  # noqa: BLE001 - informational only
                return {}
        return self._arm_info[arm]
