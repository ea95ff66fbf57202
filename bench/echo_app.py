"""A Ray Serve echo app shaped like the fleet, for `rerank-fleet bench serving`: what Serve
itself costs per request, measured beside the fleet in the same run and under the same Serve
settings (`--serve-mode`).

The shape is the fleet's: a FastAPI ingress deployment (`@serve.ingress`) that parses the same
JSON body (query + documents, Cohere's `/v2/rerank`) with pydantic and makes one
`DeploymentHandle` call to an "arm" deployment, which answers fixed scores, one per document.
Replica counts, CPU reservations and request limits are the fleet's own (`serve.deploy_options`),
so the two differ only in what the fleet's ingress and arm do per request.

`work_s` makes the arm work that long a request on a thread of its own, as the fleet's arm runs
the engine's forward pass (`work_for`): Serve's floor for a request of the engine's length. On a
VM whose idle vCPUs lose their caches (docs/BENCHMARKS.md), Serve's hops cost more when the cores
around them idled through the engine's time than back to back; the zero-work echo app does not
show that, this one does.
"""

# No `from __future__ import annotations`: FastAPI reads the route's body model from its annotation.
import asyncio
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.config import FleetConfig
from serve.deploy_options import arm_options, ingress_options

ECHO_APP_NAME = "echo"
ECHO_ROUTE_PREFIX = "/echo"
ECHO_ARM = "Arm-echo"


class EchoRerankRequest(BaseModel):
    model: str | None = None
    query: str | dict[str, Any]
    documents: list[str | dict[str, Any]] = Field(..., min_length=1)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False


WORK_CHUNK = bytes(64 * 1024)  # hashed over and over: hashlib lets go of the GIL for buffers this size


def work_for(seconds: float) -> None:
    """Keep this thread's CPU busy for `seconds` while the process's event loop stays free, as the
    engine's forward pass does (torch lets go of the GIL too)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        hashlib.sha256(WORK_CHUNK)


@serve.deployment(name=ECHO_ARM)
class EchoArm:
    """The fleet's arm without the engine: fixed scores of the right length, after `work_s` of
    work on its own thread (the fleet's forward thread) when given."""

    def __init__(self, work_s: float = 0.0):
        self.work_s = work_s
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="echo-work")

    async def score(self, documents: list) -> list[float]:
        if self.work_s:
            await asyncio.get_running_loop().run_in_executor(self._thread, work_for, self.work_s)
        return [1.0 / (i + 1) for i in range(len(documents))]


echo_api = FastAPI()


@serve.deployment(name="Ingress")
@serve.ingress(echo_api)
class EchoIngress:
    def __init__(self, arm: DeploymentHandle):
        self.arm = arm

    @echo_api.post("/v2/rerank")
    async def rerank(self, body: EchoRerankRequest) -> dict[str, Any]:
        scores = await self.arm.score.remote(body.documents)  # the documents travel, as the fleet's request does
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[: body.top_n or len(scores)]
        return {"id": "echo", "results": [{"index": i, "relevance_score": scores[i]} for i in order], "meta": {"arm": "echo"}}


def _limits(opts: dict[str, Any]) -> dict[str, Any]:
    """The replica count, CPU reservation and request limits of a fleet deployment's options."""
    keep = ("num_replicas", "ray_actor_options", "max_ongoing_requests", "max_queued_requests", "max_replicas_per_node")
    return {k: opts[k] for k in keep if k in opts}


def build_echo_app(fleet: FleetConfig, work_s: float = 0.0) -> serve.Application:
    """The echo app with the fleet's first arm's and its ingress's replicas and reservations; its
    arm works `work_s` a request."""
    arm = fleet.arms[0]
    return EchoIngress.options(**_limits(ingress_options(fleet))).bind(
        EchoArm.options(**_limits(arm_options(arm, fleet.http.drain_grace_s))).bind(work_s)
    )
