"""Capacity per arm: a stepped-load sweep that finds the highest throughput an arm sustains while
its p95 latency stays under an SLO.

For each arm, Locust runs pinned to that arm alone at each user count in turn (closed loop, no
think time), every step bounded in time; a step's throughput and p95 come from Locust's stats.
The sweep of an arm stops at the first step past the SLO (or failing more than 1 % of its
requests). The arm's capacity is the best throughput among the steps within the SLO.

Capacity is the whole arm's (all its live replicas, counted from the endpoint's /v1/models); the
planner divides by the replica count. Keep shadow traffic to the swept arm off while sweeping
(it adds load the figures do not show).

Outputs (in the run folder): `capacity.json` (what `rerank-fleet plan --capacity` reads in place
of estimates for the device it was measured on), `capacity.md` and `capacity.png` (p95 latency
against throughput per arm: the picture precisions are compared by), and each step's Locust files.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from loadtest.report import final_or_periodic, pyplot, read_stats_csv, save_figure
from loadtest.runner import LoadTestPlan, checked_target, machine_description, run_loadtest

MAX_FAILURE_RATE = 0.01
SCHEMA = "rerank-fleet capacity/1"


@dataclass(frozen=True)
class Step:
    users: int
    requests: int
    failures: int
    rps: float
    p50_ms: float | None
    p95_ms: float | None

    @property
    def failure_rate(self) -> float:
        return self.failures / self.requests if self.requests else 1.0

    def within(self, slo_ms: float) -> bool:
        return self.requests > 0 and self.p95_ms is not None and self.p95_ms <= slo_ms and self.failure_rate <= MAX_FAILURE_RATE


def capacity_of(steps: list[Step], slo_ms: float) -> Step | None:
    """The step with the highest throughput among those within the SLO (None: not even the first)."""
    ok = [s for s in steps if s.within(slo_ms)]
    return max(ok, key=lambda s: s.rps) if ok else None


def sweep_arm(plan: LoadTestPlan, arm: str, user_steps: list[int], slo_ms: float, out_dir: Path, log=print) -> list[Step]:
    steps: list[Step] = []
    for users in user_steps:
        step_dir = out_dir / arm / f"users-{users}"
        run = run_loadtest(dataclasses.replace(plan, arms=(arm,), users=users, spawn_rate=float(users), mode="pinned",
                                               wait_s=0.0, out_dir=step_dir))  # fmt: skip
        stats = read_stats_csv(final_or_periodic(step_dir, "stats")) if run.stats_csv.exists() else {}
        row = stats.get(f"rerank[{arm}]")
        # Throughput counts answered requests only: fast refusals past the arm's bounds are not capacity.
        answered_rps = row.rps * (row.requests - row.failures) / row.requests if row and row.requests else 0.0
        step = Step(users, row.requests, row.failures, answered_rps, row.p50_ms, row.p95_ms) if row else Step(users, 0, 0, 0.0, None, None)
        steps.append(step)
        log(f"  {arm:>12} users {users:>3}: {step.rps:7.2f} req/s, p95 {step.p95_ms} ms, {step.failures}/{step.requests} failed")
        if not step.within(slo_ms):
            break  # past the knee: more users only queue
    return steps


def run_capacity(plan: LoadTestPlan, *, user_steps: list[int], slo_ms: float, log=print) -> dict[str, Any]:
    """Sweep every arm of the endpoint (or `plan.arms`); write and return the capacity report."""
    target = checked_target(plan.host, allow_remote=plan.allow_remote)
    headers = {"authorization": f"Bearer {plan.api_key}"} if plan.api_key else {}
    with httpx.Client(base_url=target, timeout=30, headers=headers) as c:
        models = c.get("/v1/models").json()
    model = models["data"][0]
    cards = {a["name"]: a for a in model["arms"]}
    arms = plan.arms or tuple(cards)
    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "schema": SCHEMA, "model": model["id"], "slo_p95_ms": slo_ms, "docs_per_request": plan.traffic.docs,
        "image_share": plan.traffic.image_share, "step_duration_s": plan.duration_s, "user_steps": user_steps,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine_description(), "arms": [],
    }  # fmt: skip
    for arm in arms:
        log(f"capacity sweep of arm {arm} (p95 SLO {slo_ms:g} ms, {plan.duration_s} s per step)")
        steps = sweep_arm(plan, arm, user_steps, slo_ms, out, log)
        best = capacity_of(steps, slo_ms)
        card = cards.get(arm, {})
        report["arms"].append({
            "arm": arm, "precision": card.get("precision"), "device": card.get("device"), "replicas": card.get("replicas") or 1,
            "capacity_rps": best.rps if best else 0.0, "pairs_per_s": (best.rps if best else 0.0) * plan.traffic.docs,
            "at_users": best.users if best else None, "p95_ms_at_capacity": best.p95_ms if best else None,
            "steps": [dataclasses.asdict(s) for s in steps],
        })  # fmt: skip
    write_outputs(report, out)
    return report


def write_outputs(report: dict[str, Any], out: Path) -> None:
    (out / "capacity.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# Capacity per arm: {report['model']}", "",
        f"Highest throughput with p95 <= {report['slo_p95_ms']:g} ms and <= {MAX_FAILURE_RATE:.0%} failures; "
        f"{report['docs_per_request']} documents per request, {report['step_duration_s']} s per step, measured {report['measured_at']}.", "",
        "| arm | precision | device | replicas | capacity req/s | pairs/s | at users | p95 ms there | steps (users: req/s, p95 ms) |",
        "|---|---|---|--:|--:|--:|--:|--:|---|",
    ]  # fmt: skip
    for a in report["arms"]:
        steps = "; ".join(f"{s['users']}: {s['rps']:.1f}, {s['p95_ms']}" for s in a["steps"])
        lines.append(f"| {a['arm']} | {a['precision']} | {a['device']} | {a['replicas']} | {a['capacity_rps']:.2f} | {a['pairs_per_s']:.1f} | "
                     f"{a['at_users']} | {a['p95_ms_at_capacity']} | {steps} |")  # fmt: skip
    lines += ["", "![p95 latency against throughput](capacity.png)", ""]
    (out / "capacity.md").write_text("\n".join(lines))
    plot_capacity(report, out / "capacity.png")


def plot_capacity(report: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for a in report["arms"]:
        pts = [(s["rps"], s["p95_ms"]) for s in a["steps"] if s["p95_ms"] is not None]
        if pts:
            line = ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{a['arm']} ({a['precision']})")[0]
            if a["capacity_rps"]:
                ax.axvline(a["capacity_rps"], color=line.get_color(), linestyle=":", linewidth=1)
    ax.axhline(report["slo_p95_ms"], color="grey", linestyle="--", linewidth=1, label=f"SLO p95 {report['slo_p95_ms']:g} ms")
    ax.set_xlabel("throughput (answered requests/s)")
    ax.set_ylabel("p95 latency (ms)")
    ax.set_title("Latency against throughput per arm (dotted: capacity)")
    ax.legend(fontsize=8)
    ax.set_ylim(bottom=0)
    return save_figure(fig, path)
