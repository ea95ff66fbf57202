"""`rerank-fleet bench backends`: the vLLM backend against the transformers engine, in one run.

1. Engine alone: the `bench engine` cases (bench/engine.py `CASES`), each handed whole to each
   backend: the transformers engine prepares every request and runs one forward call (shared
   prefix on); vLLM gets every pair of every request at once (its scheduler batches them).
   Pairs/s, p50 per call, and the vLLM / transformers ratio.
2. Through Serve: one app with both arms (`hf`: transformers, `vllm`; fp32, one CPU each, no
   shadow), requests pinned to each arm over HTTP: p50 with one request in flight, requests/s with
   `concurrency` in flight, for text requests and image-document requests.
3. Memory per replica: resident set of the engine (transformers: this process's growth at load;
   vLLM: its engine-core processes plus this process's growth).

Needs the vLLM environment (scripts/vllm-env.sh). Prints a table, writes JSON.
"""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from bench.bodies import image_request, text_requests
from bench.report import summary_ms


def _rss_gib(pids: list[int]) -> float:
    import psutil

    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**30


def _children() -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process().children(recursive=True)]


def engine_alone(source: str, case_names: list[str], repeats: int) -> dict[str, Any]:
    import os

    import torch

    from engine.config import EngineConfig
    from engine.engine import RerankEngine
    from engine.vllm_engine import VllmRerankEngine, VllmSettings
    from bench.engine import CASES, case_requests, time_call

    me = os.getpid()
    before = _rss_gib([me])
    hf = RerankEngine.load(source, "fp32", config=EngineConfig(max_batch_tokens=1 << 16), device="cpu")
    hf_mem = _rss_gib([me]) - before
    before, kids = _rss_gib([me]), set(_children())
    vllm = VllmRerankEngine(source, "fp32", config=EngineConfig(), settings=VllmSettings(enforce_eager=True), device="cpu")
    vllm_mem = _rss_gib([me]) - before + _rss_gib([p for p in _children() if p not in kids])
    loop = asyncio.new_event_loop()

    async def all_pairs(requests):
        return await asyncio.gather(*(vllm.score_request(r) for r in requests))

    rows = []
    for name in case_names:
        requests = case_requests(CASES[name])
        pairs = sum(len(r.documents) for r in requests)
        times: dict[str, list[float]] = {"transformers": [], "vllm": []}
        time_call(hf, requests)  # warm-up
        loop.run_until_complete(all_pairs(requests))
        for _ in range(repeats):
            p, f, _ = time_call(hf, requests)
            times["transformers"].append(p + f)
            t0 = time.perf_counter()
            loop.run_until_complete(all_pairs(requests))
            times["vllm"].append(time.perf_counter() - t0)
        row = {"case": name, "pairs": pairs}
        for backend, ts in times.items():
            row[backend] = {"pairs_per_s": pairs * len(ts) / sum(ts), "p50_ms": 1000 * statistics.median(ts)}
        row["vllm_vs_transformers"] = row["vllm"]["pairs_per_s"] / row["transformers"]["pairs_per_s"]
        rows.append(row)
    loop.run_until_complete(vllm.aclose())
    loop.close()
    return {"rows": rows, "memory_gib": {"transformers": hf_mem, "vllm": vllm_mem}, "torch_threads": torch.get_num_threads()}


