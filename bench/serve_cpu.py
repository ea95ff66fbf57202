"""CPU per answered request, by role, of the Serve processes of one application under a load of
bench/load.py's: `rerank-fleet bench serving`'s comparison of the fleet with the echo app.

Roles: `proxy` (Serve's ProxyActor, the HAProxyManager actor and the haproxy processes, when
running), `ingress`, `arm` (its replicas' whole CPU), `engine` (inside the arm replicas: the CPU
of the threads `BatchedEngine` names `prepare-*` and `forward-*`, read in the replica through
Ray's `__ray_call__`), `ledger` and `controller`; `arm machinery` is `arm` less `engine`. Shared
processes (proxy, controller) count for the application under load; the replicas of the other
application do not. Ray's own daemons (raylet, GCS) and the load generator (this process) are
reported apart and never counted.

Each sample is user+system CPU time (psutil) taken before and after a measured load: idle
background work in the window (health probes, metrics pushes) counts too, as it would in
production.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench.load import closed_loop, open_loop
from bench.report import summary_ms

ENGINE_THREAD_PREFIXES = ("prepare-", "forward-")  # serve/batched_engine.py names them
ROLES = ("proxy", "ingress", "arm machinery", "engine", "ledger", "controller")
PROXY_CLASSES = ("ProxyActor", "HAProxyManager")
RAY_DAEMONS = ("raylet", "gcs_server")


def engine_thread_cpu_s(_replica: Any = None) -> float:
    """CPU seconds of this process's engine threads (run inside an arm replica by `__ray_call__`)."""
    import threading

    total = 0.0
    for t in threading.enumerate():
        if t.name.startswith(ENGINE_THREAD_PREFIXES) and t.ident is not None:
            try:
                total += time.clock_gettime(time.pthread_getcpuclockid(t.ident))
            except (OSError, ProcessLookupError):  # the thread ended between the two calls
                pass
    return total


@dataclass
class ServeProcess:
    pid: int
    role: str  # proxy, ingress, arm, ledger, controller
    app: str | None  # None: shared by every application
    actor: tuple[str, str] | None = None  # (name, namespace) of an arm replica, for its engine threads
    node_id: str | None = None  # the Ray node it runs on (a haproxy process: its manager actor's)


@dataclass
class CpuSample:
    processes: dict[int, ServeProcess] = field(default_factory=dict)
    process_s: dict[int, float] = field(default_factory=dict)
    engine_s: dict[int, float] = field(default_factory=dict)
    other_s: dict[str, float] = field(default_factory=dict)  # not counted: ray daemons, load generator


def _role(class_name: str) -> tuple[str, str | None] | None:
    if class_name in PROXY_CLASSES:
        return "proxy", None
    if class_name == "ServeController":
        return "controller", None
    if class_name.startswith("ServeReplica:"):
        _, app, deployment = class_name.split(":", 2)
        if deployment.startswith("Arm-"):
            return "arm", app
        return ("ledger" if deployment == "Ledger" else "ingress"), app
    return None


def serve_processes() -> list[ServeProcess]:
    """The live Serve actors and haproxy processes, each with its role. The actors come from the
    GCS's actor table (`ray._private.state.actors`: Ray's state API needs the dashboard, which the
    embedded instance runs without); Serve names its actors in the "serve" namespace."""
    import psutil
    from ray._private.state import actors

    found = []
    for a in actors(actor_state_name="ALIVE").values():
        role = _role(a["ActorClassName"])
        if role is not None and a["Pid"]:
            actor = (a["Name"], "serve") if role[0] == "arm" and a["Name"] else None
            found.append(ServeProcess(a["Pid"], role[0], role[1], actor, a["Address"]["NodeID"]))
    for manager in [p for p in found if p.role == "proxy"]:
        # HAProxy runs in the foreground, a child of its manager actor (and no other instance's).
        with contextlib.suppress(psutil.NoSuchProcess):
            haproxy = [c.pid for c in psutil.Process(manager.pid).children() if c.name() == "haproxy"]
            found += [ServeProcess(pid, "proxy", None, node_id=manager.node_id) for pid in haproxy]
    return found


def placement() -> list[dict[str, Any]]:
    """Where the Serve processes, Ray's daemons and this process (the load generator) run: role,
    Ray node (head or worker) and the CPUs the kernel lets each run on (its affinity, as
    /proc/<pid>/status Cpus_allowed_list writes it), with the pids that share that row."""
    import psutil
    import ray

    heads = {n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]}
    session = os.path.basename(ray._private.worker._global_node.get_session_dir_path())  # this cluster's daemons, no other's
    rows: dict[tuple[str, str, str], list[int]] = {}
    others = [(os.getpid(), "load generator", None)]
    for p in psutil.process_iter(["name", "cmdline"]):
        # A raylet names its node; the GCS runs on the head.
        if p.info["name"] in RAY_DAEMONS and session in " ".join(p.info["cmdline"] or []):
            named = [a.split("=", 1)[1] for a in p.info["cmdline"] if a.startswith("--node_id=")]
            others.append((p.pid, p.info["name"], named[0] if named else next(iter(heads), None)))
    for pid, role, node_id in [(p.pid, p.role, p.node_id) for p in serve_processes()] + others:
        try:
            cpus = _cpu_list(os.sched_getaffinity(pid))
        except ProcessLookupError:  # ended since it was listed
            continue
        node = "" if node_id is None else "head" if node_id in heads else "worker"
        rows.setdefault((role, node, cpus), []).append(pid)
    return [{"role": r, "node": n, "cpus": c, "pids": sorted(pids)} for (r, n, c), pids in sorted(rows.items())]


