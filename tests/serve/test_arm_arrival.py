"""Arms on an elastic cluster (pure logic, milliseconds): the ingress starts once every arm answers
or once one does and the grace has passed, and an arm with no running replica is named with
Serve's reason."""

from __future__ import annotations

import asyncio

from serve.arm_arrival import await_arms, failed_arms, serve_reason, unplaced_arms
from serve.deploy_options import PLANNED_REPLICAS_POLICY, deferred_autoscaling


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def arm_call(answers_after: float | None, clock: Clock, log: list[str], name: str):
    """An arm's describe: answers once `answers_after` seconds of the clock have passed (None: never)."""

    async def call():
        log.append(name)
        while answers_after is None or clock.now < answers_after:
            await asyncio.sleep(0.001)
        return {"arm": name}

    return call


async def _run(arrivals: dict[str, float | None], grace_s: float, tick_s: float = 0.5) -> tuple[set[str], float]:
    clock, log = Clock(), []
    calls = {name: arm_call(after, clock, log, name) for name, after in arrivals.items()}
    task = asyncio.ensure_future(await_arms(calls, grace_s, clock=clock, poll_s=0.001))
    while not task.done():
        await asyncio.sleep(0.001)
        clock.now += tick_s / 10
    return task.result(), clock.now


def test_the_ingress_waits_for_every_arm_that_comes():
    answered, at = asyncio.run(_run({"bf16-l4": 3.0, "fp16-t4": 6.0}, grace_s=300))
    assert answered == {"bf16-l4", "fp16-t4"} and 6.0 <= at < 7.0  # when the last arm answered, long before the grace


def test_an_arm_that_never_comes_delays_the_start_by_the_grace_at_most():
    answered, at = asyncio.run(_run({"bf16-l4": 2.0, "fp16-t4": None}, grace_s=20))
    assert answered == {"bf16-l4"} and 22.0 <= at < 23.0  # the grace counts from the first answer


def test_arms_whose_nodes_join_late_but_together_all_start():
    # GPU nodes took ten minutes to come, the second arm a minute after the first: both serve from the start.
    answered, at = asyncio.run(_run({"bf16-l4": 600.0, "fp16-t4": 660.0}, grace_s=300, tick_s=5.0))
    # Started when the second arm answered (660 s), not when a grace counted from the first ran out
    # (900 s); the slack is twenty clock ticks, since a busy machine may advance the clock a few times
    # before the waiting task runs again.
    assert answered == {"bf16-l4", "fp16-t4"} and 660.0 <= at < 670.0


def test_with_no_arm_the_ingress_keeps_waiting():
    async def scenario():
        clock = Clock()
        task = asyncio.ensure_future(await_arms({"a": arm_call(None, clock, [], "a")}, 5, clock=clock, poll_s=0.001))
        for _ in range(200):
            await asyncio.sleep(0.001)
            clock.now += 1.0
        done = task.done()
        task.cancel()
        return done

    assert asyncio.run(scenario()) is False  # 200 s past a 5 s grace: nothing can answer, nothing is claimed


def test_a_call_that_fails_is_made_again():
    calls = {"n": 0}

    async def flaky():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("replica died while starting")
        return {}

    assert asyncio.run(await_arms({"a": flaky}, 0, poll_s=0.001, retry_s=0.001)) == {"a"} and calls["n"] == 2


def test_an_arm_serve_gave_up_on_is_not_waited_for():
    """An arm whose replicas failed to start (e.g. its canary): its calls fail at once with Serve's
    DeploymentUnavailableError, and the ingress starts without waiting out the grace."""

    class GaveUp(Exception):
        pass

    async def never_starts():
        raise GaveUp

    async def scenario():
        clock = Clock()
        calls = {"bf16-l4": arm_call(1.0, clock, [], "bf16-l4"), "nf4-l4": never_starts}
        task = asyncio.ensure_future(await_arms(calls, 300, clock=clock, poll_s=0.001, retry_s=0.001,
                                                gave_up=lambda e: isinstance(e, GaveUp)))  # fmt: skip
        while not task.done():
            await asyncio.sleep(0.001)
            clock.now += 0.05
        return task.result(), clock.now

    answered, at = asyncio.run(scenario())
    assert answered == {"bf16-l4"} and 1.0 <= at < 2.0  # when the other answered, not 300 s later


FAILED_3_TIMES = (
    "The deployment failed to start 3 times in a row. This may be due to a problem with its constructor or initial health check "
    "failing. See controller logs for details. Error:\n\x1b[36mray::ServeReplica:app:Arm-nf4.initialize_and_get_metadata()\x1b[39m "
    "(pid=1, ip=10.0.0.1)\n  File \"replica.py\", line 1928, in initialize\n    raise RuntimeError(traceback.format_exc()) from None\n"
    "RuntimeError: Traceback (most recent call last):\n  File \"serve/arm.py\", line 140, in __init__\n"
    "RuntimeError: arm 'nf4' (backend transformers, precision nf4) cannot start: canary failed: scores are constant\n"
)  # the shape of Serve 2.60's message (tests/serve/test_serve_canary.py sees the real one)


def test_serves_message_is_cut_to_its_sentence_and_the_errors_last_line():
    assert serve_reason(FAILED_3_TIMES) == (
        "The deployment failed to start 3 times in a row: RuntimeError: arm 'nf4' (backend transformers, precision nf4) "
        "cannot start: canary failed: scores are constant"
    )
    waiting = "Deployment 'Arm-fp16-t4' has 1 replicas that have taken more than 30s to be scheduled."
    assert serve_reason(waiting) == waiting and serve_reason("") == ""


def test_the_arms_serve_gave_up_on_are_named():
    states = {
        "Arm-fp32": (1, "HEALTHY", ""),
        "Arm-nf4": (0, "DEPLOY_FAILED", FAILED_3_TIMES),  # at deploy
        "Arm-int8": (0, "UNHEALTHY", FAILED_3_TIMES.replace("nf4", "int8")),  # scaling up from 0 (elastic clusters)
        "Arm-bf16": (0, "UPSCALING", "waiting for resources"),  # still coming: not given up
        "Ingress": (1, "HEALTHY", ""),
    }
    out = failed_arms(states, ["fp32", "nf4", "int8", "bf16"])
    assert set(out) == {"nf4", "int8"} and "arm 'nf4'" in out["nf4"] and "canary failed" in out["int8"]
    assert "Traceback" in FAILED_3_TIMES and "canary failed" in unplaced_arms(states, ["nf4"])["nf4"]


def test_unplaced_arms_are_named_with_serves_reason():
    states = {
        "Arm-bf16-l4": (1, "HEALTHY", ""),
        "Arm-fp16-t4": (0, "UPSCALING", "Deployment 'Arm-fp16-t4' has 1 replicas that have taken more than 30s to be scheduled."),
        "Ingress": (2, "HEALTHY", ""),
    }
    out = unplaced_arms(states, ["bf16-l4", "fp16-t4", "int8-a10g"])
    assert set(out) == {"fp16-t4", "int8-a10g"}
    assert "UPSCALING" in out["fp16-t4"] and "taken more than 30s to be scheduled" in out["fp16-t4"]
    assert "absent" in out["int8-a10g"]


def test_a_deferred_arm_starts_at_zero_and_asks_for_its_plan():
    config = deferred_autoscaling(planned=3, most=6, target_ongoing_requests=8)
    assert (config["min_replicas"], config["initial_replicas"], config["max_replicas"]) == (0, 0, 6)
    assert config["policy"] == {"policy_function": PLANNED_REPLICAS_POLICY, "policy_kwargs": {"planned": 3}}
