"""The HTTP front door (`Ingress` deployment): parse, route, fetch media, call an arm, answer.

Data flow: request -> protocol model -> `RerankRequest` (validated, media still references)
-> router decision -> media fetched concurrently, each image hashed once -> engine
`ScoreRequest` -> the chosen arm's handle -> ranked response. A shadowed request is mirrored to
the shadow arm by a background task started after the primary answer is in hand, so it never
delays the primary response; its ranking agreement with the primary feeds `/v1/experiments`.

Experiment records (answers, errors, latency, cache use, agreement, the rankings shown) go into
this replica's `Tally` and, every `experiment.flush_interval_s`, to the `Ledger` deployment,
which merges them fleet-wide and answers with the live control state (weights, shadow,
interleaving) the router then follows: admin changes and guardrails reach every ingress replica
within one interval, without a redeploy.

Errors are raised as typed exceptions and turned into HTTP by `serve.errors.error_response`.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at
# runtime, and through Serve's class-based ingress string annotations are not resolved.
import asyncio
import logging
import random
import time
import uuid
from dataclasses import replace

from fastapi import Body, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import InputError
from engine.inputs import RerankItem, ScoreRequest
from serve.arm_arrival import await_arms, deployment_states, unplaced_arms
from serve.arm_result import ArmResult
from serve.cache import FeatureCache
from serve.config import FleetConfig, ShadowConfig
from serve.errors import ArmDown, Draining, classify, error_response, log_if_internal, unwrap
from serve.experiment_page import render as render_experiment
from serve.fetch import MediaFetcher
from serve.guard import Admission, Guard, GuardMiddleware
from serve.health import ArmHealth
from serve.ledger import ExperimentLedger, UnknownRequest
from serve.ledger_link import LedgerLink
from serve.protocol import (
    ArmCard,
    CohereRerankRequest,
    CohereRerankResponse,
    ErrorResponse,
    ExperimentStart,
    FeedbackRequest,
    FeedbackResponse,
    ImageCacheUse,
    JinaRerankRequest,
    JinaRerankResponse,
    ModelCard,
    ModelList,
    RerankOutcome,
    RerankRequest,
    ServingMeta,
    ShadowChange,
    TEIRerankRequest,
    TEIRerankResponse,
    WeightsChange,
)
from serve.router import ArmRouter, resolve_pin
from ranking.metrics import agreement, ranking, team_draft_interleave

log = logging.getLogger(__name__)

DEADLINE_HEADER = "x-rerank-timeout-ms"  # a client's own deadline, at most limits.request_timeout_s
PROBE_TIMEOUT_S = 1.0
PLACEMENT_CHECK_S = 2.0  # elastic clusters: how often Serve's status is read for arms without a running replica
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


def interleaved(a: ArmResult, b: ArmResult, rng: random.Random) -> tuple[list[int], list[int], list[float]]:
    """Team-draft interleaving of two arms' rankings: (the order, each position's team 0/1, and
    each document's score from the arm whose team placed it)."""
    order, teams = team_draft_interleave(ranking(a.scores), ranking(b.scores), [rng.random() < 0.5 for _ in range(len(a.scores) + 1)])
    scores = list(a.scores)
    for doc, team in zip(order, teams):
        if team == 1:
            scores[doc] = b.scores[doc]
    return order, teams, scores


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
_ADMIN_ERRORS = {400: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
                 408: {"model": ErrorResponse}, 422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}  # fmt: skip


