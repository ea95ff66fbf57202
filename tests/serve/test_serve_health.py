"""Arm health as the ingress sees it, and routing around a down arm: pure logic, no Ray."""

from __future__ import annotations

import random

import pytest

from serve.health import ArmHealth
from serve.router import ArmRouter, ShadowPolicy


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_dead_replica_takes_its_arm_down_at_once_and_a_probe_brings_it_back():
    clock = Clock()
    health = ArmHealth(["a", "b"], probe_interval_s=0.5, clock=clock)
    health.died("a", "ActorDiedError")
    assert health.down() == {"a"} and health.is_down("a")
    assert health.due_for_probe() == []  # the first probe waits one interval
    clock.now += 0.5
    assert health.due_for_probe() == ["a"]
    assert health.due_for_probe() == []  # stamped: not again until the next interval
    health.succeeded("a")
    assert health.down() == frozenset()
    events = [e["event"] for e in health.snapshot()["a"]["events"]]
    assert events == ["down: ActorDiedError", "up"]


def test_failures_take_an_arm_down_only_in_a_row():
    health = ArmHealth(["a"], failure_threshold=3, clock=Clock())
    health.failed("a", "timeout")
    health.failed("a", "timeout")
    health.succeeded("a")  # resets the run
    health.failed("a", "timeout")
    health.failed("a", "timeout")
    assert not health.is_down("a")
    health.failed("a", "timeout")
    assert health.is_down("a")
    assert health.snapshot()["a"]["reason"] == "3 calls in a row failed (last: timeout)"


def test_routed_traffic_goes_around_a_down_arm_by_the_other_weights():
    router = ArmRouter({"a": 2, "b": 1, "c": 1}, rng=random.Random(3))
    picks = [router.route(down=frozenset({"a"})) for _ in range(4000)]
    assert {p.arm for p in picks} == {"b", "c"}
    assert all(p.reason in ("weighted", "failover") for p in picks)
    # Requests that would have gone to a are split between b and c by their weights (1:1).
    moved = [p.arm for p in picks if p.reason == "failover"]
    assert 0.4 < moved.count("b") / len(moved) < 0.6


def test_sticky_users_of_a_down_arm_fail_over_and_the_others_stay():
    router = ArmRouter({"a": 1, "b": 1}, rng=random.Random(1))
    users = [f"user-{i}" for i in range(200)]
    before = {u: router.route(sticky_key=u).arm for u in users}
    during = {u: router.route(sticky_key=u, down=frozenset({"a"})) for u in users}
    assert all(d.arm == "b" for d in during.values())
    assert all(during[u].reason == ("failover" if before[u] == "a" else "sticky") for u in users)
    assert {u: router.route(sticky_key=u).arm for u in users} == before  # back when a is up


def test_a_pin_to_a_down_arm_is_kept_and_a_down_arm_is_never_a_shadow():
    router = ArmRouter({"a": 1, "b": 1}, shadow=ShadowPolicy("b", 1.0), rng=random.Random(2))
    decision = router.route(pin="b", down=frozenset({"b"}))
    assert (decision.arm, decision.reason) == ("b", "pinned")
    assert router.route(pin="a").shadow_arm == "b"
    assert router.route(pin="a", down=frozenset({"b"})).shadow_arm is None


def test_when_every_arm_is_down_routing_keeps_the_drawn_arm():
    router = ArmRouter({"a": 1, "b": 1}, rng=random.Random(4))
    assert router.route(down=frozenset({"a", "b"})).arm in ("a", "b")


def test_bad_thresholds_are_refused():
    with pytest.raises(ValueError):
        ArmHealth(["a"], failure_threshold=0)
