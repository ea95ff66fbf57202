"""A Ray Serve echo app shaped like the fleet, for `rerank-fleet bench serving`: what Serve
itself costs per request, measured beside the fleet in the same run and under the same Serve
settings (`--serve-mode`).

The shape is the fleet's: a FastAPI ingress deployment (`@serve.ingress`) that parses the same
JSON body (query + documents, Cohere's `/v2/rerank`) with pydantic and makes one
`DeploymentHandle` call to an "arm" deployment, which answers fixed scores, one per document.
Replica counts, CPU reservations and request limits are the fleet's own (`serve.deploy_options`),
so the two differ only in what the fleet's ingress and arm do per request.
"""

# No `from __future__ import annotations`: FastAPI reads the route's body model from its annotation.
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


@serve.deployment(name=ECHO_ARM)
class EchoArm:
    """The fleet's arm without the engine: fixed scores of the right length."""

    async def score(self, documents: list) -> list[float]:
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


def build_echo_app(fleet: FleetConfig) -> serve.Application:
    """The echo app with the fleet's first arm's and its ingress's replicas and reservations."""
    arm = fleet.arms[0]
    return EchoIngress.options(**_limits(ingress_options(fleet))).bind(
        EchoArm.options(**_limits(arm_options(arm, fleet.http.drain_grace_s))).bind()
    )