def format_placement(rows: list[dict[str, Any]]) -> str:
    """`placement()` on one line: role on node, CPUs (how many processes)."""
    return "; ".join(f"{r['role']}{' on ' + r['node'] if r['node'] else ''} CPU {r['cpus']} ({len(r['pids'])})" for r in rows)


def _cpu_list(cpus: set[int]) -> str:
    """CPU numbers as the kernel writes a Cpus_allowed_list (0-3,6)."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


class ServeCpu:
    """Samples CPU time of the Serve processes, listed afresh each time (HAProxy starts a new
    process on every reload); `per_request` turns two samples into ms per request. Resolution:
    psutil's clock ticks (10 ms) per process, so a few hundred requests give ~0.1 ms."""

    def __init__(self):
        self.processes: dict[int, ServeProcess] = {}  # every one seen

    def sample(self) -> CpuSample:
        import psutil
        import ray

        s = CpuSample(processes={p.pid: p for p in serve_processes()})
        self.processes.update(s.processes)
        for pid in s.processes:
            try:
                t = psutil.Process(pid).cpu_times()
                s.process_s[pid] = t.user + t.system
            except psutil.NoSuchProcess:
                pass
        arms = [p for p in s.processes.values() if p.actor is not None]
        calls = [ray.get_actor(*p.actor).__ray_call__.remote(engine_thread_cpu_s) for p in arms]
        s.engine_s = dict(zip((p.pid for p in arms), ray.get(calls, timeout=30)))
        me = psutil.Process(os.getpid()).cpu_times()
        s.other_s["load generator"] = me.user + me.system
        for p in psutil.process_iter(["name", "cpu_times"]):
            if p.info["name"] in RAY_DAEMONS and p.info["cpu_times"] is not None:
                s.other_s["ray daemons"] = s.other_s.get("ray daemons", 0.0) + p.info["cpu_times"].user + p.info["cpu_times"].system
        return s

    @staticmethod
    def per_request(app: str, before: CpuSample, after: CpuSample, answered: int) -> dict[str, Any]:
        """ms of CPU per answered request by role for `app` (shared processes included), their
        total (`serve_path`, engine excluded), and the uncounted processes' ms apart. A process
        that started between the samples counts whole; one that ended, not at all."""
        used: Counter[str] = Counter()
        for pid, p in after.processes.items():
            if p.app in (None, app) and pid in after.process_s:
                used[p.role] += after.process_s[pid] - before.process_s.get(pid, 0.0)
                if p.role == "arm":
                    used["engine"] += after.engine_s.get(pid, 0.0) - before.engine_s.get(pid, 0.0)
        used["arm machinery"] = used.pop("arm", 0.0) - used["engine"]
        ms = {role: round(1000 * used[role] / answered, 2) for role in ROLES}
        return {
            "cpu_ms_per_request": ms,
            "serve_path_cpu_ms": round(sum(v for r, v in ms.items() if r != "engine"), 2),
            "not_counted_ms": {k: round(1000 * (after.other_s[k] - before.other_s.get(k, 0.0)) / answered, 2) for k in after.other_s},
        }


def measure_app(cpu: ServeCpu, app: str, url: str, bodies_1: list[dict], bodies_n: list[dict], in_flight: int) -> dict[str, Any]:
    """p50 at 1 and `in_flight` requests in flight, throughput, and CPU per request by role at both."""
    asyncio.run(closed_loop(url, bodies_n[: 2 * in_flight], in_flight))  # warm: connections, handles, batches
    out: dict[str, Any] = {}
    for n, bodies in ((1, bodies_1), (in_flight, bodies_n)):
        before = cpu.sample()
        latencies, wall = asyncio.run(closed_loop(url, bodies, n))
        after = cpu.sample()
        out[f"in_flight_{n}"] = {**_latency_row(latencies, wall), **cpu.per_request(app, before, after, len(latencies))}
    return out


def measure_at_rate(cpu: ServeCpu, app: str, base_url: str, bodies: list[dict], rate: float) -> dict[str, Any]:
    """CPU per request by role with `len(bodies)` requests arriving at `rate` per second (open
    loop): two apps measured at the same rate carry the same background work (controller, health
    probes, metrics pushes) per request, whatever their capacity. Every answer must be a 200."""
    before = cpu.sample()
    start = time.perf_counter()
    result = asyncio.run(open_loop(base_url, rate, len(bodies) / rate, bodies))
    wall = time.perf_counter() - start
    after = cpu.sample()
    statuses = Counter(o.status for o in result.outcomes)
    if set(statuses) != {200}:
        raise RuntimeError(f"{base_url} at {rate:.1f} req/s answered {dict(statuses)}: lower the rate")
    latencies = [o.latency_s for o in result.outcomes]
    return {"rate_req_per_s": round(rate, 1), **_latency_row(latencies, wall), **cpu.per_request(app, before, after, len(latencies))}


def _latency_row(latencies: list[float], wall: float) -> dict[str, Any]:
    summary = summary_ms(latencies)
    return {"requests": summary["n"], "p50_ms": summary["p50"], "p95_ms": summary["p95"], "req_per_s": round(len(latencies) / wall, 2)}