def through_serve(source: str, requests: int, concurrency: int, port: int) -> dict[str, Any]:
    import httpx

    from serve.config import FleetConfig
    from serve.local import embedded_serve

    arms = [
        {"name": "hf", "precision": "fp32", "backend": "transformers", "ray_actor_options": {"num_cpus": 1}},
        {"name": "vllm", "precision": "fp32", "backend": "vllm", "ray_actor_options": {"num_cpus": 1}, "vllm": {"enforce_eager": True}},
        # The same vLLM arm with raw images (vLLM's own vision tower, no feature cache).
        {"name": "vllm-raw", "precision": "fp32", "backend": "vllm", "ray_actor_options": {"num_cpus": 1},
         "vllm": {"enforce_eager": True, "vision_encoder": "vllm"}},
    ]
    fleet = FleetConfig.from_dict({"model": {"source": source}, "arms": arms, "http": {"host": "127.0.0.1", "port": port}})
    bodies = {
        "text (8 docs)": text_requests(requests, 8, seed=1),
        "image docs (4 new images)": [image_request([1000 * i + j for j in range(4)], 224) for i in range(requests // 2)],
        "image docs (4 repeated images)": [image_request([7, 8, 9, 10], 224) for _ in range(requests // 2)],
    }
    arms_of = {"text (8 docs)": ("hf", "vllm")}
    out: dict[str, Any] = {}
    with embedded_serve(fleet, num_cpus=5) as base:

        async def post(client, body, arm):
            t0 = time.perf_counter()
            r = await client.post("/v2/rerank", json=body, headers={"x-rerank-arm": arm})
            r.raise_for_status()
            return time.perf_counter() - t0

        async def measure(arm: str, bodies: list[dict]) -> dict[str, Any]:
            async with httpx.AsyncClient(base_url=base, timeout=300) as client:
                await post(client, bodies[0], arm)  # warm-up
                serial = [await post(client, b, arm) for b in bodies]
                sem = asyncio.Semaphore(concurrency)

                async def bounded(b):
                    async with sem:
                        return await post(client, b, arm)

                t0 = time.perf_counter()
                await asyncio.gather(*(bounded(b) for b in bodies))
                wall = time.perf_counter() - t0
            return {"one_in_flight": summary_ms(serial), f"req_per_s_at_{concurrency}": len(bodies) / wall}

        for kind, items in bodies.items():
            out[kind] = {arm: asyncio.run(measure(arm, items)) for arm in arms_of.get(kind, ("hf", "vllm", "vllm-raw"))}
    return out


def run_backend_bench(*, model_source: str = "tiny", cases: list[str] | None = None, repeats: int = 3, requests: int = 24,
                      concurrency: int = 8, port: int = 8766, out: str | Path = "out/bench-backends.json") -> dict[str, Any]:  # fmt: skip
    from serve.local import free_port
    from serve.request_path import set_local_ray_environment
    from workshop.tiny import resolve_source

    # Before vLLM imports Ray (the engine-alone cases): Ray reads its auth mode when it is imported,
    # and the local cluster started later for the Serve part has token auth on.
    set_local_ray_environment(free_port=free_port)
    source = resolve_source(model_source)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
        "model": model_source,
        "engine_alone": engine_alone(source, cases or ["short100", "batch32x8", "long100", "imgquery", "imgdocs"], repeats),
    }
    print(json.dumps(report["engine_alone"], indent=1), flush=True)  # kept if the Serve part fails
    report["through_serve"] = through_serve(source, requests, concurrency, port)
    print(format_table(report, concurrency))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))
    return report


def format_table(report: dict[str, Any], concurrency: int) -> str:
    e = report["engine_alone"]
    lines = [f"engine alone, fp32, {report['machine']} (torch threads {e['torch_threads']})",
             "| case | pairs | transformers pairs/s | vLLM pairs/s | vLLM / transformers | transformers p50 ms | vLLM p50 ms |",
             "|---|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
    for r in e["rows"]:
        t, v = r["transformers"], r["vllm"]
        lines.append(f"| {r['case']} | {r['pairs']} | {t['pairs_per_s']:.1f} | {v['pairs_per_s']:.1f} | {r['vllm_vs_transformers']:.2f}x | {t['p50_ms']:.1f} | {v['p50_ms']:.1f} |")
    m = e["memory_gib"]
    lines += ["", f"memory per engine (resident): transformers {m['transformers']:.2f} GiB, vLLM {m['vllm']:.2f} GiB (engine core + KV cache)", "",
              "through Serve (HTTP, pinned arm, one CPU each)",
              f"| requests | arm | p50 ms, 1 in flight | p95 ms, 1 in flight | req/s at {concurrency} in flight |", "|---|---|--:|--:|--:|"]  # fmt: skip
    for kind, arms in report["through_serve"].items():
        for arm, s in arms.items():
            lines.append(f"| {kind} | {arm} | {s['one_in_flight']['p50']:.1f} | {s['one_in_flight']['p95']:.1f} | {s[f'req_per_s_at_{concurrency}']:.1f} |")
    return "\n".join(lines)
