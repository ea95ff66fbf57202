"""Live replica actors per arm, from Ray's named-actor table: the serving layer's one use of a
private Ray API (`ray.serve._private.common.ReplicaID`), and why.

A killed or crashed replica leaves the actor table at once (a GCS call of about a millisecond),
long before Serve's health check notices and `serve.status()` changes; while it is gone, Serve's
handle holds calls for the arm instead of failing them. Counting the table lets the ingress take
such an arm out of routed traffic within one probe interval. No public API says this sooner.
"""

from __future__ import annotations

from serve.deploy_options import ARM_PREFIX


def live_replicas(app_name: str, arms: list[str]) -> dict[str, int]:
    import ray
    from ray.serve._private.common import ReplicaID

    counts = dict.fromkeys(arms, 0)
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if ReplicaID.is_full_id_str(name):
            deployment = ReplicaID.from_full_id_str(name).deployment_id
            arm = deployment.name.removeprefix(ARM_PREFIX)
            if deployment.app_name == app_name and arm in counts:
                counts[arm] += 1
    return counts
