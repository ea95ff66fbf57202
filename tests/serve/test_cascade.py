"""Cascade arms, pure (milliseconds): how an answer is composed from its two arms' scores, the plan
of a request's stages, the config's checks, the cascade's health, and what experiments count and
report for it (pairs each arm scored, cost per 1000 requests, agreement with the then arm)."""

from __future__ import annotations

import random

import pytest

from engine.errors import ConfigError
from engine.inputs import ScoreRequest
from serve.arm_result import ArmResult
from serve.cascade import GAP, CascadePlan, compose
from serve.config import FleetConfig
from serve.experiments import Tally
from serve.health import ArmHealth
from serve.ledger import ExperimentLedger
from serve.router import ArmRouter


def by_hand(first: list[float], then_of: dict[int, float]) -> tuple[list[float], list[int]]:
    """The cascade rule restated: the rescored documents best first by the then arm, the others
    after them in the first arm's order; the others' scores moved below the lowest rescored one
    by one factor only when the first arm's best of them is not already below it."""
    top = sorted(then_of, key=lambda i: (-then_of[i], i))
    rest = sorted((i for i in range(len(first)) if i not in then_of), key=lambda i: (-first[i], i))
    floor = min(then_of.values())
    best = max((first[i] for i in rest), default=-1.0)
    factor = 1.0 if best < floor else floor / best * (1 - 1e-6)
    scores = [then_of[i] if i in then_of else first[i] * factor for i in range(len(first))]
    return scores, top + rest


def test_the_top_k_rank_by_the_then_arm_and_the_rest_keep_the_first_arm_s_order_and_scores():
    first = [0.9, 0.1, 0.5, 0.8, 0.3]
    # The first arm's top 2 are documents 0 and 3; the then arm prefers 3. The rest (2, 4, 1)
    # already score below the then arm's lowest (0.6): their scores are the first arm's, unchanged.
    scores, order = compose(first, [0, 3], [0.6, 0.7])
    assert order == [3, 0, 2, 4, 1]
    assert scores == [0.6, 0.1, 0.5, 0.7, 0.3]


def test_the_rest_are_scaled_below_the_top_k_when_the_then_arm_scores_lower():
    """A then arm on a lower scale: the rest keep their order and ratios, moved under the top k,
    so a client sorting by relevance_score gets the cascade's order."""
    first = [0.9, 0.1, 0.5, 0.8, 0.3]
    scores, order = compose(first, [0, 3], [0.2, 0.05])
    assert order == [0, 3, 2, 4, 1]
    factor = 0.05 / 0.5 * (1 - GAP)
    assert scores == pytest.approx([0.2, 0.1 * factor, 0.5 * factor, 0.05, 0.3 * factor], rel=1e-12)
    assert max(scores[i] for i in (1, 2, 4)) < min(scores[0], scores[3])
    assert sorted(range(5), key=lambda i: -scores[i]) == order


def test_composition_matches_the_rule_and_sorting_by_score_gives_its_order():
    rng = random.Random(3)
    for _ in range(300):
        n, k = rng.randint(1, 30), rng.randint(1, 12)
        first = [rng.choice([rng.random(), 0.5]) for _ in range(n)]  # ties too
        top = sorted(range(n), key=lambda i: (-first[i], i))[:k]
        then = [rng.random() * rng.choice([0.01, 1.0]) for _ in top]
        scores, order = compose(first, top, then)
        want_scores, want_order = by_hand(first, dict(zip(top, then)))
        assert order == want_order
        assert scores == pytest.approx(want_scores, rel=1e-12, abs=0)
        assert sorted(range(n), key=lambda i: (-scores[i], i)) == order  # what a client sorting by score sees


def test_k_at_least_the_documents_rescores_them_all():
    scores, order = compose([0.3, 0.6], [0, 1], [0.9, 0.2])
    assert scores == [0.9, 0.2] and order == [0, 1]


def job(n: int, query: str = "red circle") -> ScoreRequest:
    return ScoreRequest.of(query, [f"doc {i}" for i in range(n)])


def fleet(**extra) -> FleetConfig:
    return FleetConfig.from_dict({
        "model": {"source": "tiny"},
        "arms": [{"name": "fp32", "precision": "fp32", "weight": 1, "cost_per_replica_hour": 4.0},
                 {"name": "nf4", "precision": "nf4", "weight": 1, "cost_per_replica_hour": 1.0}],
        "cascades": [{"name": "casc", "first": "nf4", "then": "fp32", "k": 2, "weight": 1}],
        **extra,
    })  # fmt: skip


def arm_result(arm: str, scores: list[float], *, cached: int = 0, tokens: int = 10) -> ArmResult:
    return ArmResult(scores, arm, arm, "m", 1, 2, 3, tokens=tokens, score_cache_hits=cached, score_cache_misses=len(scores) - cached)


