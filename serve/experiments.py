"""What an experiment counts, per arm, in a form that merges exactly: each ingress replica keeps a
`Tally` of the requests it answered and sends it to the ledger (`serve.ledger`) every
`experiment.flush_interval_s`, which adds it to the fleet-wide one. Pure: no Ray, no I/O.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any, get_args, get_origin, get_type_hints

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
    score_cache_hits: int = 0  # pairs of answered requests served from the ingress's score cache
    score_cache_misses: int = 0  # pairs the arm scored for them, with the score cache on
    score_cache_whole: int = 0  # answered requests whose every pair came from the score cache: no arm call
    batch_requests_sum: int = 0
    pairs_scored: int = 0  # pairs this arm's engine scored: for its answers, cascades' stages and mirrored calls (score-cache hits left out)
    stage_pairs: Counter = field(default_factory=Counter)  # a cascade: pairs each of its two arms scored for its answers
    cascade_degraded: int = 0  # a cascade: answers in its first arm's order alone (the then arm was down)
    shadow_requests: int = 0
    shadow_errors: int = 0
    shadow_dropped: int = 0
    # primary arm -> metric -> moments: this arm's ranking against the primary's on mirrored
    # requests (primary == this arm: the noise floor, the same arm in another batch).
    agreement: dict[str, dict[str, Moments]] = field(default_factory=dict)
    clicks_ndcg: Moments = field(default_factory=Moments)
    clicks_rr: Moments = field(default_factory=Moments)

    # Each field is merged, written out and read back by its type (`_merged`, `_plain`, `_typed`):
    # a new count, Counter, Moments, LatencyHistogram or dict of them needs only its line above.

    def merge(self, other: ArmTally) -> None:
        for f in fields(self):
            setattr(self, f.name, _merged(getattr(self, f.name), getattr(other, f.name)))

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> ArmTally:
        types = get_type_hints(cls)
        return cls(**{f.name: _typed(types[f.name], d[f.name]) for f in fields(cls)})


# Plain data of the mergeable values: (to it, from it).
_CODECS: dict[type, tuple] = {Moments: (Moments.to_list, Moments.from_list), LatencyHistogram: (LatencyHistogram.to_dict, LatencyHistogram.from_dict)}


def _merged(mine: Any, theirs: Any) -> Any:
    """`theirs` added to `mine`: counts add, mappings (Counters too) merge key by key, the rest by their own `merge`."""
    if isinstance(mine, (int, float)):
        return mine + theirs
    if isinstance(mine, dict):
        for key, value in theirs.items():
            mine[key] = _merged(mine[key], value) if key in mine else copy.deepcopy(value)
        return mine
    mine.merge(theirs)
    return mine


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(v) for key, v in value.items()}
    codec = _CODECS.get(type(value))
    return codec[0](value) if codec else value


def _typed(kind: Any, data: Any) -> Any:
    if kind in _CODECS:
        return _CODECS[kind][1](data)
    if get_origin(kind) is dict:
        return {key: _typed(get_args(kind)[1], v) for key, v in data.items()}
    return kind(data)  # int, Counter


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
        s.score_cache_hits += result.score_cache_hits
        s.score_cache_misses += result.score_cache_misses
        s.score_cache_whole += result.score_cache_hits > 0 and result.score_cache_misses == 0
        self._record_cache(s, result)
        if result.cascade is not None:
            s.stage_pairs.update(result.cascade.pairs)
            s.cascade_degraded += result.cascade.degraded is not None
        self._record_pairs(result)

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
        self._record_pairs(result)

    def record_shadow_failure(self, arm: str, *, dropped: bool = False) -> None:
        if dropped:
            self.arms[arm].shadow_dropped += 1
        else:
            self.arms[arm].shadow_errors += 1

    def _record_pairs(self, result: ArmResult) -> None:
        """The pairs each arm's engine scored for `result` (a cascade's: both of its arms')."""
        scored = result.cascade.pairs if result.cascade is not None else {result.arm: len(result.scores) - result.score_cache_hits}
        for arm, n in scored.items():
            self.arms.setdefault(arm, ArmTally()).pairs_scored += n

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
