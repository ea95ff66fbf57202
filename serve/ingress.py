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

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import InputError
from engine.inputs import RerankItem, ScoreRequest
from serve.arm_result import ArmResult
from serve.cache import FeatureCache
from serve.config import FleetConfig
from serve.errors import error_response, log_if_internal
from serve.experiments import ExperimentStats
from serve.fetch import MediaFetcher
from serve.guard import Guard, GuardMiddleware
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

MAX_SHADOW_IN_FLIGHT = 64


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

        items = await self.fetcher.resolve_items([req.query, *req.documents])
        job = score_request(req, items)
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

    async def _call_arm(self, arm: str, job: ScoreRequest) -> ArmResult:
        """Call an arm under the request time limit; its errors are raised here as themselves."""
        async with asyncio.timeout(self.fleet.limits.request_timeout_s):
            return await self._arms[arm].remote(job)

    def _start_shadow(self, arm: str, primary: str, job: ScoreRequest, primary_scores: list[float]) -> None:
        if len(self._shadow_tasks) >= MAX_SHADOW_IN_FLIGHT:
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
