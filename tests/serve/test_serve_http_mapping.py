"""The one exception -> HTTP mapping (`serve.errors`), the API-key / body-size guard
(`serve.guard`, in-process ASGI) and the
request -> engine request glue (`MediaFetcher.resolve_request`; an arm that lacks the features of
an image sent by digest only says so, and the fetcher downloads it). No Ray cluster needed."""

from __future__ import annotations

import asyncio
import base64
import json
import logging

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from serving_testkit import png_bytes
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import ImageDecodeError, ImageTooLarge, InputError
from engine.inputs import ImageInput, RerankItem, ScoreRequest, sha256_hex
from serve.cache import FeatureCache
from serve.config import CacheConfig, LimitsConfig
from serve.errors import (
    ERROR_TABLE,
    ArmDown,
    BodyTimeout,
    DeadlineExceeded,
    Draining,
    FeaturesMissing,
    FetchError,
    ForbiddenURL,
    RequestTooLarge,
    ServiceUnavailable,
    Unauthorized,
    classify,
    error_response,
    log_if_internal,
)
from serve.fetch import MediaFetcher
from serve.guard import Guard, GuardMiddleware
from serve.protocol import CohereRerankRequest, JinaRerankRequest


def body(resp) -> dict:
    return json.loads(resp.body)["error"]


@pytest.mark.parametrize(
    "exc, status, kind, field",
    [
        (InputError("documents.3.image", "bad"), 400, "invalid_input", "documents.3.image"),
        (ForbiddenURL("query.image", "loopback"), 400, "forbidden_url", "query.image"),
        (FetchError("documents.0.image", "HTTP 404"), 422, "fetch_error", "documents.0.image"),
        (ImageTooLarge("documents.1.image", "too big"), 413, "too_large", "documents.1.image"),
        (RequestTooLarge("body", "over the limit"), 413, "too_large", "body"),
        (Unauthorized("authorization", "no key"), 401, "unauthorized", "authorization"),
        (ImageDecodeError("documents.2.image", "not an image"), 400, "image_decode_error", "documents.2.image"),
        (StarletteHTTPException(404, "Not Found"), 404, "http_error", None),
        (StarletteHTTPException(405, "Method Not Allowed"), 405, "http_error", None),
        (ServiceUnavailable("busy"), 503, "overloaded", None),
        (BackPressureError(num_queued_requests=9, max_queued_requests=8), 503, "overloaded", None),
        (TimeoutError(), 504, "timeout", None),
        (BodyTimeout("body", "the request body did not arrive within 10s"), 408, "body_timeout", "body"),
        (ArmDown("arm 'a' is out of service"), 503, "overloaded", None),
        (DeadlineExceeded("the request's deadline passed"), 503, "overloaded", None),
        (Draining("the service is draining"), 503, "overloaded", None),
    ],
)
def test_typed_errors_map_to_status_and_field(exc, status, kind, field):
    resp = error_response(exc, "rid-1")
    err = body(resp)
    assert resp.status_code == status and err["code"] == status and err["type"] == kind and err["field"] == field
    assert classify(exc) == (status, kind)  # the one table decides both
    if field is not None:
        assert err["message"].startswith(f"{field}: ")
    assert (resp.headers.get("retry-after") == "1") == (status == 503)
    assert (resp.headers.get("www-authenticate") == "Bearer") == (status == 401)


def test_error_table_kinds_are_distinct_per_status_and_input_errors_come_before_their_base():
    kinds = {kind for _, _, kind in ERROR_TABLE}
    assert kinds == {"unauthorized", "too_large", "forbidden_url", "fetch_error", "image_decode_error", "invalid_input", "invalid_request",
                     "http_error", "overloaded", "timeout", "body_timeout", "forbidden", "not_found", "conflict"}  # fmt: skip
    first = {kind: i for i, (_, _, kind) in reversed(list(enumerate(ERROR_TABLE)))}
    for specific in ("unauthorized", "too_large", "forbidden_url", "fetch_error", "image_decode_error", "body_timeout", "forbidden", "not_found", "conflict"):
        assert first[specific] < first["invalid_input"]  # else every InputError subclass would be "invalid_input"
    assert classify(RuntimeError("boom")) == (500, "internal_error")


