"""Overload, faults and hostile clients against a real Serve app over real HTTP (fast versions of
`rerank-fleet bench reliability`): bursts within an arm's queue budget are served, sustained
overload is refused at once with Retry-After (by the arm's queue budget, the ingress's admission
gate before the body is read, an arm's Serve bound, and Serve's proxy), a killed arm
replica costs no request, a client's deadline is kept, slow senders get 408 without starving
`/health`, and one request with many slow URLs cannot hold every download slot."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from statistics import median

import httpx
import pytest
from conftest import _arm, _deployed, _fleet

from bench.bodies import text_requests
from bench.load import closed_loop_capacity, open_loop
from bench.reliability import BURST_SIZE, BURSTS, bursts, replica_kill
from serve.config import FleetConfig
from serve.local import DEFAULT_CONFIG

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def rel_app(ray_serve, tiny_model):
    """Two fp32 arms holding 2 requests each with 2 queued; a 1 s body-read limit; at most 6
    downloads in the replica, 2 per request."""
    arms = []
    for name in ("a", "b"):
        arm = _arm(name, 1.0, max_ongoing=2, max_queued=2)
        arm["precision"] = "fp32"
        arms.append(arm)
    fleet = _fleet(tiny_model, arms, None, router={"probe_interval_s": 0.2})
    fleet["limits"].update(body_read_timeout_s=1.0, max_downloads=6, max_downloads_per_request=2, download_deadline_s=30)
    with _deployed(ray_serve, "rel", "/rel", fleet) as app:
        yield app


@pytest.fixture(scope="module")
def local_arm_app(ray_serve, tiny_model):
    """One arm exactly as configs/local.yaml sets its first one (queue budget, Serve's bounds,
    batching, CPU share and niceness), no cache."""
    arm = FleetConfig.from_yaml(DEFAULT_CONFIG).arms[0].model_dump(mode="json")
    with _deployed(ray_serve, "local-arm", "/local-arm", _fleet(tiny_model, [arm], None)) as app:
        yield app


def test_bursts_to_one_arm_within_its_queue_budget_are_all_served(local_arm_app):
    """Twelve requests of 8 documents at once, five times, all pinned to one arm: a spike within the
    arm's queue budget is absorbed (the former count bounds of 4 + 2 requests refused about half)."""
    pin = {"x-rerank-arm": FleetConfig.from_yaml(DEFAULT_CONFIG).arms[0].name}
    row = asyncio.run(bursts(local_arm_app.base_url, text_requests(64, 8, seed=3), headers=pin)).row("bursts")
    assert row["sent"] == BURST_SIZE * BURSTS and row["200"] == row["sent"], row


def test_sustained_overload_of_one_arm_is_refused_fast_by_its_queue_budget_and_is_not_its_failure(local_arm_app):
    """Requests of 16 documents pinned to one arm at twice the rate it answers them, for three
    seconds (some 40 to 50 in flight): past the queue budget the arm refuses at once, before any
    work, with Retry-After; the refusals are capacity, not the arm's errors: it stays in service."""
    arm = FleetConfig.from_yaml(DEFAULT_CONFIG).arms[0].name
    pin, bodies, client = {"x-rerank-arm": arm}, text_requests(64, 16, seed=5), local_arm_app.client
    capacity, _ = asyncio.run(closed_loop_capacity(local_arm_app.base_url, 8, 2.0, bodies, headers=pin))
    gate_before = client.get("/health").json()["admission"]["refused"]
    errors_before = client.get("/v1/experiments").json()["arms"][arm]["errors"]
    load = asyncio.run(open_loop(local_arm_app.base_url, 2 * capacity, 3.0, bodies, headers=pin))
    statuses = Counter(o.status for o in load.outcomes)
    assert set(statuses) <= {200, 503} and statuses[200] > 0 and statuses[503] > 0, load.row("sustained")
    assert all(o.retry_after for o in load.outcomes if o.status == 503)
    refused = [o.latency_s for o in load.outcomes if o.status == 503]
    answered = [o.latency_s for o in load.outcomes if o.status == 200]
    # Refused at once: far faster than an answer that waited its turn within the budget.
    assert median(refused) < 0.1 and median(refused) < median(answered) / 2, load.row("sustained")
    # The arm's budget refused them (the ingress's gate and Serve's bounds are far above this)...
    assert client.get("/health").json()["admission"]["refused"] == gate_before
    for _ in range(50):  # the ingress's tally reaches /v1/experiments at its next flush
        errors = client.get("/v1/experiments").json()["arms"][arm]["errors"]
        if errors["refused_503"] - errors_before["refused_503"] == statuses[503]:
            break
        time.sleep(0.1)
    # ...counted as refused, never as the arm's server errors, and the arm stays in routed traffic.
    assert errors["refused_503"] - errors_before["refused_503"] == statuses[503] and errors["server"] == errors_before["server"], errors
    assert client.get("/health").json()["arm_state"][arm] == "up"


