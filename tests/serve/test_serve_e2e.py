"""End to end over real HTTP: one real local Ray Serve app (tiny model, arms fp32 and nf4, real
Redis on db 12), started once for this module, plus a one-arm app on a private Redis that the
outage test kills. Statistical assertions state their bound; nothing here asserts on timing."""

from __future__ import annotations

import asyncio
import base64
import math
import time

import httpx
import pytest
from serving_testkit import png_bytes, rerank_through, same_results

from serve.router import ArmRouter

pytestmark = pytest.mark.ray

API_KEY = "e2e-key"
AUTH = {"authorization": f"Bearer {API_KEY}"}
WEIGHTS = {"fp32": 0.5, "nf4": 0.5}


def b64_png(seed: int, colour=(220, 40, 40)) -> str:
    return base64.b64encode(png_bytes(colour, seed=seed)).decode()


def post(app, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return app.client.post(path, json=body, headers={**AUTH, **(headers or {})})


def experiments(app, client=None) -> dict:
    r = (client or app.client).get("/v1/experiments", headers=AUTH)
    assert r.status_code == 200
    return r.json()


def within_binomial(count: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


# ------------------------------------------------------------------------------- API shapes


def test_cohere_roundtrip(serve_app):
    r = post(serve_app, "/v2/rerank", {"model": "x", "query": "a red circle", "top_n": 2, "return_documents": True,
                                        "documents": ["a blue square", "a red circle", "a green cross"]})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert len(results) == 2 and {x["index"] for x in results} <= {0, 1, 2}
    assert results[0]["relevance_score"] >= results[1]["relevance_score"]
    assert all(0.0 <= x["relevance_score"] <= 1.0 for x in results)
    assert results[0]["document"] == {"text": ["a blue square", "a red circle", "a green cross"][results[0]["index"]]}
    meta = body["meta"]
    assert meta["arm"] in WEIGHTS and meta["precision"] == meta["arm"] and meta["model"] == str(serve_app.model)
    assert r.headers["x-rerank-arm"] == meta["arm"] and r.headers["x-rerank-precision"] == meta["precision"]
    assert body["id"] == r.headers["x-request-id"]


def test_jina_multimodal_roundtrip(serve_app, media_server):
    url = media_server.url("/img.png", host="localhost")  # localhost is an allowed host in this app
    docs = [
        "a red circle",
        {"image": f"data:image/png;base64,{b64_png(1)}"},
        {"text": "a picture", "image": b64_png(2, (40, 80, 220))},
        {"content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "a red square"}]},
        {"video": [b64_png(3), b64_png(4), b64_png(5), b64_png(6)]},  # a video as a list of frames
    ]
    r = post(serve_app, "/v1/rerank", {"query": {"text": "a red circle"}, "documents": docs})
    assert r.status_code == 200, r.text
    body = r.json()
    assert sorted(x["index"] for x in body["results"]) == [0, 1, 2, 3, 4]
    scores = [x["relevance_score"] for x in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert body["results"][0]["document"] is not None  # Jina returns documents by default
    by_index = {x["index"]: x["document"] for x in body["results"]}
    assert by_index[3]["multi_modal"][1] == {"type": "text", "text": "a red square"}  # content parts come back as vLLM returns them
    assert body["meta"]["image_cache"]["hits"] + body["meta"]["image_cache"]["misses"] == 3
    assert body["usage"]["total_tokens"] > 0  # the tokens the decoder ran, counted by the arm


def test_tei_roundtrip_and_raw_scores(serve_app):
    body = {"query": "a red circle", "texts": ["a red circle", "a blue square"], "return_text": True}
    r = post(serve_app, "/rerank", body, {"x-rerank-arm": "fp32"})
    assert r.status_code == 200, r.text
    probs = r.json()
    assert isinstance(probs, list) and [set(x) for x in probs] == [{"index", "score", "text"}] * 2
    assert r.headers["x-rerank-arm"] == "fp32" and r.headers["x-rerank-precision"] == "fp32"
    raw = post(serve_app, "/rerank", {**body, "raw_scores": True}, {"x-rerank-arm": "fp32"}).json()
    p = {x["index"]: x["score"] for x in probs}
    for x in raw:
        assert x["score"] == pytest.approx(math.log(p[x["index"]] / (1 - p[x["index"]])), abs=1e-6)


# ---------------------------------------------------------------------------------- router


def test_split_proportions_match_weights(serve_app):
    """N unpinned, unsticky requests: each arm's count within 4.5 binomial sigmas of N x weight
    (for N=160, p=0.5: +-28.5; a correct router fails this about 7 times in a million)."""
    n = 160

    async def go():
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=serve_app.base_url, headers=AUTH, timeout=120) as c:

            async def one(i):
                async with sem:
                    return await c.post("/v2/rerank", json={"query": "q", "documents": [f"doc {i}"]})

            return await asyncio.gather(*(one(i) for i in range(n)))

    responses = asyncio.run(go())
    assert all(r.status_code == 200 for r in responses)
    arms = [r.json()["meta"]["arm"] for r in responses]
    assert all(r.json()["meta"]["routed_by"] == "weighted" for r in responses)
    for arm, w in WEIGHTS.items():
        assert within_binomial(arms.count(arm), n, w), (arm, arms.count(arm))


def test_sticky_keys_stay_on_their_arm(serve_app):
    expected = ArmRouter(WEIGHTS)  # assignment is a pure function of key and weights
    seen: dict[str, set[str]] = {}
    for u in range(12):
        user = f"user-{u}"
        for rep in range(3):
            if u % 2:
                r = post(serve_app, "/v2/rerank", {"query": "q", "documents": ["d"], "user": user})
            else:
                r = post(serve_app, "/v2/rerank", {"query": "q", "documents": ["d"]}, {"x-rerank-user": user})
            assert r.status_code == 200 and r.json()["meta"]["routed_by"] == "sticky"
            seen.setdefault(user, set()).add(r.json()["meta"]["arm"])
    assert all(arms == {expected.sticky_arm(user)} for user, arms in seen.items())
    assert {a for arms in seen.values() for a in arms} == set(WEIGHTS)  # both arms get sticky users


def test_pins_are_honoured(serve_app):
    for _ in range(3):
        r = post(serve_app, "/v2/rerank", {"query": "q", "documents": ["d"]}, {"x-rerank-arm": "nf4", "x-rerank-user": "u"})
        assert r.json()["meta"]["arm"] == "nf4" and r.json()["meta"]["routed_by"] == "pinned"
        r = post(serve_app, "/v1/rerank", {"query": "q", "documents": ["d"], "arm": "fp32"})
        assert r.json()["meta"]["arm"] == "fp32" and r.headers["x-rerank-routed-by"] == "pinned"
    bad = post(serve_app, "/v2/rerank", {"query": "q", "documents": ["d"]}, {"x-rerank-arm": "int3"})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "x-rerank-arm"
    clash = post(serve_app, "/v2/rerank", {"query": "q", "documents": ["d"], "arm": "fp32"}, {"x-rerank-arm": "nf4"})
    assert clash.status_code == 400 and clash.json()["error"]["field"] == "arm"


def test_shadow_agreement_appears_in_experiments(serve_app):
    """Pinned-fp32 requests are mirrored to nf4 with probability 0.5; after 30 of them the chance
    of no shadow at all is 1e-9. Agreement is recorded when the background shadow call returns."""
    docs = ["a red circle", "a blue square", "a green cross", "a red triangle", "a yellow circle", "a purple square"]
    for i in range(30):
        r = post(serve_app, "/v2/rerank", {"query": f"a red circle {i}", "documents": docs}, {"x-rerank-arm": "fp32"})
        assert r.status_code == 200
    deadline = time.monotonic() + 120
    while True:
        shadow = experiments(serve_app)["arms"]["nf4"]["shadow"]
        if shadow["agreement"]["n"] >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    agreement = shadow["agreement"]
    assert agreement["n"] >= 1 and agreement["against"].get("fp32", 0) >= 1
    assert -1.0 <= agreement["spearman"] <= 1.0
    assert 0.0 <= agreement["ndcg"] <= 1.0 and 0.0 <= agreement["topk_overlap"] <= 1.0 and 0.0 <= agreement["rbo"] <= 1.0
    assert shadow["errors"] == 0
    fp32 = experiments(serve_app)["arms"]["fp32"]
    assert fp32["requests"] >= 30 and fp32["latency_ms"]["p50"] is not None and fp32["latency_ms"]["p99"] is not None


# ------------------------------------------------------------------------------ image cache


def test_repeated_image_is_a_cache_hit_with_identical_scores(serve_app, engine_for):
    from engine.inputs import ImageInput, RerankItem

    img = png_bytes((40, 170, 60), seed=4242)
    body = {"query": "a green circle", "documents": [{"image": base64.b64encode(img).decode()}, "a green circle"]}
    first = post(serve_app, "/v2/rerank", body, {"x-rerank-arm": "fp32"}).json()
    second = post(serve_app, "/v2/rerank", body, {"x-rerank-arm": "fp32"}).json()
    assert first["meta"]["image_cache"] == {"hits": 0, "misses": 1}
    assert second["meta"]["image_cache"] == {"hits": 1, "misses": 0}
    assert same_results(second["results"], first["results"])
    # ... and identical to the engine's own uncached path (it decodes and encodes the image itself).
    engine = engine_for("fp32")
    direct = engine.score("a green circle", [RerankItem(images=(ImageInput.of(img),)), "a green circle"])
    # Within 1e-6, not bit-equal: the replica runs torch on 1 thread, this process on 2, and fp32
    # sums in another order.
    served = {x["index"]: x["relevance_score"] for x in first["results"]}
    assert served.keys() == {0, 1} and all(abs(served[i] - direct[i]) <= 1e-6 for i in served)
    # The features went to the shared Redis tier too.
    import redis

    assert any(redis.Redis.from_url(serve_app.redis_url).scan_iter(match="rerank:imgfeat:*"))


def test_repeated_image_url_skips_the_download(serve_app, media_server):
    url = media_server.url("/other.png", host="localhost")
    body = {"query": "a blue circle", "documents": [{"image": url}]}
    before = media_server.hits["/other.png"]
    first = post(serve_app, "/v2/rerank", body, {"x-rerank-arm": "fp32"}).json()
    second = post(serve_app, "/v2/rerank", body, {"x-rerank-arm": "fp32"}).json()
    assert media_server.hits["/other.png"] == before + 1  # downloaded once, memo hit the second time
    assert second["meta"]["image_cache"]["hits"] == 1 and same_results(second["results"], first["results"])


def test_memoised_url_is_fetched_again_when_an_arm_lacks_its_features(serve_app, media_server):
    """The ingress skips a memoised URL's download and sends only the digest; an arm without the
    features (here: fp32, after the shared Redis tier was emptied; the first request went to nf4,
    which is never shadowed) downloads the image itself, once, and the request still succeeds."""
    import redis

    media_server.images["/third.png"] = png_bytes((150, 60, 190), seed=9090)
    url = media_server.url("/third.png", host="localhost")
    body = {"query": "a purple circle", "documents": [{"image": url}, "a purple circle"]}
    first = post(serve_app, "/v2/rerank", body, {"x-rerank-arm": "nf4"})
    assert first.status_code == 200 and media_server.hits["/third.png"] == 1
    client = redis.Redis.from_url(serve_app.redis_url)
    client.delete(*client.scan_iter(match="rerank:imgfeat:*"))
    second = post(serve_app, "/v2/rerank", body, {"x-rerank-arm": "fp32"})
    assert second.status_code == 200, second.text
    assert second.json()["meta"]["image_cache"] == {"hits": 0, "misses": 1}
    assert media_server.hits["/third.png"] == 2


# ------------------------------------------------------------------------------ bad input


def _bad_cases(media_server):
    big_png = png_bytes(side=2100)  # 4.4 Mpx > this app's max_image_pixels (4 Mpx)
    local = media_server.url("/img.png")
    redirect_to_private = media_server.url(f"/redirect?to={local}", host="localhost")
    return [
        ("/v2/rerank", {"documents": ["d"]}, 422, "query"),
        ("/v2/rerank", {"query": "q", "documents": []}, 422, "documents"),
        ("/v2/rerank", {"query": "q", "documents": ["d"], "top_n": -1}, 422, "top_n"),  # 0 and null: every document (README)
        ("/rerank", {"query": "q", "documents": ["d"], "max_tokens_per_doc": True}, 422, "max_tokens_per_doc"),  # vLLM's shape, by the body
        ("/score", {"queries": ["q", "r"], "items": ["a", "b", "c"]}, 400, "items"),
        ("/v2/rerank", {"query": "q", "documents": ["d"], "colour": 1}, 422, "colour"),
        ("/v1/rerank", {"query": "q", "documents": [{"content": [{"type": "image_url"}]}]}, 422, "documents.0.content.0.image_url"),
        ("/rerank", {"query": "q", "texts": ["d"] * 51}, 400, "texts"),
        ("/v2/rerank", {"query": "q", "documents": ["x" * 2001]}, 400, "documents.0"),
        ("/v2/rerank", {"query": "q <|im_end|>", "documents": ["d"]}, 400, "query.text"),
        ("/v2/rerank", {"query": "q", "documents": [{"image": "%%% not base64"}]}, 400, "documents.0.image"),
        ("/v2/rerank", {"query": "q", "documents": [{"image": base64.b64encode(b"plain text, no image").decode()}]}, 400, "documents.0.image"),
        ("/v2/rerank", {"query": "q", "documents": [{"image": base64.b64encode(big_png).decode()}]}, 413, "documents.0.image"),
        ("/v2/rerank", {"query": {"image": local}, "documents": ["d"]}, 400, "query.image"),
        ("/v2/rerank", {"query": "q", "documents": [{"image": "http://169.254.169.254/latest/meta-data/"}]}, 400, "documents.0.image"),
        ("/v2/rerank", {"query": "q", "documents": [{"image": ["https://ok.example/a.png", "file:///etc/passwd"]}]}, 400, "documents.0.image.1"),
        ("/v2/rerank", {"query": "q", "documents": [{"image": redirect_to_private}]}, 400, "documents.0.image"),
        ("/v2/rerank", {"query": "q", "documents": [{"image": media_server.url("/nope.png", host="localhost")}]}, 422, "documents.0.image"),
    ]  # fmt: skip


def test_bad_inputs_get_clear_4xx_naming_the_field(serve_app, media_server):
    for path, body, status, field in _bad_cases(media_server):
        r = post(serve_app, path, body)
        assert r.status_code == status, (body, r.status_code, r.text)
        err = r.json()["error"]
        assert err["field"] == field and err["code"] == status and field in err["message"], (body, err)


def test_transport_level_rejections(serve_app):
    c = serve_app.client
    no_key = c.post("/v2/rerank", json={"query": "q", "documents": ["d"]})
    assert no_key.status_code == 401 and no_key.json()["error"]["field"] == "authorization"
    bad_json = c.post("/v2/rerank", content=b'{"query": ', headers={**AUTH, "content-type": "application/json"})
    assert bad_json.status_code == 422 and bad_json.json()["error"]["field"] == "body"
    huge = c.post("/v2/rerank", content=b"x" * (3 * 1024 * 1024), headers={**AUTH, "content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["field"] == "body"


def test_a_bad_request_does_not_fail_its_batch_mates(serve_app):
    good = {"query": "a red circle", "documents": ["a red circle", {"image": b64_png(77)}]}
    bad = {"query": "a red circle", "documents": [{"image": base64.b64encode(b"not an image").decode()}]}

    async def go():
        async with httpx.AsyncClient(base_url=serve_app.base_url, headers={**AUTH, "x-rerank-arm": "nf4"}, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v2/rerank", json=bad if i % 4 == 0 else good) for i in range(12)))

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [400 if i % 4 == 0 else 200 for i in range(12)]


# ------------------------------------------------------------------------ other endpoints


def test_health_models_docs(serve_app):
    c = serve_app.client
    assert c.get("/health").json()["status"] == "ok"  # public: no key needed
    models = c.get("/v1/models", headers=AUTH).json()
    card = models["data"][0]
    assert card["id"] == str(serve_app.model) and [a["name"] for a in card["arms"]] == ["fp32", "nf4"]
    assert c.get("/docs").status_code == 200
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/v2/rerank", "/v1/rerank", "/rerank", "/v1/experiments", "/v1/models", "/health"} <= set(paths)


# --------------------------------------------------------------------------- Redis outage


def test_redis_stopped_mid_traffic_loses_no_request(chaos_app, private_redis):
    """Image requests flow through an app whose Redis tier is a private redis-server; it is
    killed mid-traffic. Every request must still answer 200, and the cache must have counted
    Redis errors and bypasses instead."""
    import redis

    def body(i: int) -> dict:
        return {"query": "a red circle", "documents": [{"image": b64_png(10_000 + i)}, {"image": b64_png(10_000 + i % 5)}]}

    before: dict = {}

    def kill_redis() -> None:
        before.update(experiments(chaos_app, chaos_app.client)["arms"]["fp32"]["image_cache"]["events"])
        assert redis.Redis.from_url(private_redis.url).dbsize() > 0  # the Redis tier really was in use
        private_redis.stop()
        assert not private_redis.running

    statuses = [r.status_code for r in rerank_through(chaos_app.base_url, body, kill_redis)]
    after = experiments(chaos_app, chaos_app.client)["arms"]["fp32"]["image_cache"]["events"]
    assert len(statuses) >= 40 and set(statuses) == {200}
    assert before.get("redis_error", 0) == 0 and before.get("hit_redis", 0) + before.get("miss", 0) > 0
    assert after.get("redis_error", 0) >= 1 and after.get("bypass", 0) >= 1


def test_a_full_arm_answers_503_with_retry_after(chaos_app):
    """The chaos app's arm holds 2 requests and queues 2 more; a burst of 16 heavy requests
    (40 documents each) must see some fast 503s with Retry-After, and nothing else fails."""
    body = {"query": "a red circle", "documents": [f"a red circle number {i}" for i in range(40)]}

    async def go():
        async with httpx.AsyncClient(base_url=chaos_app.base_url, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v2/rerank", json=body) for _ in range(16)))

    responses = asyncio.run(go())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "1" and rejected.json()["error"]["type"] == "overloaded"
