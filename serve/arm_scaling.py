"""How an arm asks for its replicas on a cluster whose nodes join over time (`cluster: elastic`).

Serve reports an application RUNNING only when every deployment has reached its target, and
KubeRay routes traffic only to RUNNING applications. An arm whose replicas wait for GPU nodes
that are still starting, or never come (a sold-out type), would hold the whole fleet back. So on
such a cluster an arm is deployed at 0 replicas (the application is RUNNING at once) and
`PlannedReplicas`, its Serve autoscaling policy (`serve.deploy_options.deferred_autoscaling`
sets it), asks for the planned count on the first tick:
Serve then reports the arm UPSCALING (triggered by autoscaling), which leaves the application
RUNNING while the replicas wait for their nodes; their pending resource demand is what makes
the Ray autoscaler start GPU nodes. Above the planned count, Serve's own queue-length policy
scales as usual (with its delays).
"""

from __future__ import annotations

from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext


class PlannedReplicas:
    """Never fewer than `planned` replicas; more when Serve's queue-length policy asks."""

    def __init__(self, planned: int):
        self.planned = planned

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        by_load, state = replica_queue_length_autoscaling_policy(ctx)
        return max(self.planned, int(by_load)), state