def test_overload_is_refused_at_once_with_retry_after_and_the_rest_is_answered(rel_app):
    bodies = text_requests(40, 16, seed=7)

    async def burst():
        async with httpx.AsyncClient(base_url=rel_app.base_url, timeout=60) as client:
            async def one(body):
                r = await client.post("/v2/rerank", json=body)
                message = r.json()["error"]["message"] if r.status_code != 200 else ""
                return r.status_code, r.headers.get("retry-after"), message

            return await asyncio.gather(*(one(b) for b in bodies))

    refused_before = rel_app.client.get("/health").json()["admission"]["refused"]
    results = asyncio.run(burst())
    statuses = [s for s, _, _ in results]
    # At least one arm's worth is answered (the gate admits 8; a random split may send more than
    # an arm's 2 + 2 to one arm, whose own bound then refuses the excess).
    assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and statuses.count(200) >= 4, statuses
    refusals = [(ra, msg) for s, ra, msg in results if s == 503]
    assert all(ra == "1" for ra, _ in refusals)
    # Refused at once: by a bound (the ingress's gate, an arm's queue budget or its Serve queue
    # bound), never by a deadline that passed while the request waited behind the work ahead of it.
    bounds = ("ingress.max_in_flight", "queue_budget_s", "no replica can take this request now")
    assert all(any(b in msg for b in bounds) for _, msg in refusals), refusals
    # The ingress's admission gate (auto: 2 arms x (2 + 2)) refused the excess before reading it,
    # naming its setting; the arms' own Serve bound stays behind it.
    at_gate = [msg for _, msg in refusals if "ingress.max_in_flight" in msg]
    assert at_gate, [msg for _, msg in refusals][:3]
    health = rel_app.client.get("/health").json()
    assert health["admission"] == {"limit": 8, "refused": refused_before + len(at_gate)} and health["in_flight"] == 0
    assert rel_app.client.get("/ready").status_code == 200  # fully healthy right after


