"""The score cache: a pair whose score an arm computed before is answered by the ingress, not
computed again.

    jobs -> keys (engine/score_key.py: the arm's scorer, instruction, limits, content digests)
         -> lookup (in-process LRU, then Redis: `ScoreStore`, the tiers of serve/cache.py)
         -> every pair found: the answer, no arm call
            some missing: only those pairs go to the arm (a smaller ScoreRequest per job), their
            scores are stored, and the answer merges cached and fresh scores in request order

The ingress names an arm's scores by the scorer the arm reports with each answer
(`ArmResult.scorer`: its checkpoint's fingerprint, precision, backend and settings); until an arm
has answered once through this ingress replica its scorer is unknown, and the request goes to the
arm whole (its scores are then stored). A fresh answer is always stored under the scorer that
answered; if that is not the scorer the hits were found under (the request failed over to another
arm, or the arm's replica now runs other weights), the request is scored whole by the arm that
answered, so one answer never mixes two scorers.

Each arm has its own tiers (its share of `score_cache.local_max_bytes`, its own Redis bypass) so
every event is counted per arm: hit_local, hit_redis, miss per distinct pair looked up, and the
faults (redis_error, bypass, corrupt). Redis lost degrades to the LRU and to the arm, as the
feature cache does; nothing here fails a request.

Bypassed: requests with `x-rerank-score-cache: bypass` (neither read nor written), and the calls
that measure an arm (shadow, noise floor, interleaving), which never pass through here.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from engine.errors import InputError
from engine.inputs import ScoreRequest
from engine.score_key import pair_keys
from serve.arm_result import ArmResult
from serve.cache import TieredCache
from serve.config import FleetConfig
from serve.router import ArmRouter, RouteDecision

if TYPE_CHECKING:  # Ray's modules stay unimported here: a bench reads the header before Ray starts
    from serve.arm_calls import ArmCalls

SCORE_CACHE_HEADER = "x-rerank-score-cache"
KEY_PREFIX = "rerank:score:"
_SCORE = struct.Struct("<d")
_ENTRY_BYTES = 32 + 24  # the key's characters and a float, before the LRU's own per-entry charge


def wants_cache(header: str | None) -> bool:
    """Whether a request uses the score cache: yes unless its `x-rerank-score-cache` says bypass."""
    if header is None or header.strip().lower() == "use":
        return True
    if header.strip().lower() == "bypass":
        return False
    raise InputError(SCORE_CACHE_HEADER, f"must be 'bypass' (or 'use', the default), got {header!r}")


class ScoreStore(TieredCache):
    """Scores (probabilities) by pair key: 8 bytes each in Redis."""

    name = "score cache"

    async def get_many(self, keys: Sequence[str]) -> dict[str, float]:
        return await self._get_tiers(keys, self._decode, lambda _: _ENTRY_BYTES, self.config.ttl_s)

    async def put_many(self, scores: Mapping[str, float]) -> None:
        items = ((key, score, _ENTRY_BYTES) for key, score in scores.items() if 0.0 <= score <= 1.0)  # never a NaN
        await self._put_tiers(items, _SCORE.pack, self.config.ttl_s)

    def _decode(self, key: str, raw: Any) -> float | None:
        try:
            (score,) = _SCORE.unpack(bytes(raw))
        except (struct.error, TypeError):
            score = math.nan
        if not 0.0 <= score <= 1.0:
            self._corrupt(key)
            return None
        return score


# ----------------------------------------------------------------------------- pure part


@dataclass(frozen=True)
class CachePlan:
    """A request's pairs against what the cache holds: which go to the arm, and the merge after."""

    jobs: tuple[ScoreRequest, ...]
    keys: tuple[tuple[str, ...], ...]  # per job, per document
    found: Mapping[str, float]

    @classmethod
    def of(cls, scorer: str, jobs: Sequence[ScoreRequest]) -> CachePlan:
        """The plan before the lookup (nothing found yet)."""
        return cls(tuple(jobs), tuple(tuple(pair_keys(scorer, job)) for job in jobs), {})

    def all_keys(self) -> list[str]:
        return [k for keys in self.keys for k in keys]

    @property
    def hits(self) -> int:
        return sum(k in self.found for keys in self.keys for k in keys)

    @property
    def misses(self) -> int:
        return sum(len(keys) for keys in self.keys) - self.hits

    def missing(self) -> list[ScoreRequest]:
        """The jobs to send: each job's documents the cache lacks (fields kept: errors name the
        request's own document), jobs with none left out."""
        out = []
        for job, keys in zip(self.jobs, self.keys):
            docs = tuple(d for d, k in zip(job.documents, keys) if k not in self.found)
            if docs:
                out.append(replace(job, documents=docs))
        return out

    def merged(self, fresh: Sequence[float]) -> list[float]:
        """Every pair's score in request order: cached ones from the cache, the others from
        `fresh` (the arm's scores of `missing()`, in its order)."""
        rest: Iterator[float] = iter(fresh)
        scores = [self.found[k] if k in self.found else next(rest) for k in self.all_keys()]
        if next(rest, None) is not None:
            raise ValueError("more fresh scores than missing pairs")
        return scores


