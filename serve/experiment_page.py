"""The readable view of an experiment (`GET /v1/experiments/page`): the ledger's results as one
HTML page, every figure with its interval. Pure: results dict in, HTML out."""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from typing import Any


def _ci(x: dict | None) -> str:
    if not x or x.get("mean") is None:
        return "–"
    ci = x.get("ci95")
    return f"{x['mean']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "") + f" (n={x['n']})"


def _ratio(x: dict) -> str:
    if x.get("value") is None:
        return "–"
    ci = x.get("ci95")
    return f"{x['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _score_cache(x: dict | None) -> str:
    if not x or x.get("hit_rate") is None:
        return "–"
    return f"{x['hit_rate']:.3f} ({x['hits']} of {x['hits'] + x['misses']} pairs)"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def render(results: dict[str, Any]) -> str:
    ref = results["reference"]
    metric = next((a["versus_reference"]["agreement"]["metric"] for a in results["arms"].values() if a.get("versus_reference")), "spearman")
    floor = results["arms"][ref].get("noise_floor") or {}
    arms = []
    for name, a in results["arms"].items():
        v = a.get("versus_reference")
        cost = a.get("cost_per_1000_requests")
        arms.append([
            name + (" (reference)" if name == ref else ""), a["precision"], f"{a['weight']:.3f}", a["requests"],
            f"{a['latency_ms']['p50']} / {a['latency_ms']['p95']}", _ratio(v["latency"]["p95_ratio"]) if v else "–",
            _ci(v["agreement"]["arm"]) if v else _ci(floor.get(metric)) + " (noise floor)",
            f"{a['errors']['server']} ({a['errors']['server_rate']})", "–" if cost is None else f"{cost['value']:.4f}", _score_cache(a.get("score_cache")),
            _ci(a["clicks"]["click_ndcg@10"]), (v["verdict"] + (f"; {v['more_requests_needed']} more requests" if v["more_requests_needed"] else "")) if v else "reference",
        ])  # fmt: skip
    control = results["control"]
    changes = [[datetime.fromtimestamp(c["at"], UTC).strftime("%Y-%m-%d %H:%M:%S"), c["who"], c["what"], c["detail"]] for c in reversed(results["changes"])]
    inter = [[pair, v["wins"], v["ties"], v["preference"], v["sign_test_p"]] for pair, v in results["interleaving"].items()]
    started = datetime.fromtimestamp(results["started_at"], UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Experiment {escape(results['experiment'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}th{{background:#f3f3f3}}</style></head><body>
<h1>Experiment {escape(results['experiment'])} {'(running)' if results['active'] else '(stopped)'}</h1>
<p>Started {started}, {results['elapsed_s']:.0f} s of traffic; reference arm <b>{escape(ref)}</b>; {escape(results['scope'])}.
Intervals are 95 %. Agreement is {escape(metric)} of each arm's ranking with the reference's on mirrored requests; the noise floor is the reference against itself in another batch.</p>
{_table(["arm", "precision", "weight", "requests", "p50 / p95 ms", "p95 ratio to reference", f"{metric} agreement", "5xx (rate)", "cost / 1000 req", "score cache hit rate", "click NDCG@10", "verdict"], arms)}
<h2>Control</h2><p>weights {escape(str(control['weights']))}; shadow {escape(str(control['shadow']))}; noise floor {escape(str(control['noise_floor']))};
interleave {escape(str(control['interleave']))}; tripped {escape(str(control['tripped']) or '–')}; ramp {escape(str(control['ramp']))}</p>
<h2>Interleaving (clicks)</h2>{_table(["pair", "wins", "ties", "preference", "sign test p"], inter) if inter else "<p>none</p>"}
<h2>Feedback</h2><p>{results['feedback']['received']} received; {results['feedback']['joinable_requests']} answered requests joinable.</p>
<h2>Changes</h2>{_table(["when", "who", "what", "detail"], changes)}
</body></html>"""
