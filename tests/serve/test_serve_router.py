"""Routing decisions as pure logic: weighted split, pins, sticky keys, shadow selection."""

from __future__ import annotations

import json
import math
import random

import pytest

from engine.errors import InputError
from serve.config import FleetConfig
from serve.ledger import ExperimentLedger
from serve.router import ArmRouter, NoiseFloorPolicy, ShadowPolicy, resolve_pin


def within_binomial(count: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    """|count - np| <= sigmas * sqrt(np(1-p)); 4.5 sigma fails a correct router ~7 times in a million."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_weighted_split_matches_weights():
    router = ArmRouter({"a": 3, "b": 1, "c": 0}, rng=random.Random(7))
    n = 20_000
    picks = [router.route().arm for _ in range(n)]
    assert within_binomial(picks.count("a"), n, 0.75)
    assert within_binomial(picks.count("b"), n, 0.25)
    assert picks.count("c") == 0  # zero weight: no routed traffic
    assert router.route().reason == "weighted"


def test_seeded_router_is_reproducible():
    a = ArmRouter({"x": 1, "y": 1}, rng=random.Random(3))
    b = ArmRouter({"x": 1, "y": 1}, rng=random.Random(3))
    assert [a.route().arm for _ in range(50)] == [b.route().arm for _ in range(50)]


def test_sticky_is_deterministic_stable_and_weighted():
    weights = {"fp32": 0.5, "nf4": 0.5}
    r1 = ArmRouter(weights, rng=random.Random(1))
    r2 = ArmRouter(weights, rng=random.Random(2))  # another process, another RNG: same answers
    keys = [f"user-{i}" for i in range(4000)]
    first = [r1.route(sticky_key=k).arm for k in keys]
    assert first == [r2.route(sticky_key=k).arm for k in keys]
    assert first == [r1.route(sticky_key=k).arm for k in keys]  # repeated calls do not drift
    assert within_binomial(first.count("fp32"), len(keys), 0.5)
    assert r1.route(sticky_key="user-1").reason == "sticky"
    # Golden values: SHA-256 based, so they never change across runs or Python versions
    # (Python's hash() is salted per process and would break this). With equal weights the arm
    # with the larger SHA-256(\0 key \0 arm) wins.
    assert r1.sticky_arm("alice") == "nf4"
    assert r1.sticky_arm("carol") == "fp32"


def test_sticky_moves_only_when_weights_change():
    before = ArmRouter({"a": 0.5, "b": 0.5})
    after = ArmRouter({"a": 0.8, "b": 0.2})
    keys = [f"k{i}" for i in range(2000)]
    moved = [k for k in keys if before.sticky_arm(k) != after.sticky_arm(k)]
    # Growing a from 50% to 80% moves only b-users to a, and 30 % of all users (binomial bounds).
    assert moved and all(before.sticky_arm(k) == "b" and after.sticky_arm(k) == "a" for k in moved)
    assert within_binomial(len(moved), len(keys), 0.3)


def test_sticky_weight_change_moves_only_the_share_it_must_with_three_arms():
    keys = [f"user-{i}" for i in range(6000)]
    before = ArmRouter({"a": 0.5, "b": 0.3, "c": 0.2})
    shifted = ArmRouter({"a": 0.4, "b": 0.3, "c": 0.3})  # 10 % of traffic from a to c
    moved = [k for k in keys if before.sticky_arm(k) != shifted.sticky_arm(k)]
    # Rendezvous hashing moves a little more than the minimum with three arms (some of a's users
    # go to b while as many of b's go to c): 12.8 % here; cut points on a line would move 20 %.
    assert 0.1 * len(keys) * 0.9 <= len(moved) <= 0.14 * len(keys)
    assert not any(shifted.sticky_arm(k) == "a" for k in moved)  # nobody moves to the arm that shrank
    # An arm taken out of routed traffic (weight 0, e.g. a guardrail) moves its own users only.
    tripped = ArmRouter({"a": 0.5, "b": 0.0, "c": 0.2})
    moved = [k for k in keys if before.sticky_arm(k) != tripped.sticky_arm(k)]
    assert all(before.sticky_arm(k) == "b" for k in moved)
    assert within_binomial(len(moved), len(keys), 0.3)


def test_pin_wins_and_unknown_pin_names_the_field():
    router = ArmRouter({"a": 1, "b": 0})
    d = router.route(pin="b", sticky_key="someone")
    assert (d.arm, d.reason) == ("b", "pinned")  # a zero-weight arm can still be pinned
    with pytest.raises(InputError) as e:
        router.route(pin="zz", pin_field="x-rerank-arm")
    assert e.value.field == "x-rerank-arm" and "unknown arm 'zz'" in e.value.problem


def test_resolve_pin_header_and_body():
    assert resolve_pin("a", None, "x-rerank-arm") == ("a", "x-rerank-arm")
    assert resolve_pin(None, "b", "x-rerank-arm") == ("b", "arm")
    assert resolve_pin("a", "a", "x-rerank-arm") == ("a", "arm")
    assert resolve_pin(None, None, "x-rerank-arm") == (None, "x-rerank-arm")
    with pytest.raises(InputError) as e:
        resolve_pin("a", "b", "x-rerank-arm")
    assert e.value.field == "arm"


def test_shadow_fraction_and_never_primary():
    router = ArmRouter({"fp32": 1, "nf4": 1}, shadow=ShadowPolicy(arm="nf4", fraction=0.3), rng=random.Random(11))
    decisions = [router.route() for _ in range(20_000)]
    on_fp32 = [d for d in decisions if d.arm == "fp32"]
    assert all(d.shadow_arm is None for d in decisions if d.arm == "nf4")
    shadowed = sum(d.shadow_arm == "nf4" for d in on_fp32)
    assert within_binomial(shadowed, len(on_fp32), 0.3)
    always = ArmRouter({"fp32": 1, "nf4": 1}, shadow=ShadowPolicy(arm="nf4", fraction=1.0))
    assert always.route(pin="fp32").shadow_arm == "nf4"
    assert always.route(pin="nf4").shadow_arm is None


def test_from_the_ledgers_control_state_and_bad_weights():
    fleet = FleetConfig.from_dict(
        {"arms": [{"name": "fp32", "precision": "fp32", "weight": 2}, {"name": "nf4", "precision": "nf4", "weight": 1}],
         "router": {"shadow": {"arm": "nf4", "fraction": 0.5}}}
    )  # fmt: skip
    control = ExperimentLedger(fleet).control_state()
    router = ArmRouter.from_control(control)  # what an ingress starts with
    assert router.shares == pytest.approx({"fp32": 2 / 3, "nf4": 1 / 3})
    assert router.shadow == ShadowPolicy("nf4", 0.5)
    assert router.noise_floor == NoiseFloorPolicy("fp32", 0.05)
    # The admin endpoints answer it as JSON.
    answer = json.loads(json.dumps(control.to_json()))
    assert answer == {"epoch": control.epoch, "version": control.version, "experiment": "default", "active": True,
                      "weights": {"fp32": 2, "nf4": 1}, "shadow": {"arm": "nf4", "fraction": 0.5},
                      "noise_floor": {"arm": "fp32", "fraction": 0.05}, "interleave": None}  # fmt: skip
    with pytest.raises(ValueError):
        ArmRouter({"a": 0})
    with pytest.raises(ValueError):
        ArmRouter({"a": 1}, shadow=ShadowPolicy("b", 0.1))
