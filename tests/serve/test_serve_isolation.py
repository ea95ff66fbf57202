"""One client's bad input never harms another's, over real HTTP through the real app: poison
requests fail alone with a 4xx naming the field while the valid requests they were sent with all
succeed with the scores the engine gives them alone; decompression bombs are refused from their
headers with 413 naming the field and the limit."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.ray

AUTH = {"authorization": "Bearer e2e-key", "x-rerank-arm": "fp32"}


def one_bit_png(side: int, seed: int = 0) -> str:
    img = Image.new("1", (side, side), 0)
    img.putpixel((seed % side, 0), 1)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def test_poison_requests_fail_alone_in_a_crowd_of_valid_ones(serve_app, engine_for):
    poison = b'{"query": "bad \\ud800 text", "documents": ["a red circle"]}'
    valid = [{"query": f"a red circle {i % 4}", "documents": ["a red circle", "a blue square", f"doc {i}"]} for i in range(40)]

    async def burst():
        async with httpx.AsyncClient(base_url=serve_app.base_url, timeout=120, headers=AUTH) as c:
            good = [c.post("/v2/rerank", json=body) for body in valid]
            bad = [c.post("/v2/rerank", content=poison, headers={"content-type": "application/json"}) for _ in range(33)]
            return await asyncio.gather(*good, *bad)

    responses = asyncio.run(burst())
    good, bad = responses[: len(valid)], responses[len(valid) :]
    assert [r.status_code for r in good] == [200] * len(valid)
    assert {r.status_code for r in bad} == {400}
    for r in bad:
        err = r.json()["error"]
        assert err["field"] == "query.text" and "lone surrogate" in err["message"]
    engine = engine_for("fp32")
    for body, r in zip(valid, good):
        by_index = {res["index"]: res["relevance_score"] for res in r.json()["results"]}
        alone = engine.score(body["query"], body["documents"])
        assert max(abs(by_index[i] - s) for i, s in enumerate(alone)) <= 1e-5


def test_a_decompression_bomb_is_refused_with_413_naming_the_field(serve_app):
    r = serve_app.client.post(
        "/v2/rerank", headers=AUTH, json={"query": "q", "documents": ["fine", {"image": one_bit_png(8000)}]}
    )
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["field"] == "documents.1.image" and "max_image_pixels" in err["message"]


def test_a_request_over_its_pixel_budget_is_refused_with_413(serve_app):
    docs = [{"image": one_bit_png(1900, seed=i)} for i in range(40)]  # 3.6 Mpx each, 144 Mpx in all
    r = serve_app.client.post("/v2/rerank", headers=AUTH, json={"query": "q", "documents": docs})
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["field"].startswith("documents.") and "max_request_pixels" in err["message"]
    # The service is unharmed.
    ok = serve_app.client.post("/v2/rerank", headers=AUTH, json={"query": "q", "documents": ["a", "b"]})
    assert ok.status_code == 200


def test_jina_usage_counts_the_tokens_scored(serve_app):
    body = {"query": "a red circle", "documents": ["a red circle", "a blue square"]}
    one = serve_app.client.post("/v1/rerank", headers=AUTH, json=body).json()["usage"]["total_tokens"]
    body["documents"].append("a green cross")
    three = serve_app.client.post("/v1/rerank", headers=AUTH, json=body).json()["usage"]["total_tokens"]
    # The shared prefix (system turn, instruction, query) is run once: one more document costs
    # only its own tokens, far fewer than a whole pair.
    assert 0 < three - one < one / 2


def test_the_api_scores_empty_sides_as_the_engine_does(serve_app, engine_for):
    from engine.inputs import RerankItem

    body = {"query": "a red circle", "documents": [{}, {"text": ""}, "a red circle"]}
    r = serve_app.client.post("/v2/rerank", headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    by_index = {res["index"]: res["relevance_score"] for res in r.json()["results"]}
    engine = engine_for("fp32")
    alone = engine.score("a red circle", [RerankItem(), RerankItem(text=""), "a red circle"])
    assert max(abs(by_index[i] - s) for i, s in enumerate(alone)) <= 1e-5
