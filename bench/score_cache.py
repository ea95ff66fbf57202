"""bench score-cache: the score cache on vs off, through the real fleet, on search-like traffic.

Traffic: queries drawn Zipf (exponent 1.1 over 10,000 queries, as search logs show), each sent
with its candidate list: `docs` documents drawn Zipf from a pool (popular documents recur across
queries), fixed per query as a first-stage retriever returns them, each slot replaced by a fresh
draw from the pool with probability `fresh` (the index moved: partial hits; at 0.02 and 16
documents, 72 % of a repeated query's requests are whole hits, at 0.2 only 3 %). Texts only.

One embedded fleet (the main job's config, `rerank-fleet up`'s arms) with the score cache shared
through a redis-server of its own on loopback. Two sides, the same request sequence, one after the
other, each a closed loop of `concurrency` clients for `duration_s`:

- off: every request carries `x-rerank-score-cache: bypass`, so the arms score every pair and the
  cache is neither read nor written (the same app: the difference is the cache alone);
- on: from a cold cache.

Per side: requests answered, throughput, p50/p99 of the answered, refusals; the share of pairs
served from the cache and of requests answered with no arm call (the experiment results' per-arm
counts over the side). Loopback only,
bounded in time. `run_score_cache_bench` prints a table and writes JSON; the CLI wraps it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

import httpx

from bench.bodies import COLOURS, SHAPES
from bench.load import closed_loop_capacity
from bench.reliability import PrivateRedis
from serve.local import DEFAULT_LAYOUT
from serve.score_cache import SCORE_CACHE_HEADER

QUERIES, POOL, EXPONENT = 10_000, 20_000, 1.1


def zipf_weights(n: int, exponent: float) -> list[float]:
    """Cumulative weights of ranks 1..n under Zipf(`exponent`), for `random.choices`."""
    return list(itertools.accumulate(1.0 / (k**exponent) for k in range(1, n + 1)))


def _text(kind: str, i: int) -> str:
    colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
    return f"a {colour} {shape}, {kind} {i}"


def workload(requests: int, *, docs: int = 16, queries: int = QUERIES, pool: int = POOL, exponent: float = EXPONENT,
             fresh: float = 0.02, seed: int = 0) -> list[dict]:  # fmt: skip
    """`requests` rerank bodies: Zipf queries, each with its candidate list (see the module)."""
    rng = random.Random(seed)
    query_cum, doc_cum = zipf_weights(queries, exponent), zipf_weights(pool, exponent)
    ranks = range(pool)
    candidates: dict[int, list[int]] = {}
    bodies = []
    for q in rng.choices(range(queries), cum_weights=query_cum, k=requests):
        if q not in candidates:
            own, listed = random.Random(seed * 1_000_003 + q), {}
            while len(listed) < docs:  # distinct documents, the popular ones most often
                listed[own.choices(ranks, cum_weights=doc_cum)[0]] = None
            candidates[q] = list(listed)
        listed = list(candidates[q])
        for slot in range(docs):
            if rng.random() < fresh and (new := rng.choices(ranks, cum_weights=doc_cum)[0]) not in listed:
                listed[slot] = new
        bodies.append({"query": _text("query", q), "documents": [_text("document", d) for d in listed]})
    return bodies


def _cache_counts(base: str) -> tuple[int, int, int, int]:
    """(answered requests, pairs served from the score cache, pairs scored by the arms, requests
    with no arm call) so far, fleet-wide (the experiment results)."""
    arms = httpx.get(f"{base}/v1/experiments", timeout=60).json()["arms"].values()
    return (sum(a["requests"] for a in arms), sum(a["score_cache"]["hits"] for a in arms), sum(a["score_cache"]["misses"] for a in arms),
            sum(a["score_cache"]["requests_without_arm_call"] for a in arms))  # fmt: skip


def _side(base: str, name: str, bodies: list[dict], concurrency: int, duration_s: float, headers: dict | None) -> dict[str, Any]:
    before = _cache_counts(base)
    rate, load = asyncio.run(closed_loop_capacity(base, concurrency, duration_s, bodies, headers))
    answered, hits, misses, whole = (a - b for a, b in zip(_cache_counts(base), before))
    docs = len(bodies[0]["documents"])
    return load.row(name, req_per_s=round(rate, 1), pairs_per_s=round(rate * docs, 1), pairs_from_cache=hits, pairs_scored=misses,
                    share_from_cache=round(hits / (hits + misses), 4) if hits + misses else 0.0,
                    no_arm_call=round(whole / answered, 4) if answered else 0.0)  # fmt: skip


def run_score_cache_bench(*, config: str | None = None, duration_s: float = 20.0, concurrency: int = 8, docs: int = 16, fresh: float = 0.02,
                          out: str | Path = "out/bench-score-cache.json", layout: str = DEFAULT_LAYOUT) -> dict[str, Any]:  # fmt: skip
    from serve.config import FleetConfig
    from serve.local import embedded_serve, local_fleet

    redis = PrivateRedis()
    fleet = local_fleet(config, redis.url, 8768)
    data = fleet.to_dict()
    data["score_cache"] = {**data["score_cache"], "mode": "shared"}
    fleet = FleetConfig.from_dict(data, source=config or "configs/local.yaml")
    bodies = workload(max(4000, int(200 * duration_s)), docs=docs, fresh=fresh)
    warm = workload(200, docs=docs, fresh=fresh, seed=1)
    bypass = {SCORE_CACHE_HEADER: "bypass"}
    with redis, embedded_serve(fleet, layout=layout) as base:
        asyncio.run(closed_loop_capacity(base, concurrency, 3.0, warm, bypass))  # warm-up: nothing cached
        rows = [_side(base, "score cache off (bypass)", bodies, concurrency, duration_s, bypass),
                _side(base, "score cache on (cold)", bodies, concurrency, duration_s, None)]  # fmt: skip
    off, on = rows
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "config": config or "configs/local.yaml", "layout": layout, "concurrency": concurrency, "duration_s": duration_s,
        "workload": {"queries": QUERIES, "zipf_exponent": EXPONENT, "document_pool": POOL, "documents_per_request": docs, "fresh_slot_share": fresh},
        "rows": rows,
        "throughput_ratio_on_off": round(on["req_per_s"] / off["req_per_s"], 2) if off["req_per_s"] else None,
    }  # fmt: skip
    print(format_table(report))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))
    return report


def format_table(report: dict[str, Any]) -> str:
    w = report["workload"]
    cols = ["sent", "200", "503", "other", "req_per_s", "pairs_per_s", "p50_ms", "p99_ms", "share_from_cache", "no_arm_call", "pairs_from_cache", "pairs_scored"]
    lines = [f"score cache, {report['machine']}, {report['config']}, layout {report['layout']}, {report['concurrency']} clients x "
             f"{report['duration_s']:g} s per side; Zipf {w['zipf_exponent']} over {w['queries']} queries, {w['documents_per_request']} "
             f"documents from a pool of {w['document_pool']} (Zipf), {w['fresh_slot_share']:.0%} fresh per slot",
             "| side | " + " | ".join(cols) + " |", "|---|" + "--:|" * len(cols)]  # fmt: skip
    for r in report["rows"]:
        lines.append(f"| {r['scenario']} | " + " | ".join("" if r.get(c) is None else str(r[c]) for c in cols) + " |")
    lines.append(f"throughput on/off: {report['throughput_ratio_on_off']}")
    return "\n".join(lines)
