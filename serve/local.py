"""The main job: the whole fleet on one machine, on embedded Ray, until Ctrl-C.

`run_local` starts a private Ray instance (token auth off, a small CPU budget, no dashboard;
Ray picks a free GCS port, never Redis's 6379), starts Serve's HTTP proxy on the configured
host (127.0.0.1 by default), deploys `build_app`, prints the URL and a sample request, and on
SIGINT/SIGTERM shuts Serve and Ray down before returning.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from serve.config import FleetConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "local.yaml"


def local_fleet(config_path: str | None, redis_url: str | None, port: int | None) -> FleetConfig:
    fleet = FleetConfig.from_yaml(config_path or DEFAULT_CONFIG)
    data = fleet.to_dict()
    if redis_url:
        data["cache"]["redis_url"] = redis_url
    if port is not None:
        data["http"]["port"] = port
    return FleetConfig.from_dict(data, source=str(config_path or DEFAULT_CONFIG))


def ray_cpus_for(fleet: FleetConfig) -> float:
    """Enough logical CPUs for every arm replica's reservation plus the ingress and Serve's actors."""
    need = 0.0
    for arm in fleet.arms:
        replicas = arm.autoscaling.max_replicas if arm.autoscaling else arm.num_replicas
        need += replicas * (arm.ray_actor_options.num_cpus if arm.ray_actor_options.num_cpus is not None else 1.0)
    return max(2.0, need + 1.0)


@contextlib.contextmanager
def embedded_serve(fleet: FleetConfig, *, num_cpus: float | None = None) -> Iterator[str]:
    """Embedded Ray + Serve running `fleet`; yields the base URL; shuts both down on exit.
    The model is made ready first (the offline one is built here, with progress, if needed)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private, loopback-only instance
    import ray
    from ray import serve

    from serve.app import APP_NAME, build_app, resolve_model

    fleet = resolve_model(fleet)

    ray.init(
        address="local",  # always a fresh embedded instance, never an existing cluster (RAY_ADDRESS)
        num_cpus=num_cpus or ray_cpus_for(fleet),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        serve.start(http_options={"host": fleet.http.host, "port": fleet.http.port})
        serve.run(build_app({"config": fleet.to_dict()}), name=APP_NAME, route_prefix=fleet.http.route_prefix)
        yield f"http://{fleet.http.host}:{fleet.http.port}{fleet.http.route_prefix.rstrip('/')}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def run_local(config_path: str | None = None, redis_url: str | None = None, port: int | None = None) -> int:
    fleet = local_fleet(config_path, redis_url, port)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with embedded_serve(fleet) as base:
            arms = ", ".join(f"{a.name} ({a.precision}, weight {a.weight:g})" for a in fleet.arms)
            cache = fleet.cache.redis_url or "in-process only"
            auth = ' -H "authorization: Bearer $KEY"' if fleet.api_keys else ""
            print(
                f"rerank-fleet serving {fleet.model.source} at {base}\n"
                f"  arms: {arms}\n  feature cache: {cache}\n  docs: {base}/docs   experiments: {base}/v1/experiments\n"
                f"try:\n  curl -s {base}/v2/rerank -H 'content-type: application/json'{auth} \\\n"
                """    -d '{"query": "a red circle", "documents": ["a red circle", "a blue square"], "top_n": 2}'\n"""
                "Ctrl-C stops.",
                flush=True,
            )
            while not stop.wait(0.5):
                pass
            print("stopping ...", flush=True)
        print("stopped.", flush=True)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(run_local(*(sys.argv[1:2] or [None])))
