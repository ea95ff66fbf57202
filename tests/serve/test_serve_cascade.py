"""Cascade arms over real Serve and real HTTP (`cascade_app`: arms fp32 and nf4, the cascade `casc`
= nf4 on every document, then fp32 on its top 3; `canary_app` for a cascade with a broken arm).
A cascade's answer is what its two arms give pinned alone, composed as serve/cascade.py says
(composed here again, by hand); it is routed and pinned like an arm, each of its stages hits or
misses the score cache under its own arm, experiments report its pairs, cost and agreement with
fp32 alone, and a bad input gets the arms' own error. (A cascade with an arm down:
test_serve_canary.py, whose app has one.)"""

from __future__ import annotations

import base64
import time

import pytest
from test_cascade import by_hand

pytestmark = pytest.mark.ray

BYPASS = {"x-rerank-score-cache": "bypass"}
K = 3


def documents(tag: str, n: int = 9) -> list[str]:
    colours, shapes = ("red", "blue", "green"), ("circle", "square", "cross")
    return [f"a {colours[i % 3]} {shapes[(i // 3) % 3]} {tag} {i}" for i in range(n)]


def rerank(app, body: dict, arm: str | None = None, headers: dict | None = None):
    pin = {"x-rerank-arm": arm} if arm else {}
    return app.client.post("/v2/rerank", json=body, headers=pin | (headers or {}))


def scores_of(answer: dict) -> dict[int, float]:
    return {r["index"]: r["relevance_score"] for r in answer["results"]}


def test_a_cascade_answers_what_its_two_arms_give_pinned_alone_composed(cascade_app):
    body = {"query": "red circle", "documents": documents("pinned")}
    alone = {}
    for arm in ("nf4", "fp32"):
        r = rerank(cascade_app, body, arm, BYPASS)
        assert r.status_code == 200 and r.headers["x-rerank-arm"] == arm, r.text
        alone[arm] = scores_of(r.json())
    n = len(body["documents"])
    nf4 = [alone["nf4"][i] for i in range(n)]
    top = sorted(range(n), key=lambda i: (-nf4[i], i))[:K]
    want_scores, want_order = by_hand(nf4, {i: alone["fp32"][i] for i in top})

    r = rerank(cascade_app, body, "casc", BYPASS)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert r.headers["x-rerank-arm"] == "casc" and r.headers["x-rerank-precision"] == "nf4>fp32"
    assert [x["index"] for x in answer["results"]] == want_order
    got = scores_of(answer)
    assert max(abs(got[i] - want_scores[i]) for i in range(n)) <= 1e-6, (got, want_scores)
    meta = answer["meta"]
    assert meta["arm"] == "casc" and meta["routed_by"] == "pinned"
    assert meta["cascade"] == {"first": "nf4", "then": "fp32", "k": K, "then_scored": sorted(top)}, meta
    # top_n cuts the composed order; usage counts both arms' tokens.
    cut = rerank(cascade_app, body | {"top_n": 2}, "casc", BYPASS).json()
    assert [x["index"] for x in cut["results"]] == want_order[:2]
    assert cut["usage"]["prompt_tokens"] > rerank(cascade_app, body, "fp32", BYPASS).json()["usage"]["prompt_tokens"]


def test_a_cascade_is_routed_like_an_arm(cascade_app):
    body = {"query": "blue square", "documents": documents("routed", 4)}
    weighted = rerank(cascade_app, body)
    sticky = rerank(cascade_app, body, headers={"x-rerank-user": "user-7"})
    for r, why in ((weighted, "weighted"), (sticky, "sticky")):  # the arms have weight 0: the cascade takes the routed traffic
        assert r.status_code == 200 and r.json()["meta"]["arm"] == "casc" and r.json()["meta"]["routed_by"] == why, r.text
    unknown = rerank(cascade_app, body, "nope")
    assert unknown.status_code == 400 and "casc" in unknown.json()["error"]["message"], unknown.text
    cards = {a["name"]: a for a in cascade_app.client.get("/v1/models").json()["data"][0]["arms"]}
    assert cards["casc"]["precision"] == "nf4>fp32" and cards["casc"]["weight"] == 1.0 and cards["casc"]["replicas"] is None
    state = cascade_app.client.get("/health").json()["arm_state"]
    assert state == {"fp32": "up", "nf4": "up", "casc": "up"}, state


def test_each_stage_hits_the_score_cache_under_its_own_arm(cascade_app):
    body = {"query": "green cross", "documents": documents("cached")}
    n = len(body["documents"])
    fresh = rerank(cascade_app, body, "casc").json()["meta"]["score_cache"]
    assert fresh == {"hits": 0, "misses": n + K}, fresh  # nf4 scored every pair, fp32 its top 3
    # fp32 alone finds the 3 pairs the cascade's fp32 stage scored, under fp32's scorer, and scores the rest.
    alone = rerank(cascade_app, body, "fp32").json()["meta"]["score_cache"]
    assert alone == {"hits": K, "misses": n - K}, alone
    again = rerank(cascade_app, body, "casc").json()["meta"]["score_cache"]
    assert again == {"hits": n + K, "misses": 0}, again  # both stages from the cache: no arm call


def test_a_bad_input_gets_the_arms_own_error(cascade_app):
    body = {"query": "red circle", "documents": ["a red circle", {"image": base64.b64encode(b"not an image").decode()}, "a blue square"]}
    answers = {arm: rerank(cascade_app, body, arm, BYPASS) for arm in ("nf4", "fp32", "casc")}
    for arm, r in answers.items():
        assert r.status_code == 400 and r.json()["error"]["field"].startswith("documents.1"), (arm, r.text)
    assert answers["casc"].json() == answers["nf4"].json() == answers["fp32"].json()
    too_many = {"query": "q", "documents": ["d"] * 51}  # the app's max_documents is 50
    limits = [rerank(cascade_app, too_many, arm) for arm in ("nf4", "casc")]
    assert limits[0].status_code == limits[1].status_code == 400 and limits[0].json() == limits[1].json()


def test_experiments_show_the_cascade_with_its_agreement_and_cost(cascade_app):
    for i in range(6):
        assert rerank(cascade_app, {"query": f"red square {i}", "documents": documents(f"exp{i}")}).status_code == 200
    deadline = time.monotonic() + 60
    while True:  # the mirrored fp32 calls run after each answer
        casc = cascade_app.client.get("/v1/experiments").json()["arms"]["casc"]
        agreement = casc["cascade"]["agreement_with_then"]
        if agreement.get("spearman", {}).get("n", 0) >= 6 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert casc["precision"] == "nf4>fp32" and casc["requests"] >= 6
    assert agreement["spearman"]["n"] >= 6 and -1 <= agreement["spearman"]["mean"] <= 1, casc
    assert agreement["source"] == "'fp32' mirrored on the cascade's requests"
    pairs = casc["cascade"]["pairs_scored"]
    assert pairs["fp32"] > 0 and pairs["nf4"] > pairs["fp32"], casc  # the first arm scores every document, the then arm 3 a request
    cost = casc["cost_per_1000_requests"]
    assert cost is not None and cost["value"] > 0 and set(cost["by_arm"]) == {"nf4", "fp32"}, casc
    assert casc["cascade"]["degraded_answers"] == 0
    page = cascade_app.client.get("/v1/experiments/page")
    assert page.status_code == 200 and "nf4&gt;fp32" in page.text