def test_a_clients_deadline_is_kept_and_a_bad_one_is_named(rel_app):
    r = rel_app.client.post("/v2/rerank", json={"query": "q", "documents": ["d"]}, headers={"x-rerank-timeout-ms": "soon"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "x-rerank-timeout-ms"
    r = rel_app.client.post("/v2/rerank", json={"query": "q", "documents": ["d"] * 40}, headers={"x-rerank-timeout-ms": "1"})
    # A 1 ms deadline cannot be met: a timeout (504), or a refusal with Retry-After (503) when the
    # arm saw the deadline pass in its queue; never scores.
    assert (r.status_code, r.json()["error"]["type"]) in ((504, "timeout"), (503, "overloaded")), r.text
    assert r.status_code == 504 or r.headers.get("retry-after") == "1", r.headers
    ok = rel_app.client.post("/v2/rerank", json={"query": "q", "documents": ["d"]}, headers={"x-rerank-timeout-ms": "20000"})
    assert ok.status_code == 200
    # Clients' own short deadlines, missed again and again, never take an arm out of service: not
    # its health, and not its error rate, which the guardrails judge.
    arm = ok.headers["x-rerank-arm"]
    errors_before = rel_app.client.get("/v1/experiments").json()["arms"][arm]["errors"]
    for _ in range(6):
        rel_app.client.post("/v2/rerank", json={"query": "q", "documents": ["d"] * 40, "arm": arm}, headers={"x-rerank-timeout-ms": "1"})
    assert rel_app.client.get("/health").json()["arm_state"][arm] == "up"
    assert rel_app.client.get("/v1/experiments").json()["arms"][arm]["errors"] == errors_before
    pinned = rel_app.client.post("/v2/rerank", json={"query": "q", "documents": ["d"], "arm": arm})
    assert pinned.status_code == 200, pinned.text


def test_slow_senders_get_408_and_hold_no_request_slot(rel_app):
    url = httpx.URL(rel_app.base_url)
    answers: list[bytes] = []

    def slowloris():
        with socket.create_connection((url.host, url.port), timeout=10) as s:
            s.sendall(f"POST {url.path}/v2/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode())
            for _ in range(4):
                try:
                    s.sendall(b" ")
                except OSError:
                    break
                time.sleep(0.5)
            answers.append(s.recv(64))

    # 40 slow senders, five times the ingress's admission limit (8): a sender holds no slot until
    # its body is in, so the rerank below is still admitted.
    threads = [threading.Thread(target=slowloris) for _ in range(40)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    health = rel_app.client.get("/health")
    # Answered while slow senders still hold their connections (not all have had their 408), and
    # none of them holds a request slot.
    assert health.status_code == 200 and health.json()["in_flight"] == 0 and len(answers) < len(threads), (health.text, len(answers))
    assert rel_app.client.post("/v2/rerank", json={"query": "q", "documents": ["d"]}).status_code == 200
    for t in threads:
        t.join(timeout=15)
    assert len(answers) == 40 and all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[:3]


def test_one_request_with_many_slow_urls_cannot_take_every_download_slot(rel_app, media_server):
    slow = [{"image": media_server.url("/slow?s=4", host="localhost") + f"&n={i}"} for i in range(12)]
    started = media_server.hits["/slow"]
    hog = threading.Thread(target=lambda: rel_app.client.post("/v2/rerank", json={"query": "q", "documents": slow}))
    hog.start()
    until = time.monotonic() + 30
    while media_server.hits["/slow"] - started < 2 and time.monotonic() < until:
        time.sleep(0.05)
    assert media_server.hits["/slow"] - started == 2  # the hog holds its 2 download slots (of 6) now
    r = rel_app.client.post("/v2/rerank", json={"query": "q", "documents": [{"image": media_server.url("/img.png", host="localhost")}]})
    # Answered while the hog still waits on its slow URLs, of which it has begun no more than its 2.
    assert r.status_code == 200 and hog.is_alive() and media_server.hits["/slow"] - started == 2, (r.text, media_server.hits)
    hog.join(timeout=60)


def test_a_killed_arm_replica_costs_no_request_and_the_arm_comes_back(rel_app):
    """One replica of arm `a` is killed under steady load: the ingress sees it gone from Ray's
    actor table, routes around it and retries calls that were waiting on it; Serve restarts the
    replica and a probe brings the arm back."""
    bodies = text_requests(64, 4, seed=11)
    row = asyncio.run(replica_kill(rel_app.base_url, "a", rate=6, duration_s=5, bodies=bodies, kill_at_s=1.0))
    assert row["sent"] == 30 and row["200"] == row["sent"], row  # nothing dropped, nothing refused
    assert row["recovery_s"] is not None, row  # the ingress routes to the arm again
    health = rel_app.client.get("/v1/experiments").json()["this_replica"]["health"]["a"]
    assert health["state"] == "up" and [e["event"].split(":")[0] for e in health["events"]][-2:] == ["down", "up"]


def test_serves_own_backpressure_refusals_carry_retry_after(ray_serve):
    """Past a deployment's max_queued_requests Serve's proxy refuses by itself; with the fleet's
    `backpressure_config` (every deployment gets it) that refusal is a 503 with Retry-After too."""
    from ray import serve

    from serve.deploy_options import BACKPRESSURE

    @serve.deployment(max_ongoing_requests=1, max_queued_requests=1, backpressure_config=BACKPRESSURE)
    class Slow:
        async def __call__(self, request) -> str:
            await asyncio.sleep(1.0)
            return "done"

    serve.run(Slow.bind(), name="backpressure", route_prefix="/backpressure")
    try:
        async def burst():
            async with httpx.AsyncClient(base_url=ray_serve, timeout=30) as client:
                return await asyncio.gather(*(client.get("/backpressure") for _ in range(6)))

        answers = asyncio.run(burst())
        refused = [r for r in answers if r.status_code == 503]
        assert [r.status_code for r in answers].count(200) >= 1 and len(refused) >= 3, [r.status_code for r in answers]
        assert all(r.headers.get("retry-after") == "1" for r in refused)
    finally:
        serve.delete("backpressure")
