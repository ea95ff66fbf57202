"""`rerank-fleet bench cascade`: a cascade arm (nf4 first, fp32 on its top 10: serve/cascade.py)
against the expensive arm alone (fp32), on the offline model's labelled evaluation set, through
the real Serve app, in one run.

One embedded app: arms `fp32` and `nf4` (one replica each, a torch thread each) and the cascade
`cascade` over them; no score cache (every pair is scored), no noise floor. For every task of the
evaluation set (`workshop.tiny.eval_set`: a text query, graded documents, 60 % of them images) the
same body is sent pinned to `fp32`, to `cascade` and to `nf4` (the cheap arm alone, for reference),
in a rotating order, `repeats` times. Per side:

- NDCG@10 against the set's labels (`ranking.metrics.ndcg_at_k`, the same as `rerank-fleet eval`
  and the tiny model's training report), of the ranking the client was shown (the answer's order);
- agreement with fp32 alone on the same task (`ranking.metrics.agreement`: Spearman, NDCG@10 with
  fp32's ranks as gains, top-10 overlap, RBO), each a mean with its 95 % interval
  (`serve.statistics.Moments`);
- pairs each arm scored per request (the cascade's from `meta.cascade`), decoder tokens;
- latency p50/p95 seen by the client (all repeats).

Prints a table and writes JSON; the CLI wraps `run_cascade_bench`.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import finish, pinned_rerank, progress
from ranking.metrics import agreement, ndcg_at_k
from serve.statistics import Moments

SIDES = ("fp32", "cascade", "nf4")
AGREEMENT = ("spearman", "ndcg@10", "top10_overlap", "rbo")


note = progress("cascade")


def cascade_fleet(model_source: str, port: int, k: int = 10, documents: int = 20):
    """The bench's app: fp32 and nf4 one replica each (a core and a torch thread each), the cascade over them."""
    from serve.config import FleetConfig

    def arm(name: str) -> dict:
        return {"name": name, "precision": name, "weight": 0, "queue_budget_s": 60.0, "ray_actor_options": {"num_cpus": 1}, "torch_threads": 1}

    return FleetConfig.from_dict({
        "model": {"source": model_source},
        "arms": [arm("fp32"), arm("nf4")],
        "cascades": [{"name": "cascade", "first": "nf4", "then": "fp32", "k": k, "weight": 1}],
        "limits": {"max_documents": max(1000, documents)},
        "experiment": {"noise_floor_fraction": 0.0},
        "http": {"host": "127.0.0.1", "port": port},
    })  # fmt: skip


def item_json(item) -> str | dict:
    """An evaluation item as the API takes it: a text as a string, an image as base64."""
    if item.images:
        return {"image": base64.b64encode(item.images[0].data).decode()}
    return item.text


def task_bodies(queries: int, documents: int) -> list[tuple[dict, list[float]]]:
    """(rerank body, graded gains per document) of each task of the offline model's evaluation set."""
    from workshop.tiny import eval_set

    return [({"query": q.text, "documents": [item_json(d) for d in docs]}, gains)
            for q, docs, gains in eval_set(n_queries=queries, n_docs=documents)]  # fmt: skip


def shown(answer: dict, n: int) -> list[float]:
    """The ranking a client was shown, as scores (n for the first document, n - 1 for the next, ...)."""
    scores = [0.0] * n
    for position, r in enumerate(answer["results"]):
        scores[r["index"]] = float(n - position)
    return scores


def summarise(side: str, tasks: list[dict], latencies: list[float]) -> dict[str, Any]:
    """A side's figures over the tasks: NDCG@10 against labels, agreement with fp32, pairs, tokens, latency."""
    ndcg, agree = Moments(), {m: Moments() for m in AGREEMENT}
    for t in tasks:
        ndcg.add(ndcg_at_k(t[side], t["gains"], 10))
        for m, v in agreement(t["fp32"], t[side], 10).items():
            agree[m].add(v)
    pairs = {arm: sum(t["pairs"][side].get(arm, 0) for t in tasks) / len(tasks) for arm in ("nf4", "fp32")}
    return {
        "ndcg@10_labels": _moments(ndcg),
        "agreement_with_fp32": {m: _moments(agree[m]) for m in AGREEMENT},
        "pairs_per_request": pairs,
        "decoder_tokens_per_request": round(sum(t["tokens"][side] for t in tasks) / len(tasks), 1),
        "latency_ms": {"n": len(latencies), "p50": round(float(np.percentile(latencies, 50)) * 1000, 1),
                       "p95": round(float(np.percentile(latencies, 95)) * 1000, 1)},
    }  # fmt: skip


