"""`rerank-fleet bench idle-gap`: what a pause before each request costs the engine on this
machine, with and without the CPU kept awake (bench/awake_cores.py says why it can cost much)."""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import time

from bench.awake_cores import awake_cores_on
from bench.bodies import score_request, text_requests
from bench.report import finish
from serve.local import on_cpus


def run_idle_gap_bench(*, out: str = "out/bench-idle-gap.json", model_source: str = "tiny", requests: int = 100,
                       gaps_ms: tuple[float, ...] = (0, 0.5, 2, 10), docs_per_request: int = 8) -> dict:  # fmt: skip
    """What a pause before each request costs on this machine: the engine's latency for requests
    sent back to back, and after each pause of `gaps_ms`, on one CPU, with and without a
    `SCHED_IDLE` loop keeping that CPU awake. Prints a table, writes JSON."""
    import torch

    from engine.engine import RerankEngine
    from workshop.tiny import resolve_source

    cpu = max(os.sched_getaffinity(0))
    torch.set_num_threads(1)
    with on_cpus({cpu}):
        engine = RerankEngine.load(resolve_source(model_source), "fp32", device="cpu")
        prepared = [score_request(b) for b in text_requests(requests, docs_per_request)]
        for r in prepared[:10]:  # warm
            engine.forward([engine.prepare(r)])
        rows = []
        for awake in (False, True):
            with awake_cores_on([cpu] if awake else []):
                time.sleep(0.5)  # the loop has started
                for gap in gaps_ms:
                    took = []
                    for r in prepared:
                        if gap:
                            time.sleep(gap / 1000)
                        t = time.perf_counter()
                        engine.forward([engine.prepare(r)])
                        took.append(time.perf_counter() - t)
                    rows.append({"cpu_kept_awake": awake, "pause_ms": gap, "p50_ms": round(statistics.median(took) * 1000, 2)})
    result = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()}-core CPU", "cpu": cpu,
              "model": model_source, "docs_per_request": docs_per_request, "requests": requests, "rows": rows}  # fmt: skip
    lines = [f"engine p50 (ms) per {docs_per_request}-document request, one CPU ({cpu}), after a pause before each request",
             "| pause (ms) | idle CPU may halt | CPU kept awake (SCHED_IDLE loop) |", "|--:|--:|--:|"]  # fmt: skip
    for gap in gaps_ms:
        plain, awake = (next(r["p50_ms"] for r in rows if r["pause_ms"] == gap and r["cpu_kept_awake"] is a) for a in (False, True))
        lines.append(f"| {gap:g} | {plain} | {awake} |")
    return finish(result, "\n".join(lines), out)