def test_a_plan_sends_each_query_s_top_k_to_the_then_arm_and_composes_per_query():
    cascade = fleet().cascade("casc")
    jobs = [job(4, "a"), job(3, "b")]
    first = [0.1, 0.9, 0.8, 0.2, 0.3, 0.2, 0.7]
    plan = CascadePlan.of(cascade, jobs, first)
    assert plan.tops == ((1, 2), (0, 2))
    sent = plan.then_jobs()
    assert [d.text for d in sent[0].documents] == ["doc 1", "doc 2"] and sent[0].query == jobs[0].query
    assert [d.field for d in sent[1].documents] == [jobs[1].documents[0].field, jobs[1].documents[2].field]  # errors name the request's own document
    scores, rescored, order = plan.composed([0.5, 0.6, 0.1, 0.4])
    assert scores[:4] == compose(first[:4], [1, 2], [0.5, 0.6])[0]
    assert scores[4:] == compose(first[4:], [0, 2], [0.1, 0.4])[0]
    assert rescored == (1, 2, 4, 6) and order is None  # two queries: their scores in pair order
    with pytest.raises(ValueError):
        plan.composed([0.5])


def test_a_cascade_result_says_who_scored_what_and_sums_both_calls():
    fl = fleet()
    plan = CascadePlan.of(fl.cascade("casc"), [job(4)], [0.1, 0.9, 0.8, 0.2])
    first = arm_result("nf4", [0.1, 0.9, 0.8, 0.2], cached=1)
    then = arm_result("fp32", [0.3, 0.6], cached=2, tokens=5)
    r = plan.result(first, then, "nf4>fp32")
    assert r.arm == "casc" and r.precision == "nf4>fp32" and r.scorer is None
    assert r.scores == [0.1, 0.3, 0.6, 0.2] and r.cascade.order == (2, 1, 3, 0) and r.cascade.then_scored == (1, 2)
    assert r.cascade.pairs == {"nf4": 3, "fp32": 0}  # score-cache hits cost no arm any work
    assert (r.tokens, r.cache_hits, r.score_cache_hits, r.score_cache_misses) == (15, 2, 3, 3)
    degraded = plan.result(first, None, "nf4>fp32", degraded="then arm 'fp32' is down")
    assert degraded.scores == first.scores and degraded.cascade.order == (1, 2, 3, 0) and degraded.cascade.then_scored == ()
    assert degraded.cascade.pairs == {"nf4": 3} and degraded.cascade.degraded


@pytest.mark.parametrize("cascade, error", [
    ({"name": "c", "first": "bf16", "then": "fp32"}, "cascades.0.first: 'bf16' is not one of the arms"),
    ({"name": "c", "first": "nf4", "then": "nf4"}, "cascades.0: first and then are the same arm"),
    ({"name": "c", "first": "nf4", "then": "fp32", "k": 0}, "cascades.0.k"),
    ({"name": "fp32", "first": "nf4", "then": "fp32"}, "arm names must be unique"),
])  # fmt: skip
def test_a_cascade_is_checked_once_at_the_edge(cascade, error):
    with pytest.raises(ConfigError, match=error):
        fleet(cascades=[cascade])


def test_a_cascade_s_stage_cannot_be_a_cascade():
    with pytest.raises(ConfigError, match=r"cascades.1.then: 'c1' is a cascade; a cascade's stages are arms"):
        fleet(cascades=[{"name": "c1", "first": "nf4", "then": "fp32"}, {"name": "c2", "first": "nf4", "then": "c1"}])


def test_a_cascade_is_an_arm_to_routing_shadow_and_experiments():
    fl = fleet(router={"shadow": {"arm": "casc", "fraction": 0.5}}, experiment={"reference": "fp32", "ramp": {"arm": "casc"}})
    assert fl.arm_names == ["fp32", "nf4", "casc"] and fl.weights == {"fp32": 1, "nf4": 1, "casc": 1}
    router = ArmRouter(fl.weights)
    assert router.route(pin="casc").arm == "casc"
    assert {router.route(sticky_key=f"user-{i}").arm for i in range(200)} == {"fp32", "nf4", "casc"}
    only = fleet(arms=[{"name": "fp32", "precision": "fp32", "weight": 0}, {"name": "nf4", "precision": "nf4", "weight": 0}])
    assert only.weights == {"fp32": 0, "nf4": 0, "casc": 1}  # a cascade alone may take the traffic


