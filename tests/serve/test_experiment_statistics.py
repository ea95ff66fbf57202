"""Experiment statistics and the ledger's decisions, pure (milliseconds): mergeable latency
histograms and moments checked against numpy/scipy on the raw samples, the confidence intervals'
coverage, rank-biased overlap and team-draft interleaving, and the ledger's guardrails, ramp,
feedback join and verdicts."""

from __future__ import annotations

import json
import random
from dataclasses import fields

import numpy as np
import pytest
from scipy import stats as sps

from engine.errors import InputError
from serve.arm_result import ArmResult
from serve.config import FleetConfig
from serve.experiment_page import render as render_experiment
from serve.experiments import ArmTally, Tally
from serve.ledger import AlreadyRecorded, ExperimentLedger, Shown, UnknownRequest
from serve.router import ControlState, ShadowPolicy
from serve.statistics import LatencyHistogram, Moments, mean_difference_ci, quantile_ratio_ci, samples_needed, sign_test_p, wilson
from ranking.metrics import click_ndcg, rank_biased_overlap, reciprocal_rank, team_draft_interleave

# ------------------------------------------------------------------------------- statistics


def test_histogram_quantiles_are_within_one_percent_and_merge_exactly():
    rng = np.random.default_rng(1)
    samples = rng.lognormal(mean=-3, sigma=0.8, size=5000)
    parts = [LatencyHistogram() for _ in range(3)]
    for i, x in enumerate(samples):
        parts[i % 3].add(float(x))
    merged = LatencyHistogram()
    for p in parts:
        merged.merge(p)
    whole = LatencyHistogram()
    for x in samples:
        whole.add(float(x))
    assert merged.counts == whole.counts and merged.n == 5000  # merging loses nothing
    for q in (0.5, 0.95, 0.99):
        exact = float(np.quantile(samples, q, method="inverted_cdf"))
        assert abs(merged.quantile(q) / exact - 1) <= 0.0101
    assert LatencyHistogram.from_dict(merged.to_dict()).counts == merged.counts
    slow, n = merged.share_over(0.1)
    assert n == 5000 and abs(slow / n - float(np.mean(samples > 0.1))) < 0.01


def test_moments_match_scipy_and_merge():
    rng = np.random.default_rng(2)
    xs = rng.normal(0.9, 0.05, size=200)
    a, b = Moments(), Moments()
    for i, x in enumerate(xs):
        (a if i % 2 else b).add(float(x))
    a.merge(b)
    lo, hi = sps.t.interval(0.95, len(xs) - 1, loc=xs.mean(), scale=sps.sem(xs))
    assert a.n == 200 and a.mean == pytest.approx(xs.mean()) and a.ci() == pytest.approx((lo, hi))


def test_intervals_cover_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(3)
    wilson_hits = welch_hits = 0
    for _ in range(400):
        k = int(rng.binomial(80, 0.1))
        lo, hi = wilson(k, 80)
        wilson_hits += lo <= 0.1 <= hi
        a, b = Moments(), Moments()
        for x in rng.normal(0.9, 0.1, 30):
            a.add(float(x))
        for x in rng.normal(0.85, 0.2, 40):
            b.add(float(x))
        lo, hi = mean_difference_ci(a, b)
        welch_hits += lo <= 0.05 <= hi
    assert 0.92 * 400 <= wilson_hits and 0.92 * 400 <= welch_hits <= 0.99 * 400


def test_bootstrap_ratio_of_p95_brackets_the_true_ratio():
    rng = np.random.default_rng(4)
    slow, fast = LatencyHistogram(), LatencyHistogram()
    for x in rng.exponential(0.2, 3000):
        slow.add(float(x))
    for x in rng.exponential(0.1, 3000):
        fast.add(float(x))
    lo, hi = quantile_ratio_ci(slow, fast, 0.95)
    assert lo < 2.0 < hi and hi - lo < 0.5  # the true ratio of the two p95s is exactly 2


def test_sample_size_and_sign_test():
    floor = Moments(1000, 950.0, 905.0)  # mean 0.95, variance 0.0025
    arm = Moments(100, 94.0, 88.6)  # mean 0.94, variance 0.0024
    assert samples_needed(floor, arm, margin=0.02) == 237  # 0.0024 / ((0.01 / 2.80)^2 - 0.0025 / 1000)
    assert samples_needed(floor, arm, margin=0.005) is None  # already further apart than the margin
    assert samples_needed(Moments(100, 95.0, 90.5), arm, margin=0.02) is None  # 100 floor comparisons are too few
    assert sign_test_p(30, 10) == pytest.approx(sps.binomtest(30, 40).pvalue)
    assert sign_test_p(0, 0) is None


