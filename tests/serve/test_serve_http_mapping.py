"""The one exception -> HTTP mapping, the API-key / body-size guard (in-process ASGI), the
experiment statistics and the request -> arm job glue. No Ray needed."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError

from serve.arm import ArmResult
from serve.config import LimitsConfig
from serve.engine.errors import FetchError, ForbiddenURL, ImageTooLarge, InputError, ServiceUnavailable
from serve.engine.inputs import image_digest
from serve.fetch import ImageRef, MediaFetcher, ResolvedMedia
from serve.engine.inputs import RerankItem
from serve.ingress import ExperimentStats, Guard, GuardMiddleware, build_job, error_response, percentile, replace_refs
from serve.protocol import CohereRerankRequest


def body(resp) -> dict:
    return json.loads(resp.body)["error"]


@pytest.mark.parametrize(
    "exc, status, kind, field",
    [
        (InputError("documents.3.image", "bad"), 400, "invalid_input", "documents.3.image"),
        (ForbiddenURL("query.image", "loopback"), 400, "forbidden_url", "query.image"),
        (FetchError("documents.0.image", "HTTP 404"), 422, "fetch_error", "documents.0.image"),
        (ImageTooLarge("documents.1.image", "too big"), 413, "too_large", "documents.1.image"),
        (ServiceUnavailable("busy"), 503, "overloaded", None),
        (BackPressureError(num_queued_requests=9, max_queued_requests=8), 503, "overloaded", None),
        (TimeoutError(), 504, "timeout", None),
    ],
)
def test_typed_errors_map_to_status_and_field(exc, status, kind, field):
    resp = error_response(exc, "rid-1")
    err = body(resp)
    assert resp.status_code == status and err["code"] == status and err["type"] == kind and err["field"] == field
    if status == 503:
        assert resp.headers["retry-after"] == "1"


def test_unexpected_errors_are_500_without_leaking():
    resp = error_response(RuntimeError("secret path /etc/shadow and token abc"), "rid-2")
    err = body(resp)
    assert resp.status_code == 500 and err["type"] == "internal_error"
    assert "secret" not in resp.body.decode() and "rid-2" in err["message"]


def test_errors_from_a_replica_are_unwrapped():
    wrapped = RayTaskError("score", "Traceback ...", InputError("documents.2", "must have text")).as_instanceof_cause()
    resp = error_response(wrapped)
    assert resp.status_code == 400 and body(resp)["field"] == "documents.2"


def test_validation_errors_name_the_field():
    class M(BaseModel):
        top_n: int

    try:
        M.model_validate({"top_n": "many"})
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
    resp = error_response(RequestValidationError(errors))
    err = body(resp)
    assert resp.status_code == 422 and err["field"] == "top_n" and err["message"].startswith("top_n:")
    bad_json = RequestValidationError([{"type": "json_invalid", "loc": ("body", 5), "msg": "JSON decode error", "ctx": {"error": "Expecting value"}}])
    err = body(error_response(bad_json))
    assert err["field"] == "body" and "not valid JSON" in err["message"]


def _guarded_app(keys=("k1", "k2"), max_bytes=100) -> FastAPI:
    app = FastAPI()
    app.add_middleware(GuardMiddleware)
    app.state.guard = Guard(api_keys=keys, max_request_bytes=max_bytes)

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.post("/v2/rerank")
    async def rerank(payload: dict):
        return {"n": len(json.dumps(payload))}

    return app


def test_guard_api_keys_and_body_cap():
    async def go():
        transport = httpx.ASGITransport(app=_guarded_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            no_key = await c.post("/v2/rerank", json={"a": 1})
            wrong = await c.post("/v2/rerank", json={"a": 1}, headers={"authorization": "Bearer nope"})
            ok = await c.post("/v2/rerank", json={"a": 1}, headers={"authorization": "Bearer k2"})
            health = await c.get("/health")
            big = await c.post("/v2/rerank", json={"a": "x" * 200}, headers={"authorization": "Bearer k1"})

            async def chunks():  # no Content-Length: the cap is enforced while reading
                for _ in range(10):
                    yield b"x" * 20

            streamed = await c.post("/v2/rerank", content=chunks(), headers={"authorization": "Bearer k1"})
            return no_key, wrong, ok, health, big, streamed

    no_key, wrong, ok, health, big, streamed = asyncio.run(go())
    assert no_key.status_code == 401 and no_key.json()["error"]["field"] == "authorization"
    assert no_key.headers["www-authenticate"] == "Bearer"
    assert wrong.status_code == 401
    assert ok.status_code == 200 and health.status_code == 200
    assert big.status_code == 413 and big.json()["error"]["field"] == "body"
    assert streamed.status_code == 413


def test_percentiles_and_experiment_snapshot():
    assert percentile([], 50) is None
    values = [float(i) for i in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99)) == (50.0, 95.0, 99.0)
    stats = ExperimentStats(["fp32", "nf4"])
    for i in range(10):
        r = ArmResult([0.5], "fp32", "fp32", "m", cache_hits=i % 2, cache_misses=1 - i % 2, batch_requests=2,
                      cache_events={"hit_local": 1} if i == 0 else {})  # fmt: skip
        stats.record_answer("fp32", "weighted", 0.01 * (i + 1), r)
    stats.record_error("fp32", 400)
    stats.record_error("fp32", 503)
    shadow = ArmResult([0.4], "nf4", "nf4", "m", 0, 1, 1)
    stats.record_shadow("nf4", "fp32", {"spearman": 1.0, "ndcg@10": 1.0, "top10_overlap": 1.0}, shadow)
    stats.record_shadow("nf4", "fp32", {"spearman": 0.5, "ndcg@10": 0.9, "top10_overlap": 0.8}, shadow)
    stats.record_shadow_failure("nf4")
    snap = stats.snapshot()
    fp32 = snap["fp32"]
    assert fp32["requests"] == 10 and fp32["errors"] == {"client": 1, "server": 1}
    assert fp32["latency_ms"] == {"window": 10, "p50": 50.0, "p95": 100.0, "p99": 100.0}
    assert fp32["image_cache"]["hit_rate"] == 0.5 and fp32["image_cache"]["events"] == {"hit_local": 1}
    assert fp32["mean_batch_requests"] == 2
    agreement = snap["nf4"]["shadow"]["agreement"]
    assert agreement["n"] == 2 and agreement["spearman"] == 0.75 and agreement["top10_overlap"] == 0.9
    assert agreement["against"] == {"fp32": 2} and snap["nf4"]["shadow"]["errors"] == 1


def test_build_job_pairs_documents_with_the_query():
    req = CohereRerankRequest.model_validate({"query": "q", "documents": ["a", "b"], "instruction": "find"}).to_internal()
    img = b"\x89PNG..."
    media = [
        ResolvedMedia(RerankItem(text="q", images=(img,)), {image_digest(img): "query.image"}),
        ResolvedMedia(RerankItem(text="a"), {}),
        ResolvedMedia(RerankItem(text="b", images=(img,)), {image_digest(img): "documents.1.image"}),
    ]
    job = build_job(req, media)
    assert [(p.query.text, p.document.text, p.document_field, p.instruction) for p in job.pairs] == [
        ("q", "a", "documents.0", "find"), ("q", "b", "documents.1", "find")]  # fmt: skip
    assert job.image_fields == {image_digest(img): "query.image"}  # first path wins
    assert job.max_tokens_per_doc == 4096


def test_replace_refs_downloads_only_requested_digests(media_server):
    url = media_server.url("/img.png")
    data = media_server.images["/img.png"]
    ref = ImageRef(digest=image_digest(data), url=url, field="documents.0.image")
    other = ImageRef(digest="f" * 64, url=media_server.url("/other.png"), field="documents.1.image")
    req = CohereRerankRequest.model_validate({"query": "q", "documents": ["a", "b"]}).to_internal()
    job = build_job(req, [ResolvedMedia(RerankItem(text="q"), {}), ResolvedMedia(RerankItem(text="a", images=(ref,)), {}),
                          ResolvedMedia(RerankItem(text="b", images=(other,)), {})])  # fmt: skip

    async def go():
        fetcher = MediaFetcher(LimitsConfig(allow_private_urls=True))
        try:
            return await replace_refs(job, {ref.digest}, fetcher)
        finally:
            await fetcher.aclose()

    fixed = asyncio.run(go())
    assert fixed.pairs[0].document.images == (data,)
    assert fixed.pairs[1].document.images == (other,)
    assert fixed.image_fields[ref.digest] == "documents.0.image"


def test_metric_definitions_are_accepted_by_ray():
    """Ray validates names, tags and bucket boundaries when a metric is created; do it here, not in a replica."""
    from serve.arm import ArmMetrics
    from serve.ingress import IngressMetrics

    arm = ArmMetrics("fp32", "fp32")
    arm.requests.inc()
    arm.cache_event("hit_local", 2)
    arm.latency.observe(0.02)
    ingress = IngressMetrics()
    ingress.shadow_agreement.observe(-0.3, tags={"arm": "nf4", "metric": "spearman"})
    ingress.requests.inc(tags={"arm": "fp32", "api": "CohereRerankResponse", "status": "200"})
