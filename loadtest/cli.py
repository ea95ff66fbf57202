"""`rerank-fleet loadtest`: Locust against a running endpoint, then one comparison report.

    rerank-fleet loadtest --users 8 --duration 60 --out out/loadtest/fp32-vs-nf4
    rerank-fleet loadtest --quick                        # a few seconds, small load (CI)
    rerank-fleet loadtest --report-from out/loadtest/x  # rebuild the report from a run's files
    rerank-fleet loadtest --start-local configs/local.yaml --duration 60   # start the app here too
    rerank-fleet loadtest --capacity --slo-ms 500 --duration 15   # stepped-load sweep per arm -> capacity.json

Targets outside loopback are refused unless --allow-remote. Locust stops by itself after
--duration, and the runner kills it if it has not exited a minute after that. For an endpoint
with API keys, put the key in the RERANK_API_KEY environment variable (never on a command line).
"""

from __future__ import annotations

import argparse
import os
import sys

import httpx
from datetime import datetime
from pathlib import Path

DEFAULT_HOST = "http://127.0.0.1:8000"
# --quick: enough requests per arm for percentiles and a cache that warms up, in a few seconds.
QUICK = {"users": 4, "spawn_rate": 4.0, "duration": 5, "docs": 4, "pool_size": 4, "stop_timeout": 5.0}


def add_subparser(subparsers) -> argparse.ArgumentParser:
    from loadtest.payloads import TrafficConfig

    t = TrafficConfig()
    p = subparsers.add_parser("loadtest", help="Locust comparison of precision arms against a running endpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--host", default=DEFAULT_HOST, help=f"endpoint base URL (default {DEFAULT_HOST})")
    p.add_argument("--users", type=int, default=8, help="concurrent Locust users")
    p.add_argument("--spawn-rate", type=float, default=8.0, help="users started per second")
    p.add_argument("--duration", type=int, default=60, help="seconds of load")
    p.add_argument("--arms", default=None, help="comma list of arms (default: the endpoint's, from /v1/experiments)")
    p.add_argument("--mode", choices=["pinned", "split"], default="pinned",
                   help="pinned: one user class per arm; split: the router's weights decide")  # fmt: skip
    p.add_argument("--docs", type=int, default=t.docs, help="documents per request")
    p.add_argument("--text-chars", type=int, default=t.text_chars, help="characters per text document")
    p.add_argument("--image-share", type=float, default=t.image_share, help="share of documents that are images")
    p.add_argument("--pool-size", type=int, default=t.pool_size, help="images drawn once and reused")
    p.add_argument("--repeat-rate", type=float, default=t.repeat_rate, help="share of image documents from the pool")
    p.add_argument("--top-n", type=int, default=t.top_n, help="results asked for per request")
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--wait", type=float, default=0.1, help="think time: users wait 0..WAIT seconds between requests")
    p.add_argument("--stop-timeout", type=float, default=10.0, help="seconds in-flight requests may finish at the end")
    p.add_argument("--reference", default=None, help="arm that agreement is reported against (default: the shadow's primary)")
    p.add_argument("--out", default=None, help="output folder (default out/loadtest/<time>)")
    p.add_argument("--allow-remote", action="store_true", help="allow a target that is not loopback")
    p.add_argument("--quick", action="store_true", help="a few seconds of small load (CI): overrides users/duration/docs/pool")
    p.add_argument("--report-from", default=None, metavar="DIR", help="only rebuild the report from a finished run's folder")
    p.add_argument("--capacity", action="store_true",
                   help="capacity mode: per arm, Locust at each of --user-steps for --duration s each; writes capacity.json/.md/.png")
    p.add_argument("--slo-ms", type=float, default=500.0, help="capacity mode: the p95 latency an arm must keep")
    p.add_argument("--user-steps", default="1,2,4,8,16,32", help="capacity mode: comma list of concurrent users, rising")
    p.add_argument("--start-local", default=None, metavar="CONFIG",
                   help="first start this fleet YAML on embedded Ray (as `rerank-fleet up`) on --host's port; "
                        "stop it after the run")  # fmt: skip
    p.set_defaults(func=cmd_loadtest)
    return p


