"""Cascade arms: a cheap arm's order with an expensive arm's scores on its top k.

A cascade (`cascades:` in serve/config.py) is routed, pinned, shadowed and judged like any arm,
but runs no replicas of its own: it calls two arms' deployments.

    the request's documents -> `first` arm (every pair) -> its top k per query
                            -> `then` arm (those k pairs) -> one answer

**How an answer is composed** (`compose`, pure): the top k of the first arm's order are ranked by
the then arm's scores, and the rest follow in the first arm's order. Scores say which arm made
them: a top-k document's `relevance_score` is the then arm's own score; every other document keeps
the first arm's score, multiplied by one factor when needed so that it sorts below every top-k
score (a client that only reads `relevance_score` and sorts by it gets the cascade's order
whatever the two arms' scales): when the first arm's best remaining score is below the then arm's
lowest top-k score the factor is 1 (the scores are the first arm's, unchanged), else it is
min(top k) / max(rest) x (1 - 1e-6). `meta.cascade` names both arms, k, and which documents the
then arm scored (`then_scored`); the rest were scored by the first.

**Each stage is an arm call as any other**: routed requests go through the score cache
(serve/score_cache.py: each stage's pairs hit or miss under that arm's own scorer, so the then
arm's cached scores of a document serve the cascade and the arm alone alike) and fan-out
(serve/fan_out.py, by each arm's own settings), each stage admitted by its arm's queue budget,
all within the request's one deadline. Mirrored calls (shadow, noise floor, interleaving) bypass
the score cache, as for plain arms.

**Health**: while the first arm is down the cascade is down (routed traffic goes around it, a pin
to it gets 503, a call that finds the first arm gone fails over to a plain arm, as an arm's own
calls do); while the then arm is down the cascade answers with the first arm's order and scores,
`meta.cascade.degraded` saying why (`then_scored` empty): the first arm's ranking is a ranking,
and the cascade exists to spare the expensive arm. Other failures of either stage (a bad input, a
refusal by the queue budget, the deadline) are the request's, as for any arm.

This module is the pure part (the composition; no Ray, no I/O); `serve.cascade_calls.Cascades`
makes the calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from engine.inputs import ScoreRequest
from ranking.metrics import ranking
from serve.arm_result import ArmResult, CascadeTrace
from serve.config import CascadeConfig, FleetConfig

GAP = 1e-6  # relative gap between the lowest top-k score and the best of the rest, when they must be moved apart


def compose(first: Sequence[float], top: Sequence[int], then: Sequence[float]) -> tuple[list[float], list[int]]:
    """One query's cascade answer: (each document's score, the documents best first).

    `first`: the first arm's score of every document; `top`: the documents the then arm scored
    (the first's top k, in any order); `then`: the then arm's scores of those, in `top`'s order.
    The top k rank by the then arm's scores, the rest after them in the first arm's order; the
    top k keep the then arm's scores, the rest the first arm's, scaled down (one factor) only as
    far as needed to sort below the lowest top-k score. Ties: by document index."""
    rescored = dict(zip(top, then, strict=True))
    rest = [i for i in ranking(first) if i not in rescored]
    scores = list(first)
    for i, s in rescored.items():
        scores[i] = s
    if rest and rescored:
        floor, best = min(rescored.values()), first[rest[0]]
        if best >= floor:
            factor = floor / best * (1 - GAP) if best > 0 else 0.0
            for i in rest:
                scores[i] = first[i] * factor
    order = sorted(rescored, key=lambda i: (-rescored[i], i)) + rest
    return scores, order


@dataclass(frozen=True)
class CascadePlan:
    """A request's jobs against the first arm's scores: what the then arm scores, and the merge."""

    cascade: CascadeConfig
    jobs: tuple[ScoreRequest, ...]
    first: tuple[float, ...]  # the first arm's scores of every pair, in request order
    tops: tuple[tuple[int, ...], ...]  # per job, its top k documents (positions in the job), in document order

    @classmethod
    def of(cls, cascade: CascadeConfig, jobs: Sequence[ScoreRequest], first: Sequence[float]) -> CascadePlan:
        tops, start = [], 0
        for job in jobs:
            n = len(job.documents)
            tops.append(tuple(sorted(ranking(first[start : start + n])[: cascade.k])))
            start += n
        if start != len(first):
            raise ValueError(f"{len(first)} first-arm scores for {start} pairs")
        return cls(cascade, tuple(jobs), tuple(first), tuple(tops))

    def then_jobs(self) -> list[ScoreRequest]:
        """What the then arm scores: each job's top k documents (their fields kept, so an error names
        the request's own document)."""
        return [replace(job, documents=tuple(job.documents[i] for i in top)) for job, top in zip(self.jobs, self.tops)]

    def composed(self, then: Sequence[float] | None) -> tuple[list[float], tuple[int, ...], tuple[int, ...] | None]:
        """(every pair's score in request order, the pair positions the then arm scored, one job's
        order best first (None for several jobs)); `then` None: the then arm did not answer, so the
        first arm's scores and order alone."""
        scores: list[float] = []
        rescored: list[int] = []
        orders = []
        start, taken = 0, 0
        for job, top in zip(self.jobs, self.tops):
            n = len(job.documents)
            first = self.first[start : start + n]
            if then is None:
                job_scores, order = list(first), ranking(first)
            else:
                job_scores, order = compose(first, top, then[taken : taken + len(top)])
                rescored += [start + i for i in top]
                taken += len(top)
            scores += job_scores
            orders.append(order)
            start += n
        if then is not None and taken != len(then):
            raise ValueError(f"{len(then)} then-arm scores for {taken} pairs")
        return scores, tuple(rescored), tuple(orders[0]) if len(orders) == 1 else None

    def result(self, first: ArmResult, then: ArmResult | None, precision: str, degraded: str | None = None) -> ArmResult:
        """The cascade's answer as one ArmResult: the composed scores; counts (tokens, caches) of
        both calls summed; `cascade` says which arm scored what."""
        c = self.cascade
        scores, rescored, order = self.composed(then.scores if then is not None else None)
        stages = [first] + ([then] if then is not None else [])
        trace = CascadeTrace(first=c.first, then=c.then, k=c.k, then_scored=rescored, order=order, degraded=degraded,
                             pairs={r.arm: len(r.scores) - r.score_cache_hits for r in stages})  # fmt: skip
        both = ArmResult.concat(stages)
        return replace(both, scores=scores, arm=c.name, precision=precision, model=first.model, replica_rate=None, scorer=None, cascade=trace)


def cascade_precision(fleet: FleetConfig, cascade: CascadeConfig) -> str:
    """How a cascade's precision is reported (meta.precision, x-rerank-precision): first>then, e.g. nf4>fp32."""
    return f"{fleet.arm(cascade.first).precision}>{fleet.arm(cascade.then).precision}"
