"""What an arm answers for one request (pure data, shared by the arm, the ingress and the stats)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CascadeTrace:
    """How a cascade arm's answer was made (serve/cascade.py): which stage arm scored what."""

    first: str
    then: str
    k: int
    then_scored: tuple[int, ...]  # pair positions (request order) whose score is the then arm's; every other is the first's
    pairs: dict[str, int]  # pairs each stage arm scored for this answer (score-cache hits left out): what it cost each
    order: tuple[int, ...] | None = None  # one query's answer: its documents best first (the top k by then, the rest by first)
    degraded: str | None = None  # why the then arm did not rescore (it is down): the answer is the first arm's alone


@dataclass(frozen=True)
class ArmResult:
    scores: list[float]
    arm: str
    precision: str
    model: str
    cache_hits: int
    cache_misses: int
    batch_requests: int  # requests merged into the forward pass that produced these scores
    # Cache events (hit_local, redis_error, bypass, ...) of this request's lookups and stores.
    cache_events: dict[str, int] = field(default_factory=dict)
    tokens: int = 0  # tokens the decoder ran for this request (a shared prefix counted once)
    replica_rate: float | None = None  # the answering replica's pairs per busy second (its queue budget's rate)
    scorer: str | None = None  # the answering engine's `ScoreSpec.digest`: what the score cache keys its scores by
    # Pairs of the request answered from the ingress's score cache, and scored by the arm (both 0: no score cache).
    score_cache_hits: int = 0
    score_cache_misses: int = 0
    cascade: CascadeTrace | None = None  # a cascade arm's answer: how its two arms made it

    @classmethod
    def concat(cls, results: list[ArmResult]) -> ArmResult:
        """One arm's results for the parts of one request as one result: scores in order, counts summed."""
        first = results[0]
        events: dict[str, int] = {}
        for r in results:
            for name, n in r.cache_events.items():
                events[name] = events.get(name, 0) + n
        return cls(
            scores=[s for r in results for s in r.scores], arm=first.arm, precision=first.precision, model=first.model,
            cache_hits=sum(r.cache_hits for r in results), cache_misses=sum(r.cache_misses for r in results),
            batch_requests=max(r.batch_requests for r in results), cache_events=events, tokens=sum(r.tokens for r in results),
            replica_rate=results[-1].replica_rate, scorer=first.scorer,
            score_cache_hits=sum(r.score_cache_hits for r in results), score_cache_misses=sum(r.score_cache_misses for r in results),
        )  # fmt: skip