def plan_from_args(args):
    from loadtest.payloads import TrafficConfig
    from loadtest.runner import LoadTestPlan

    users, spawn_rate, duration, docs, pool_size, stop_timeout = (
        args.users, args.spawn_rate, args.duration, args.docs, args.pool_size, args.stop_timeout,
    )  # fmt: skip
    if args.quick:
        users, spawn_rate, duration = QUICK["users"], QUICK["spawn_rate"], QUICK["duration"]
        docs, pool_size, stop_timeout = QUICK["docs"], QUICK["pool_size"], QUICK["stop_timeout"]
    traffic = TrafficConfig(
        docs=docs, text_chars=args.text_chars, image_share=args.image_share, pool_size=pool_size,
        repeat_rate=args.repeat_rate, top_n=args.top_n, seed=args.seed,
    )  # fmt: skip
    out = Path(args.out) if args.out else Path("out/loadtest") / datetime.now().strftime("%Y%m%d-%H%M%S")
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip()) if args.arms else ()
    return LoadTestPlan(
        host=args.host, users=users, spawn_rate=spawn_rate, duration_s=duration, arms=arms, mode=args.mode,
        traffic=traffic, out_dir=out, wait_s=args.wait, stop_timeout_s=stop_timeout, reference_arm=args.reference,
        allow_remote=args.allow_remote, api_key=os.environ.get("RERANK_API_KEY") or None, start_local=args.start_local,
    )  # fmt: skip


def _run_against_local_app(plan, config_path: str, run):
    """Start the fleet in this process (embedded Ray + Serve on loopback), `run(plan)`, stop it."""
    import dataclasses
    from urllib.parse import urlsplit

    from loadtest.runner import checked_target
    from serve.local import embedded_serve, local_fleet

    port = urlsplit(checked_target(plan.host)).port or 80  # loopback only: this starts a server here
    fleet = local_fleet(config_path, None, port)
    if fleet.http.host not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError(f"{config_path}: http.host is {fleet.http.host}; --start-local serves on loopback only")
    with embedded_serve(fleet) as base:
        print(f"started {config_path} at {base}", flush=True)
        return run(dataclasses.replace(plan, host=base))


def cmd_loadtest(args) -> int:
    from loadtest.report import build_report
    from loadtest.runner import EndpointError, RemoteTargetRefused, run_loadtest

    if args.report_from:
        report = build_report(Path(args.report_from), reference=args.reference)
        print(report.markdown)
        return 0
    if args.capacity:
        return cmd_capacity(args)
    try:
        plan = plan_from_args(args)
        if args.start_local:
            run = _run_against_local_app(plan, args.start_local, run_loadtest)
        else:
            run = run_loadtest(plan)
    except (RemoteTargetRefused, EndpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not run.stats_csv.exists():
        print(f"error: Locust wrote no statistics (exit {run.locust_returncode}); see {run.out_dir / 'locust.log'}",
              file=sys.stderr)  # fmt: skip
        return 1
    report = build_report(run.out_dir, reference=args.reference)
    total = report.aggregate.requests if report.aggregate else 0
    print(f"{total} requests over {plan.duration_s} s to {run.target} ({', '.join(run.arms)}); report: {report.markdown}")
    for fig in report.arms:
        row = fig.locust
        if row is not None:
            print(f"  {fig.arm:>12}: {row.requests} requests, {row.failures} failures, {row.rps:.2f} req/s, "
                  f"p50 {row.p50_ms} ms, p95 {row.p95_ms} ms")  # fmt: skip
    if run.killed:
        print("warning: Locust did not stop by itself and was killed at the hard time limit", file=sys.stderr)
        return 1
    return 0 if total > 0 else 1


def cmd_capacity(args) -> int:
    import functools

    from loadtest.capacity import run_capacity
    from loadtest.runner import EndpointError, RemoteTargetRefused

    try:
        steps = sorted({int(x) for x in args.user_steps.split(",") if x.strip()})
        if not steps or steps[0] < 1:
            raise ValueError(f"--user-steps: positive whole numbers, got {args.user_steps!r}")
        plan = plan_from_args(args)
        sweep = functools.partial(run_capacity, user_steps=steps, slo_ms=args.slo_ms)
        report = _run_against_local_app(plan, args.start_local, sweep) if args.start_local else sweep(plan)
    except (RemoteTargetRefused, EndpointError, ValueError, httpx.HTTPError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for a in report["arms"]:
        print(f"  {a['arm']:>12}: capacity {a['capacity_rps']:.2f} req/s ({a['pairs_per_s']:.1f} pairs/s) at p95 <= {args.slo_ms:g} ms")
    print(f"capacity report: {plan.out_dir / 'capacity.md'} (JSON for `rerank-fleet plan --capacity`: {plan.out_dir / 'capacity.json'})")
    return 0 if any(a["capacity_rps"] > 0 for a in report["arms"]) else 1
