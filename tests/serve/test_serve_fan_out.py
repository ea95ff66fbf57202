"""Fan-out over real Serve and HTTP (serve/fan_out.py, serve/arm_calls.py): the `fanout` app's arm
`fan` (2 replicas, requests of over 500 documents split) against its arm `whole` (1 replica, no
fan-out), all fp32 on the tiny model. A 1000-document request fanned out scores as the unsplit
one (and as the engine scoring the pairs itself), both replicas do the work, `top_n` and the
returned documents are applied to the merged answer, a bad document in a chunk gives the
unsplit request's error, naming its place in the whole request, and a fanned-out request is
admitted or refused whole (arm `tight`)."""

from __future__ import annotations

import base64
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serving_testkit import png_bytes

from engine.inputs import ScoreRequest
from serve.deploy_options import arm_deployment_name

pytestmark = pytest.mark.ray

APP = "fanout"
N = 1000
QUERY = "a red circle on a white page"
WORDS = ["red", "circle", "blue", "square", "white", "page", "green", "cross", "small", "large", "dark", "round"]


def documents(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for i in range(N)]


def rerank(app, arm: str, body: dict) -> httpx.Response:
    return app.client.post("/v2/rerank", json=body, headers={"x-rerank-arm": arm})


def scores_in_order(response: httpx.Response) -> list[float]:
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    out = [float("nan")] * len(results)
    for r in results:
        out[r["index"]] = r["relevance_score"]
    return out


def replica_pairs(arm: str) -> dict[int, int]:
    """Pairs each replica of `arm` has scored (its describe(), by pid): describe is called until
    both replicas have answered (Serve picks a replica per call)."""
    from ray.serve.handle import DeploymentHandle

    handle = DeploymentHandle(arm_deployment_name(arm), APP)
    handle._init(_run_router_in_separate_loop=True)  # a handle this (synchronous) test can call: its router in a thread of its own
    describe = handle.options(method_name="describe")
    seen: dict[int, int] = {}
    for _ in range(20):
        for d in [r.result(timeout_s=30) for r in [describe.remote() for _ in range(8)]]:
            seen[d["pid"]] = d["scored"]["pairs"]
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only replicas {sorted(seen)} of arm {arm} answered describe")


def pixel_png(seed: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(side=64, seed=seed)).decode()


def test_a_fanned_out_request_scores_as_the_unsplit_one_and_both_replicas_score_it(fan_out_app, engine_for):
    docs = documents()
    body = {"query": QUERY, "documents": docs}
    before = replica_pairs("fan")
    fanned = scores_in_order(rerank(fan_out_app, "fan", body))
    after = replica_pairs("fan")
    whole = scores_in_order(rerank(fan_out_app, "whole", body))
    assert len(fanned) == len(whole) == N
    assert max(abs(a - b) for a, b in zip(fanned, whole)) <= 1e-5
    # Each replica scored one chunk: Serve's handle gave the two chunks two replicas.
    assert sorted(after[pid] - before.get(pid, 0) for pid in after) == [500, 500]
    # The pairs as the engine scores them itself, on both sides of the cut among them.
    sample = sorted({0, 1, 499, 500, 501, 998, 999, *random.Random(5).sample(range(N), 13)})
    direct = engine_for("fp32").score_requests([ScoreRequest.of(QUERY, [docs[i] for i in sample])])[0].scores
    assert max(abs(fanned[i] - s) for i, s in zip(sample, direct)) <= 1e-5


def test_top_n_and_returned_documents_apply_to_the_merged_answer(fan_out_app):
    docs = documents(seed=1)
    whole = scores_in_order(rerank(fan_out_app, "whole", {"query": QUERY, "documents": docs}))
    r = rerank(fan_out_app, "fan", {"query": QUERY, "documents": docs, "top_n": 5, "return_documents": True})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 5
    assert [x["relevance_score"] for x in results] == sorted((x["relevance_score"] for x in results), reverse=True)
    sixth = sorted(whole, reverse=True)[5]
    for x in results:  # the best five of all 1000, whichever chunk scored them
        assert abs(x["relevance_score"] - whole[x["index"]]) <= 1e-5 and x["relevance_score"] >= sixth - 1e-5
        assert x["document"] == {"text": docs[x["index"]]}


def _bad_at_700(case: str) -> tuple[dict, int, str]:
    """(body, status, field) of a 1000-document request with a bad document in `fan`'s second chunk."""
    docs: list = documents(seed=2)
    if case == "reserved token":  # refused by the arm: in the chunk, by the engine's own check
        docs[700] = "look: <|im_start|> here"
        return {"query": QUERY, "documents": docs}, 400, "documents.700.text"
    if case == "undecodable image":
        docs[700] = {"image": "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 40).decode()}
        return {"query": QUERY, "documents": docs}, 400, "documents.700.image"
    if case == "text over max_text_chars":  # the edge's limits, on the whole request
        docs[700] = "x" * 2001
        return {"query": QUERY, "documents": docs}, 400, "documents.700"
    # Twelve images of 4096 pixels against a budget of ten: six in each chunk, over only together.
    at = [50 + 80 * k for k in range(12)]
    for k, i in enumerate(at):
        docs[i] = {"image": pixel_png(k)}
    return {"query": QUERY, "documents": docs}, 413, f"documents.{at[10]}.image"


@pytest.mark.parametrize("case", ["reserved token", "undecodable image", "text over max_text_chars", "request over max_request_pixels"])
def test_a_bad_document_in_a_chunk_gives_the_unsplit_request_s_error(fan_out_app, case):
    body, status, field = _bad_at_700(case)
    fanned, whole = rerank(fan_out_app, "fan", body), rerank(fan_out_app, "whole", body)
    assert (fanned.status_code, whole.status_code) == (status, status), (fanned.text, whole.text)
    assert fanned.json() == whole.json()
    assert fanned.json()["error"]["field"] == field
    ok = rerank(fan_out_app, "fan", {"query": QUERY, "documents": documents()[:600]})  # the arm serves on
    assert ok.status_code == 200, ok.text


def test_a_fanned_out_request_is_admitted_or_refused_whole(fan_out_app):
    """`tight` admits no work that would wait (queue budget 1 ms). A lone fanned-out request is
    admitted whole: its second chunk is not judged as waiting behind its first. Of two sent at
    once, one is answered and the other refused before any of its chunks reaches a replica."""
    warm = rerank(fan_out_app, "tight", {"query": QUERY, "documents": documents()[:20]})
    assert warm.status_code == 200, warm.text  # the ingress knows the arm's rate from here on
    body = {"query": QUERY, "documents": documents(seed=3)}
    lone = rerank(fan_out_app, "tight", body)
    assert lone.status_code == 200, lone.text
    before = replica_pairs("tight")
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: rerank(fan_out_app, "tight", body), range(2)))
    after = replica_pairs("tight")
    assert sorted(a.status_code for a in answers) == [200, 503], [a.text[:200] for a in answers]
    refused = next(a for a in answers if a.status_code == 503)
    assert refused.json()["error"]["type"] == "overloaded" and "retry-after" in refused.headers
    assert sorted(after[pid] - before.get(pid, 0) for pid in after) == [500, 500]  # the answered request's chunks only
