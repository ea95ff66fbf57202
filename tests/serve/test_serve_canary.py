"""Canary at start, over real Serve and real HTTP (`canary_app`: arm fp32 of the tiny model, and
two broken checkpoints that claim to be it, `zeroed` and `scaled`, each with the model's canary
reference). A broken arm never becomes ready: its replicas refuse to start naming the agreement
they reached, Serve tries each three times and gives up, the ingress takes the arm out of routing
and `/ready` says why, and the fleet serves with the arm that passed. A cascade whose expensive arm
is broken answers in its first arm's order (marked degraded); one whose first arm is broken is down."""

from __future__ import annotations

import asyncio
import time

import pytest

from serve.deploy_options import arm_deployment_name

pytestmark = pytest.mark.ray

BROKEN = ("scaled", "zeroed")


def ready_body(app, until) -> dict:
    """`/ready`'s body once `until(body)` holds (the ingress reads Serve's reasons every 2 s), within a minute."""
    deadline = time.monotonic() + 60
    while True:
        r = app.client.get("/ready")
        if until(r.json()) or time.monotonic() > deadline:
            assert r.status_code == 200, r.text  # the fleet is ready: fp32 scores
            return r.json()
        time.sleep(0.5)


def test_broken_checkpoints_never_start_and_serve_says_why(canary_app):
    from ray import serve

    app, failed = canary_app
    # serve.run gave up on the application at the first broken arm Serve gave up on; never on fp32.
    assert "Failed to update the deployments" in str(failed) and any(arm_deployment_name(a) in str(failed) for a in BROKEN)
    assert arm_deployment_name("fp32") not in str(failed)
    deployments = serve.status().applications["canary"].deployments
    assert deployments[arm_deployment_name("fp32")].status == "HEALTHY"
    for arm in BROKEN:
        d = deployments[arm_deployment_name(arm)]
        # Serve tried the replica 3 times (min(3 x replicas, 20)) and stopped: no replica runs or starts.
        assert d.status == "DEPLOY_FAILED" and not d.replica_states.get("RUNNING") and not d.replica_states.get("STARTING"), d
        assert "failed to start 3 times in a row" in d.message and f"arm {arm!r}" in d.message and "canary failed" in d.message
    assert "scores are constant (0.5000 for every pair)" in deployments[arm_deployment_name("zeroed")].message


def test_the_fleet_serves_with_the_arm_that_passed(canary_app):
    app, _ = canary_app
    for i in range(8):  # the broken arms and the cascade whose first arm is one take a quarter of the weight each: they fail over
        r = app.client.post("/v2/rerank", json={"query": "red circle", "documents": ["a blue square", "a red circle", f"a green cross {i}"]})
        assert r.status_code == 200 and r.headers["x-rerank-arm"] == "fp32", r.text
        assert r.json()["results"][0]["index"] == 1
    pinned = app.client.post("/v2/rerank", json={"query": "red circle", "documents": ["a red circle"]}, headers={"x-rerank-arm": "zeroed"})
    assert pinned.status_code == 503, pinned.text  # a pin to an arm that is out is refused at once


def test_ready_names_each_broken_arm_and_the_agreement_it_reached(canary_app):
    app, _ = canary_app
    body = ready_body(app, lambda b: all("failed to start 3 times" in b["arms"].get(a, "") for a in BROKEN))
    assert body["ready"] is True and body["arms"]["fp32"] == "ok" and body["degraded"] == list(BROKEN), body
    for arm in BROKEN:
        reason = body["arms"][arm]
        assert reason.startswith("down: no replica running (Serve: DEPLOY_FAILED: The deployment failed to start 3 times in a row: ")
        assert f"arm {arm!r}" in reason and "canary failed" in reason and "mean Spearman" in reason and "top-1" in reason, reason
        assert "Traceback" not in reason and "\n" not in reason  # Serve's message, cut to its error's last line
    assert "scores are constant (0.5000 for every pair)" in body["arms"]["zeroed"]
    health = app.client.get("/health").json()
    assert health["arm_state"] == {"fp32": "up"} | dict.fromkeys(BROKEN, "down") | {"then-down": "degraded", "first-down": "down"}, health


def test_a_cascade_whose_then_arm_is_down_answers_in_its_first_arm_s_order(canary_app):
    app, _ = canary_app
    body = {"query": "red circle", "documents": ["a blue square", "a red circle", "a green cross", "a red square"]}
    alone = app.client.post("/v2/rerank", json=body, headers={"x-rerank-arm": "fp32"}).json()
    deadline = time.monotonic() + 60
    while True:
        r = app.client.post("/v2/rerank", json=body, headers={"x-rerank-arm": "then-down"})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert [x["index"] for x in answer["results"]] == [x["index"] for x in alone["results"]]
    assert max(abs(a - b) for a, b in zip((x["relevance_score"] for x in answer["results"]), (x["relevance_score"] for x in alone["results"]))) <= 1e-6
    meta = answer["meta"]["cascade"]
    assert meta["then_scored"] == [] and "then arm 'zeroed'" in meta["degraded"], meta
    first_down = app.client.post("/v2/rerank", json=body, headers={"x-rerank-arm": "first-down"})
    assert first_down.status_code == 503 and "'zeroed'" in first_down.json()["error"]["message"], first_down.text


def test_the_arm_that_passed_reports_its_canary(canary_app):
    from ray.serve.handle import DeploymentHandle

    async def describe() -> dict:  # a handle routes in the loop it is used from (throughput mode): this call's own
        handle = DeploymentHandle(arm_deployment_name("fp32"), "canary").options(method_name="describe")
        try:
            return await handle.remote()
        finally:
            await handle.shutdown_async()

    canary = asyncio.run(describe())["canary"]
    assert canary["state"] == "passed" and canary["mean_spearman"] == 1.0 and canary["top1"] == canary["groups"] == 4, canary
    assert canary["pairs"] == 24 and canary["problems"] == []
    print(f"\ncanary of arm fp32 at start: {canary}")