# ------------------------------------------------------------------------------- rankings


def test_rank_biased_overlap():
    assert rank_biased_overlap([0, 1, 2, 3], [0, 1, 2, 3]) == pytest.approx(1.0)
    assert rank_biased_overlap([0, 1, 2, 3], [3, 2, 1, 0]) < rank_biased_overlap([0, 1, 2, 3], [1, 0, 2, 3]) < 1.0
    # Top-weighted: a swap at the top costs more than the same swap at the bottom.
    assert rank_biased_overlap(list(range(20)), [1, 0, *range(2, 20)]) < rank_biased_overlap(list(range(20)), [*range(18), 19, 18])


def test_click_metrics():
    assert reciprocal_rank([4, 2, 7], {7}) == pytest.approx(1 / 3)
    assert reciprocal_rank([4, 2, 7], set()) == 0.0
    assert click_ndcg([4, 2, 7], {4}) == 1.0 and click_ndcg([4, 2, 7], {2}) == pytest.approx(1 / np.log2(3))


def test_team_draft_interleaving_takes_turns_and_covers_every_document():
    a, b = [0, 1, 2, 3, 4], [4, 3, 2, 1, 0]
    order, teams = team_draft_interleave(a, b, [True, False, True])
    assert sorted(order) == [0, 1, 2, 3, 4] and len(teams) == 5
    assert order[:2] == [0, 4] and teams[:2] == [0, 1]  # a first (coin), then b's best
    # Each team's picks keep that team's own order.
    assert [d for d, t in zip(order, teams) if t == 0] == [d for d in a if d in {d for d, t in zip(order, teams) if t == 0}]
    # Identical rankings: every prefix is the shared ranking, the teams alternate in pairs.
    same, teams = team_draft_interleave([2, 0, 1, 3], [2, 0, 1, 3], [False])
    assert same == [2, 0, 1, 3] and abs(teams.count(0) - teams.count(1)) <= 1


# ------------------------------------------------------------------------------- the ledger


def fleet(**experiment) -> FleetConfig:
    return FleetConfig.from_dict({
        "model": {"source": "tiny"},
        "arms": [{"name": "ref", "precision": "fp32", "weight": 1, "cost_per_replica_hour": 4.0},
                 {"name": "cand", "precision": "nf4", "weight": 1, "cost_per_replica_hour": 1.0}],
        "router": {"shadow": {"arm": "cand", "fraction": 0.5}},
        "experiment": {"noise_floor_fraction": 0.1, **experiment},
    })  # fmt: skip


_seq = iter(range(1, 10**9))


def send(ledger: ExperimentLedger, tally: Tally | None, shown=(), source: str = "ingress-1") -> ControlState:
    """One batch from an ingress replica, numbered as `serve.ledger_link` numbers them."""
    return ledger.flush(source, next(_seq), ledger.name, None if tally is None else tally.to_dict(), list(shown), 0).control


def result(arm: str) -> ArmResult:
    return ArmResult([0.5], arm, "fp32", "m", 0, 0, 1)


def tally_with(answers: dict[str, int], agreement: float | None = None, floor: float = 1.0, n_agree: int = 0, latency=0.05) -> Tally:
    t = Tally(["ref", "cand"])
    for arm, n in answers.items():
        for i in range(n):
            t.record_answer(arm, "weighted", latency * (1 + 0.01 * (i % 7)), result(arm))
    rng = random.Random(0)
    for _ in range(n_agree):
        cand = min(1.0, agreement + rng.uniform(-0.02, 0.02))
        t.record_shadow("cand", "ref", {"ndcg@10": cand, "spearman": cand}, result("cand"))
        same = min(1.0, floor - rng.uniform(0, 0.01))
        t.record_shadow("ref", "ref", {"ndcg@10": same, "spearman": same}, result("ref"))
    return t


