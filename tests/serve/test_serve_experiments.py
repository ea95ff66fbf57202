"""A/B experiments over real HTTP on a real Serve app with two ingress replicas: fleet-wide totals
that count every answer given before a read whichever replica reads, live weight changes (sticky
users move only as the new weights say), a guardrail that takes a disagreeing arm (random
weights) out of routed traffic, feedback joined to the arm that answered, interleaving credited
by clicks, and the admin key. The tests run in file order: each one starts from the state the
previous left (the ledger is the app's one experiment)."""

from __future__ import annotations

import time

import httpx
import pytest

from serve.router import ArmRouter

pytestmark = pytest.mark.ray

ADMIN = {"authorization": "Bearer admin-secret"}
DOCS = ["a red circle", "a blue square", "a green cross", "a red triangle", "a yellow circle", "a purple square", "a red square", "a blue circle"]


def rerank(app, query: str, headers: dict | None = None, docs=DOCS) -> httpx.Response:
    # A new connection per request, so Serve's proxy spreads them over both ingress replicas.
    with httpx.Client(base_url=app.base_url, timeout=120) as c:
        r = c.post("/v2/rerank", json={"query": query, "documents": docs}, headers=headers or {})
    assert r.status_code == 200, r.text
    return r


def results(app) -> dict:
    with httpx.Client(base_url=app.base_url, timeout=60) as c:
        r = c.get("/v1/experiments")
    assert r.status_code == 200, r.text
    return r.json()


def test_every_read_counts_every_answer_given_before_it_whichever_replica_reads(exp_app):
    replicas = set()
    for _ in range(30):
        with httpx.Client(base_url=exp_app.base_url, timeout=30) as c:
            replicas.add(c.get("/health").json()["replica"])
    assert len(replicas) == 2  # the proxy spreads new connections over both ingress replicas
    # Read right after the answers, in rounds: an answer given within a flush interval (0.2 s)
    # of the read is still in its replica's own tally when the read begins.
    readers, n = set(), 0
    for batch in range(4):
        for i in range(6):
            rerank(exp_app, f"red {batch} {i}", {"x-rerank-arm": "ref"})
        n += 6
        for _ in range(3):
            res = results(exp_app)
            readers.add(res["this_replica"]["source"])
            ref = res["arms"]["ref"]
            assert (ref["requests"], ref["latency_ms"]["n"], res["unreported_sources"]) == (n, n, []), f"read after {n} answers"
            assert ref["routed_by"] == {"pinned": n} and res["arms"]["rand"]["requests"] == 0
    assert len(readers) == 2  # both replicas answered reads
    assert res["arms"]["ref"]["cost_per_1000_requests"]["value"] > 0


def test_admin_calls_need_the_admin_key(exp_app, serve_app):
    with httpx.Client(base_url=exp_app.base_url, timeout=30) as c:
        none = c.post("/v1/experiments/weights", json={"weights": {"ref": 1}})
        wrong = c.post("/v1/experiments/weights", json={"weights": {"ref": 1}}, headers={"authorization": "Bearer nope"})
        bad = c.post("/v1/experiments/weights", json={"weights": {"nope": 1}}, headers=ADMIN)
    assert none.status_code == 403 and wrong.status_code == 403 and none.json()["error"]["field"] == "authorization"
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "weights.nope"
    # An app with no admin key configured refuses every admin call, whatever key is sent.
    refused = serve_app.client.post("/v1/experiments/stop", headers={"authorization": "Bearer e2e-key"})
    assert refused.status_code == 403 and "no admin key" in refused.json()["error"]["message"]


