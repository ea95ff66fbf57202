"""`QueueBudget` (serve/admission.py) on a hand-driven clock: admission at the budget's edge, in
pairs not requests, and a rate that follows the measured batches. No Ray."""

from __future__ import annotations

import pytest

from serve.admission import QueueBudget, ReportedQueue


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def budget(budget_s: float = 1.0, start=(100, 1.0), window_s: float = 2.0) -> tuple[QueueBudget, Clock]:
    clock = Clock()
    return QueueBudget(budget_s, start, window_s=window_s, clock=clock), clock


def test_admits_while_the_wait_ahead_is_within_the_budget_and_refuses_past_it():
    q, _ = budget(1.0, start=(100, 1.0))  # 100 pairs/s: the budget holds 100 pairs of waiting work
    assert q.admit(60) and q.admit(40)  # 0 then 0.6 s ahead
    assert q.wait_s() == pytest.approx(1.0)
    assert q.admit(8)  # exactly at the edge: 1.0 s ahead is within the budget
    assert not q.admit(1)  # 1.08 s ahead: refused, however small
    assert q.queued == 108  # a refusal takes nothing into the queue
    q.finished(8, scored=False)
    assert q.admit(1)  # back at the edge


def test_work_is_counted_in_pairs_and_an_idle_replica_admits_any_request():
    q, _ = budget(1.0, start=(100, 1.0))
    assert q.admit(500)  # nothing waits ahead of it, so even 5 s of work is admitted
    assert not q.admit(1)  # but nothing behind it
    q.finished(500, scored=False)
    assert q.queued == 0
    for _ in range(13):  # requests of 8 documents: the thirteenth finds 96 pairs (0.96 s) ahead
        assert q.admit(8)
    assert not q.admit(8) and q.queued == 104  # the fourteenth would wait 1.04 s


def test_the_rate_follows_measured_batches_weighted_by_busy_time():
    q, clock = budget(1.0, start=(8, 0.08), window_s=2.0)  # starts at 100 pairs/s
    assert q.rate == pytest.approx(100)
    # The replica now scores 400 pairs/s: bursts of 32 pairs finish every 0.08 s.
    for _ in range(100):  # 8 busy seconds, four windows
        q.admit(32)
        clock.now += 0.08
        q.finished(32, scored=True)
        clock.now += 0.5  # idle between bursts: counts for nothing
    assert q.rate == pytest.approx(400, rel=0.01)
    # Twice as slow from here: after three windows of busy time the old rate weighs e^-3 of what it did.
    for _ in range(38):  # 6.08 busy seconds
        q.admit(32)
        clock.now += 0.16
        q.finished(32, scored=True)
    assert q.rate == pytest.approx(200, rel=0.06)


def test_batch_mates_finishing_together_count_as_one_batch():
    q, clock = budget(1.0, start=(8, 0.08), window_s=1e6)  # 100 pairs/s; nothing fades within this test
    for _ in range(4):
        q.admit(8)
    clock.now += 0.08  # one merged forward call of 32 pairs takes 0.08 s: 400 pairs/s
    for _ in range(4):
        q.finished(8, scored=True)  # the first carries the 0.08 s, the others none
    assert q.rate == pytest.approx((8 + 32) / (0.08 + 0.08))  # the start and this batch, weighted by their busy seconds alike


def test_failed_requests_leave_the_queue_without_measuring_and_their_time_goes_to_the_next_finish():
    q, clock = budget(1.0, start=(10, 0.1))  # 100 pairs/s
    q.admit(10)
    q.admit(10)
    clock.now += 0.05
    q.finished(10, scored=False)  # a bad input (or a passed deadline) leaves: no measurement
    assert q.queued == 10 and q.rate == pytest.approx(100)
    clock.now += 0.05
    q.finished(10, scored=True)  # 10 pairs in the 0.1 s since the replica became busy
    assert q.queued == 0 and q.rate == pytest.approx(100, rel=0.01)


def test_the_start_is_the_first_measurement_and_must_be_one():
    q, clock = budget(1.0, start=(8, 0.02))  # a replica that scored its calibration request at 400 pairs/s
    assert q.rate == pytest.approx(400)
    q.admit(8)
    clock.now += 0.02
    q.finished(8, scored=True)
    assert q.rate == pytest.approx(400)
    for bad in [(0, 1.0), (8, 0.0)]:
        with pytest.raises(ValueError):
            QueueBudget(1.0, bad)
    with pytest.raises(ValueError):
        QueueBudget(0.0, (8, 0.02))


def test_the_ingress_view_admits_until_a_rate_is_reported_then_judges_at_the_arms_rate():
    """The ingress's copy of an arm's gate counts its own pairs in flight and takes the rate the
    arm's replicas report with their answers (times the live replicas); before any report it
    admits everything (the arm's own gate decides)."""
    q = ReportedQueue(0.5)
    assert q.rate == float("inf") and all(q.admit(100) for _ in range(5))  # 500 pairs in flight, no rate known
    q.finished(100, scored=False, replica_rate=999.0)  # a failed call reports nothing
    assert q.rate == float("inf") and q.queued == 400
    q.finished(100, scored=True, replica_rate=100.0)  # the replica scores 100 pairs per busy second
    assert not q.admit(8)  # 300 pairs ahead, 3 s: refused
    assert "overloaded: arm 'nf4' has about 3.00 s of work queued (300 pairs at 100 pairs/s), over its queue_budget_s of 0.5 s" in q.refusal("nf4")
    q.replicas = 6  # six replicas drain it in 0.5 s: within the budget
    assert q.admit(8) and q.queued == 308