# ----------------------------------------------------------------------------- the ingress's part


@dataclass(frozen=True)
class KnownArm:
    scorer: str
    model: str
    precision: str


class ScoreCache:
    """The ingress replica's score cache, in front of `ArmCalls.call_with_failover`."""

    def __init__(self, fleet: FleetConfig, calls: ArmCalls, on_event: Callable[[str, str, int], None] = lambda arm, event, n: None):
        self.calls = calls
        cfg = fleet.score_cache
        self.enabled = cfg.mode != "off"
        tiers = cfg.tiers(fleet.cache)
        tiers = tiers.model_copy(update={"local_max_bytes": tiers.local_max_bytes // max(1, len(calls.arms))})
        self.stores = {
            arm: ScoreStore(tiers, key_prefix=KEY_PREFIX, on_event=lambda event, n, arm=arm: on_event(arm, event, n)) for arm in calls.arms
        } if self.enabled else {}  # fmt: skip
        self.known: dict[str, KnownArm] = {}  # arm -> its scorer as its latest answer through this replica named it

    async def call(self, decision: RouteDecision, jobs: Sequence[ScoreRequest], deadline: float, router: ArmRouter,
                   use: bool = True) -> tuple[ArmResult, RouteDecision]:  # fmt: skip
        """The request's scores (as `ArmCalls.call_with_failover` answers them), from the cache where
        it has them; `use` False: the client's bypass (nothing read or written)."""
        if not self.enabled:
            return await self.calls.call_with_failover(decision, jobs, deadline, router)
        known = self.known.get(decision.arm) if use else None
        if known is None:
            result, decision = await self._call(decision, jobs, deadline, router, store=use)
            return _counted(result, 0, len(result.scores)), decision
        plan = CachePlan.of(known.scorer, jobs)
        plan = replace(plan, found=await self.stores[decision.arm].get_many(plan.all_keys()))
        if plan.misses == 0:  # every pair cached: no arm call
            result = ArmResult(scores=plan.merged([]), arm=decision.arm, precision=known.precision, model=known.model, cache_hits=0,
                               cache_misses=0, batch_requests=0, scorer=known.scorer)  # fmt: skip
            return _counted(result, plan.hits, 0), decision
        result, answered = await self._call(decision, plan.missing(), deadline, router)
        if result.scorer != known.scorer or answered.arm != decision.arm:
            # The hits belong to another scorer: the arm that answered scores the request whole.
            whole = await self.calls.call_all(answered.arm, jobs, deadline)
            await self._store(whole, jobs)
            return _counted(whole, 0, len(whole.scores)), answered
        return _counted(replace(result, scores=plan.merged(result.scores)), plan.hits, plan.misses), answered

    async def _call(self, decision: RouteDecision, jobs: Sequence[ScoreRequest], deadline: float, router: ArmRouter,
                    store: bool = True) -> tuple[ArmResult, RouteDecision]:  # fmt: skip
        result, decision = await self.calls.call_with_failover(decision, jobs, deadline, router)
        if result.scorer is not None:
            self.known[result.arm] = KnownArm(result.scorer, result.model, result.precision)
        if store:
            await self._store(result, jobs)
        return result, decision

    async def _store(self, result: ArmResult, jobs: Sequence[ScoreRequest]) -> None:
        """Fresh scores under the scorer that computed them."""
        store = self.stores.get(result.arm)
        if store is None or result.scorer is None:
            return
        keys = CachePlan.of(result.scorer, jobs).all_keys()
        await store.put_many(dict(zip(keys, result.scores)))

    def snapshot(self) -> dict[str, dict[str, int]]:
        """This replica's score-cache events per arm ({} when the score cache is off)."""
        return {arm: store.snapshot() for arm, store in self.stores.items()}

    async def aclose(self) -> None:
        for store in self.stores.values():
            await store.aclose()


def _counted(result: ArmResult, hits: int, misses: int) -> ArmResult:
    return replace(result, score_cache_hits=hits, score_cache_misses=misses)
