"""`ExperimentTraffic`: this ingress replica's part of the running experiment.

It holds the router built from the ledger's control state (weights, shadow, interleaving), records
each answer, error, shadow agreement and shown ranking in the `LedgerLink`, and every
`experiment.flush_interval_s` sends them to the `Ledger` deployment, which merges them fleet-wide
and answers with the live control state: admin changes and guardrails reach every ingress replica
within one interval, without a redeploy. Mirrored (shadow) calls run as background tasks after
the primary answer is in hand, so they never delay it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from ray.serve.handle import DeploymentHandle

from engine.inputs import ScoreRequest
from ranking.metrics import agreement, ranking, team_draft_interleave
from serve.arm_result import ArmResult
from serve.cascade_calls import Cascades
from serve.config import FleetConfig, ShadowConfig
from serve.errors import classify, unwrap
from serve.ingress_metrics import IngressMetrics
from serve.ledger import ExperimentLedger, UnknownRequest
from serve.ledger_link import LedgerLink
from serve.protocol import CascadeUse, ImageCacheUse, RerankOutcome, ScoreCacheUse, ServingMeta
from serve.router import ArmRouter, ControlState, RouteDecision

log = logging.getLogger(__name__)


def outcome_of(result: ArmResult, routed_by: str) -> RerankOutcome:
    c = result.cascade
    return RerankOutcome(
        scores=result.scores, tokens=result.tokens, order=list(c.order) if c and c.order is not None else None,
        meta=ServingMeta(
            arm=result.arm, precision=result.precision, model=result.model, routed_by=routed_by,
            image_cache=ImageCacheUse(hits=result.cache_hits, misses=result.cache_misses),
            score_cache=ScoreCacheUse(hits=result.score_cache_hits, misses=result.score_cache_misses)
            if result.score_cache_hits + result.score_cache_misses else None,
            cascade=CascadeUse(first=c.first, then=c.then, k=c.k, then_scored=list(c.then_scored), degraded=c.degraded) if c else None,
        ),
    )  # fmt: skip


def interleaved(a: ArmResult, b: ArmResult, rng: random.Random) -> tuple[list[int], list[int], list[float]]:
    """Team-draft interleaving of two arms' rankings: (the order, each position's team 0/1, and
    each document's score from the arm whose team placed it)."""
    order, teams = team_draft_interleave(ranking(a.scores), ranking(b.scores), [rng.random() < 0.5 for _ in range(len(a.scores) + 1)])
    scores = list(a.scores)
    for doc, team in zip(order, teams):
        if team == 1:
            scores[doc] = b.scores[doc]
    return order, teams, scores