def test_an_arm_tally_travels_and_merges_every_field():
    t = tally_with({"cand": 4}, agreement=0.9, n_agree=3)
    for status in (400, 500, 503):
        t.record_error("cand", status)
    t.record_shadow_failure("cand")
    t.record_shadow_failure("cand", dropped=True)
    cand = t.arms["cand"]
    cand.cache_hits, cand.cache_misses, cand.cache_events["redis_hit"] = 2, 3, 2
    cand.score_cache_hits, cand.score_cache_misses, cand.score_cache_whole = 3, 1, 1
    cand.stage_pairs["ref"], cand.cascade_degraded = 5, 1  # a cascade's (serve/cascade.py)
    cand.clicks_ndcg.add(0.5)
    cand.clicks_rr.add(1.0)
    empty = ArmTally()
    assert all(getattr(cand, f.name) != getattr(empty, f.name) for f in fields(ArmTally))  # every field is exercised
    sent = ArmTally.from_dict(json.loads(json.dumps(cand.to_dict())))  # as a batch reaches the ledger
    assert sent == cand
    empty.merge(sent)
    assert empty == cand
    empty.merge(sent)
    assert empty.requests == 2 * cand.requests and empty.latency.n == 2 * cand.latency.n
    assert empty.agreement["ref"]["spearman"].n == 6 and empty.routed_by["weighted"] == 8 and cand.requests == 4  # cand untouched


def test_ledger_merges_replicas_exactly_and_judges_equivalence_against_the_floor():
    ledger = ExperimentLedger(fleet())
    for _ in range(3):  # three ingress replicas
        send(ledger, tally_with({"ref": 40, "cand": 40}, agreement=0.99, n_agree=30))
    res = ledger.results()
    assert res["arms"]["ref"]["requests"] == 120 and res["arms"]["cand"]["requests"] == 120
    assert res["arms"]["cand"]["agreement_with_reference"]["ndcg"]["n"] == 90
    assert res["arms"]["ref"]["noise_floor"]["ndcg"]["n"] == 90
    versus = res["arms"]["cand"]["versus_reference"]
    assert versus["ranking"] == "equivalent within the noise floor", versus
    assert versus["latency"]["p95_ratio"]["ci95"] is not None
    assert res["arms"]["cand"]["cost_per_1000_requests"]["value"] < res["arms"]["ref"]["cost_per_1000_requests"]["value"]
    assert not res["control"]["tripped"]
    page = render_experiment(res)
    assert "equivalent within the noise floor" in page and "<b>ref</b>" in page


def test_guardrail_takes_a_disagreeing_arm_out_and_logs_it():
    ledger = ExperimentLedger(fleet(guardrails={"min_agreement": 0.9, "min_requests": 20}))
    control = send(ledger, tally_with({"ref": 30, "cand": 30}, agreement=0.5, n_agree=25))
    assert control.weights["cand"] == 0.0 and control.weights["ref"] == 1.0
    assert control.shadow == ShadowPolicy("cand", 0.5)  # shadow continues
    res = ledger.results()
    assert "cand" in res["control"]["tripped"] and res["changes"][-1]["who"] == "guardrail"
    assert res["arms"]["cand"]["versus_reference"]["verdict"].startswith("guardrail tripped")
    # An operator puts it back explicitly; the change names who.
    ledger.set_weights("alice", {"cand": 1})
    assert ledger.control_state().weights["cand"] == 1.0 and ledger.results()["changes"][-1]["who"] == "alice"


def test_guardrail_needs_significant_evidence():
    ledger = ExperimentLedger(fleet(guardrails={"min_agreement": 0.9, "min_requests": 20}))
    send(ledger, tally_with({"ref": 5, "cand": 5}, agreement=0.5, n_agree=5))  # too few comparisons
    assert not ledger.results()["control"]["tripped"]


def test_error_rate_and_p95_guardrails():
    ledger = ExperimentLedger(fleet(guardrails={"min_agreement": None, "max_error_rate": 0.05, "min_requests": 20}))
    t = tally_with({"cand": 30})
    for _ in range(200):
        t.record_error("cand", 503)  # refusals under overload are capacity, not the arm failing
    send(ledger, t)
    assert not ledger.results()["control"]["tripped"] and ledger.results()["arms"]["cand"]["errors"]["refused_503"] == 200
    t = Tally(["ref", "cand"])
    for _ in range(20):
        t.record_error("cand", 500)
    send(ledger, t)
    assert "error rate" in ledger.results()["control"]["tripped"]["cand"]
    slow = ExperimentLedger(fleet(guardrails={"min_agreement": None, "p95_slo_ms": 100, "min_requests": 20}))
    send(slow, tally_with({"cand": 40}, latency=0.3))
    assert "SLO" in slow.results()["control"]["tripped"]["cand"]


