"""The main job: the whole fleet on one machine, on embedded Ray, until Ctrl-C.

`run_local` starts a private Ray instance (token auth on, with a token made for this instance; a
small CPU budget, no dashboard; Ray picks a free GCS port, never Redis's 6379) on Serve's fast
request path (serve/request_path.py: HAProxy and throughput mode), serves HTTP on the configured
host (127.0.0.1 by default: HAProxy and the ingress replicas it forwards to listen there only), deploys `build_app`, waits until `/ready` says every arm scores (an arm whose replicas fail to start, e.g. on its canary, is
named and the others serve), prints the URL and a sample request, and
on SIGINT/SIGTERM drains (new requests get 503, in-flight ones finish within
`http.drain_grace_s`) before it shuts Serve and Ray down.

`embedded_serve`, the one place the main job and the benches start Ray and Serve, lays the
processes out on this machine's CPUs in one of two layouts (`LAYOUTS`):

- `shared`: one embedded Ray node on every core; the HTTP path (HAProxy, the ingress) and the arms
  compete for the same CPUs. The main job's layout.
- `split`: production's layout on one machine, for the benches: a simulated two-node Ray cluster.
  The head node (GCS, Serve's controller, HAProxy, the ingress and the ledger) runs on the first
  CPU this process may use, an arm node (the arm replicas) on the others, as a fleet puts its HTTP
  path on head/CPU nodes and its arms on GPU nodes. The driver (a bench's load generator) stays on
  the head's CPU, beside the HTTP path it loads.

CPU affinity is inherited across fork and exec: each node's processes (GCS, raylet, the workers
the raylet starts, HAProxy started by its manager actor) keep the CPUs the driver had when it
started that node. Custom resources steer Serve's replicas to their node (`place`); Serve's
controller and its one proxy (`proxy_location="HeadOnly"`, in both layouts) go to the head.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from engine.errors import ConfigError
from serve.arm_arrival import GAVE_UP, deployment_states, failed_arms
from serve.config import FleetConfig
from serve.deploy_options import arm_deployment_name
from serve.request_path import DEFAULT_SERVE_MODE, set_local_ray_environment

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "local.yaml"
READY_TIMEOUT_S = 900.0  # a first start may compile (vLLM) or build the offline model first
LAYOUTS = ("shared", "split")
DEFAULT_LAYOUT = "shared"
HTTP_RESOURCE = "fleet_http"  # the head node's: the ingress and the ledger ask for one unit
ARMS_RESOURCE = "fleet_arms"  # the arm node's: each arm replica asks for one unit
# Each node holds as many units as any fleet here could ask for: the resources steer, they never limit.
STEERING_UNITS = 1000.0


def local_fleet(config_path: str | None, redis_url: str | None, port: int | None) -> FleetConfig:
    fleet = FleetConfig.from_yaml(config_path or DEFAULT_CONFIG)
    data = fleet.to_dict()
    if redis_url:
        data["cache"]["redis_url"] = redis_url
    if port is not None:
        data["http"]["port"] = port
    return FleetConfig.from_dict(data, source=str(config_path or DEFAULT_CONFIG))


RAY_WORKER_PORTS_END = 19999  # Ray's workers take ports from 10002 to here (min/max_worker_port)


def free_port() -> int:
    """A TCP port free on every interface now, from outside the range the kernel hands out for
    port 0 (and above Ray's worker ports). A port chosen now is bound later (HAProxy's stats
    page, once Ray and Serve are up), and Ray's processes bind port 0 meanwhile: an OS-picked
    port was once taken that way before HAProxy bound it, and HAProxy failed to start."""
    low, high = _ephemeral_ports()
    candidates = range(RAY_WORKER_PORTS_END + 1, low) if low - RAY_WORKER_PORTS_END > 1000 else range(high + 1, 65536)
    for port in random.Random().sample(candidates, min(200, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every candidate tried was taken: the OS's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def ray_cpus_for(fleet: FleetConfig) -> float:
    """Logical CPUs for the embedded Ray: what every replica reserves (`required_resources`) plus
    one for Serve's own actors, in whole numbers as Ray counts them."""
    from serve.deploy_options import required_resources

    return float(max(2, math.ceil(required_resources(fleet)["CPU"] + 1.0)))


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout


