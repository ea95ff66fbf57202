"""The comparison report of one load-test run: Markdown with a per-arm table, and PNG plots.

Reads only what the run left in its folder (see `loadtest.runner`), so a report can be rebuilt
from those files at any time:

* Locust's statistics table, `locust_stats_final.csv` (written by the locustfile when Locust
  quits, so requests finished during the stop timeout are in it; `locust_stats.csv`, Locust's
  last periodic write, if it is missing): requests, failures, RPS and latency percentiles per
  arm row (`rerank[<arm>]`) and the aggregate;
* `locust_stats_history.csv` (full history): cumulative counts per row each second, whence the
  throughput over time;
* `locust_failures_final.csv` (else `locust_failures.csv`): failures per row and error;
* `/v1/experiments` before and after the run: per-arm image-cache hits and misses and shadow
  agreement, taken as the change over the run (after - before), so traffic the endpoint saw
  earlier does not leak into this run's numbers;
* `client_stats.json`: what the load generator itself saw in the responses (cache use per answer).
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.payloads import arm_of_request_name
from loadtest.runner import CSV_PREFIX, load_run

AGGREGATED = "Aggregated"
PNG_DPI = 80  # small checked-in PNGs
LATENCY_PNG = "latency_percentiles.png"
THROUGHPUT_PNG = "throughput.png"
FAILURES_PNG = "failures.png"


# ------------------------------------------------------------------------------ Locust CSVs


@dataclass(frozen=True)
class LocustRow:
    name: str
    requests: int
    failures: int
    rps: float
    failures_per_s: float
    avg_ms: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None


def _number(value: str) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None  # Locust writes N/A for rows without requests
    return None if math.isnan(x) else x


def read_stats_csv(path: Path) -> dict[str, LocustRow]:
    rows = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows[r["Name"]] = LocustRow(
                name=r["Name"],
                requests=int(r["Request Count"]),
                failures=int(r["Failure Count"]),
                rps=_number(r["Requests/s"]) or 0.0,
                failures_per_s=_number(r["Failures/s"]) or 0.0,
                avg_ms=_number(r["Average Response Time"]),
                p50_ms=_number(r["50%"]),
                p95_ms=_number(r["95%"]),
                p99_ms=_number(r["99%"]),
                max_ms=_number(r["Max Response Time"]),
            )
    return rows


def read_history_csv(path: Path) -> dict[str, list[tuple[int, int, int, int]]]:
    """Per row name: [(unix second, users, cumulative requests, cumulative failures)], one per second."""
    series: dict[str, dict[int, tuple[int, int, int]]] = defaultdict(dict)
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            # The last line written within a second wins: it has the counts at that second's end.
            series[r["Name"]][int(r["Timestamp"])] = (int(r["User Count"]), int(r["Total Request Count"]), int(r["Total Failure Count"]))
    return {name: [(t, *v) for t, v in sorted(points.items())] for name, points in series.items()}


def throughput_series(points: list[tuple[int, int, int, int]], t0: int) -> tuple[list[float], list[float], list[float]]:
    """(seconds since t0, requests/s, failures/s) between consecutive history lines."""
    xs, rps, fps = [], [], []
    for (t_a, _, req_a, fail_a), (t_b, _, req_b, fail_b) in zip(points, points[1:]):
        dt = t_b - t_a
        xs.append(t_b - t0)
        rps.append((req_b - req_a) / dt)
        fps.append((fail_b - fail_a) / dt)
    return xs, rps, fps


def read_failures_csv(path: Path) -> dict[str, Counter]:
    """Per row name: occurrences per error text (the text a response was failed with)."""
    out: dict[str, Counter] = defaultdict(Counter)
    if not path.exists():
        return out
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            error = r["Error"]
            wrapped = re.fullmatch(r"""CatchResponseError\((['"])(.*)\1\)""", error)
            out[r["Name"]][wrapped.group(2) if wrapped else error] += int(r["Occurrences"])
    return out


def final_or_periodic(out_dir: Path, kind: str) -> Path:
    """`locust_<kind>_final.csv` when the locustfile wrote it at quit, else Locust's own file."""
    final = out_dir / f"{CSV_PREFIX}_{kind}_final.csv"
    return final if final.exists() else out_dir / f"{CSV_PREFIX}_{kind}.csv"


# ----------------------------------------------------------------------- /v1/experiments


@dataclass(frozen=True)
class ServerDelta:
    """One arm's change in /v1/experiments over the run."""

    precision: str | None
    answered: int
    client_errors: int
    server_errors: int
    cache_hits: int
    cache_misses: int
    shadow_requests: int
    shadow_failed: int  # errors + dropped
    agreement_n: int
    agreement: dict[str, float]  # metric -> mean over this run's shadow comparisons
    agreement_against: dict[str, int]  # primary arm -> comparisons
    routed_by: dict[str, int]
    mean_batch_requests: float | None  # requests per engine call over this run's answers
    ingress_latency_ms: dict  # p50/p95/p99 over the ingress's window at the end of the run, and its size

    @property
    def cache_hit_rate(self) -> float | None:
        looked_up = self.cache_hits + self.cache_misses
        return self.cache_hits / looked_up if looked_up else None


def experiments_delta(before: dict | None, after: dict | None) -> dict[str, ServerDelta]:
    """Per-arm change between two /v1/experiments snapshots of the same ingress."""
    if not after or not isinstance(after.get("arms"), dict):
        return {}
    before_arms = (before or {}).get("arms", {}) or {}
    out = {}
    for arm, a in after["arms"].items():
        b = before_arms.get(arm, {})
        agree_a = a.get("shadow", {}).get("agreement", {})
        agree_b = b.get("shadow", {}).get("agreement", {})
        n_a, n_b = int(agree_a.get("n", 0)), int(agree_b.get("n", 0))
        dn = n_a - n_b
        agreement = {}
        if dn > 0:
            for metric, mean_a in agree_a.items():
                if metric in ("n", "against") or not isinstance(mean_a, int | float):
                    continue
                # Snapshots carry running means: recover this run's mean from the sums.
                agreement[metric] = (mean_a * n_a - float(agree_b.get(metric, 0.0)) * n_b) / dn
        against = Counter(agree_a.get("against", {}))
        against.subtract(Counter(agree_b.get("against", {})))
        routed = Counter(a.get("routed_by", {}))
        routed.subtract(Counter(b.get("routed_by", {})))

        def diff(*keys: str) -> int:
            va, vb = a, b
            for k in keys:
                va, vb = (va or {}).get(k, 0), (vb or {}).get(k, 0)
            return int(va or 0) - int(vb or 0)

        answered = diff("requests")
        batch_a, batch_b = a.get("mean_batch_requests"), b.get("mean_batch_requests")
        mean_batch = None
        if answered > 0 and batch_a is not None:
            # Also a running mean: this run's share from the sums (rounded at the source to 3 decimals).
            mean_batch = (batch_a * int(a.get("requests", 0)) - (batch_b or 0.0) * int(b.get("requests", 0))) / answered

        out[arm] = ServerDelta(
            precision=a.get("precision"),
            answered=answered,
            client_errors=diff("errors", "client"),
            server_errors=diff("errors", "server"),
            cache_hits=diff("image_cache", "hits"),
            cache_misses=diff("image_cache", "misses"),
            shadow_requests=diff("shadow", "requests"),
            shadow_failed=diff("shadow", "errors") + diff("shadow", "dropped"),
            agreement_n=dn,
            agreement=agreement,
            agreement_against={k: v for k, v in against.items() if v > 0},
            routed_by={k: v for k, v in routed.items() if v > 0},
            mean_batch_requests=mean_batch,
            ingress_latency_ms=dict(a.get("latency_ms") or {}),
        )
    return out


def reference_arm(deltas: dict[str, ServerDelta], arms: list[str], requested: str | None = None) -> str | None:
    """The arm agreement is measured against: as asked, else the primary the shadow arm was compared with most."""
    if requested:
        return requested
    against: Counter = Counter()
    for d in deltas.values():
        against.update(d.agreement_against)
    if against:
        return against.most_common(1)[0][0]
    return arms[0] if arms else None


# ---------------------------------------------------------------------------- the report


@dataclass
class ArmFigures:
    """One row of the comparison table; every number comes from the run's files."""

    arm: str
    precision: str | None
    locust: LocustRow | None
    server: ServerDelta | None
    client: dict = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return self.locust.requests if self.locust else 0

    @property
    def failures(self) -> int:
        return self.locust.failures if self.locust else 0


@dataclass
class Report:
    markdown: Path
    plots: list[Path]
    arms: list[ArmFigures]
    aggregate: LocustRow | None
    reference: str | None


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _agreement_cell(fig: ArmFigures, reference: str | None, top_k_keys: list[str]) -> str:
    if fig.arm == reference:
        return "reference"
    s = fig.server
    if s is None or s.agreement_n == 0:
        return "–"
    values = " / ".join(f"{s.agreement[k]:.3f}" if k in s.agreement else "–" for k in top_k_keys)
    others = {k: v for k, v in s.agreement_against.items() if k != reference}
    note = f" (also vs {', '.join(f'{k}: {v}' for k, v in sorted(others.items()))})" if others else ""
    return f"{values} (n={s.agreement_n}){note}"


def _agreement_keys(arms: list[ArmFigures]) -> list[str]:
    """spearman first, then ndcg, topk_overlap and rbo in the names the endpoint uses."""
    keys: list[str] = []
    for fig in arms:
        if fig.server:
            keys.extend(k for k in fig.server.agreement if k not in keys)
    order = {"spearman": 0}
    return sorted(keys, key=lambda k: (order.get(k, 1 if k.startswith("ndcg") else 2), k)) or ["spearman", "ndcg", "topk_overlap", "rbo"]


def collect(out_dir: Path, reference: str | None = None) -> tuple[dict, list[ArmFigures], LocustRow | None, str | None]:
    data = load_run(out_dir)
    run = data["run"] or {}
    stats = read_stats_csv(final_or_periodic(out_dir, "stats"))
    deltas = experiments_delta(data["experiments_before"], data["experiments_after"])
    client_arms = (data["client_stats"] or {}).get("arms", {})
    arms = list(run.get("arms") or [])
    # Rows Locust saw beyond the planned arms (e.g. rerank[unanswered] in split mode) follow them.
    for name in stats:
        arm = arm_of_request_name(name)
        if arm is not None and arm not in arms:
            arms.append(arm)
    figures = []
    for arm in arms:
        row = stats.get(f"rerank[{arm}]")
        server = deltas.get(arm)
        figures.append(ArmFigures(arm=arm, precision=server.precision if server else None, locust=row, server=server,
                                  client=client_arms.get(arm, {})))  # fmt: skip
    plan = run.get("plan") or {}
    ref = reference_arm(deltas, arms, reference or plan.get("reference_arm"))
    return data, figures, stats.get(AGGREGATED), ref


def build_report(out_dir: Path, *, reference: str | None = None, markdown_name: str = "report.md") -> Report:
    """Write report.md and the three PNGs into `out_dir` from the run's files there."""
    out_dir = Path(out_dir)
    data, figures, aggregate, ref = collect(out_dir, reference)
    history = read_history_csv(out_dir / f"{CSV_PREFIX}_stats_history.csv")
    failures = read_failures_csv(final_or_periodic(out_dir, "failures"))
    plots = [
        plot_latency(figures, out_dir / LATENCY_PNG),
        plot_throughput(figures, history, out_dir / THROUGHPUT_PNG),
        plot_failures(figures, failures, out_dir / FAILURES_PNG),
    ]
    md = out_dir / markdown_name
    md.write_text(render_markdown(data, figures, aggregate, ref, failures, final_or_periodic(out_dir, "stats").name))
    return Report(markdown=md, plots=plots, arms=figures, aggregate=aggregate, reference=ref)


def render_markdown(data: dict, figures: list[ArmFigures], aggregate: LocustRow | None, reference: str | None,
                    failures: dict[str, Counter], stats_file: str = "locust_stats.csv") -> str:  # fmt: skip
    run = data["run"] or {}
    plan = run.get("plan") or {}
    traffic = plan.get("traffic") or {}
    machine = run.get("machine") or {}
    arms = list(run.get("arms") or [f.arm for f in figures])
    keys = _agreement_keys(figures)
    mode = plan.get("mode", "pinned")
    how = (
        f"one Locust user class per arm, pinned by the `{run.get('pin_header', 'x-rerank-arm')}` header"
        if mode == "pinned"
        else "unpinned requests split by the router's weights; each named after the arm that answered"
    )
    lines = [
        f"# Load-test comparison: {' vs '.join(arms)}",
        "",
        f"- **Run**: {run.get('started_at', '?')} against `{run.get('target', '?')}`, "
        f"{plan.get('users')} users (spawn {plan.get('spawn_rate')}/s) for {plan.get('duration_s')} s; "
        f"Locust {machine.get('locust', '?')} exited with {run.get('locust_returncode')}"
        + (" (**killed at the hard time limit**)" if run.get("killed") else "")
        + ".",
        f"- **Mode**: {mode}: {how}.",
        f"- **Traffic**: {traffic.get('docs')} documents per request, {_pct(traffic.get('image_share'))} images, "
        f"text documents of {traffic.get('text_chars')} characters, image pool of {traffic.get('pool_size')} "
        f"reused at repeat rate {traffic.get('repeat_rate')} (so about {_pct(traffic.get('repeat_rate'))} of image "
        f"documents can hit the feature cache), top_n {traffic.get('top_n')}, seed {traffic.get('seed')}, "
        f"think time 0–{plan.get('wait_s')} s.",
        f"- **Load generator**: {machine.get('platform', '?')}, {machine.get('cpus', '?')} CPUs, Python {machine.get('python', '?')}.",
        "",
        f"| Arm | Precision | Requests | Failures | RPS | p50 ms | p95 ms | p99 ms | Cache hit rate | "
        f"Agreement with {reference or '–'} ({' / '.join(keys)}) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for fig in figures:
        row, s = fig.locust, fig.server
        lines.append(
            f"| {fig.arm} | {fig.precision or '–'} | {fig.requests} | {fig.failures} | "
            f"{(row.rps if row else 0.0):.2f} | {_ms(row.p50_ms if row else None)} | {_ms(row.p95_ms if row else None)} | "
            f"{_ms(row.p99_ms if row else None)} | {_pct(s.cache_hit_rate if s else None)} | {_agreement_cell(fig, reference, keys)} |"
        )
    if aggregate is not None:
        lines.append(
            f"| **all** | | {aggregate.requests} | {aggregate.failures} | {aggregate.rps:.2f} | {_ms(aggregate.p50_ms)} | "
            f"{_ms(aggregate.p95_ms)} | {_ms(aggregate.p99_ms)} | | |"
        )
    lines += [
        "",
        "Requests, failures, RPS and latency percentiles (client-side, end to end) are Locust's, from "
        f"`{stats_file}` of this run. Cache hit rate and agreement are the change in the endpoint's "
        "`/v1/experiments` over the run (after − before): cache use counts every image lookup the arm made, "
        "shadow calls included; agreement compares the shadow arm's ranking with the answering arm's on the "
        "same mirrored requests (means over n comparisons).",
        "",
        "## Server view (`/v1/experiments`, change over the run)",
        "",
        "| Arm | Answered | Errors 4xx / 5xx | Ingress latency p50 / p95 / p99 ms (window) | Mean batch | "
        "Image cache hits / misses | Shadow calls (failed) | Routed by | Cache hits / misses seen by the client |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    widened = False
    for fig in figures:
        s, c = fig.server, fig.client
        client_cache = f"{c['cache_hits']} / {c['cache_misses']}" if "cache_hits" in c else "–"
        if s is None:
            lines.append(f"| {fig.arm} | – | – | – | – | – | – | – | {client_cache} |")
            continue
        routed = ", ".join(f"{k} {v}" for k, v in sorted(s.routed_by.items())) or "–"
        lat = s.ingress_latency_ms
        window = int(lat.get("n", lat.get("window")) or 0)
        widened |= window > s.answered
        latency = " / ".join(_ms(lat.get(q)) for q in ("p50", "p95", "p99")) + f" ({window})"
        batch = "–" if s.mean_batch_requests is None else f"{s.mean_batch_requests:.2f}"
        lines.append(
            f"| {fig.arm} | {s.answered} | {s.client_errors} / {s.server_errors} | {latency} | {batch} | "
            f"{s.cache_hits} / {s.cache_misses} | {s.shadow_requests} ({s.shadow_failed}) | {routed} | {client_cache} |"
        )
    lines += [
        "",
        "Ingress latency is the endpoint's own measure, from the ingress handler's start to the arm's answer "
        "(media decoding and the arm call; not HTTP, Serve's proxy or JSON encoding), over every answer of the endpoint's running experiment (fleet-wide) at the end of the run"
        + ("; more answers than the run's: it includes earlier traffic." if widened else ", all from this run.")
        + " Mean batch: requests merged into one engine call by dynamic batching.",
    ]
    if not any(f.server for f in figures):
        lines += ["", "The endpoint's `/v1/experiments` did not answer: no server-side figures."]
    lines += ["", "## Failures", ""]
    failure_lines = [
        f"- `{name}`: {count} × {error}" for name, errors in sorted(failures.items()) for error, count in errors.most_common()
    ]
    lines += failure_lines or ["None."]
    lines += [
        "",
        "## Plots",
        "",
        f"![Latency percentiles per arm]({LATENCY_PNG})",
        "",
        f"![Throughput over time per arm]({THROUGHPUT_PNG})",
        "",
        f"![Failures per arm]({FAILURES_PNG})",
        "",
        "## Reproduce",
        "",
        "```",
        _command_line(run),
        "```",
        "",
        "Raw Locust output of the run (CSV, HTML, log) and the two `/v1/experiments` snapshots are in the "
        "run's output folder.",
        "",
    ]
    return "\n".join(lines)


def _command_line(run: dict) -> str:
    plan = run.get("plan") or {}
    t = plan.get("traffic") or {}
    parts = [
        "rerank-fleet loadtest", f"--host {plan.get('host')}", f"--users {plan.get('users')}",
        f"--spawn-rate {plan.get('spawn_rate')}", f"--duration {plan.get('duration_s')}",
        f"--arms {','.join(run.get('arms') or [])}", f"--mode {plan.get('mode')}", f"--docs {t.get('docs')}",
        f"--text-chars {t.get('text_chars')}", f"--image-share {t.get('image_share')}",
        f"--pool-size {t.get('pool_size')}", f"--repeat-rate {t.get('repeat_rate')}", f"--seed {t.get('seed')}",
        f"--wait {plan.get('wait_s')}",
    ]  # fmt: skip
    if plan.get("start_local"):
        parts.insert(1, f"--start-local {plan['start_local']}")
    return " \\\n  ".join(parts)


# ---------------------------------------------------------------------------------- plots


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def plot_latency(figures: list[ArmFigures], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    arms = [f for f in figures if f.locust is not None and f.locust.requests]
    width = 0.8 / 3
    for i, (label, attr) in enumerate((("p50", "p50_ms"), ("p95", "p95_ms"), ("p99", "p99_ms"))):
        xs = [j + (i - 1) * width for j in range(len(arms))]
        ys = [getattr(f.locust, attr) or 0 for f in arms]
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(arms)), [f"{f.arm}\n({f.precision})" if f.precision else f.arm for f in arms])
    ax.set_ylabel("latency (ms)")
    ax.set_title("Client-side latency percentiles per arm (Locust)")
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    if not arms:
        ax.text(0.5, 0.5, "no requests", ha="center", va="center", transform=ax.transAxes)
    return save_figure(fig, path)


def plot_throughput(figures: list[ArmFigures], history: dict[str, list], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    starts = [pts[0][0] for pts in history.values() if pts]
    t0 = min(starts) if starts else 0
    for f in figures:
        pts = history.get(f"rerank[{f.arm}]", [])
        xs, rps, _ = throughput_series(pts, t0)
        if xs:
            ax.plot(xs, rps, label=f.arm, linewidth=1.2)
    xs, rps, _ = throughput_series(history.get(AGGREGATED, []), t0)
    if xs:
        ax.plot(xs, rps, label="all", linestyle="--", color="grey", linewidth=1)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("requests/s")
    ax.set_title("Throughput over time (per second, from Locust's history)")
    ax.legend(fontsize=8)
    ax.set_ylim(bottom=0)
    return save_figure(fig, path)


def plot_failures(figures: list[ArmFigures], failures: dict[str, Counter], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = [f.arm for f in figures]
    errors = sorted({e for f in figures for e in failures.get(f"rerank[{f.arm}]", {})})
    bottoms = [0] * len(names)
    for error in errors:
        heights = [failures.get(f"rerank[{a}]", Counter())[error] for a in names]
        ax.bar(names, heights, bottom=bottoms, label=error[:60])
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    totals = [f.failures for f in figures]
    if not errors:
        ax.bar(names, totals)
    requests = sum(f.requests for f in figures)
    for i, f in enumerate(figures):
        share = f"{100 * f.failures / f.requests:.1f}%" if f.requests else "–"
        ax.text(i, max(bottoms[i], f.failures), f"{f.failures} of {f.requests} ({share})", ha="center", va="bottom", fontsize=8)
    if not any(totals):
        ax.text(0.5, 0.5, f"no failures in {requests} requests", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylim(0, 1)
    else:
        ax.legend(fontsize=7)
        ax.margins(y=0.2)
    ax.set_ylabel("failed requests")
    ax.set_title("Failures per arm (Locust)")
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=PNG_DPI)
    pyplot().close(fig)
    return path