def test_ramp_advances_while_guardrails_hold_and_halts_when_one_trips():
    ledger = ExperimentLedger(fleet(ramp={"arm": "cand", "steps": [0.01, 0.05, 0.25], "min_requests": 10}))
    assert ledger.control_state().weights["cand"] == pytest.approx(0.01)
    send(ledger, tally_with({"cand": 10}))
    assert ledger.control_state().weights["cand"] == pytest.approx(0.05)
    send(ledger, tally_with({"cand": 10}))
    assert ledger.control_state().weights["cand"] == pytest.approx(0.25)
    send(ledger, tally_with({"cand": 10}))
    assert ledger.results()["control"]["ramp"]["state"] == "holding"
    bad = ExperimentLedger(fleet(ramp={"arm": "cand", "min_requests": 10}, guardrails={"min_requests": 20}))
    send(bad, tally_with({"ref": 30, "cand": 5}, agreement=0.3, n_agree=25))
    assert bad.results()["control"]["ramp"]["state"] == "halted" and bad.control_state().weights["cand"] == 0.0


def test_feedback_joins_the_arm_and_refuses_bad_input():
    ledger = ExperimentLedger(fleet())
    shown = [Shown("r1", ("cand",), (2, 0, 1), (), 3), Shown("r2", ("ref", "cand"), (1, 0, 2), (0, 1, 0), 3),
             Shown("r3", ("cand", "ref"), (1, 0, 2), (0, 1, 0), 3)]  # fmt: skip
    send(ledger, None, shown)
    assert ledger.feedback("r1", [2])["arms"] == ["cand"]
    clicks = ledger.results()["arms"]["cand"]["clicks"]
    assert clicks["feedback"] == 1 and clicks["mrr"]["mean"] == 1.0
    with pytest.raises(AlreadyRecorded):
        ledger.feedback("r1", [0])
    with pytest.raises(UnknownRequest):
        ledger.feedback("nope", [0])
    with pytest.raises(InputError) as e:
        ledger.feedback("r2", [5])
    assert e.value.field == "clicked.0"
    # Interleaved: document 0 sits at position 1, placed by team 1 (cand): cand wins this request.
    assert ledger.feedback("r2", [0])["credit"] == {"ref": 0, "cand": 1}
    # The same pair with cand picking first: position 1 is ref's; both land in one tally.
    assert ledger.feedback("r3", [0])["credit"] == {"cand": 0, "ref": 1}
    assert ledger.results()["interleaving"] == {"cand|ref": {"wins": {"cand": 1, "ref": 1}, "ties": 0, "preference": 0.0, "sign_test_p": 1.0}}


def test_feedback_window_is_bounded():
    ledger = ExperimentLedger(fleet(feedback_window=10))
    send(ledger, None, [Shown(f"r{i}", ("ref",), (0,), (), 1) for i in range(25)])
    assert ledger.results()["feedback"]["joinable_requests"] == 10
    with pytest.raises(UnknownRequest):
        ledger.feedback("r0", [0])
    ledger.feedback("r24", [0])


def test_admin_changes_validate_and_start_archives():
    ledger = ExperimentLedger(fleet())
    with pytest.raises(InputError) as e:
        ledger.set_weights("bob", {"nope": 1})
    assert e.value.field == "weights.nope"
    with pytest.raises(InputError):
        ledger.set_weights("bob", {"ref": 0, "cand": 0})
    v = ledger.control_state().version
    ledger.set_shadow("bob", None, None, 0.2)
    assert ledger.control_state().shadow is None and ledger.control_state().version > v
    send(ledger, tally_with({"ref": 3}))
    ledger.start("bob", "second")
    res = ledger.results()
    assert res["experiment"] == "second" and res["arms"]["ref"]["requests"] == 0 and ledger.past[0]["arms"]["ref"]["requests"] == 3
    ledger.stop("bob")
    send(ledger, tally_with({"ref": 3}))  # a stopped experiment counts nothing more
    assert ledger.results()["arms"]["ref"]["requests"] == 0 and ledger.control_state().active is False


