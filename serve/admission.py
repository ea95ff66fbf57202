"""`QueueBudget`: an arm replica's admission, bounded in time rather than in count.

A request is admitted while the work already queued in the replica (pairs admitted and not yet
finished) would take at most `budget_s` at the replica's measured service rate; past that it is
refused at once, before any work is done (the arm raises, the ingress answers 503 +
Retry-After). Work is counted in pairs (query x document): a request of 100 documents is not a
request of 1. An idle replica admits any request: nothing waits ahead of it.

The same gate runs twice: in the arm replica (its own queue, the authority) and in each ingress
replica (`ReportedQueue`, used by `serve.arm_calls`), over the pairs that ingress has in flight to
the arm and the rate the arm's replicas report with each answer (their own measurement, times the
arm's live replicas). With one ingress that is the arm's wait (a little more: its count includes
calls in transit), so the ingress refuses what the arm would, and an arm under sustained overload
spends no CPU on refusals (each cost the arm ~1.8 ms of its core through Serve's call path); with
several, each counts only its own share and leaves the rest to the arm. Until the first answer
reports a rate, the ingress admits.

The service rate is measured while the replica is busy: pairs finished over the busy seconds they
took (from work reaching an idle replica, or from the previous finish, to this finish),
exponentially weighted over the last `window_s` busy seconds. Idle time counts for nothing, and
no backend needs a special case: whatever a backend overlaps (two batches in flight, vLLM's
continuous batching), pairs finished per busy second is the rate its queue drains at. The first
measurement is given (`start`: the replica scores a request before it takes traffic) and blends
with the later ones like any other.

Pure: no Ray, no I/O; the clock is given, so tests run in milliseconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

RATE_WINDOW_S = 2.0  # busy seconds the rate looks back over: several batches, so one odd batch moves it little


class QueueBudget:
    def __init__(self, budget_s: float, start: tuple[int, float], *, window_s: float = RATE_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        """`start`: (pairs, seconds) of a request scored before any traffic, the first measurement."""
        pairs, seconds = start
        if not (budget_s > 0 and window_s > 0 and pairs > 0 and seconds > 0):
            raise ValueError(f"budget_s, window_s and the start's pairs and seconds must be positive, got {budget_s}, {window_s}, {start}")
        self.budget_s = budget_s
        self.queued = 0  # pairs admitted and not finished
        self._window_s = window_s
        self._clock = clock
        self._pairs = float(pairs)  # pairs finished, weighted by how recent (in busy seconds)
        self._seconds = seconds  # the busy seconds they took, weighted alike
        self._since = 0.0  # when the busy span being measured began: work reached an idle replica, or the last finish

    @property
    def rate(self) -> float:
        """Pairs per busy second."""
        return self._pairs / self._seconds

    def wait_s(self) -> float:
        """Expected seconds before a request admitted now starts: the work queued ahead of it."""
        return self.queued / self.rate

    def refusal(self, arm: str) -> str:
        """What a refused client is told (the arm's replica and the ingress say the same)."""
        return (f"overloaded: arm {arm!r} has about {self.wait_s():.2f} s of work queued ({self.queued} pairs at {self.rate:.0f} pairs/s), "
                f"over its queue_budget_s of {self.budget_s:g} s; retry later")  # fmt: skip

    def admit(self, pairs: int) -> bool:
        """Take `pairs` into the queue if the wait ahead of them is within the budget; a refusal
        changes nothing."""
        if self.queued and self.wait_s() > self.budget_s:
            return False
        if not self.queued:
            self._since = self._clock()  # a busy span begins: the idle time before it is no one's work
        self.queued += pairs
        return True

    def finished(self, pairs: int, *, scored: bool) -> None:
        """`pairs` leave the queue. Scored ones measure the rate; failed ones (bad input, a passed
        deadline, a caller gone) only leave, their time counted with the next scored finish."""
        self.queued -= pairs
        if not scored:
            return
        now = self._clock()
        seconds, self._since = now - self._since, now
        keep = math.exp(-seconds / self._window_s)  # older measurements fade with busy time, not with count
        self._pairs = self._pairs * keep + pairs
        self._seconds = self._seconds * keep + seconds


class ReportedQueue(QueueBudget):
    """An arm's queue as one ingress sees it: the pairs it has in flight to the arm, judged at the
    rate the arm reports (its replica's `QueueBudget.rate` with each answer, times the arm's live
    replicas). No rate yet: it admits."""

    def __init__(self, budget_s: float):
        super().__init__(budget_s, (1, 1.0))
        self.replica_rate = math.inf  # pairs per busy second of one replica, as the last answer reported it
        self.replicas = 1  # the arm's live replicas (the ingress's probe loop counts them)

    @property
    def rate(self) -> float:
        return self.replica_rate * self.replicas

    def finished(self, pairs: int, *, scored: bool, replica_rate: float | None = None) -> None:
        self.queued -= pairs
        if scored and replica_rate:
            self.replica_rate = replica_rate
