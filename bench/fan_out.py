"""`rerank-fleet bench fan-out`: one large request (1000 documents) on one replica against the
same request fanned out over two (serve/fan_out.py), through the whole Serve path, in one run.

One local app on embedded Ray with three fp32 arms of the same model, each replica one torch
thread: `one` (1 replica, no fan-out: the request as every reranker server runs it), `two` (2
replicas, fan-out into 2 chunks) and `one-fanned` (1 replica, fan-out into 2 chunks: what
splitting costs where no replica is spare: a second call and a second query prefix). Each
replica is pinned to a CPU of its own where the machine has them (every thread of its process,
so the torch threads it starts later too: replica k of an arm on the k-th CPU this process may
use), as each replica of a GPU arm has a GPU of its own; the HTTP path and this load generator
are not pinned. The arms are measured one request at a time, interleaved, so drift hits all
alike. The report says where each replica ran and how much CPU it used, the scores' largest
difference between the arms (the same model: within float noise), the decoder tokens each ran,
and the latency ratio two / one.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import random
import statistics
from pathlib import Path
from typing import Any

from bench.report import finish, pinned_rerank, progress

ARMS = ("one", "two", "one-fanned")
WORDS = ("red", "green", "blue", "circle", "square", "cross", "small", "large", "dark", "bright", "page", "corner", "round",
         "edge", "pattern", "shape", "line", "dot", "stripe", "frame")  # fmt: skip


note = progress("fan-out")


def fan_out_fleet(model_source: str, port: int, documents: int):
    from serve.config import FleetConfig

    def arm(name: str, replicas: int, fan_out: bool) -> dict:
        return {
            "name": name, "precision": "fp32", "weight": 1 if name == "one" else 0, "num_replicas": replicas,
            "queue_budget_s": 60.0, "ray_actor_options": {"num_cpus": 1}, "torch_threads": 1,
            **({"fan_out_above": -(-documents // 2)} if fan_out else {}),
        }  # fmt: skip

    return FleetConfig.from_dict(
        {
            "model": {"source": model_source},
            "arms": [arm("one", 1, False), arm("two", 2, True), arm("one-fanned", 1, True)],
            "limits": {"max_documents": documents, "max_request_bytes": 64 * 1024 * 1024},
            "experiment": {"noise_floor_fraction": 0.0},
            "http": {"host": "127.0.0.1", "port": port},
        }
    )


def request_body(documents: int, words: int, seed: int) -> dict:
    rng = random.Random(seed)
    return {
        "query": f"a {rng.choice(WORDS)} {rng.choice(WORDS)} near the {rng.choice(WORDS)}",
        "documents": [f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(documents)],
    }


def pin_replicas(app: str) -> list[dict[str, Any]]:
    """Pin each arm replica's process (every thread) to one CPU: replica k of an arm on the k-th
    allowed CPU; returns where each went."""
    from bench.serve_cpu import serve_processes

    allowed = sorted(os.sched_getaffinity(0))
    replicas = sorted((p.actor[0], p.pid) for p in serve_processes() if p.role == "arm" and p.app == app and p.actor)
    rows, count = [], {}
    for name, pid in replicas:
        arm = name.split("#")[1].removeprefix("Arm-")
        cpu = allowed[count.setdefault(arm, 0) % len(allowed)]
        count[arm] += 1
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), {cpu})
            except ProcessLookupError:  # a thread that ended meanwhile
                pass
        rows.append({"arm": arm, "pid": pid, "cpus": str(cpu)})
    return rows


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    import psutil

    out = {}
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        out[pid] = t.user + t.system
    return out


def run_fan_out_bench(*, model_source: str = "tiny", documents: int = 1000, words: int = 12, repeats: int = 7,
                      out: str | Path = "out/bench-fan-out.json", port: int = 8768) -> dict[str, Any]:  # fmt: skip
    import httpx

    from serve.deploy_options import APP_NAME
    from serve.local import embedded_serve
    from workshop.tiny import resolve_source

    fleet = fan_out_fleet(resolve_source(model_source), port, documents)
    note(f"starting Ray and the app: arms {', '.join(ARMS)}; {documents} documents of {words} words a request, {repeats} repeats")
    latencies: dict[str, list[float]] = {a: [] for a in ARMS}
    tokens: dict[str, int] = {}
    scores: dict[str, list[float]] = {}
    with embedded_serve(fleet) as base, httpx.Client(base_url=base, timeout=600) as client:
        where = pin_replicas(APP_NAME)
        note("replicas: " + "; ".join(f"{r['arm']} pid {r['pid']} on CPU {r['cpus']}" for r in where))

        rerank = pinned_rerank(client, fleet.router.pin_header)
        for seed in (1, 2):  # warm every replica: first calls pay lazy initialisation
            for arm in ARMS:
                rerank(arm, request_body(documents, words, seed))
        before = cpu_seconds([r["pid"] for r in where])
        for k in range(repeats):
            body = request_body(documents, words, 100 + k)
            for arm in ARMS:
                elapsed, answer = rerank(arm, body)
                latencies[arm].append(elapsed)
                if k == 0:
                    tokens[arm] = answer["usage"]["prompt_tokens"]
                    by_index = {x["index"]: x["relevance_score"] for x in answer["results"]}
                    scores[arm] = [by_index[i] for i in range(documents)]
            note(f"repeat {k + 1}/{repeats}: " + ", ".join(f"{a} {1000 * latencies[a][-1]:.0f} ms" for a in ARMS))
        after = cpu_seconds([r["pid"] for r in where])
    for r in where:
        r["cpu_s"] = round(after[r["pid"]] - before[r["pid"]], 2)
    rows = {a: {"p50_ms": round(1000 * statistics.median(v), 1), "min_ms": round(1000 * min(v), 1), "max_ms": round(1000 * max(v), 1),
                "decoder_tokens": tokens[a]} for a, v in latencies.items()}  # fmt: skip
    report = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, os.cpu_count() {os.cpu_count()}, CPUs this process may use {sorted(os.sched_getaffinity(0))}",
        "model": model_source, "documents": documents, "words_per_document": words, "repeats": repeats,
        "replicas": where, "arms": rows,
        "ratio_two_over_one_p50": round(rows["two"]["p50_ms"] / rows["one"]["p50_ms"], 3),
        "ratio_one_fanned_over_one_p50": round(rows["one-fanned"]["p50_ms"] / rows["one"]["p50_ms"], 3),
        "max_score_difference": {a: max(abs(x - y) for x, y in zip(scores["one"], scores[a])) for a in ("two", "one-fanned")},
    }  # fmt: skip
    return finish(report, format_table(report), out)


def format_table(r: dict[str, Any]) -> str:
    lines = [f"fan-out, {r['machine']}, {r['documents']} documents of {r['words_per_document']} words, {r['repeats']} repeats",
             "replicas: " + "; ".join(f"{x['arm']} pid {x['pid']} CPU {x['cpus']} ({x['cpu_s']} CPU s)" for x in r["replicas"]),
             "| arm | replicas | chunks | p50 ms | min ms | max ms | decoder tokens |", "|---|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
    shape = {"one": (1, 1), "two": (2, 2), "one-fanned": (1, 2)}
    for arm, row in r["arms"].items():
        lines.append(f"| {arm} | {shape[arm][0]} | {shape[arm][1]} | {row['p50_ms']} | {row['min_ms']} | {row['max_ms']} | {row['decoder_tokens']} |")
    lines.append(f"latency ratio (p50) two / one: {r['ratio_two_over_one_p50']}; one-fanned / one: {r['ratio_one_fanned_over_one_p50']}; "
                 f"largest score difference against one: {r['max_score_difference']}")  # fmt: skip
    return "\n".join(lines)