def test_weight_change_at_runtime_moves_only_the_users_it_must(exp_app):
    users = [f"user-{i}" for i in range(120)]
    before = {u: rerank(exp_app, "red circle", {"x-rerank-user": u}).headers["x-rerank-arm"] for u in users}
    assert before == {u: ArmRouter({"ref": 0.5, "rand": 0.5}).sticky_arm(u) for u in users}
    with httpx.Client(base_url=exp_app.base_url, timeout=30) as c:
        r = c.post("/v1/experiments/weights", json={"weights": {"ref": 0.6, "rand": 0.4}}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["weights"] == {"ref": 0.6, "rand": 0.4}
    time.sleep(0.6)  # the other ingress replica follows within one flush interval (0.2 s)
    after = {u: rerank(exp_app, "red circle", {"x-rerank-user": u}).headers["x-rerank-arm"] for u in users}
    expected = ArmRouter({"ref": 0.6, "rand": 0.4})
    assert after == {u: expected.sticky_arm(u) for u in users}  # on both replicas, without a redeploy
    moved = [u for u in users if before[u] != after[u]]
    assert all(before[u] == "rand" and after[u] == "ref" for u in moved)
    assert 3 <= len(moved) <= 24  # 10 % of 120 users, 4.5-sigma binomial bounds
    change = results(exp_app)["changes"][-1]
    assert change["who"] == "ops" and change["what"] == "weights" and change["detail"]["after"]["rand"] == 0.4


def test_guardrail_takes_the_disagreeing_arm_out_of_routed_traffic(exp_app):
    with httpx.Client(base_url=exp_app.base_url, timeout=30) as c:
        r = c.post("/v1/experiments/shadow", json={"arm": "rand", "fraction": 1.0, "noise_floor_fraction": 0.5}, headers=ADMIN)
    assert r.status_code == 200, r.text
    time.sleep(0.6)
    deadline = time.monotonic() + 120
    while "rand" not in results(exp_app)["control"]["tripped"] and time.monotonic() < deadline:
        for i in range(5):
            rerank(exp_app, f"a red shape {i}", {"x-rerank-arm": "ref"})
    res = results(exp_app)
    assert "rand" in res["control"]["tripped"] and "agreement" in res["control"]["tripped"]["rand"], str([(k, x, res["arms"][k].get(x)) for k in ("rand", "ref") for x in ("shadow", "agreement_with_reference", "versus_reference")])
    assert res["control"]["weights"]["rand"] == 0.0
    assert any(c["who"] == "guardrail" and c["detail"]["arm"] == "rand" for c in res["changes"])
    versus = res["arms"]["rand"]["versus_reference"]
    assert versus["verdict"].startswith("guardrail tripped") and versus["agreement"]["arm"]["n"] >= 10
    assert res["arms"]["ref"]["noise_floor"]["spearman"]["mean"] > versus["agreement"]["arm"]["mean"]
    with httpx.Client(base_url=exp_app.base_url, timeout=30) as c:
        page = c.get("/v1/experiments/page")
    assert page.status_code == 200 and "guardrail tripped" in page.text and "text/html" in page.headers["content-type"]
    time.sleep(0.6)
    arms = {rerank(exp_app, "red circle", {"x-rerank-user": f"late-{i}"}).headers["x-rerank-arm"] for i in range(20)}
    assert arms == {"ref"}  # sticky users of rand included: it takes no routed traffic
    assert rerank(exp_app, "red circle", {"x-rerank-arm": "rand"}).headers["x-rerank-arm"] == "rand"  # pins still reach it


def test_feedback_joins_the_arm_that_answered(exp_app):
    r = rerank(exp_app, "a red circle", {"x-rerank-arm": "ref"})
    rid = r.json()["id"]
    top = r.json()["results"][0]["index"]
    with httpx.Client(base_url=exp_app.base_url, timeout=30) as c:
        ok = c.post("/v1/feedback", json={"request_id": rid, "clicked": [top]})
        again = c.post("/v1/feedback", json={"request_id": rid, "clicked": [top]})
        unknown = c.post("/v1/feedback", json={"request_id": "no-such-request", "clicked": [0]})
        out_of_range = c.post("/v1/feedback", json={"request_id": rerank(exp_app, "x", {"x-rerank-arm": "ref"}).json()["id"], "clicked": [99]})
        bad = c.post("/v1/feedback", json={"request_id": rid, "clicked": ["one"]})
    assert ok.status_code == 200 and ok.json()["arms"] == ["ref"], ok.text
    assert again.status_code == 409 and unknown.status_code == 404 and unknown.json()["error"]["field"] == "request_id"
    assert out_of_range.status_code == 400 and out_of_range.json()["error"]["field"] == "clicked.0"
    assert bad.status_code == 422 and bad.json()["error"]["field"].startswith("clicked")
    clicks = results(exp_app)["arms"]["ref"]["clicks"]
    assert clicks["feedback"] == 1 and clicks["mrr"]["mean"] == 1.0  # the top result was clicked


def test_interleaving_credits_the_arm_whose_document_was_clicked(exp_app):
    with httpx.Client(base_url=exp_app.base_url, timeout=30) as c:
        assert c.post("/v1/experiments/start", json={"name": "interleave"}, headers=ADMIN).status_code == 200
        # The guardrail's trip outlives the restart: an operator puts rand back (and it stays).
        assert c.post("/v1/experiments/weights", json={"weights": {"rand": 0.4}}, headers=ADMIN).json()["weights"]["rand"] > 0
        assert c.post("/v1/experiments/shadow", json={"arm": None, "interleave_fraction": 1.0}, headers=ADMIN).status_code == 200
    time.sleep(0.6)
    # A query where the two arms' best documents differ: the reference's best is then placed by
    # the reference's team (position 0 or 1), whichever team picks first.
    for i in range(20):
        query = f"a red circle {i}"
        tops = {arm: rerank(exp_app, query, {"x-rerank-arm": arm}).json()["results"][0]["index"] for arm in ("ref", "rand")}
        if tops["ref"] != tops["rand"]:
            break
    else:
        pytest.fail("the two arms agreed on the best document for 20 queries")
    credited = {}
    for arm in ("ref", "rand"):
        r = rerank(exp_app, query)
        body = r.json()
        assert body["meta"]["routed_by"] == "interleaved" and body["meta"]["arm"] in ("ref+rand", "rand+ref")
        assert sorted(x["index"] for x in body["results"]) == list(range(len(DOCS)))
        assert [x["index"] for x in body["results"]][:2].count(tops[arm]) == 1  # in the first two places
        with httpx.Client(base_url=exp_app.base_url, timeout=30) as c:
            fb = c.post("/v1/feedback", json={"request_id": body["id"], "clicked": [tops[arm]]})
        assert fb.status_code == 200, fb.text
        credited[arm] = fb.json()["credit"]
    assert credited["ref"] == {"ref": 1, "rand": 0} and credited["rand"] == {"ref": 0, "rand": 1}
    view = results(exp_app)["interleaving"]["ref|rand"]
    assert view["wins"] == {"ref": 1, "rand": 1} and view["ties"] == 0
