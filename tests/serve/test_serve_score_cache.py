"""The score cache over real HTTP, real Serve and a real redis-server (`score_cache_app`: arms fp32
and nf4, the score cache shared through a private Redis that the last test kills). Arm calls are
counted at the arm: the pairs each replica scored (`describe()["scored"]`)."""

from __future__ import annotations


import pytest
import redis

from serve.deploy_options import arm_deployment_name
from serve.score_cache import KEY_PREFIX, SCORE_CACHE_HEADER
from serving_testkit import rerank_through

pytestmark = pytest.mark.ray

APP = "scorecache"
BYPASS = {SCORE_CACHE_HEADER: "bypass"}


def scored_pairs(arm: str) -> int:
    """Pairs the arm's (one) replica has scored."""
    from ray.serve.handle import DeploymentHandle

    handle = DeploymentHandle(arm_deployment_name(arm), APP)
    handle._init(_run_router_in_separate_loop=True)  # a handle this (synchronous) test can call: its router in a thread of its own
    return handle.options(method_name="describe").remote().result(timeout_s=60)["scored"]["pairs"]


def rerank(app, query: str, docs: list[str], headers: dict | None = None) -> dict:
    r = app.client.post("/v2/rerank", json={"query": query, "documents": docs}, headers=headers or {})
    assert r.status_code == 200, r.text
    body = r.json()
    body["scores"] = [s for _, s in sorted((x["index"], x["relevance_score"]) for x in body["results"])]  # request order
    return body


def test_a_repeated_request_is_answered_from_the_cache_with_the_same_scores_and_no_arm_call(score_cache_app, private_redis):
    docs = [f"a red circle, picture {i}" for i in range(6)]
    first = rerank(score_cache_app, "red circle", docs)
    assert first["meta"]["arm"] == "fp32" and first["meta"]["score_cache"] == {"hits": 0, "misses": 6}
    before = scored_pairs("fp32")
    again = rerank(score_cache_app, "red circle", docs)
    assert scored_pairs("fp32") == before  # no arm call
    assert again["scores"] == first["scores"]  # the same numbers, bit for bit
    assert again["meta"]["score_cache"] == {"hits": 6, "misses": 0} and again["usage"]["prompt_tokens"] == 0
    results = score_cache_app.client.get("/v1/experiments").json()["arms"]["fp32"]["score_cache"]
    assert results["hits"] >= 6 and results["misses"] >= 6 and 0 < results["hit_rate"] < 1 and results["requests_without_arm_call"] >= 1
    assert len(redis.Redis.from_url(private_redis.url).keys(KEY_PREFIX + "*")) >= 6  # stored in the shared tier too


def test_a_partial_hit_sends_only_the_misses(score_cache_app):
    docs = [f"a blue square, variant {i}" for i in range(8)]
    rerank(score_cache_app, "blue square", docs[:5])  # five of the eight are cached now
    before = scored_pairs("fp32")
    mixed = rerank(score_cache_app, "blue square", [docs[6], docs[0], docs[7], docs[3], docs[5], docs[1]])
    assert scored_pairs("fp32") - before == 3  # docs 6, 7 and 5 only
    assert mixed["meta"]["score_cache"] == {"hits": 3, "misses": 3}
    # Each score is the one the arm gives the pair in a request of its own (the documents' order and
    # batch mates change a score by float noise only).
    whole = rerank(score_cache_app, "blue square", [docs[6], docs[0], docs[7], docs[3], docs[5], docs[1]], headers=BYPASS)
    assert mixed["scores"] == pytest.approx(whole["scores"], abs=1e-5)
    assert scored_pairs("fp32") - before == 3 + 6  # the bypass went to the arm whole


def test_the_bypass_header_and_its_bad_values(score_cache_app):
    docs = ["a green triangle", "a red circle"]
    rerank(score_cache_app, "green triangle", docs)
    before = scored_pairs("fp32")
    bypassed = rerank(score_cache_app, "green triangle", docs, headers=BYPASS)
    assert scored_pairs("fp32") - before == 2 and bypassed["meta"]["score_cache"] == {"hits": 0, "misses": 2}
    r = score_cache_app.client.post("/v2/rerank", json={"query": "q", "documents": ["d"]}, headers={SCORE_CACHE_HEADER: "sometimes"})
    assert r.status_code == 400 and r.json()["error"]["field"] == SCORE_CACHE_HEADER


def test_another_precision_never_reads_the_first_ones_scores(score_cache_app):
    docs = ["a yellow star", "a purple moon"]
    rerank(score_cache_app, "yellow star", ["warm-up"], headers={"x-rerank-arm": "nf4"})  # nf4 answers once: its scorer is known
    assert rerank(score_cache_app, "yellow star", docs)["meta"]["score_cache"]["misses"] == 2  # cached under fp32 now
    before = scored_pairs("nf4")
    pinned = rerank(score_cache_app, "yellow star", docs, headers={"x-rerank-arm": "nf4"})
    assert pinned["meta"]["arm"] == "nf4" and pinned["meta"]["score_cache"] == {"hits": 0, "misses": 2}
    assert scored_pairs("nf4") - before == 2


def test_redis_killed_mid_load_loses_nothing(score_cache_app, private_redis):
    """Requests drawn from a small pool (repeats: hits) flow while the Redis tier is killed: every
    request answers 200 with the scores it had before, the ingress counts Redis's faults and keeps
    answering from its LRU and the arm."""
    pool = [("white circle", [f"a white circle, copy {i}", f"a black square {i}", "a white circle"]) for i in range(5)]
    expected = [rerank(score_cache_app, q, docs, headers=BYPASS)["scores"] for q, docs in pool]

    def body(n: int) -> dict:  # every other request a new document too: a miss that must go to the arm, with Redis alive or dead
        q, docs = pool[n % len(pool)]
        return {"query": q, "documents": docs + ([f"new document {n}"] if n % 2 else [])}

    def kill_redis() -> None:
        assert redis.Redis.from_url(private_redis.url).keys(KEY_PREFIX + "*")  # the Redis tier was in use
        private_redis.stop()
        assert not private_redis.running

    responses = rerank_through(score_cache_app.base_url, body, kill_redis)
    assert len(responses) >= 40 and {r.status_code for r in responses} == {200}
    for n, r in enumerate(responses):
        scores = [x["relevance_score"] for x in sorted(r.json()["results"], key=lambda x: x["index"])]
        assert scores[:3] == pytest.approx(expected[n % len(pool)], abs=1e-5)
    events = score_cache_app.client.get("/health").json()["score_cache"]["fp32"]
    assert events["redis_error"] >= 1 and events["hit_local"] > 0
    after = rerank(score_cache_app, *pool[0])
    assert after["meta"]["score_cache"]["hits"] == 3  # the LRU still answers with Redis gone
