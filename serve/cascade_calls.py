"""`Cascades`: the ingress's calls by any routed name: a plain arm's as `ArmCalls` and the score
cache make them, a cascade arm's composed of its two arms' calls (what a cascade is, how its answer
is composed and what happens when one of its arms is down: serve/cascade.py).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

from engine.inputs import ScoreRequest
from serve.arm_calls import ARM_GONE, ArmCalls
from serve.arm_result import ArmResult
from serve.cascade import CascadePlan, cascade_precision
from serve.config import CascadeConfig, FleetConfig
from serve.errors import ArmDown, unwrap
from serve.router import ArmRouter, RouteDecision
from serve.score_cache import ScoreCache

Stage = Callable[[str, Sequence[ScoreRequest]], Awaitable[ArmResult]]


class Cascades:
    """Arm calls by any routed name: a plain arm's as they were, a cascade's composed of its two
    arms' calls. Routed answers go through the score cache (`answer`); mirrored calls do not (`call`)."""

    def __init__(self, fleet: FleetConfig, calls: ArmCalls, scores: ScoreCache):
        self.fleet = fleet
        self.calls = calls
        self.scores = scores

    async def answer(self, decision: RouteDecision, jobs: Sequence[ScoreRequest], deadline: float, router: ArmRouter,
                     use_cache: bool = True) -> tuple[ArmResult, RouteDecision]:  # fmt: skip
        """A routed request's scores (as `ScoreCache.call` answers them). A cascade whose first arm
        is gone fails over once, to a plain arm, unless pinned."""
        cascade = self.fleet.cascade(decision.arm)
        if cascade is None:
            return await self.scores.call(decision, jobs, deadline, router, use_cache)

        async def stage(arm: str, stage_jobs: Sequence[ScoreRequest]) -> ArmResult:
            # Pinned: a stage never fails over on its own (the cascade does, whole).
            result, _ = await self.scores.call(RouteDecision(arm=arm, reason="pinned"), stage_jobs, deadline, router, use_cache)
            return result

        try:
            return await self._composed(cascade, jobs, stage), decision
        except Exception as e:
            if not _gone(e) or decision.reason == "pinned":
                raise
            other = router.failover(decision.arm, self.calls.health.down() | self.calls.not_failover_targets)
            if other == decision.arm:
                raise
            decision = replace(decision, arm=other, reason="failover", shadow_arm=None)
            return await self.scores.call(decision, jobs, deadline, router, use_cache)

    async def call(self, arm: str, job: ScoreRequest, deadline: float | None = None) -> ArmResult:
        """One engine request on an arm or a cascade, no score cache (a mirrored call: it measures
        the arm); within `deadline` (default: the service's limit from now)."""
        cascade = self.fleet.cascade(arm)
        if cascade is None:
            return await self.calls.call(arm, job, deadline)
        deadline = deadline if deadline is not None else time.monotonic() + self.fleet.limits.request_timeout_s

        async def stage(name: str, stage_jobs: Sequence[ScoreRequest]) -> ArmResult:
            return await self.calls.call_all(name, stage_jobs, deadline)

        return await self._composed(cascade, [job], stage)

    async def _composed(self, cascade: CascadeConfig, jobs: Sequence[ScoreRequest], stage: Stage) -> ArmResult:
        health = self.calls.health
        if health.is_down(cascade.first):
            raise ArmDown(f"cascade {cascade.name!r}: {health.snapshot()[cascade.name]['reason']}")
        first = await stage(cascade.first, jobs)
        plan = CascadePlan.of(cascade, jobs, first.scores)
        precision = cascade_precision(self.fleet, cascade)
        if health.is_down(cascade.then):
            return plan.result(first, None, precision, degraded=f"then arm {cascade.then!r} is down: {health.snapshot()[cascade.then]['reason']}")
        try:
            then = await stage(cascade.then, plan.then_jobs())
        except Exception as e:
            if not _gone(e):
                raise
            return plan.result(first, None, precision, degraded=f"then arm {cascade.then!r} is gone ({type(unwrap(e)).__name__})")
        return plan.result(first, then, precision)


def _gone(error: BaseException) -> bool:
    """Whether a call failed because its arm is gone (its replica died, or it is out of service)."""
    return isinstance(unwrap(error), ARM_GONE)