def _outcome(result: ArmResult, routed_by: str) -> RerankOutcome:
    return RerankOutcome(
        scores=result.scores, tokens=result.tokens,
        meta=ServingMeta(
            arm=result.arm, precision=result.precision, model=result.model, routed_by=routed_by,
            image_cache=ImageCacheUse(hits=result.cache_hits, misses=result.cache_misses),
        ),
    )  # fmt: skip


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    async def __init__(self, config: dict, arms: dict[str, DeploymentHandle], ledger: DeploymentHandle):
        self.fleet = FleetConfig.from_dict(config).resolve_secrets()
        self._ledger = ledger
        # Routing starts from the control state the ledger starts with; the first flush brings
        # whatever changed since (an admin call, a guardrail, the ramp).
        self._control_key = (0.0, 0)
        self._apply_control(ExperimentLedger(self.fleet).control_state())
        self.link = LedgerLink([a.name for a in self.fleet.arms], ledger, self.fleet.experiment.name)
        self._flush_task: asyncio.Task | None = None
        self._rng = random.Random()
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
        # Rerank requests in flight here, counted (and bounded) by the guard from body read to answer.
        self.admission = Admission(
            self.fleet.ingress.in_flight_limit(self.fleet.arms),
            on_refusal=lambda: self.metrics.requests.inc(tags={"arm": "", "api": "admission", "status": "503"}),
        )
        self._draining = False
        app.state.guard = Guard(
            api_keys=tuple(k.get_secret_value() for k in self.fleet.api_keys),
            admin_keys=tuple((name, k.get_secret_value()) for name, k in self.fleet.admin_keys.items()),
            max_request_bytes=self.fleet.limits.max_request_bytes,
            body_read_timeout_s=self.fleet.limits.body_read_timeout_s,
            admission=self.admission,
        )
        if self.fleet.cluster.elastic:
            # Start (and let the application report RUNNING) only once the fleet can serve: see serve.arm_arrival.
            answered = await await_arms({a: self._describe[a].remote for a in self._arms}, self.fleet.cluster.arm_grace_s)
            for arm in self._arms:
                if arm not in answered:
                    self.health.died(arm, f"no answer within cluster.arm_grace_s ({self.fleet.cluster.arm_grace_s:g} s) of the first arm's")

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
        """Liveness: the ingress answers (with its rerank requests in flight, whether it is
        draining, and each arm's state as this replica routes). Whether arms can score is `/ready`."""
        return {"status": "ok", "arms": list(self._arms), "in_flight": self.admission.in_flight,
                "admission": {"limit": self.admission.limit, "refused": self.admission.refused}, "draining": self._draining,
                "arm_state": {a: v["state"] for a, v in self.health.snapshot().items()},
                "replica": serve.get_replica_context().replica_id.unique_id}  # fmt: skip

    @app.get("/ready", responses={503: {"model": ErrorResponse}})
    async def ready(self) -> JSONResponse:
        """Readiness: the fleet answers reranks, i.e. an arm that takes routed traffic scores a
        one-pair request within its probe time. Each arm's state is listed ("ok", or why not:
        down and its reason, e.g. no replica placed yet) and the others are `degraded`; 503 with
        Retry-After when no routed arm scores, and while draining."""
        self._ensure_probing()
        results = await asyncio.gather(*(self._probe_score(a) for a in self._arms))
        arms = {a: ("ok" if error is None else error) for a, error in zip(self._arms, results)}
        routed = [a for a in self._arms if self.router.shares.get(a, 0) > 0] or list(self._arms)
        ok = not self._draining and any(arms[a] == "ok" for a in routed)
        body = {"ready": ok, "draining": self._draining, "arms": arms, "degraded": sorted(a for a, state in arms.items() if state != "ok")}
        return JSONResponse(body, status_code=200 if ok else 503, headers={} if ok else {"retry-after": "1"})

    async def drain(self, grace_s: float) -> int:
        """Refuse new requests (503 Draining) and wait up to `grace_s` for in-flight ones to
        finish; returns how many were still in flight at the end (0: nothing dropped)."""
        self._draining = True
        deadline = time.monotonic() + grace_s
        while self.admission.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.admission.in_flight

    @app.get("/v1/models", response_model=ModelList)
    async def models(self) -> ModelList:
        described = await asyncio.gather(*(self._arm_description(a.name) for a in self.fleet.arms))
        model_id = described[0].get("model", self.fleet.model.source)
        live = await self._live_replicas()
        arms = [ArmCard(name=a.name, precision=a.precision, weight=self.router.shares[a.name], device=d.get("device_name"), replicas=live.get(a.name))
                for a, d in zip(self.fleet.arms, described)]  # fmt: skip
        return ModelList(data=[ModelCard(id=model_id, arms=arms)])

    @app.get("/v1/experiments")
    async def experiments(self) -> dict:
        """The running experiment, fleet-wide (every ingress replica's records, merged in the
        ledger; this replica's are sent first): per arm requests, errors, latency, cache use and
        agreement, each candidate against the reference arm with 95 % intervals and a verdict,
        the noise floor, click feedback, interleaving credit, the control state and its change
        log. `this_replica` holds what only this ingress replica knows (arm health, URL memo)."""
        await self._flush()
        results = await self._ledger.results.remote()
        return {
            **results,
            "router": {"sticky_header": self.fleet.router.sticky_header, "pin_header": self.fleet.router.pin_header},
            "this_replica": {"url_memo_cache": self.memo.snapshot(), "health": self.health.snapshot()},
        }

    @app.get("/v1/experiments/page", response_class=HTMLResponse)
    async def experiment_page(self) -> HTMLResponse:
        """The running experiment as a readable page: each arm against the reference with its
        intervals and verdict, the control state, interleaving credit and the change log."""
        await self._flush()
        return HTMLResponse(render_experiment(await self._ledger.results.remote()))

    @app.post("/v1/experiments/weights", responses=_ADMIN_ERRORS)
    async def set_weights(self, change: WeightsChange, request: Request) -> dict:
        """Admin: change arm weights at runtime (every ingress within one flush interval; sticky
        users move only as far as the change requires). Returns the new control state."""
        return await self._admin(self._ledger.set_weights.remote(request.state.admin, change.weights))

    @app.post("/v1/experiments/shadow", responses=_ADMIN_ERRORS)
    async def set_shadow(self, change: ShadowChange, request: Request) -> dict:
        """Admin: change the shadow arm and fraction, the noise-floor fraction or the interleaved fraction, at runtime."""
        return await self._admin(self._ledger.set_shadow.remote(
            request.state.admin, change.arm, change.fraction, change.noise_floor_fraction, change.interleave_fraction))  # fmt: skip

    @app.post("/v1/experiments/start", responses=_ADMIN_ERRORS)
    async def start_experiment(self, change: ExperimentStart, request: Request) -> dict:
        """Admin: archive the running experiment's results and start a new one (counts from zero)."""
        return await self._admin(self._ledger.start.remote(request.state.admin, change.name))

    @app.post("/v1/experiments/stop", responses=_ADMIN_ERRORS)
    async def stop_experiment(self, request: Request) -> dict:
        """Admin: stop the experiment: no more shadowing, interleaving, guardrails or counting;
        routing keeps the current weights."""
        return await self._admin(self._ledger.stop.remote(request.state.admin))

    @app.post("/v1/feedback", response_model=FeedbackResponse, responses={**_ERRORS, 404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}})
    async def feedback(self, body: FeedbackRequest = Body(...)) -> FeedbackResponse:
        """What the user did with a ranking: the documents clicked (and purchased), joined to the
        arm that answered (per-arm click NDCG and MRR) or, for an interleaved answer, credited to
        each arm's team. 404 for an unknown or forgotten request id, 409 when already given."""
        await self._flush()  # this replica's own recent answers must be joinable
        try:
            joined = await self._ledger.feedback.remote(body.request_id, body.clicked, body.purchased)
        except Exception as e:
            if not isinstance(unwrap(e), UnknownRequest):
                raise
            # Another ingress replica may have answered it within its last flush interval.
            await asyncio.sleep(2 * self.fleet.experiment.flush_interval_s)
            joined = await self._ledger.feedback.remote(body.request_id, body.clicked, body.purchased)
        return FeedbackResponse(**joined)

    async def _admin(self, call) -> dict:
        control = await call
        self._apply_control(control)
        return control

    # ------------------------------------------------------------------ experiment records

    def _apply_control(self, control: dict) -> None:
        """Follow a control state unless an older one: replies of overlapping calls may arrive out
        of order; a restarted ledger (a new epoch) always wins."""
        key = (control["epoch"], control["version"])
        if key[0] != self._control_key[0] or key[1] > self._control_key[1]:
            self.router = ArmRouter.from_control(control)
            self._control_key = key

    async def _flush(self) -> None:
        """Hand this replica's records to the ledger (`LedgerLink`) and follow its control state."""
        control = await self.link.flush()
        if control is not None:
            self._apply_control(control)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.fleet.experiment.flush_interval_s)
            await self._flush()


    # ------------------------------------------------------------------ the one rerank path

    async def _rerank(self, body, shape, request: Request, response: Response):
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
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
        if decision.interleave_with is not None:
            outcome = await self._interleaved(decision, job, deadline, started, request_id)
        else:
            outcome = await self._routed(decision, job, deadline, started, request_id, req.top_n)
        result = outcome.meta
        response.headers["x-rerank-arm"] = result.arm
        response.headers["x-rerank-precision"] = result.precision
        response.headers["x-rerank-routed-by"] = result.routed_by
        return shape.build(req, outcome, request_id)

    async def _routed(self, decision, job: ScoreRequest, deadline: float, started: float, request_id: str, top_n: int | None) -> RerankOutcome:
        try:
            result, decision = await self._call_with_failover(decision, job, deadline)
        except Exception as e:
            self.link.tally.record_error(decision.arm, classify(e)[0])
            raise
        elapsed = time.perf_counter() - started
        self.link.tally.record_answer(decision.arm, decision.reason, elapsed, result)
        self.metrics.latency.observe(elapsed, tags={"arm": decision.arm})
        if decision.shadow_arm is not None:
            self._start_shadow(decision.shadow_arm, decision.arm, job, result.scores)
        outcome = _outcome(result, decision.reason)
        self.link.record_shown(request_id, (result.arm,), outcome.ranked(top_n), [], len(result.scores))
        return outcome

    async def _interleaved(self, decision, job: ScoreRequest, deadline: float, started: float, request_id: str) -> RerankOutcome:
        """Both arms score the request; the answer is their rankings team-draft interleaved. If
        one arm fails, the other's answer is served as a plain failover answer."""
        arms = (decision.arm, decision.interleave_with)
        ended: dict[str, float] = {}

        async def call(arm: str) -> ArmResult:
            try:
                return await self._call_arm(arm, job, deadline)
            finally:
                ended[arm] = time.perf_counter()

        results = await asyncio.gather(*(call(a) for a in arms), return_exceptions=True)
        for arm, r in zip(arms, results):
            if isinstance(r, BaseException):
                self.link.tally.record_error(arm, classify(r)[0])
            else:  # each arm's own latency: the request's media work and its own call
                self.link.tally.record_answer(arm, "interleaved", ended[arm] - started, r)
                self.metrics.latency.observe(ended[arm] - started, tags={"arm": arm})
        ok = [r for r in results if not isinstance(r, BaseException)]
        if not ok:
            raise results[0]
        if len(ok) == 1:
            outcome = _outcome(ok[0], "failover")
            self.link.record_shown(request_id, (ok[0].arm,), outcome.ranked(None), [], len(ok[0].scores))
            return outcome
        a, b = results
        order, teams, scores = interleaved(a, b, self._rng)
        meta = ServingMeta(
            arm=f"{a.arm}+{b.arm}", precision=f"{a.precision}+{b.precision}", model=a.model, routed_by="interleaved",
            image_cache=ImageCacheUse(hits=a.cache_hits + b.cache_hits, misses=a.cache_misses + b.cache_misses),
        )  # fmt: skip
        self.link.record_shown(request_id, arms, order, teams, len(scores))
        return RerankOutcome(scores=scores, tokens=a.tokens + b.tokens, meta=meta, order=order)

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
        """Start the background probe of arms out of routed traffic and the experiment flush
        (they need the running loop)."""
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_loop())
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _probe_loop(self) -> None:
        interval = self.fleet.router.probe_interval_s
        placement_checked = 0.0
        while True:
            await asyncio.sleep(interval / 2)
            live = await self._live_replicas()
            for arm, n in live.items():
                if n == 0:
                    self._arm_gone(arm, "no live replica")
            if self.fleet.cluster.elastic and time.monotonic() - placement_checked >= PLACEMENT_CHECK_S:
                placement_checked = time.monotonic()
                for arm, why in (await self._unplaced()).items():
                    self._arm_gone(arm, why)
            due = self.health.due_for_probe()
            results = await asyncio.gather(*(self._probe_describe(a) for a in due))
            for arm, ok in zip(due, results):
                if ok:
                    self.health.succeeded(arm)

    async def _live_replicas(self) -> dict[str, int]:
        """Live replicas per arm ({} when Ray's actor table cannot be read)."""
        app_name = serve.get_replica_context().app_name
        try:
            return await asyncio.get_running_loop().run_in_executor(None, live_replicas, app_name, list(self._arms))
        except Exception as e:  # noqa: BLE001 - without the table, calls and probes still decide
            log.warning("cannot read the replica table: %s", type(e).__name__)
            return {}

    async def _unplaced(self) -> dict[str, str]:
        """Arms with no running replica and Serve's reason ({} when Serve's status cannot be read)."""
        app_name = serve.get_replica_context().app_name
        try:
            states = await asyncio.get_running_loop().run_in_executor(None, deployment_states, app_name)
        except Exception as e:  # noqa: BLE001 - calls and probes still decide without it
            log.warning("cannot read Serve's status: %s", type(e).__name__)
            return {}
        return unplaced_arms(states, list(self._arms))

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
        if len(self._shadow_tasks) >= self._shadow_settings.max_in_flight:
            self.link.tally.record_shadow_failure(arm, dropped=True)  # shadowing must not pile up under load
            self.metrics.shadow_failures.inc(tags={"arm": arm, "reason": "dropped"})
            return
        task = asyncio.get_running_loop().create_task(self._shadow(arm, primary, job, primary_scores))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, arm: str, primary: str, job: ScoreRequest, primary_scores: list[float]) -> None:
        try:
            result = await self._call_arm(arm, job)
            scores = agreement(primary_scores, result.scores, self._shadow_settings.top_k)
            self.link.tally.record_shadow(arm, primary, scores, result)
            for name, value in scores.items():
                self.metrics.shadow_agreement.observe(value, tags={"arm": arm, "metric": name})
        except Exception as e:  # noqa: BLE001 - a shadow failure is counted, never surfaced
            log.warning("shadow call to arm %s failed: %s", arm, type(e).__name__)
            self.link.tally.record_shadow_failure(arm)
            self.metrics.shadow_failures.inc(tags={"arm": arm, "reason": "error"})

    @property
    def _shadow_settings(self) -> ShadowConfig:
        """top_k and max_in_flight of mirrored calls (the defaults when the config has no shadow
        and one was set at runtime, or for the noise floor)."""
        return self.fleet.router.shadow or ShadowConfig(arm=self.fleet.reference_arm)

    async def _arm_description(self, arm: str) -> dict:
        if arm not in self._arm_info:
            try:
                async with asyncio.timeout(10):
                    self._arm_info[arm] = await self._describe[arm].remote()
            except Exception:  # noqa: BLE001 - informational only
                return {}
        return self._arm_info[arm]
