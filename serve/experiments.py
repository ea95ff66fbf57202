"""Per-arm experiment statistics behind `/v1/experiments`: answers, errors, latency, cache use,
shadow agreement. Kept by one ingress replica, latency over a bounded window. Pure: no Ray, no I/O."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from serve.arm_result import ArmResult

LATENCY_WINDOW = 4096


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


@dataclass
class ArmStats:
    requests: int = 0
    client_errors: int = 0
    server_errors: int = 0
    routed_by: Counter = field(default_factory=Counter)
    latencies_s: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    cache_hits: int = 0
    cache_misses: int = 0
    cache_events: Counter = field(default_factory=Counter)
    batch_requests_sum: int = 0
    shadow_requests: int = 0
    shadow_errors: int = 0
    shadow_dropped: int = 0
    agreement_n: int = 0
    agreement_sums: Counter = field(default_factory=Counter)
    agreement_against: Counter = field(default_factory=Counter)


class ExperimentStats:
    """Per-arm counters for `/v1/experiments`: kept by one ingress replica, latency over a bounded window."""

    def __init__(self, arms: list[str]):
        self.arms = {a: ArmStats() for a in arms}

    def record_answer(self, arm: str, reason: str, latency_s: float, result: ArmResult) -> None:
        s = self.arms[arm]
        s.requests += 1
        s.routed_by[reason] += 1
        s.latencies_s.append(latency_s)
        s.batch_requests_sum += result.batch_requests
        self._record_cache(s, result)

    def record_error(self, arm: str, status: int) -> None:
        if status >= 500:
            self.arms[arm].server_errors += 1
        else:
            self.arms[arm].client_errors += 1

    def record_shadow(self, arm: str, primary: str, scores: dict[str, float], result: ArmResult) -> None:
        s = self.arms[arm]
        s.shadow_requests += 1
        s.agreement_n += 1
        s.agreement_sums.update(scores)
        s.agreement_against[primary] += 1
        self._record_cache(s, result)

    def record_shadow_failure(self, arm: str, *, dropped: bool = False) -> None:
        if dropped:
            self.arms[arm].shadow_dropped += 1
        else:
            self.arms[arm].shadow_errors += 1

    @staticmethod
    def _record_cache(s: ArmStats, result: ArmResult) -> None:
        s.cache_hits += result.cache_hits
        s.cache_misses += result.cache_misses
        s.cache_events.update(result.cache_events)

    def snapshot(self) -> dict[str, dict]:
        out = {}
        for name, s in self.arms.items():
            lat = sorted(s.latencies_s)
            looked_up = s.cache_hits + s.cache_misses
            out[name] = {
                "requests": s.requests,
                "errors": {"client": s.client_errors, "server": s.server_errors},
                "routed_by": dict(s.routed_by),
                "latency_ms": {
                    "window": len(lat),
                    **{f"p{q}": None if (v := percentile(lat, q)) is None else round(v * 1000, 3) for q in (50, 95, 99)},
                },
                "mean_batch_requests": round(s.batch_requests_sum / s.requests, 3) if s.requests else None,
                "image_cache": {
                    "hits": s.cache_hits,
                    "misses": s.cache_misses,
                    "hit_rate": round(s.cache_hits / looked_up, 4) if looked_up else None,
                    "events": dict(s.cache_events),
                },
                "shadow": {
                    "requests": s.shadow_requests,
                    "errors": s.shadow_errors,
                    "dropped": s.shadow_dropped,
                    "agreement": {
                        "n": s.agreement_n,
                        "against": dict(s.agreement_against),
                        **({k: round(v / s.agreement_n, 6) for k, v in sorted(s.agreement_sums.items())} if s.agreement_n else {}),
                    },
                },
            }
        return out
