"""`ArmCalls`: everything about calling arms from the ingress, in one place: the request's time
budget, the call itself (a large request split over the arm's replicas when the arm fans out:
`serve.fan_out`), failover to another arm when a replica is gone, each arm's health (calls and a
background probe) and readiness.

Deadlines are this process's `time.monotonic()`; an arm is sent the seconds left, never a
wall-clock time (two nodes' clocks differ). An arm whose replica is gone (killed, crashed, its
node lost) leaves routed traffic at once: calls waiting on it fail over, and a probe brings it
back when it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from engine.errors import InputError
from engine.inputs import ScoreRequest
from serve import fan_out
from serve.arm_arrival import await_arms, deployment_states, unplaced_arms
from serve.admission import ReportedQueue
from serve.arm_result import ArmResult
from serve.config import FleetConfig
from serve.errors import ArmDown, FeaturesMissing, ServiceUnavailable, classify, unwrap
from serve.fetch import MediaFetcher
from serve.health import ArmHealth
from serve.replica_table import live_replicas
from serve.router import ArmRouter, RouteDecision

if TYPE_CHECKING:  # what DeploymentHandle.choose_replica yields (its module is Serve's private one)
    from ray.serve._private.request_router.replica_wrapper import ReplicaSelection

log = logging.getLogger(__name__)

DEADLINE_HEADER = "x-rerank-timeout-ms"  # a client's own deadline, at most limits.request_timeout_s
PROBE_TIMEOUT_S = 1.0
PLACEMENT_CHECK_S = 2.0  # how often Serve's status is read while an arm has no live replica (always, on elastic clusters)
READY_QUERY = ScoreRequest.of("readiness probe", ["readiness probe"])
# The arm's replica is gone: scoring is idempotent, so the request is retried once on another arm,
# and the arm leaves routed traffic until a probe answers.
ARM_GONE = (ActorDiedError, ActorUnavailableError, RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, ArmDown)


def time_budget(header: str | None, limit_s: float) -> float:
    """Seconds a request may take: the client's `x-rerank-timeout-ms`, at most `limit_s`."""
    if header is None:
        return limit_s
    try:
        ms = float(header)
    except ValueError:
        ms = float("nan")
    if not ms > 0:  # also refuses NaN
        raise InputError(DEADLINE_HEADER, f"must be a positive number of milliseconds, got {header!r}")
    return min(ms / 1000, limit_s)