def _moments(m: Moments) -> dict[str, Any]:
    ci = m.ci()
    return {"mean": round(m.mean, 4), "ci95": None if ci is None else [round(ci[0], 4), round(ci[1], 4)], "n": m.n}


def run_cascade_bench(*, model_source: str = "tiny", queries: int = 24, documents: int = 20, k: int = 10, repeats: int = 3,
                      out: str | Path = "out/bench-cascade.json", port: int = 8769) -> dict[str, Any]:  # fmt: skip
    import httpx

    from serve.local import embedded_serve
    from workshop.tiny import resolve_source

    fleet = cascade_fleet(resolve_source(model_source), port, k, documents)
    bodies = task_bodies(queries, documents)
    note(f"starting Ray and the app: fp32, nf4, cascade (nf4 then fp32 on the top {k}); {queries} tasks of {documents} documents, {repeats} repeats")
    tasks = [{"gains": gains, "pairs": {}, "tokens": {}} for _, gains in bodies]
    latencies: dict[str, list[float]] = {s: [] for s in SIDES}
    with embedded_serve(fleet) as base, httpx.Client(base_url=base, timeout=600) as client:
        rerank = pinned_rerank(client, fleet.router.pin_header)
        for body, _ in bodies[:2]:  # warm both replicas: first calls pay lazy initialisation
            for side in SIDES:
                rerank(side, body)
        for rep in range(repeats):
            for i, (body, _) in enumerate(bodies):
                order = SIDES[(i + rep) % 3 :] + SIDES[: (i + rep) % 3]  # each side first, second and third alike
                for side in order:
                    elapsed, answer = rerank(side, body)
                    latencies[side].append(elapsed)
                    if rep == 0:
                        n = len(body["documents"])
                        tasks[i][side] = shown(answer, n)
                        tasks[i]["tokens"][side] = answer["usage"]["prompt_tokens"]
                        cascade = answer["meta"].get("cascade")
                        tasks[i]["pairs"][side] = ({"nf4": n, "fp32": len(cascade["then_scored"])} if cascade else {side: n})
            note(f"repeat {rep + 1}/{repeats}: " + ", ".join(f"{s} p50 {1000 * float(np.median(latencies[s])):.0f} ms" for s in SIDES))
    report = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, os.cpu_count() {os.cpu_count()}",
        "model": model_source, "tasks": queries, "documents_per_task": documents, "k": k, "repeats": repeats,
        "sides": {s: summarise(s, tasks, latencies[s]) for s in SIDES},
    }  # fmt: skip
    fp32, casc = report["sides"]["fp32"], report["sides"]["cascade"]
    report["expensive_pairs_ratio"] = round(casc["pairs_per_request"]["fp32"] / fp32["pairs_per_request"]["fp32"], 4)
    report["latency_p50_ratio"] = round(casc["latency_ms"]["p50"] / fp32["latency_ms"]["p50"], 3)
    return finish(report, format_table(report), out)


def format_table(r: dict[str, Any]) -> str:
    def ci(x: dict) -> str:
        return f"{x['mean']:.4f}" + (f" [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}]" if x["ci95"] else "")

    lines = [f"cascade (nf4 then fp32 on the top {r['k']}) vs fp32 alone, {r['machine']}; {r['tasks']} tasks of "
             f"{r['documents_per_task']} documents, {r['repeats']} repeats",
             "| side | NDCG@10 labels | Spearman vs fp32 | top-10 overlap vs fp32 | NDCG@10 vs fp32 | pairs nf4 / fp32 per request | "
             "decoder tokens | p50 ms | p95 ms |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
    for side, s in r["sides"].items():
        a, p = s["agreement_with_fp32"], s["pairs_per_request"]
        lines.append(f"| {side} | {ci(s['ndcg@10_labels'])} | {ci(a['spearman'])} | {ci(a['top10_overlap'])} | {ci(a['ndcg@10'])} | "
                     f"{p['nf4']:g} / {p['fp32']:g} | {s['decoder_tokens_per_request']} | {s['latency_ms']['p50']} | {s['latency_ms']['p95']} |")  # fmt: skip
    lines.append(f"pairs scored by fp32, cascade / alone: {r['expensive_pairs_ratio']}; latency p50, cascade / fp32 alone: {r['latency_p50_ratio']}")
    return "\n".join(lines)