def place(fleet: FleetConfig, layout: str) -> FleetConfig:
    """The fleet with each deployment asking for its node's resource in `layout` (unchanged when
    shared). Idempotent: a bench that deploys more apps beside the fleet (its echo app) builds them
    from the placed fleet too."""
    if check_layout(layout) == "shared":
        return fleet
    data = fleet.to_dict()
    data["ingress"]["resources"] = {**data["ingress"]["resources"], HTTP_RESOURCE: 1.0}  # the ledger follows the ingress
    for arm in data["arms"]:
        arm["ray_actor_options"]["resources"] = {**arm["ray_actor_options"]["resources"], ARMS_RESOURCE: 1.0}
    return FleetConfig.from_dict(data, source=f"layout {layout}")


def split_cpus() -> tuple[set[int], set[int]]:
    """(head CPUs, arm CPUs): the first CPU this process may use, and the rest."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        raise ConfigError(f"the split layout needs two CPUs or more; this process may use {allowed}")
    return {allowed[0]}, set(allowed[1:])


@contextlib.contextmanager
def on_cpus(cpus: set[int]) -> Iterator[None]:
    """Run the block's calling thread, and the processes and threads it starts, on `cpus` (Linux:
    affinity is per thread and inherited)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextlib.contextmanager
def local_ray(layout: str, num_cpus: float) -> Iterator[None]:
    """A fresh local Ray instance in `layout`, the driver connected, for the block. `num_cpus` is
    the logical CPUs the fleet reserves; in the split layout each node declares them all (the
    custom resources decide which node takes a replica, never a shortage of logical CPUs)."""
    import ray

    driver = {"log_to_driver": False, "configure_logging": False}
    if check_layout(layout) == "shared":
        # address="local": always a fresh embedded instance, never an existing cluster (RAY_ADDRESS).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **driver)
        try:
            yield
        finally:
            ray.shutdown()
        return
    from ray.cluster_utils import Cluster

    head_cpus, arm_cpus = split_cpus()
    cluster = None
    # The driver's threads start under the head's CPUs: the load generator's CPU is the head's.
    with on_cpus(head_cpus):
        try:
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": num_cpus, "resources": {HTTP_RESOURCE: STEERING_UNITS},
                                                                     "include_dashboard": False})  # fmt: skip
            with on_cpus(arm_cpus):
                cluster.add_node(num_cpus=num_cpus, resources={ARMS_RESOURCE: STEERING_UNITS})
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, **driver)
            yield
        finally:
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()


@contextlib.contextmanager
def embedded_serve(
    fleet: FleetConfig, *, num_cpus: float | None = None, serve_mode: str = DEFAULT_SERVE_MODE, layout: str = DEFAULT_LAYOUT,
    arms_may_fail: bool = False,
) -> Iterator[str]:
    """Embedded Ray + Serve running `fleet` in `serve_mode` (serve/request_path.py) and `layout`
    (`LAYOUTS`: shared cores, or the HTTP path and the arms on CPUs of their own);
    yields the base URL; shuts both down on exit. The model is made ready first (the offline one
    is built here, with progress, if needed). `arms_may_fail`: an arm whose replicas fail to start
    (e.g. its canary) leaves the others serving, and is named on stderr; otherwise the deploy
    fails with it (a bench measures every arm it asks for)."""
    set_local_ray_environment(serve_mode, free_port=free_port)  # before Ray starts: every Ray process inherits it
    from ray import serve

    from serve.app import APP_NAME, build_app, resolve_model

    fleet = place(resolve_model(fleet), layout)
    with local_ray(layout, num_cpus or ray_cpus_for(fleet)):
        try:
            # One proxy, on the head: a second HAProxy on this machine would fight for the port.
            serve.start(proxy_location="HeadOnly", http_options={"host": fleet.http.host, "port": fleet.http.port})
            try:
                serve.run(build_app({"config": fleet.to_dict()}), name=APP_NAME, route_prefix=fleet.http.route_prefix)
            except RuntimeError:  # the application DEPLOY_FAILED
                if not (arms_may_fail and only_arms_failed(fleet)):
                    raise
                for arm, why in arms_out(fleet).items():
                    print(f"arm {arm} is out: {why}", file=sys.stderr, flush=True)
            yield f"http://{fleet.http.host}:{fleet.http.port}{fleet.http.route_prefix.rstrip('/')}"
        finally:
            # One event loop for the drain and the shutdown: in throughput mode a handle routes in
            # the loop it is used from, and Serve's shutdown closes that router there.
            asyncio.run(drain_and_shut_down(APP_NAME, fleet.http.drain_grace_s))


