"""The HTTP front door (`Ingress` deployment): the routes of `serve.rerank_routes` and
`serve.experiment_routes` (functions on `serve.http_app.app`, handed this replica's Ingress) over
the serving objects built here, once per replica:

* `RerankService` (serve/rerank_service.py): the one rerank path, body to answer;
* `ArmCalls` (serve/arm_calls.py): deadlines, arm calls, failover, health, readiness;
* `ExperimentTraffic` (serve/experiment_traffic.py): the router from the ledger's control state,
  records to the ledger, shadow and interleaved calls;
* `MediaFetcher` (serve/fetch.py): the only place media are fetched;
* `ScoreCache` (serve/score_cache.py): scores of pairs seen before, in front of the arm calls;
* `Cascades` (serve/cascade.py): a cascade arm's answer composed of its two arms' calls.

Background loops (arm probes, experiment flushes) start here, with the replica.
"""

import asyncio

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.arm_calls import ArmCalls
from serve.cache import FeatureCache
from serve.cascade_calls import Cascades
from serve.config import FleetConfig
from serve import experiment_routes, rerank_routes  # noqa: F401 - they register the routes on `app`
from serve.experiment_traffic import ExperimentTraffic
from serve.fetch import MediaFetcher
from serve.guard import Admission, Guard
from serve.http_app import app
from serve.ingress_metrics import IngressMetrics
from serve.rerank_service import RerankService
from serve.score_cache import ScoreCache

@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    async def __init__(self, config: dict, arms: dict[str, DeploymentHandle], ledger: DeploymentHandle):
        self.fleet = fleet = FleetConfig.from_dict(config).resolve_secrets()
        self.ledger = ledger
        self.metrics = metrics = IngressMetrics()
        memo = FeatureCache(fleet.cache, key_prefix="rerank:", on_event=lambda e, n: metrics.memo_events.inc(n, tags={"event": e}))
        self.fetcher = MediaFetcher(fleet.limits, memo=memo)
        self.calls = ArmCalls(
            fleet, arms, serve.get_replica_context().app_name, self.fetcher,
            on_refusal=lambda arm: metrics.refusals.inc(tags={"arm": arm, "reason": "queue_budget"}),
        )  # fmt: skip
        scores = ScoreCache(fleet, self.calls, on_event=lambda arm, e, n: metrics.score_cache_events.inc(n, tags={"arm": arm, "event": e}))
        cascades = Cascades(fleet, self.calls, scores)
        self.experiment = ExperimentTraffic(fleet, ledger, cascades, metrics)
        admission = Admission(
            fleet.ingress.in_flight_limit(fleet.arms),
            on_refusal=lambda: metrics.requests.inc(tags={"arm": "", "api": "admission", "status": "503"}),
        )
        self.service = RerankService(fleet, self.calls, self.experiment, self.fetcher, metrics, admission, scores, cascades)
        self.guard = Guard(
            api_keys=tuple(k.get_secret_value() for k in fleet.api_keys),
            admin_keys=tuple((name, k.get_secret_value()) for name, k in fleet.admin_keys.items()),
            max_request_bytes=fleet.limits.max_request_bytes,
            body_read_timeout_s=fleet.limits.body_read_timeout_s,
            admission=admission,
        )
        if fleet.cluster.elastic:
            # Start (and let the application report RUNNING) only once the fleet can serve.
            await self.calls.await_arms()
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self.calls.probe_loop()), loop.create_task(self.experiment.flush_loop())]

    async def drain(self, grace_s: float) -> int:
        """Refuse new requests and wait up to `grace_s` for in-flight ones (`RerankService.drain`)."""
        return await self.service.drain(grace_s)
