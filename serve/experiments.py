"""What an experiment counts, per arm, in a form that merges exactly: each ingress replica keeps a
`Tally` of the requests it answered and sends it to the ledger (`serve.ledger`) every
`experiment.flush_interval_s`, which adds it to the fleet-wide one. Pure: no Ray, no I/O.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from serve.arm_result import ArmResult
from serve.statistics import LatencyHistogram, Moments

AGREEMENT_METRICS = ("spearman", "ndcg", "topk_overlap", "rbo")


def metric_name(key: str) -> str:
    """`ranking.metrics.agreement`'s key without its k: ndcg@10 -> ndcg, top10_overlap -> topk_overlap."""
    if key.startswith("ndcg@"):
        return "ndcg"
    if key.startswith("top") and key.endswith("_overlap"):
        return "topk_overlap"
    return key


@dataclass
class ArmTally:
    requests: int = 0
    client_errors: int = 0
    server_errors: int = 0  # the arm failed (500, 504): what the error-rate guardrail judges
    refused: int = 0  # turned away by backpressure, a passed deadline or a down arm (503): capacity, not faults
    routed_by: Counter = field(default_factory=Counter)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    cache_hits: int = 0
    cache_misses: int = 0
    cache_events: Counter = field(default_factory=Counter)
    batch_requests_sum: int = 0
    shadow_requests: int = 0
    shadow_errors: int = 0
    shadow_dropped: int = 0
    # primary arm -> metric -> moments: this arm's ranking against the primary's on mirrored
    # requests (primary == this arm: the noise floor, the same arm in another batch).
    agreement: dict[str, dict[str, Moments]] = field(default_factory=dict)
    clicks_ndcg: Moments = field(default_factory=Moments)
    clicks_rr: Moments = field(default_factory=Moments)

    def merge(self, other: ArmTally) -> None:
        for name in ("requests", "client_errors", "server_errors", "refused", "cache_hits", "cache_misses", "batch_requests_sum",
                     "shadow_requests", "shadow_errors", "shadow_dropped"):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.routed_by.update(other.routed_by)
        self.cache_events.update(other.cache_events)
        self.latency.merge(other.latency)
        for primary, metrics in other.agreement.items():
            mine = self.agreement.setdefault(primary, {})
            for metric, m in metrics.items():
                mine.setdefault(metric, Moments()).merge(m)
        self.clicks_ndcg.merge(other.clicks_ndcg)
        self.clicks_rr.merge(other.clicks_rr)

    def to_dict(self) -> dict:
        return {
            "requests": self.requests, "client_errors": self.client_errors, "server_errors": self.server_errors, "refused": self.refused,
            "routed_by": dict(self.routed_by), "latency": self.latency.to_dict(), "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses, "cache_events": dict(self.cache_events), "batch_requests_sum": self.batch_requests_sum,
            "shadow_requests": self.shadow_requests, "shadow_errors": self.shadow_errors, "shadow_dropped": self.shadow_dropped,
            "agreement": {p: {k: m.to_list() for k, m in ms.items()} for p, ms in self.agreement.items()},
            "clicks_ndcg": self.clicks_ndcg.to_list(), "clicks_rr": self.clicks_rr.to_list(),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> ArmTally:
        t = cls(**{k: d[k] for k in ("requests", "client_errors", "server_errors", "refused", "cache_hits", "cache_misses",
                                     "batch_requests_sum", "shadow_requests", "shadow_errors", "shadow_dropped")})  # fmt: skip
        t.routed_by = Counter(d["routed_by"])
        t.cache_events = Counter(d["cache_events"])
        t.latency = LatencyHistogram.from_dict(d["latency"])
        t.agreement = {p: {k: Moments.from_list(v) for k, v in ms.items()} for p, ms in d["agreement"].items()}
        t.clicks_ndcg = Moments.from_list(d["clicks_ndcg"])
        t.clicks_rr = Moments.from_list(d["clicks_rr"])
        return t


class Tally:
    """Per-arm counts of one ingress replica since its last flush (or, in the ledger, of the fleet)."""

    def __init__(self, arms: list[str] | tuple[str, ...]):
        self.arms = {a: ArmTally() for a in arms}

    def record_answer(self, arm: str, reason: str, latency_s: float, result: ArmResult) -> None:
        s = self.arms[arm]
        s.requests += 1
        s.routed_by[reason] += 1
        s.latency.add(latency_s)
        s.batch_requests_sum += result.batch_requests
        self._record_cache(s, result)

    def record_error(self, arm: str, status: int) -> None:
        if status == 503:
            self.arms[arm].refused += 1
        elif status >= 500:
            self.arms[arm].server_errors += 1
        else:
            self.arms[arm].client_errors += 1

    def record_shadow(self, arm: str, primary: str, scores: dict[str, float], result: ArmResult) -> None:
        s = self.arms[arm]
        s.shadow_requests += 1
        metrics = s.agreement.setdefault(primary, {})
        for key, value in scores.items():
            metrics.setdefault(metric_name(key), Moments()).add(value)
        self._record_cache(s, result)

    def record_shadow_failure(self, arm: str, *, dropped: bool = False) -> None:
        if dropped:
            self.arms[arm].shadow_dropped += 1
        else:
            self.arms[arm].shadow_errors += 1

    @staticmethod
    def _record_cache(s: ArmTally, result: ArmResult) -> None:
        s.cache_hits += result.cache_hits
        s.cache_misses += result.cache_misses
        s.cache_events.update(result.cache_events)

    def merge(self, other: Tally) -> None:
        for arm, t in other.arms.items():
            self.arms.setdefault(arm, ArmTally()).merge(t)

    def empty(self) -> bool:
        return all(t == ArmTally() for t in self.arms.values())

    def to_dict(self) -> dict:
        return {a: t.to_dict() for a, t in self.arms.items()}

    @classmethod
    def from_dict(cls, d: dict) -> Tally:
        tally = cls([])
        tally.arms = {a: ArmTally.from_dict(t) for a, t in d.items()}
        return tally
