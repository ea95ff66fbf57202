"""Which arms can answer now, as the ingress sees them. Pure logic: no Ray, no I/O.

Serve replaces a dead replica, but until it has (seconds for the tiny model, minutes for an 8B
one) every call routed to that arm waits or fails. The ingress therefore keeps its own view: an
arm is *down* after its replica died under a call (at once) or after `failure_threshold` calls in
a row failed or timed out; routed traffic goes around it, and a probe (the ingress calls the arm's
`describe` every `probe_interval_s`) brings it back when it answers. Pins still reach a down arm
only to be refused with 503 at once.

A cascade arm (serve/cascade.py) has no replicas of its own: its state is its stage arms'. It is
down while its `first` arm is (it cannot answer), and degraded while only its `then` arm is (it
answers in the first arm's order).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field


@dataclass
class _ArmState:
    consecutive_failures: int = 0
    down_since: float | None = None
    reason: str = ""
    last_probe: float = 0.0
    events: list[tuple[float, str]] = field(default_factory=list)  # (time, "down: ..."/"up"), bounded


class ArmHealth:
    MAX_EVENTS = 32

    def __init__(self, arms: Iterable[str], *, failure_threshold: int = 3, probe_interval_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic, cascades: Mapping[str, tuple[str, str]] | None = None):  # fmt: skip
        """`cascades`: cascade name -> (first arm, then arm), whose states follow those arms'."""
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        self._arms = {a: _ArmState() for a in arms}
        self._cascades = dict(cascades or {})
        self.failure_threshold = failure_threshold
        self.probe_interval_s = probe_interval_s
        self._clock = clock

    def down(self) -> frozenset[str]:
        arms = frozenset(a for a, s in self._arms.items() if s.down_since is not None)
        return arms | {c for c, (first, _) in self._cascades.items() if first in arms}

    def is_down(self, arm: str) -> bool:
        if arm in self._cascades:
            return self.is_down(self._cascades[arm][0])
        return self._arms[arm].down_since is not None

    def succeeded(self, arm: str) -> None:
        """A call (or a probe) answered: the arm is up."""
        s = self._arms[arm]
        s.consecutive_failures = 0
        if s.down_since is not None:
            s.down_since, s.reason = None, ""
            self._event(s, "up")

    def died(self, arm: str, why: str) -> None:
        """The arm's replica died or is unreachable: down at once."""
        self._mark_down(self._arms[arm], why)

    def failed(self, arm: str, why: str) -> None:
        """A call failed or timed out (not an input error): down after `failure_threshold` in a row."""
        s = self._arms[arm]
        s.consecutive_failures += 1
        if s.consecutive_failures >= self.failure_threshold:
            self._mark_down(s, f"{s.consecutive_failures} calls in a row failed (last: {why})")

    def due_for_probe(self) -> list[str]:
        """Down arms whose last probe is at least `probe_interval_s` old (each is stamped now)."""
        now = self._clock()
        due = [a for a, s in self._arms.items() if s.down_since is not None and now - s.last_probe >= self.probe_interval_s]
        for a in due:
            self._arms[a].last_probe = now
        return due

    def snapshot(self) -> dict[str, dict]:
        now = self._clock()
        return {
            a: {
                "state": "down" if s.down_since is not None else "up",
                "reason": s.reason or None,
                "down_for_s": round(now - s.down_since, 3) if s.down_since is not None else None,
                "consecutive_failures": s.consecutive_failures,
                "events": [{"ago_s": round(now - t, 3), "event": e} for t, e in s.events],
            }
            for a, s in self._arms.items()
        } | {c: self._cascade_view(c, first, then, now) for c, (first, then) in self._cascades.items()}

    def _cascade_view(self, cascade: str, first: str, then: str, now: float) -> dict:
        a, b = self._arms[first], self._arms[then]
        if a.down_since is not None:
            state, reason, since = "down", f"its first arm {first!r} is down: {a.reason}", a.down_since
        elif b.down_since is not None:
            state, reason, since = "degraded", f"its then arm {then!r} is down ({b.reason}): answers in {first!r}'s order", b.down_since
        else:
            state, reason, since = "up", None, None
        return {"state": state, "reason": reason, "down_for_s": round(now - since, 3) if since is not None else None,
                "consecutive_failures": 0, "events": []}  # fmt: skip

    def _mark_down(self, s: _ArmState, why: str) -> None:
        if s.down_since is None:
            s.down_since, s.reason = self._clock(), why
            s.last_probe = s.down_since  # the first probe waits one interval
            self._event(s, f"down: {why}")
        else:
            s.reason = why  # still down: the reason shown is the latest

    def _event(self, s: _ArmState, what: str) -> None:
        s.events.append((self._clock(), what))
        del s.events[: -self.MAX_EVENTS]