def test_unexpected_errors_are_500_without_leaking(caplog):
    exc = RuntimeError("secret path /etc/shadow and token abc")
    resp = error_response(exc, "rid-2")
    err = body(resp)
    assert resp.status_code == 500 and err["type"] == "internal_error"
    assert "secret" not in resp.body.decode() and "rid-2" in err["message"]
    # Only internal errors are logged (with the request id and the traceback), never client errors.
    with caplog.at_level(logging.ERROR, logger="serve.errors"):
        assert log_if_internal(resp, exc, "rid-2") is resp
        client = InputError("documents.0", "bad")
        log_if_internal(error_response(client), client, "rid-3")
    assert [r.getMessage() for r in caplog.records] == ["internal error (request rid-2)"]
    assert caplog.records[0].exc_info[1] is exc


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
    try:  # a content part's type is not repeated in the field it names
        CohereRerankRequest.model_validate({"query": "q", "documents": [{"content": [{"type": "text", "text": "t"}, {"type": "image"}]}]})
    except ValidationError as e:
        part = [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
    assert body(error_response(RequestValidationError(part)))["field"] == "documents.0.content.1.image"
    bad_json = RequestValidationError([{"type": "json_invalid", "loc": ("body", 5), "msg": "JSON decode error", "ctx": {"error": "Expecting value"}}])
    err = body(error_response(bad_json))
    assert err["field"] == "body" and "not valid JSON" in err["message"]


def _guarded_app(keys=("k1", "k2"), max_bytes=100, admin_keys=()) -> FastAPI:
    app = FastAPI()
    guard = Guard(api_keys=keys, max_request_bytes=max_bytes, admin_keys=admin_keys)
    app.add_middleware(GuardMiddleware, guard_of=lambda: guard)

    @app.get("/v1/experiments")
    async def results():
        return {"ok": True}

    @app.post("/v1/experiments/stop")
    async def stop(request: Request):
        return {"who": request.state.admin}

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


def test_guard_admin_keys():
    async def go(admin_keys):
        transport = httpx.ASGITransport(app=_guarded_app(admin_keys=admin_keys))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return [
                await c.post("/v1/experiments/stop", headers={"authorization": f"Bearer {key}"})
                for key in ("k1", "root-key", "nope")
            ] + [await c.get("/v1/experiments", headers={"authorization": f"Bearer {key}"}) for key in ("k1", "root-key", "nope")]

    client, admin, wrong, read_client, read_admin, read_wrong = asyncio.run(go((("ops", "root-key"),)))
    assert client.status_code == 403 and wrong.status_code == 403  # a client key is no admin key
    assert admin.status_code == 200 and admin.json() == {"who": "ops"}  # the key's name is who changed it
    assert read_client.status_code == 200 and read_admin.status_code == 200 and read_wrong.status_code == 401
    none = asyncio.run(go(()))  # no admin key configured: every admin call is refused
    assert [r.status_code for r in none[:3]] == [403, 403, 403] and "no admin key" in none[0].json()["error"]["message"]


def test_score_request_keeps_the_query_documents_instruction_and_each_images_field():
    img = png_bytes((220, 40, 40), seed=31)
    b64 = base64.b64encode(img).decode()
    req = CohereRerankRequest.model_validate(
        {"query": {"text": "q", "image": b64}, "documents": ["a", {"text": "b", "image": b64}], "instruction": "find"}
    ).to_internal()

    async def go(*reqs):
        fetcher = MediaFetcher(LimitsConfig())
        try:
            return [await fetcher.resolve_request(r) for r in reqs]
        finally:
            await fetcher.aclose()

    jina = JinaRerankRequest.model_validate({"query": "q", "documents": ["a"]}).to_internal()
    job, plain = asyncio.run(go(req, jina))
    assert isinstance(job, ScoreRequest)
    assert (job.query.text, job.query.field) == ("q", "query")
    assert [(d.text, d.field) for d in job.documents] == [("a", "documents.0"), ("b", "documents.1")]
    assert (job.instruction, job.max_tokens_per_doc) == ("find", 4096)
    # The same image in two places is hashed to one digest but keeps the field it was given at each.
    assert list(job.images()) == [ImageInput.of(img, "query.image"), ImageInput.of(img, "documents.1.image")]
    assert {i.digest for i in job.images()} == {sha256_hex(img)}
    assert plain == ScoreRequest.of("q", ["a"]) and plain.max_tokens_per_doc is None and plain.instruction is None


def _digest_only(data: bytes, field: str, url: str) -> ImageInput:
    return ImageInput(sha256_hex(data), None, field, url)


def _arm_features(engine, request: ScoreRequest, cached: list[ImageInput]) -> dict:
    """The arm replica's own `_features` (cache lookup; digest-only images no tier has are
    refused), on a real in-process cache, without Ray or a second model load."""
    from serve.arm import ArmReplica

    arm = object.__new__(ArmReplica.func_or_class)
    arm.engine, arm.cache = engine, FeatureCache(CacheConfig())

    async def go():
        await arm.cache.put_many(engine.encode_images(cached))
        return await arm._features(request)

    return asyncio.run(go())


def _with_bytes(request: ScoreRequest, digests: set[str]) -> ScoreRequest:
    async def go():
        fetcher = MediaFetcher(LimitsConfig(allow_private_urls=True))
        try:
            return await fetcher.with_bytes(request, digests)
        finally:
            await fetcher.aclose()

    return asyncio.run(go())


def test_digest_only_images_an_arm_lacks_are_named_and_fetched_once_per_url_by_the_ingress(media_server, engine_for):
    """An image the ingress sent by digest (a memoised URL) is scored from cached features when the
    arm has them; when it has not, the arm names it (`FeaturesMissing`) and the ingress's fetcher
    downloads it (once per URL) and nothing else; images with bytes stay."""
    engine = engine_for("fp32")
    lacking_url, cached_url = media_server.url("/img.png"), media_server.url("/other.png")
    lacking_data, cached_data = media_server.images["/img.png"], media_server.images["/other.png"]
    inline = ImageInput.of(png_bytes((40, 80, 220), seed=32), "documents.2.image")
    request = ScoreRequest.of(
        RerankItem(text="a red circle", images=(_digest_only(lacking_data, "query.image", lacking_url),)),
        [RerankItem(images=(_digest_only(lacking_data, "documents.0.image", lacking_url),)),
         RerankItem(images=(_digest_only(cached_data, "documents.1.image", cached_url),)),
         RerankItem(images=(inline,))],
    )  # fmt: skip
    cached = [ImageInput.of(cached_data, "documents.1.image")]
    with pytest.raises(FeaturesMissing) as missing:
        _arm_features(engine, request, cached)
    assert missing.value.digests == [sha256_hex(lacking_data)]
    hits = dict(media_server.hits)
    fixed = _with_bytes(request, set(missing.value.digests))
    assert media_server.hits["/img.png"] == hits.get("/img.png", 0) + 1  # two references, one download
    assert media_server.hits.get("/other.png", 0) == hits.get("/other.png", 0)  # not named: not fetched
    downloaded = ImageInput.of(lacking_data, "documents.0.image", lacking_url)
    assert fixed.documents[0].images == (downloaded,)
    (query_image,) = fixed.query.images
    assert (query_image.digest, query_image.data, query_image.url, query_image.field) == (downloaded.digest, lacking_data, lacking_url, "query.image")
    assert fixed.documents[1].images == request.documents[1].images  # still digest-only
    assert fixed.documents[2].images == (inline,)
    assert (fixed.query.text, [d.field for d in fixed.documents]) == ("a red circle", ["documents.0", "documents.1", "documents.2"])
    features = _arm_features(engine, fixed, cached)
    assert list(features) == [engine.feature_spec.cache_key(sha256_hex(cached_data))]
    # The fixed request scores as if every image had been sent with its bytes.
    with_bytes = ScoreRequest.of(
        RerankItem(text="a red circle", images=(ImageInput.of(lacking_data),)),
        [RerankItem(images=(ImageInput.of(d),)) for d in (lacking_data, cached_data)] + [RerankItem(images=(inline,))],
    )
    scores = engine.forward([engine.prepare(fixed, features)])[0].scores
    assert scores == pytest.approx(engine.forward([engine.prepare(with_bytes)])[0].scores, abs=1e-5)
    # Nothing digest-only: nothing to look up, nothing missing.
    assert _arm_features(engine, ScoreRequest.of("q", [RerankItem(images=(inline,))]), []) == {}


def test_metric_definitions_are_accepted_by_ray():
    """Ray validates names, tags and bucket boundaries when a metric is created; do it here, not in a replica."""
    from serve.arm import ArmMetrics
    from serve.ingress_metrics import IngressMetrics

    arm = ArmMetrics("fp32", "fp32")
    arm.requests.inc()
    arm.cache_event("hit_local", 2)
    arm.latency.observe(0.02)
    ingress = IngressMetrics()
    ingress.shadow_agreement.observe(-0.3, tags={"arm": "nf4", "against": "fp32", "metric": "spearman"})
    ingress.requests.inc(tags={"arm": "fp32", "api": "CohereRerankResponse", "status": "200"})
