"""The HTTP front door (`Ingress` deployment): parse, route, fetch media, call an arm, answer.

Data flow: request -> protocol model -> `RerankRequest` (validated, media still references)
-> router decision -> media fetched concurrently, each image hashed once -> engine
`ScoreRequest` -> the chosen arm's handle -> ranked response. A shadowed request is mirrored to
the shadow arm by a background task started after the primary answer is in hand, so it never
delays the primary response; its ranking agreement with the primary feeds `/v1/experiments`.

Errors are raised as typed exceptions and turned into HTTP by `serve.errors.error_response`.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at
# runtime, and through Serve's class-based ingress string annotations are not resolved.
import asyncio
import logging
import time
import uuid
from dataclasses import replace

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import InputError
from engine.inputs import RerankItem, ScoreRequest
from serve.arm_result import ArmResult
from serve.cache import FeatureCache
from serve.config import FleetConfig
from serve.errors import ArmDown, Draining, classify, error_response, log_if_internal, unwrap
from serve.experiments import ExperimentStats
from serve.fetch import MediaFetcher
from serve.guard import Guard, GuardMiddleware
from serve.health import ArmHealth
from serve.protocol import (
    ArmCard,
    CohereRerankRequest,
    CohereRerankResponse,
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
from serve.router import ArmRouter, resolve_pin
from workshop.ranking import agreement

log = logging.getLogger(__name__)

DEADLINE_HEADER = "x-rerank-timeout-ms"  # a client's own deadline, at most limits.request_timeout_s
PROBE_TIMEOUT_S = 1.0
READY_QUERY = ScoreRequest.of("readiness probe", ["readiness probe"])
# The arm's replica is gone (killed, crashed, its node lost): scoring is idempotent, so the request
# is retried once on another arm, and the arm leaves routed traffic until a probe answers.
ARM_GONE = (ActorDiedError, ActorUnavailableError, RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, ArmDown)


def live_replicas(app_name: str, arms: list[str]) -> dict[str, int]:
    """Live replica actors per arm, from Ray's named-actor table (a GCS call of about a
    millisecond): a killed or crashed replica leaves it at once, long before Serve's health check
    notices, and while it is gone Serve's handle holds calls for the arm instead of failing them."""
    import ray
    from ray.serve._private.common import ReplicaID

    counts = dict.fromkeys(arms, 0)
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if ReplicaID.is_full_id_str(name):
            rid = ReplicaID.from_full_id_str(name)
            arm = rid.deployment_id.name.removeprefix("Arm-")
            if rid.deployment_id.app_name == app_name and arm in counts:
                counts[arm] += 1
    return counts


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


async def _awaited(response):
    return await response


def score_request(req: RerankRequest, items: list[RerankItem]) -> ScoreRequest:
    """The engine's view of a request: the query, its documents and the instruction."""
    return ScoreRequest(items[0], tuple(items[1:]), req.instruction, req.max_tokens_per_doc)