async def drain(app_name: str, grace_s: float) -> int:
    """Ask the app's ingress to refuse new requests and wait for its in-flight ones (up to
    `grace_s`); returns how many were still in flight (0: none dropped). The handle is this call's
    own, shut down in the calling loop: in throughput mode a handle routes in the loop it is used
    from, and a cached one (`serve.get_app_handle`) would be shut down later, with the app, from
    another loop, this one closed by then."""
    from ray.serve.handle import DeploymentHandle

    from serve.deploy_options import INGRESS_NAME

    handle = DeploymentHandle(INGRESS_NAME, app_name).options(method_name="drain")
    try:
        return await asyncio.wait_for(handle.remote(grace_s), grace_s + 10)
    finally:
        await handle.shutdown_async()


async def drain_and_shut_down(app_name: str, grace_s: float) -> int:
    """`drain`, then shut Serve down; returns how many were still in flight (-1: the drain could
    not be asked). The drain is best effort: an app that never came up has nothing to drain."""
    from ray import serve

    left = -1
    try:
        left = await drain(app_name, grace_s)
    except Exception as e:  # noqa: BLE001 - shutting down anyway
        print(f"drain skipped ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
    if left > 0:
        print(f"drain: {left} requests still in flight after {grace_s:g}s; stopping anyway", file=sys.stderr, flush=True)
    await serve.shutdown_async()
    return left


def arms_out(fleet: FleetConfig) -> dict[str, str]:
    """The fleet's arms Serve gave up on (their replicas failed to start), and why."""
    from serve.app import APP_NAME

    return failed_arms(deployment_states(APP_NAME), [a.name for a in fleet.arms])


def only_arms_failed(fleet: FleetConfig) -> bool:
    """Whether the deployments Serve gave up on are arms only (the ingress and the ledger are not among them)."""
    from serve.app import APP_NAME

    arms = {arm_deployment_name(a.name) for a in fleet.arms}
    failed = {name for name, (running, status, _) in deployment_states(APP_NAME).items() if running == 0 and status in GAVE_UP}
    return bool(failed) and failed <= arms


def wait_until_ready(base: str, timeout_s: float, stop: threading.Event, out: Callable[[], Collection[str]] = tuple) -> bool:
    """Poll `/ready` until every arm scores, but those `out()` names (arms that will not start), (True),
    or until `timeout_s` or `stop` (False); says what it waits for every few seconds."""
    import httpx

    deadline, last_note = time.monotonic() + timeout_s, 0.0
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base}/ready", timeout=30)
            if r.status_code == 200 and not set(r.json().get("degraded", ())) - set(out()):
                return True
            state = r.json().get("arms", {})
        except (httpx.HTTPError, ValueError) as e:
            state = {"ingress": type(e).__name__}
        if time.monotonic() - last_note > 5:
            print(f"waiting for the arms to score: {state}", flush=True)
            last_note = time.monotonic()
        stop.wait(0.5)
    return False


def run_local(config_path: str | None = None, redis_url: str | None = None, port: int | None = None) -> int:
    fleet = local_fleet(config_path, redis_url, port)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with embedded_serve(fleet, arms_may_fail=True) as base:
            if not wait_until_ready(base, READY_TIMEOUT_S, stop, out=lambda: arms_out(fleet)):
                if not stop.is_set():
                    print(f"not ready after {READY_TIMEOUT_S:g}s: see {base}/ready; stopping", file=sys.stderr, flush=True)
                    return 1
                return 0
            failed = arms_out(fleet)
            arms = ", ".join(f"{a.name} ({a.precision}, weight {a.weight:g})" for a in fleet.arms if a.name not in failed)
            arms += "".join(f", {c.name} (cascade: {c.first}, then {c.then} on its top {c.k}, weight {c.weight:g})" for c in fleet.cascades)
            arms += "".join(f"\n  out (not started): {arm}: {why}" for arm, why in failed.items())
            cache = fleet.cache.redis_url or "in-process only"
            auth = ' -H "authorization: Bearer $KEY"' if fleet.api_keys else ""
            print(
                f"ready: rerank-fleet serving {fleet.model.source} at {base}\n"
                f"  arms: {arms}\n  feature cache: {cache}\n  docs: {base}/docs   experiments: {base}/v1/experiments\n"
                f"try:\n  curl -s {base}/v2/rerank -H 'content-type: application/json'{auth} \\\n"
                """    -d '{"query": "a red circle", "documents": ["a red circle", "a blue square"], "top_n": 2}'\n"""
                "Ctrl-C stops.",
                flush=True,
            )
            while not stop.wait(0.5):
                pass
            print(f"stopping: draining in-flight requests (up to {fleet.http.drain_grace_s:g}s) ...", flush=True)
        print("stopped.", flush=True)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(run_local(*(sys.argv[1:2] or [None])))
