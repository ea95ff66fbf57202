"""The ingress's public routes: the rerank shapes (Cohere v2, Jina/vLLM v1, TEI or vLLM on `/rerank`
as the body says), vLLM's score, liveness, readiness and the model list.
Thin: each hands its work to the serving objects of the replica's `Ingress` (`service`,
`calls`, `experiment`), which the `this_ingress` dependency passes in."""

import asyncio
from typing import Union

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from ray import serve

from serve.cascade import cascade_precision
from serve.http_app import ERRORS, app, documented, this_ingress
from serve.protocol import (
    ArmCard,
    CohereRerankRequest,
    CohereRerankResponse,
    JinaRerankRequest,
    JinaRerankResponse,
    ModelCard,
    ModelList,
    TEIRerankRequest,
    TEIRerankResponse,
)
from serve.protocol_vllm import RerankBody, ScoreBody, ScoreResponse, VllmRerankResponse


@app.post("/v2/rerank", response_model=CohereRerankResponse, response_model_exclude_none=True, responses=ERRORS)
async def rerank_cohere(body: CohereRerankRequest, request: Request, response: Response, ingress=this_ingress):
    """Cohere v2 rerank; also vLLM's `/v2/rerank` (its rerank body)."""
    return await ingress.service.rerank(body, CohereRerankResponse, request.headers, response.headers)


@app.post("/v1/rerank", response_model=JinaRerankResponse, response_model_exclude_none=True, responses=ERRORS)
async def rerank_jina(body: JinaRerankRequest, request: Request, response: Response, ingress=this_ingress):
    """Jina rerank; also the Cohere v1 SDK's, Xinference's and vLLM's `/v1/rerank`."""
    return await ingress.service.rerank(body, JinaRerankResponse, request.headers, response.headers)


@app.post("/rerank", response_model=Union[TEIRerankResponse, VllmRerankResponse], response_model_exclude_none=True, responses=ERRORS)
async def rerank_tei_or_vllm(body: RerankBody, request: Request, response: Response, ingress=this_ingress):
    """The body decides: with `texts`, Text Embeddings Inference rerank (a bare list; arm and
    precision in x-rerank-* headers); with `documents`, vLLM's (and infinity's) rerank."""
    shape = TEIRerankResponse if isinstance(body, TEIRerankRequest) else VllmRerankResponse
    return await ingress.service.rerank(body, shape, request.headers, response.headers)


@app.post("/score", response_model=ScoreResponse, response_model_exclude_none=True, responses=ERRORS)
@app.post("/v1/score", response_model=ScoreResponse, response_model_exclude_none=True, responses=ERRORS)
async def score(body: ScoreBody, request: Request, response: Response, ingress=this_ingress):
    """vLLM's score API (`/v1/score` its older path): one score per pair, in pair order (1:1, 1:N or N:N)."""
    return await ingress.service.rerank(body, ScoreResponse, request.headers, response.headers)


@app.get("/health")
async def health(ingress=this_ingress) -> dict:
    """Liveness: the ingress answers (with its rerank requests in flight, whether it is
    draining, each arm's state as this replica routes, and its score cache's counts per arm).
    Whether arms can score is `/ready`."""
    admission = ingress.service.admission
    return {"status": "ok", "arms": ingress.calls.arms, "in_flight": admission.in_flight,
            "admission": {"limit": admission.limit, "refused": admission.refused}, "draining": ingress.service.draining,
            "arm_state": {a: v["state"] for a, v in ingress.calls.health.snapshot().items()},
            "score_cache": ingress.service.scores.snapshot(),
            "replica": serve.get_replica_context().replica_id.unique_id}  # fmt: skip


@app.get("/ready", responses=documented(503))
async def ready(ingress=this_ingress) -> JSONResponse:
    """Readiness: the fleet answers reranks, i.e. an arm that takes routed traffic scores a
    one-pair request within its probe time. Each arm's state is listed ("ok", or why not:
    down and its reason, e.g. no replica placed yet) and the others are `degraded`; 503 with
    Retry-After when no routed arm scores, and while draining."""
    shares = ingress.experiment.router.shares
    # A routed cascade answers while its first arm scores.
    routed = [a for a in ingress.calls.arms if shares.get(a, 0) > 0 or any(c.first == a and shares.get(c.name, 0) > 0 for c in ingress.fleet.cascades)]
    scores, arms = await ingress.calls.readiness(routed)
    ok = scores and not ingress.service.draining
    body = {"ready": ok, "draining": ingress.service.draining, "arms": arms, "degraded": sorted(a for a, state in arms.items() if state != "ok")}
    return JSONResponse(body, status_code=200 if ok else 503, headers={} if ok else {"retry-after": "1"})


@app.get("/v1/models", response_model=ModelList)
async def models(ingress=this_ingress) -> ModelList:
    described = await asyncio.gather(*(ingress.calls.describe(a.name) for a in ingress.fleet.arms))
    live = await ingress.calls.live_replicas()
    shares = ingress.experiment.router.shares
    arms = [ArmCard(name=a.name, precision=a.precision, weight=shares[a.name], device=d.get("device_name"), replicas=live.get(a.name))
            for a, d in zip(ingress.fleet.arms, described)]  # fmt: skip
    arms += [ArmCard(name=c.name, precision=cascade_precision(ingress.fleet, c), weight=shares[c.name]) for c in ingress.fleet.cascades]
    return ModelList(data=[ModelCard(id=described[0].get("model", ingress.fleet.model.source), arms=arms)])