def test_a_cascade_is_down_with_its_first_arm_and_degraded_with_its_then_arm():
    health = ArmHealth(["fp32", "nf4"], cascades={"casc": ("nf4", "fp32")})
    assert health.down() == frozenset() and health.snapshot()["casc"]["state"] == "up"
    health.died("fp32", "killed")
    assert health.down() == {"fp32"} and not health.is_down("casc")
    assert health.snapshot()["casc"]["state"] == "degraded" and "'fp32' is down (killed)" in health.snapshot()["casc"]["reason"]
    health.died("nf4", "no live replica")
    assert health.down() == {"fp32", "nf4", "casc"} and health.is_down("casc")
    assert health.snapshot()["casc"]["reason"] == "its first arm 'nf4' is down: no live replica"
    health.succeeded("nf4")
    assert not health.is_down("casc")


def cascade_tally(requests: int, *, alone: int = 0, pairs: int = 20, k: int = 2, agree: float | None = None) -> Tally:
    """`requests` cascade answers of `pairs` documents each (nf4 scores them all, fp32 the top k),
    `alone` answers of fp32 alone; the cascade mirrored on fp32's requests with Spearman `agree`."""
    t = Tally(fleet().arm_names)
    plan = CascadePlan.of(fleet().cascade("casc"), [job(pairs)], [i / pairs for i in range(pairs)])
    for _ in range(requests):
        r = plan.result(arm_result("nf4", list(plan.first), cached=0), arm_result("fp32", [0.5] * k), "nf4>fp32")
        t.record_answer("casc", "weighted", 0.05, r)
    for _ in range(alone):
        t.record_answer("fp32", "weighted", 0.05, arm_result("fp32", [0.5] * pairs))
    if agree is not None:
        for _ in range(5):
            t.record_shadow("casc", "fp32", {"spearman": agree, "top10_overlap": 1.0}, r)
    return t


def test_experiments_count_the_pairs_each_arm_scored_for_a_cascade_and_its_cost():
    now = [1000.0]
    ledger = ExperimentLedger(fleet(), now=lambda: now[0])
    now[0] += 3600  # the experiment lasts an hour
    ledger.flush("ingress-1", 1, ledger.name, cascade_tally(100, alone=20, agree=0.8).to_dict(), [], 0)
    res = ledger.results()
    casc = res["arms"]["casc"]
    assert casc["precision"] == "nf4>fp32" and casc["requests"] == 100
    # 100 answers of 20 pairs: nf4 scored 2000 for the cascade (and 5 x 20 mirrored), fp32 2 a request.
    assert casc["cascade"]["pairs_scored"] == {"nf4": 2000, "fp32": 200} and casc["cascade"]["then_pairs_per_request"] == 2.0
    assert res["arms"]["nf4"]["pairs_scored"] == 2000 + 5 * 20 and res["arms"]["fp32"]["pairs_scored"] == 200 + 20 * 20 + 5 * 2
    # An hour of each arm's one replica, in proportion to its pairs scored for the cascade, per 1000 of its requests.
    nf4 = 1.0 * 2000 / 2100
    fp32 = 4.0 * 200 / 610
    assert casc["cost_per_1000_requests"]["value"] == pytest.approx(1000 * (nf4 + fp32) / 100, rel=1e-5)
    assert casc["cost_per_1000_requests"]["by_arm"]["fp32"] == pytest.approx(1000 * fp32 / 100, rel=1e-5)
    agreement = casc["cascade"]["agreement_with_then"]
    assert agreement["spearman"]["mean"] == pytest.approx(0.8) and agreement["spearman"]["n"] == 5 and "mirrored on 'fp32'" in agreement["source"]
    assert casc["cascade"]["degraded_answers"] == 0


def test_the_cascade_s_agreement_also_comes_from_the_then_arm_mirrored_on_its_requests():
    ledger = ExperimentLedger(fleet())
    t = cascade_tally(10)
    for _ in range(3):
        t.record_shadow("fp32", "casc", {"spearman": 0.7}, arm_result("fp32", [0.5] * 20))
    ledger.flush("ingress-1", 1, ledger.name, t.to_dict(), [], 0)
    agreement = ledger.results()["arms"]["casc"]["cascade"]["agreement_with_then"]
    assert agreement["spearman"]["n"] == 3 and agreement["source"] == "'fp32' mirrored on the cascade's requests"
    no_cost = FleetConfig.from_dict({**fleet().to_dict(), "arms": [{"name": "fp32", "precision": "fp32"}, {"name": "nf4", "precision": "nf4"}]})
    ledger = ExperimentLedger(no_cost)
    ledger.flush("ingress-1", 1, ledger.name, cascade_tally(10).to_dict(), [], 0)
    assert ledger.results()["arms"]["casc"]["cost_per_1000_requests"] is None  # an arm without cost_per_replica_hour