class ExperimentTraffic:
    def __init__(self, fleet: FleetConfig, ledger: DeploymentHandle, calls: Cascades, metrics: IngressMetrics):
        self.fleet = fleet
        self.calls = calls
        self.metrics = metrics
        self._ledger = ledger
        # Routing starts from the control state the ledger starts with; the first flush brings
        # whatever changed since (an admin call, a guardrail, the ramp).
        self._control_key = (0.0, 0)
        self.apply_control(ExperimentLedger(fleet).control_state())
        self.link = LedgerLink(fleet.arm_names, ledger, fleet.experiment.name)
        self._rng = random.Random()
        self._shadow_tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ control state

    def apply_control(self, control: ControlState) -> None:
        """Follow a control state unless an older one: replies of overlapping calls may arrive out
        of order; a restarted ledger (a new epoch) always wins."""
        key = (control.epoch, control.version)
        if key[0] != self._control_key[0] or key[1] > self._control_key[1]:
            self.router = ArmRouter.from_control(control)
            self._control_key = key

    async def flush(self) -> None:
        """Hand this replica's records to the ledger and follow its control state."""
        control = await self.link.flush()
        if control is not None:
            self.apply_control(control)

    async def flush_loop(self) -> None:
        # The first flush at start tells the ledger this replica exists (reads wait for it).
        while True:
            await self.flush()
            if not self.link.read_waiting:  # a waiting read gets this replica's next batch at once
                await asyncio.sleep(self.fleet.experiment.flush_interval_s)

    async def admin(self, call) -> dict:
        """An admin change made in the ledger; this replica follows it at once. The new control
        state, as JSON."""
        control = await call
        self.apply_control(control)
        return control.to_json()

    async def results(self) -> dict:
        """The experiment fleet-wide, every answer given before the read counted, whichever
        ingress replica gave it (the ledger waits for their batches: `LedgerReplica.results`)."""
        return await self._ledger.results.remote()

    async def feedback(self, request_id: str, clicked: list[int], purchased: list[int] | None) -> dict:
        await self.flush()  # this replica's own recent answers must be joinable
        try:
            return await self._ledger.feedback.remote(request_id, clicked, purchased)
        except Exception as e:
            if not isinstance(unwrap(e), UnknownRequest):
                raise
            # Another ingress replica may have answered it within its last flush interval.
            await asyncio.sleep(2 * self.fleet.experiment.flush_interval_s)
            return await self._ledger.feedback.remote(request_id, clicked, purchased)

    # ------------------------------------------------------------------ records of answers

    def answered(self, decision: RouteDecision, result: ArmResult, elapsed: float, job: ScoreRequest, request_id: str, top_n: int | None) -> RerankOutcome:
        """Record a routed answer (and mirror it to the shadow arm when the router says so)."""
        self.link.tally.record_answer(decision.arm, decision.reason, elapsed, result)
        self.metrics.latency.observe(elapsed, tags={"arm": decision.arm})
        if decision.shadow_arm is not None:
            self._start_shadow(decision.shadow_arm, decision.arm, job, result.scores)
        outcome = outcome_of(result, decision.reason)
        self.link.record_shown(request_id, (result.arm,), outcome.ranked(top_n), [], len(result.scores))
        return outcome

    def failed(self, arm: str, error: BaseException) -> None:
        self.link.tally.record_error(arm, classify(error)[0])

    async def interleave(self, decision: RouteDecision, job: ScoreRequest, deadline: float, started: float, request_id: str) -> RerankOutcome:
        """Both arms score the request; the answer is their rankings team-draft interleaved. If
        one arm fails, the other's answer is served as a plain failover answer."""
        arms = (decision.arm, decision.interleave_with)
        ended: dict[str, float] = {}

        async def call(arm: str) -> ArmResult:
            try:
                return await self.calls.call(arm, job, deadline)
            finally:
                ended[arm] = time.perf_counter()

        results = await asyncio.gather(*(call(a) for a in arms), return_exceptions=True)
        for arm, r in zip(arms, results):
            if isinstance(r, BaseException):
                self.failed(arm, r)
            else:  # each arm's own latency: the request's media work and its own call
                self.link.tally.record_answer(arm, "interleaved", ended[arm] - started, r)
                self.metrics.latency.observe(ended[arm] - started, tags={"arm": arm})
        ok = [r for r in results if not isinstance(r, BaseException)]
        if not ok:
            raise results[0]
        if len(ok) == 1:
            outcome = outcome_of(ok[0], "failover")
            self.link.record_shown(request_id, (ok[0].arm,), outcome.ranked(None), [], len(ok[0].scores))
            return outcome
        a, b = results
        order, teams, scores = interleaved(a, b, self._rng)
        meta = ServingMeta(
            arm=f"{a.arm}+{b.arm}", precision=f"{a.precision}+{b.precision}", model=a.model, routed_by="interleaved",
            image_cache=ImageCacheUse(hits=a.cache_hits + b.cache_hits, misses=a.cache_misses + b.cache_misses),
        )  # fmt: skip
        self.link.record_shown(request_id, arms, order, teams, len(scores))
        return RerankOutcome(scores=scores, tokens=a.tokens + b.tokens, meta=meta, order=order)

    # ------------------------------------------------------------------ shadow

    def _start_shadow(self, arm: str, primary: str, job: ScoreRequest, primary_scores: list[float]) -> None:
        if len(self._shadow_tasks) >= self.shadow_settings.max_in_flight:
            self.link.tally.record_shadow_failure(arm, dropped=True)  # shadowing must not pile up under load
            self.metrics.shadow_failures.inc(tags={"arm": arm, "reason": "dropped"})
            return
        task = asyncio.get_running_loop().create_task(self._shadow(arm, primary, job, primary_scores))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, arm: str, primary: str, job: ScoreRequest, primary_scores: list[float]) -> None:
        try:
            result = await self.calls.call(arm, job)
            scores = agreement(primary_scores, result.scores, self.shadow_settings.top_k)
            self.link.tally.record_shadow(arm, primary, scores, result)
            for name, value in scores.items():
                self.metrics.shadow_agreement.observe(value, tags={"arm": arm, "against": primary, "metric": name})
        except Exception as e:  # noqa: BLE001 - a shadow failure is counted, never surfaced
            log.warning("shadow call to arm %s failed: %s", arm, type(e).__name__)
            self.link.tally.record_shadow_failure(arm)
            self.metrics.shadow_failures.inc(tags={"arm": arm, "reason": "error"})

    @property
    def shadow_settings(self) -> ShadowConfig:
        """top_k and max_in_flight of mirrored calls (the defaults when the config has no shadow
        and one was set at runtime, or for the noise floor)."""
        return self.fleet.router.shadow or ShadowConfig(arm=self.fleet.reference_arm)