def test_a_batch_counts_once_and_only_in_its_own_experiment():
    ledger = ExperimentLedger(fleet())
    batch = tally_with({"ref": 5}).to_dict()
    ledger.flush("i1", 1, ledger.name, batch, [], 0)
    ledger.flush("i1", 1, ledger.name, batch, [], 0)  # sent again after a lost reply
    ledger.flush("i2", 1, ledger.name, batch, [], 0)  # another replica's first batch
    assert ledger.results()["arms"]["ref"]["requests"] == 10
    ledger.start("ops", "next")
    ledger.flush("i1", 2, "default", batch, [], 0)  # recorded before the restart: not the new experiment's
    assert ledger.results()["arms"]["ref"]["requests"] == 0


def test_an_operator_override_holds_and_a_tripped_arm_is_never_interleaved():
    f = FleetConfig.from_dict({
        "arms": [{"name": "ref", "precision": "fp32"}, {"name": "cand", "precision": "nf4"}],
        "router": {"interleave": {"arms": ["ref", "cand"], "fraction": 0.5}},
        "experiment": {"guardrails": {"min_requests": 10}},
    })  # fmt: skip
    ledger = ExperimentLedger(f)
    send(ledger, tally_with({"ref": 20, "cand": 20}, agreement=0.3, n_agree=20))
    assert ledger.control_state().interleave is None and ledger.control_state().weights["cand"] == 0
    ledger.start("ops", "again")  # a new experiment does not put a broken arm back
    assert ledger.control_state().weights["cand"] == 0
    ledger.set_weights("ops", {"cand": 1})
    send(ledger, tally_with({"ref": 20, "cand": 20}, agreement=0.3, n_agree=40))
    assert ledger.control_state().weights["cand"] > 0 and ledger.control_state().interleave.fraction == 0.5


def test_feedback_after_stop_is_refused():
    from serve.ledger import ExperimentStopped

    ledger = ExperimentLedger(fleet())
    send(ledger, None, [Shown("r1", ("ref",), (0,), (), 1)])
    ledger.stop("ops")
    with pytest.raises(ExperimentStopped):
        ledger.feedback("r1", [0])


def test_requests_needed_is_one_sided_and_knows_when_the_floor_decides():
    floor = Moments()
    arm = Moments()
    rng = np.random.default_rng(5)
    for x in rng.normal(0.98, 0.01, 400):
        floor.add(float(x))
    for x in rng.normal(0.975, 0.05, 20):  # a little under the floor, within the margin: more data needed
        arm.add(float(x))
    n = samples_needed(floor, arm, 0.01)
    assert n is not None and n > arm.n
    tiny_floor = Moments(3, 2.7, 2.45)  # three noisy self-comparisons (variance 0.01): no arm count can settle it
    assert samples_needed(tiny_floor, arm, 0.01) is None


def test_ledger_link_delivers_each_batch_once_through_failures():
    """The delivery logic of `serve.ledger_link` against the real ledger, called in-process the way
    a Serve handle is called (`.remote` returns an awaitable); one reply is lost after the ledger
    merged the batch."""
    import asyncio

    from serve.ledger_link import LedgerLink

    ledger = ExperimentLedger(fleet())

    class Call:
        def __init__(self, fn, lose_reply=False):
            self.fn, self.lose_reply = fn, lose_reply

        async def _run(self, *a):
            out = self.fn(*a)
            if self.lose_reply:
                self.lose_reply = False
                raise ConnectionError("reply lost")
            return out

        def remote(self, *a):
            return self._run(*a)

    class Handle:
        flush = Call(ledger.flush, lose_reply=True)

    async def go():
        link = LedgerLink(["ref", "cand"], Handle(), ledger.name)
        for _ in range(3):
            link.tally.record_answer("ref", "weighted", 0.01, result("ref"))
        assert await link.flush() is None  # merged by the ledger, but the reply was lost
        link.tally.record_answer("ref", "weighted", 0.01, result("ref"))
        control = await link.flush()  # resends batch 1 (ignored) and sends batch 2
        assert control is not None and control.experiment == ledger.name
        # A read begins: the next reply tells the replica, which then owes it one more batch.
        link.tally.record_answer("ref", "weighted", 0.01, result("ref"))
        read = ledger.begin_read()
        assert ledger.unreported(read) == [link.source]
        await link.flush()
        assert link.read_waiting and ledger.unreported(read) == [link.source]  # sealed before it knew
        await link.flush()  # empty: a heartbeat sealed after the read began
        assert not link.read_waiting and ledger.unreported(read) == []

    asyncio.run(go())
    assert ledger.results()["arms"]["ref"]["requests"] == 5


