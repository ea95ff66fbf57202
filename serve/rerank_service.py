"""`RerankService`: the one rerank path, from a parsed body to the answer in the client's shape.

    body -> RerankRequest (limits checked) -> route -> media fetched (`MediaFetcher`, each image
    hashed once) -> ScoreRequest -> a cascade's two stages (`Cascades`), each as a plain arm's
    call -> score cache (`ScoreCache`: only the pairs it lacks go on) -> arm call (`ArmCalls`:
    deadline, failover, health) -> records (`ExperimentTraffic`) -> the client's response shape

A score request pairing several queries (vLLM's N:N form) is one ScoreRequest per run of pairs
with the same query, all scored by the one routed arm and recorded as one answer; it is never
mirrored nor interleaved (those compare one query's ranking).

Every failure becomes a typed HTTP answer here (`serve.errors.error_response`), counted by status.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, MutableMapping
from dataclasses import replace

from engine.errors import DeadlineExceeded
from serve.arm_calls import DEADLINE_HEADER, ArmCalls, time_budget
from serve.cascade_calls import Cascades
from serve.config import FleetConfig
from serve.errors import ArmDown, Draining, error_response, log_if_internal, unwrap
from serve.experiment_traffic import ExperimentTraffic
from serve.fetch import MediaFetcher
from serve.guard import Admission
from serve.ingress_metrics import IngressMetrics
from serve.router import resolve_pin
from serve.score_cache import SCORE_CACHE_HEADER, ScoreCache, wants_cache

__all__ = ["DEADLINE_HEADER", "RerankService"]


class RerankService:
    def __init__(self, fleet: FleetConfig, calls: ArmCalls, experiment: ExperimentTraffic, fetcher: MediaFetcher, metrics: IngressMetrics,
                 admission: Admission, scores: ScoreCache, cascades: Cascades):  # fmt: skip
        self.fleet = fleet
        self.calls = calls
        self.scores = scores
        self.cascades = cascades
        self.experiment = experiment
        self.fetcher = fetcher
        self.metrics = metrics
        self.admission = admission  # rerank requests in flight here, counted (and bounded) by the guard
        self.draining = False

    async def rerank(self, body, shape, headers: Mapping[str, str], response_headers: MutableMapping[str, str]):
        """The answer in `shape` (a response model), or a JSON error response."""
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        try:
            if self.draining:
                raise Draining("the service is draining (shutting down or redeploying); retry on another instance")
            answer = await self._answer(body, shape, headers, response_headers, request_id)
            self.metrics.requests.inc(tags={"arm": response_headers["x-rerank-arm"], "api": shape.__name__, "status": "200"})
            return answer
        except Exception as e:  # noqa: BLE001 - every failure becomes a typed HTTP answer here
            resp = log_if_internal(error_response(e, request_id), e, request_id)
            self.metrics.requests.inc(tags={"arm": "", "api": shape.__name__, "status": str(resp.status_code)})
            return resp

    async def _answer(self, body, shape, headers: Mapping[str, str], response_headers: MutableMapping[str, str], request_id: str):
        started = time.perf_counter()
        limit = self.fleet.limits.request_timeout_s
        budget = time_budget(headers.get(DEADLINE_HEADER), limit)
        deadline = time.monotonic() + budget
        # A client that set itself a deadline shorter than the service's: its passing is the client's choice.
        own_deadline = budget < limit
        req = body.to_internal()
        req.check_limits(self.fleet.limits)
        use_cache = wants_cache(headers.get(SCORE_CACHE_HEADER))
        router_cfg, router, health = self.fleet.router, self.experiment.router, self.calls.health
        pin, pin_field = resolve_pin(headers.get(router_cfg.pin_header), req.arm, router_cfg.pin_header)
        decision = router.route(pin=pin, pin_field=pin_field, sticky_key=headers.get(router_cfg.sticky_header) or req.user, down=health.down())
        if decision.reason == "pinned" and health.is_down(decision.arm):
            why = health.snapshot()[decision.arm]["reason"]
            raise ArmDown(f"arm {decision.arm!r} is out of service ({why}); retry later, or send the request unpinned")

        jobs = await self.fetcher.resolve_requests(req.parts())
        if len(jobs) > 1:
            decision = replace(decision, shadow_arm=None, interleave_with=None, reason="weighted" if decision.reason == "interleaved" else decision.reason)
        if decision.interleave_with is not None:
            outcome = await self.experiment.interleave(decision, jobs[0], deadline, started, request_id)
        else:
            try:
                result, decision = await self.cascades.answer(decision, jobs, deadline, router, use_cache)
            except Exception as e:
                if not (own_deadline and isinstance(unwrap(e), (TimeoutError, DeadlineExceeded))):
                    self.experiment.failed(decision.arm, e)  # the arm's error rate: what guardrails judge
                raise
            outcome = self.experiment.answered(decision, result, time.perf_counter() - started, jobs[0], request_id, req.top_n)
        meta = outcome.meta
        response_headers.update({"x-rerank-arm": meta.arm, "x-rerank-precision": meta.precision, "x-rerank-routed-by": meta.routed_by})
        return shape.build(req, outcome, request_id)

    async def drain(self, grace_s: float) -> int:
        """Refuse new requests (503 Draining) and wait up to `grace_s` for in-flight ones to
        finish; returns how many were still in flight at the end (0: nothing dropped)."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while self.admission.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.admission.in_flight