class ArmCalls:
    def __init__(self, fleet: FleetConfig, handles: dict[str, DeploymentHandle], app_name: str, fetcher: MediaFetcher,
                 on_refusal: Callable[[str], None] = lambda arm: None):  # fmt: skip
        self.fleet = fleet
        self.fetcher = fetcher
        self.arms = list(handles)
        self.app_name = app_name
        self._score = {name: h.options(method_name="score") for name, h in handles.items()}
        self._describe = {name: h.options(method_name="describe") for name, h in handles.items()}
        self._described: dict[str, dict] = {}
        router = fleet.router
        self.health = ArmHealth(self.arms, failure_threshold=router.failure_threshold, probe_interval_s=router.probe_interval_s,
                                cascades={c.name: (c.first, c.then) for c in fleet.cascades})  # fmt: skip
        # A failed-over request goes to a plain arm: a cascade would call the arm that just failed again.
        self.not_failover_targets = frozenset(c.name for c in fleet.cascades)
        self._gone: dict[str, asyncio.Event] = {}  # set when an arm leaves routed traffic: its waiting calls fail over
        # Each arm's queue budget as this ingress sees it (serve/admission.py): work the arm would
        # refuse is refused here, before it costs the arm's CPU.
        self.queues = {a.name: ReportedQueue(a.queue_budget_s) for a in fleet.arms}
        self._arm_configs = {a.name: a for a in fleet.arms}  # fan-out (serve/fan_out.py) splits by the arm's settings
        self._on_refusal = on_refusal  # a metric: the arm's refusals made here

    async def await_arms(self) -> None:
        """Elastic clusters: wait until every arm answers, or `cluster.arm_grace_s` after the first
        did; the others start out of routed traffic (`serve.arm_arrival`)."""
        grace = self.fleet.cluster.arm_grace_s
        # An arm Serve gave up on (its replicas failed to start: a canary that disagreed, a
        # checkpoint that does not load) is not waited for; Serve's message says why.
        answered = await await_arms({a: self._describe[a].remote for a in self.arms}, grace,
                                    gave_up=lambda e: isinstance(unwrap(e), DeploymentUnavailableError))  # fmt: skip
        unplaced = await self._unplaced() if set(self.arms) - answered else {}
        for arm in self.arms:
            if arm not in answered:
                self.health.died(arm, unplaced.get(arm) or f"no answer within cluster.arm_grace_s ({grace:g} s) of the first arm's")

    # ------------------------------------------------------------------ calls

    async def call_with_failover(self, decision: RouteDecision, jobs: Sequence[ScoreRequest], deadline: float, router: ArmRouter) -> tuple[ArmResult, RouteDecision]:
        """Call the routed arm; if its replica is gone, the arm leaves routed traffic and (unless
        the request was pinned) the request is retried once on another arm: scoring is idempotent.
        A refusal by the arm's queue budget is answered (503 + Retry-After), not retried elsewhere:
        moving an overloaded arm's traffic to the others would skew the experiment's split and hide
        the arm's latency, and under fleet-wide overload would double every refusal's cost."""
        try:
            return await self.call_all(decision.arm, jobs, deadline), decision
        except Exception as e:
            if not isinstance(unwrap(e), ARM_GONE) or decision.reason == "pinned":
                raise
            other = router.failover(decision.arm, self.health.down() | self.not_failover_targets)
            if other == decision.arm:
                raise
            log.warning("arm %s is gone (%s); retrying the request on arm %s", decision.arm, type(unwrap(e)).__name__, other)
            decision = replace(decision, arm=other, reason="failover", shadow_arm=None)
            return await self.call_all(other, jobs, deadline), decision

    async def call_all(self, arm: str, jobs: Sequence[ScoreRequest], deadline: float) -> ArmResult:
        """One request's engine requests (several for a score request's N:N pairs), each split into
        the arm's fan-out chunks (`serve.fan_out`), on one arm at once: one result, the scores in
        request order. The request is admitted or refused whole, at the arm's queue budget as this
        ingress sees it (all its pairs at once: never half run); the deadline is the whole
        request's; the first failure cancels the rest."""
        pieces = [chunk for job in jobs for chunk in fan_out.split(job, self._arm_configs[arm])]
        if len(pieces) > len(jobs):  # split: the engine's decode budget is charged for the whole request here
            for job in jobs:
                await asyncio.to_thread(fan_out.charge_whole, job, self.fleet.limits)  # image headers: off the event loop
        queue, pairs = self.queues[arm], sum(len(p.documents) for p in pieces)
        if not queue.admit(pairs):
            self._on_refusal(arm)
            raise ServiceUnavailable(queue.refusal(arm))
        try:
            result = await self._call_each(arm, pieces, deadline)
        except BaseException:
            queue.finished(pairs, scored=False)
            raise
        queue.finished(pairs, scored=True, replica_rate=result.replica_rate)
        return result

    async def call(self, arm: str, job: ScoreRequest, deadline: float | None = None) -> ArmResult:
        """One engine request on an arm (`call_all`), within `deadline` (default: the service's
        limit from now); its errors are raised here as themselves."""
        deadline = deadline if deadline is not None else time.monotonic() + self.fleet.limits.request_timeout_s
        return await self.call_all(arm, [job], deadline)

    async def _call_each(self, arm: str, pieces: Sequence[ScoreRequest], deadline: float) -> ArmResult:
        if len(pieces) == 1:
            return await self._call_with_bytes(arm, pieces[0], deadline)
        async with contextlib.AsyncExitStack() as held:
            # Calls sent at once are routed on queue lengths that do not count each other yet: two
            # chunks sent together to two idle replicas went to the same one in 9 of 12 requests.
            # Each chunk's replica is chosen, and a slot reserved on it, before the next is chosen
            # (Serve's power of two choices then sees the slot taken), and only then are they sent.
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                slots = [await held.enter_async_context(self._score[arm].choose_replica()) for _ in pieces]
            calls = [asyncio.ensure_future(self._call_with_bytes(arm, piece, deadline, slot)) for piece, slot in zip(pieces, slots)]
            try:
                return ArmResult.concat(await asyncio.gather(*calls))
            except BaseException:
                for c in calls:
                    c.cancel()
                await asyncio.gather(*calls, return_exceptions=True)  # settled before their slots are released
                raise

    async def _call_with_bytes(self, arm: str, job: ScoreRequest, deadline: float, slot: ReplicaSelection | None = None) -> ArmResult:
        """Call an arm within the request's deadline (the arm refuses work not started within the
        budget it is sent), its health updated; on the replica of `slot` when one was chosen.
        When the arm lacks the features of images sent by digest only, they are downloaded and
        the call is made once more (on any replica) with their bytes."""
        try:
            return await self._call_admitted(arm, job, deadline, slot)
        except Exception as e:
            missing = unwrap(e)
            if not isinstance(missing, FeaturesMissing):
                raise
            return await self._call_admitted(arm, await self.fetcher.with_bytes(job, set(missing.digests)), deadline)

    async def _call_admitted(self, arm: str, job: ScoreRequest, deadline: float, slot: ReplicaSelection | None = None) -> ArmResult:
        budget = max(0.0, deadline - time.monotonic())
        handle = self._score[arm]
        response = handle.remote(job, budget) if slot is None else handle.dispatch(slot, job, budget)
        call = asyncio.ensure_future(_awaited(response))
        gone = asyncio.ensure_future(self._gone_event(arm).wait())
        try:
            done, _ = await asyncio.wait({call, gone}, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED)
            if call not in done:
                response.cancel()
                call.cancel()
                if gone in done:  # the arm left routed traffic while this call waited for it
                    raise ArmDown(f"arm {arm!r} went out of service during the request")
                if budget >= self.fleet.limits.request_timeout_s / 2:
                    # Only an arm that sat on a call for a good part of the service's own limit is
                    # failing; a client's own short deadline (x-rerank-timeout-ms) says nothing about it.
                    self.health.failed(arm, "timeout")
                raise TimeoutError
            result = call.result()
        except asyncio.CancelledError:  # the caller gave up (a sibling chunk failed, the client left): so does the arm
            response.cancel()
            call.cancel()
            raise
        except Exception as e:
            cause = unwrap(e)
            if isinstance(cause, ARM_GONE) and not isinstance(cause, ArmDown):
                self.gone(arm, type(cause).__name__)
            elif classify(cause)[0] == 500 and not isinstance(cause, FeaturesMissing):  # the arm broke (not the input, not a full queue)
                self.health.failed(arm, type(cause).__name__)
            raise
        finally:
            gone.cancel()
        self.health.succeeded(arm)
        return result

    def gone(self, arm: str, why: str) -> None:
        """Take the arm out of routed traffic now; calls waiting on it fail over."""
        if not self.health.is_down(arm):
            log.warning("arm %s is out of routed traffic: %s", arm, why)
        self.health.died(arm, why)
        self._gone_event(arm).set()

    def _gone_event(self, arm: str) -> asyncio.Event:
        event = self._gone.get(arm)
        if event is None or (event.is_set() and not self.health.is_down(arm)):
            event = self._gone[arm] = asyncio.Event()
        return event

    # ------------------------------------------------------------------ health, readiness, description

    async def probe_loop(self) -> None:
        """Arms without a live replica leave routed traffic; arms out of it come back when they answer."""
        interval = self.fleet.router.probe_interval_s
        placement_checked = 0.0
        while True:
            await asyncio.sleep(interval / 2)
            live = await self.live_replicas()
            for arm, n in live.items():
                self.queues[arm].replicas = max(1, n)
                if n == 0:
                    self.gone(arm, "no live replica")
            # Why an arm has no running replica is Serve's to say (its replicas wait for a node, or
            # failed to start: a canary that disagreed, a checkpoint that does not load): read on
            # elastic clusters, and wherever an arm has none.
            if (self.fleet.cluster.elastic or 0 in live.values()) and time.monotonic() - placement_checked >= PLACEMENT_CHECK_S:
                placement_checked = time.monotonic()
                for arm, why in (await self._unplaced()).items():
                    self.gone(arm, why)
            due = self.health.due_for_probe()
            for arm, ok in zip(due, await asyncio.gather(*(self._answers(a) for a in due))):
                if ok:
                    self.health.succeeded(arm)

    async def readiness(self, routed: list[str]) -> tuple[bool, dict[str, str]]:
        """Whether an arm that takes routed traffic scores a one-pair request in time, and each
        arm's state ("ok", or why not)."""
        results = await asyncio.gather(*(self._scores(a) for a in self.arms))
        states = {a: ("ok" if error is None else error) for a, error in zip(self.arms, results)}
        return any(states[a] == "ok" for a in (routed or self.arms)), states

    async def live_replicas(self) -> dict[str, int]:
        """Live replicas per arm ({} when Ray's actor table cannot be read)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, live_replicas, self.app_name, self.arms)
        except Exception as e:  # noqa: BLE001 - without the table, calls and probes still decide
            log.warning("cannot read the replica table: %s", type(e).__name__)
            return {}

    async def describe(self, arm: str) -> dict:
        """What the arm reports about itself (model, device, ...), asked once; {} if it cannot answer."""
        if arm not in self._described:
            try:
                async with asyncio.timeout(10):
                    self._described[arm] = await self._describe[arm].remote()
            except Exception:  # noqa: BLE001 - informational only
                return {}
        return self._described[arm]

    async def _unplaced(self) -> dict[str, str]:
        """Arms with no running replica and Serve's reason ({} when Serve's status cannot be read)."""
        try:
            states = await asyncio.get_running_loop().run_in_executor(None, deployment_states, self.app_name)
        except Exception as e:  # noqa: BLE001 - calls and probes still decide without it
            log.warning("cannot read Serve's status: %s", type(e).__name__)
            return {}
        return unplaced_arms(states, self.arms)

    async def _answers(self, arm: str) -> bool:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await self._describe[arm].remote()
            return True
        except Exception:  # noqa: BLE001 - a probe that fails keeps the arm down
            return False

    async def _scores(self, arm: str) -> str | None:
        """None when the arm scores a one-pair request in time, else why not."""
        if self.health.is_down(arm):
            return f"down: {self.health.snapshot()[arm]['reason']}"
        limit = self.fleet.limits.request_timeout_s
        try:
            async with asyncio.timeout(limit):
                await self._score[arm].remote(READY_QUERY, limit)
            return None
        except Exception as e:  # noqa: BLE001 - readiness reports, never raises
            return f"cannot score: {type(unwrap(e)).__name__}"


async def _awaited(response):
    return await response