def test_a_read_waits_for_a_batch_sealed_after_it_from_every_live_ingress_replica():
    clock = [1000.0]
    ledger = ExperimentLedger(fleet(flush_interval_s=0.25), now=lambda: clock[0])
    one = tally_with({"ref": 1}).to_dict()
    ledger.flush("i1", 1, ledger.name, one, [], 0)
    ledger.flush("i2", 1, ledger.name, one, [], 0)
    read = ledger.begin_read()
    assert ledger.unreported(read) == ["i1", "i2"]
    reply = ledger.flush("i1", 2, ledger.name, one, [], 0)  # in flight when the read began
    assert reply.latest_read == read and ledger.unreported(read) == ["i1", "i2"]
    ledger.flush("i1", 3, ledger.name, None, [], reply.latest_read)
    assert ledger.unreported(read) == ["i2"]
    ledger.flush("i1", 2, ledger.name, one, [], 0)  # a late copy of an older batch: counted once, the read stays answered
    assert ledger.unreported(read) == ["i2"]
    # i2 falls silent; after ten flush intervals it is forgotten, and reads stop waiting for it.
    clock[0] += 2.0
    ledger.flush("i1", 4, ledger.name, None, [], reply.latest_read)
    assert ledger.unreported(read) == ["i2"]
    clock[0] += 0.6
    assert ledger.unreported(read) == []
    res = ledger.results(["i2"])
    assert res["arms"]["ref"]["requests"] == 3 and res["unreported_sources"] == ["i2"]


def test_the_ledger_replica_answers_a_read_once_every_replica_has_reported_or_the_wait_runs_out():
    """`LedgerReplica.results` in-process (its class without Serve): it returns once both ingress
    replicas sent a batch sealed after the read began; when one is silent, after
    READ_WAIT_FLUSHES flush intervals, naming it."""
    import asyncio
    import time

    from serve.ledger import READ_WAIT_FLUSHES
    from serve.ledger_replica import LedgerReplica

    interval = 0.05
    replica = LedgerReplica.func_or_class(fleet(flush_interval_s=interval).model_dump(mode="json"))
    name = replica.ledger.name
    one = tally_with({"ref": 1}).to_dict()

    async def read_while(*flushes) -> tuple[dict, float]:
        started = time.monotonic()
        reading = asyncio.create_task(replica.results())
        await asyncio.sleep(0)  # the read begins
        for source, seq, tally in flushes:
            reply = await replica.flush(source, seq, name, tally, [], 0)  # sealed before the read began
            await replica.flush(source, seq + 1, name, None, [], reply.latest_read)
        return await reading, time.monotonic() - started

    async def go():
        await replica.flush("i1", 1, name, one, [], 0)
        await replica.flush("i2", 1, name, None, [], 0)
        res, took = await read_while(("i1", 2, one), ("i2", 2, one))
        assert res["arms"]["ref"]["requests"] == 3 and res["unreported_sources"] == [] and took < READ_WAIT_FLUSHES * interval
        res, took = await read_while(("i1", 4, None))
        assert res["unreported_sources"] == ["i2"] and READ_WAIT_FLUSHES * interval <= took < 1.0

    asyncio.run(go())


def test_the_exact_quantile_resampling_matches_a_plain_bootstrap():
    """`_bootstrap_quantiles` draws each resample's quantile from its Beta order-statistic law;
    a plain bootstrap (resample n latencies, take the nearest-rank p95) must give the same spread."""
    from serve.statistics import _bootstrap_quantiles

    rng = np.random.default_rng(6)
    h = LatencyHistogram()
    samples = rng.lognormal(-2.5, 0.6, 800)
    for x in samples:
        h.add(float(x))
    values, counts = h._arrays()
    plain = []
    for _ in range(2000):
        resample = np.sort(rng.choice(values, size=800, p=counts / counts.sum()))
        plain.append(resample[int(np.ceil(0.95 * 800)) - 1])
    exact = _bootstrap_quantiles(h, 0.95, 2000, np.random.default_rng(7))
    for q in (0.05, 0.5, 0.95):
        assert np.quantile(exact, q) == pytest.approx(np.quantile(plain, q), rel=0.03)