# --------------------------------------------------------------------------------- HTTP


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
           408: {"model": ErrorResponse}, 422: {"model": ErrorResponse}, 503: {"model": ErrorResponse},
           504: {"model": ErrorResponse}}  # fmt: skip


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
        router_cfg = self.fleet.router
        self.health = ArmHealth(self._arms, failure_threshold=router_cfg.failure_threshold, probe_interval_s=router_cfg.probe_interval_s)
        self._probe_task: asyncio.Task | None = None
        self._gone: dict[str, asyncio.Event] = {}  # set when an arm leaves routed traffic: its waiting calls fail over
        self._in_flight = 0
        self._draining = False
        app.state.guard = Guard(
            api_keys=tuple(k.get_secret_value() for k in self.fleet.api_keys),
            max_request_bytes=self.fleet.limits.max_request_bytes,
            body_read_timeout_s=self.fleet.limits.body_read_timeout_s,
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
        """Liveness: the ingress answers (with its rerank requests in flight and whether it is
        draining). Whether arms can score is `/ready`."""
        return {"status": "ok", "arms": list(self._arms), "in_flight": self._in_flight, "draining": self._draining}

    @app.get("/ready", responses={503: {"model": ErrorResponse}})
    async def ready(self) -> JSONResponse:
        """Readiness: every arm scores a one-pair request within its probe time and none is out
        of routed traffic; 503 with Retry-After and each arm's state otherwise (and while draining)."""
        self._ensure_probing()
        results = await asyncio.gather(*(self._probe_score(a) for a in self._arms))
        arms = {a: ("ok" if error is None else error) for a, error in zip(self._arms, results)}
        ok = not self._draining and all(error is None for error in results)
        body = {"ready": ok, "draining": self._draining, "arms": arms}
        return JSONResponse(body, status_code=200 if ok else 503, headers={} if ok else {"retry-after": "1"})

    async def drain(self, grace_s: float) -> int:
        """Refuse new requests (503 Draining) and wait up to `grace_s` for in-flight ones to
        finish; returns how many were still in flight at the end (0: nothing dropped)."""
        self._draining = True
        deadline = time.monotonic() + grace_s
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self._in_flight

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
            "health": self.health.snapshot(),
            "scope": "this ingress replica since it started",
        }

    # ------------------------------------------------------------------ the one rerank path

    async def _rerank(self, body, shape, request: Request, response: Response):
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        self._in_flight += 1
        try:
            if self._draining:
                raise Draining("the service is draining (shutting down or redeploying); retry on another instance")
            answer = await self._answer(body, shape, request, response, request_id)
            self.metrics.requests.inc(tags={"arm": response.headers["x-rerank-arm"], "api": shape.__name__, "status": "200"})
            return answer
        except Exception as e:  # noqa: BLE001 - every failure becomes a typed HTTP answer here
            resp = log_if_internal(error_response(e, request_id), e, request_id)
            self.metrics.requests.inc(tags={"arm": "", "api": shape.__name__, "status": str(resp.status_code)})
            return resp
        finally:
            self._in_flight -= 1

    async def _answer(self, body, shape, request: Request, response: Response, request_id: str):
        started = time.perf_counter()
        deadline = time.time() + self._time_budget(request.headers.get(DEADLINE_HEADER))
        self._ensure_probing()
        req = body.to_internal()
        req.check_limits(self.fleet.limits)
        pin_header = self.fleet.router.pin_header
        pin, pin_field = resolve_pin(request.headers.get(pin_header), req.arm, pin_header)
        sticky_key = request.headers.get(self.fleet.router.sticky_header) or req.user
        decision = self.router.route(pin=pin, pin_field=pin_field, sticky_key=sticky_key, down=self.health.down())
        if decision.reason == "pinned" and self.health.is_down(decision.arm):
            why = self.health.snapshot()[decision.arm]["reason"]
            raise ArmDown(f"arm {decision.arm!r} is out of service ({why}); retry later, or send the request unpinned")

        items = await self.fetcher.resolve_items([req.query, *req.documents])
        job = score_request(req, items)
        try:
            result, decision = await self._call_with_failover(decision, job, deadline)
        except Exception as e:
            self.stats.record_error(decision.arm, error_response(e).status_code)
            raise
        elapsed = time.perf_counter() - started
        self.stats.record_answer(decision.arm, decision.reason, elapsed, result)
        self.metrics.latency.observe(elapsed, tags={"arm": decision.arm})
        if decision.shadow_arm is not None:
            self._start_shadow(decision.shadow_arm, decision.arm, job, result.scores)

        outcome = RerankOutcome(
            scores=result.scores, tokens=result.tokens,
            meta=ServingMeta(
                arm=result.arm, precision=result.precision, model=result.model, routed_by=decision.reason,
                image_cache=ImageCacheUse(hits=result.cache_hits, misses=result.cache_misses),
            ),
        )  # fmt: skip
        response.headers["x-rerank-arm"] = result.arm
        response.headers["x-rerank-precision"] = result.precision
        response.headers["x-rerank-routed-by"] = decision.reason
        return shape.build(req, outcome, request_id)

    def _time_budget(self, header: str | None) -> float:
        """Seconds this request may take: the client's `x-rerank-timeout-ms`, at most the configured limit."""
        limit = self.fleet.limits.request_timeout_s
        if header is None:
            return limit
        try:
            ms = float(header)
        except ValueError:
            ms = float("nan")
        if not ms > 0:  # also refuses NaN
            raise InputError(DEADLINE_HEADER, f"must be a positive number of milliseconds, got {header!r}")
        return min(ms / 1000, limit)

    async def _call_with_failover(self, decision, job: ScoreRequest, deadline: float):
        """Call the routed arm; if its replica is gone, the arm leaves routed traffic and (unless
        the request was pinned) the request is retried once on another arm: scoring is idempotent."""
        try:
            return await self._call_arm(decision.arm, job, deadline), decision
        except Exception as e:
            if not isinstance(unwrap(e), ARM_GONE) or decision.reason == "pinned":
                raise
            other = self.router.failover(decision.arm, self.health.down())
            if other == decision.arm:
                raise
            log.warning("arm %s is gone (%s); retrying the request on arm %s", decision.arm, type(unwrap(e)).__name__, other)
            decision = replace(decision, arm=other, reason="failover", shadow_arm=None)
            return await self._call_arm(other, job, deadline), decision

    async def _call_arm(self, arm: str, job: ScoreRequest, deadline: float | None = None) -> ArmResult:
        """Call an arm within the request's deadline (the arm refuses work whose deadline passed
        while it queued); its errors are raised here as themselves, and its health is updated."""
        deadline = deadline if deadline is not None else time.time() + self.fleet.limits.request_timeout_s
        response = self._arms[arm].remote(job, deadline)
        call = asyncio.ensure_future(_awaited(response))
        gone = asyncio.ensure_future(self._gone_event(arm).wait())
        try:
            done, _ = await asyncio.wait({call, gone}, timeout=max(0.0, deadline - time.time()), return_when=asyncio.FIRST_COMPLETED)
            if call not in done:
                response.cancel()
                call.cancel()
                if gone in done:  # the arm left routed traffic while this call waited for it
                    raise ArmDown(f"arm {arm!r} went out of service during the request")
                self.health.failed(arm, "timeout")
                raise TimeoutError
            result = call.result()
        except Exception as e:
            cause = unwrap(e)
            if isinstance(cause, ARM_GONE) and not isinstance(cause, ArmDown):
                self._arm_gone(arm, type(cause).__name__)
            elif classify(cause)[0] == 500:  # the arm broke (not the input, not a full queue)
                self.health.failed(arm, type(cause).__name__)
            raise
        finally:
            gone.cancel()
        self.health.succeeded(arm)
        return result

    def _gone_event(self, arm: str) -> asyncio.Event:
        event = self._gone.get(arm)
        if event is None or (event.is_set() and not self.health.is_down(arm)):
            event = self._gone[arm] = asyncio.Event()
        return event

    def _arm_gone(self, arm: str, why: str) -> None:
        """Take the arm out of routed traffic now; calls waiting on it fail over."""
        if not self.health.is_down(arm):
            log.warning("arm %s is out of routed traffic: %s", arm, why)
        self.health.died(arm, why)
        self._gone_event(arm).set()

    def _ensure_probing(self) -> None:
        """Start the background probe of arms out of routed traffic (needs the running loop)."""
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        interval = self.fleet.router.probe_interval_s
        app_name = serve.get_replica_context().app_name
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval / 2)
            try:
                live = await loop.run_in_executor(None, live_replicas, app_name, list(self._arms))
            except Exception as e:  # noqa: BLE001 - without the table, calls and probes still decide
                log.warning("cannot read the replica table: %s", type(e).__name__)
                live = {}
            for arm, n in live.items():
                if n == 0:
                    self._arm_gone(arm, "no live replica")
            due = self.health.due_for_probe()
            results = await asyncio.gather(*(self._probe_describe(a) for a in due))
            for arm, ok in zip(due, results):
                if ok:
                    self.health.succeeded(arm)

    async def _probe_describe(self, arm: str) -> bool:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await self._describe[arm].remote()
            return True
        except Exception:  # noqa: BLE001 - a probe that fails keeps the arm down
            return False

    async def _probe_score(self, arm: str) -> str | None:
        """None when the arm scores a one-pair request in time, else why not."""
        if self.health.is_down(arm):
            return f"down: {self.health.snapshot()[arm]['reason']}"
        try:
            async with asyncio.timeout(self.fleet.limits.request_timeout_s):
                await self._arms[arm].remote(READY_QUERY, time.time() + self.fleet.limits.request_timeout_s)
            return None
        except Exception as e:  # noqa: BLE001 - readiness reports, never raises
            return f"cannot score: {type(unwrap(e)).__name__}"

    def _start_shadow(self, arm: str, primary: str, job: ScoreRequest, primary_scores: list[float]) -> None:
        if len(self._shadow_tasks) >= self.fleet.router.shadow.max_in_flight:
            self.stats.record_shadow_failure(arm, dropped=True)  # shadowing must not pile up under load
            self.metrics.shadow_failures.inc(tags={"arm": arm, "reason": "dropped"})
            return
        task = asyncio.get_running_loop().create_task(self._shadow(arm, primary, job, primary_scores))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, arm: str, primary: str, job: ScoreRequest, primary_scores: list[float]) -> None:
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
