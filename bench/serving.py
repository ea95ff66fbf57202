"""Serving benchmark: what Ray Serve costs and what it buys, measured in one run.

1. Overhead: the same text requests, one at a time, through the whole Serve path (HTTP ->
   proxy -> ingress -> arm replica -> engine) and straight into a `RerankEngine` in this process,
   run on the arm's CPUs, in alternated blocks.
2. Dynamic batching: Serve throughput with 1 request in flight vs `concurrency` in flight
   (the arm merges the requests waiting for the engine into one call), the latter while that
   many are in flight: the loop's fill and drain are left out (`steady_rate`).
3. Image-feature cache: latency of image-document requests whose images are new (miss: decode,
   resize, ViT) vs repeated (hit: features from the in-replica LRU).
4. Shared prefix: a ~400-token query against 100 documents vs a short query against the same
   documents, through the served API (the prefix runs once per request, so length costs little).
5. Fleet vs echo app: the fleet and a Serve app of the same shape that does no work
   (bench/echo_app.py), on the same Serve instance: p50 at 1 and `in_flight` requests in flight
   and CPU ms per request per role (bench/serve_cpu.py), with the issue's goals as verdicts; and
   first the echo app whose arm works as long as the engine alone (section 1's p50), alternated
   with the fleet at 1 in flight: Serve's own floor for a request of that length.

`keep_cores_awake` (bench/awake_cores.py) runs the whole bench beside a `SCHED_IDLE` busy loop per
core: on a VM that gives idle vCPUs away, the figures at 1 in flight are otherwise the host's.

Everything runs under one Serve mode (`serve_mode`: serve/request_path.py, default the main
job's), set before Ray starts. The fleet is one fp32 arm of the configured model without
shadowing or the noise floor's mirrored calls, so every figure is the primary path alone. `run_serving_bench` prints a table and
writes JSON; the CLI wraps it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

from bench.bodies import COLOURS, SHAPES, image_request, score_request, text_requests
from bench.load import OVERHEAD_BLOCK, alternated_blocks
from bench.report import progress, summary_ms

note = progress("serving")


def bench_fleet(model_source: str, port: int, redis_url: str | None, max_batch_size: int, num_cpus: float):
    from serve.config import FleetConfig

    return FleetConfig.from_dict(
        {
            "model": {"source": model_source},
            "arms": [{
                "name": "fp32", "precision": "fp32", "weight": 1, "max_ongoing_requests": max(64, 2 * max_batch_size),
                "ray_actor_options": {"num_cpus": num_cpus},
                "batching": {"max_batch_size": max_batch_size},
            }],
            "cache": {"redis_url": redis_url},
            "experiment": {"noise_floor_fraction": 0},  # no mirrored calls: the primary path alone
            "http": {"host": "127.0.0.1", "port": port},
        }
    )  # fmt: skip


def run_serving_bench(
    *,
    out: str | Path = "out/bench-serving.json",
    model_source: str = "tiny",
    requests: int = 48,
    overhead_requests: int = 96,
    docs_per_request: int = 8,
    concurrency: int = 32,
    image_requests: int = 12,
    images_per_request: int = 4,
    image_side: int = 224,
    prefix_requests: int = 10,
    port: int = 8765,
    redis_url: str | None = None,
    num_cpus: float = 1,
    serve_mode: str | None = None,
    in_flight: int = 16,
    compare_requests: int = 96,
    layout: str = "shared",
    batching_rounds: int = 3,
    keep_cores_awake: bool = False,
) -> dict[str, Any]:
    from bench.awake_cores import awake_cores
    from bench.fleet_vs_echo import fleet_vs_echo, goal_verdicts, set_serve_mode
    from bench.load import closed_loop, each_once, steady_rate
    from bench.serve_cpu import format_placement, placement
    from serve.request_path import DEFAULT_SERVE_MODE

    serve_mode = serve_mode or DEFAULT_SERVE_MODE
    serve_env = set_serve_mode(serve_mode)  # before Ray starts and before ray.serve is imported
    import httpx
    import torch
    from ray import serve

    from engine.engine import RerankEngine
    from serve.batched_engine import BatchedEngine
    from serve.local import embedded_serve, on_cpus, place, split_cpus
    from workshop.tiny import resolve_source

    # The engine alone runs on the arm's CPUs: in the split layout the head's CPU also carries
    # Ray's and Serve's background work (~20 % of it idle), which slowed the engine alone there
    # by 1-4 ms a request and flattered what Serve adds.
    engine_cpus = split_cpus()[1] if layout == "split" else os.sched_getaffinity(0)
    # Placed here too (serve/local.py), so the echo app built from it goes where the fleet's deployments go.
    fleet = place(bench_fleet(model_source, port, redis_url, max_batch_size=concurrency, num_cpus=num_cpus), layout)
    load = text_requests(requests, docs_per_request)
    bursts = [text_requests(requests * 6, docs_per_request, seed=1 + i) for i in range(batching_rounds)]
    results: dict[str, Any] = {}
    load_before = os.getloadavg()[0]
    note(f"starting Ray and the fleet (serve mode {serve_mode}: {serve_env})")
    # Logical CPUs: the fleet's arm and ingress, the echo app's (the same reservations), one for Serve.
    ray_cpus = 2 * num_cpus + 1
    with (
        awake_cores(keep_cores_awake) as awake,  # started first: its loops are not pinned with the nodes
        embedded_serve(fleet, num_cpus=ray_cpus, serve_mode=serve_mode, layout=layout) as base,
        httpx.Client(base_url=base, timeout=300) as client,
    ):
        arm = serve.get_deployment_handle("Arm-fp32", app_name="rerank")
        arm._init(_run_router_in_separate_loop=True)  # a handle called from sync code, whatever the Serve mode's default
        arm_info = arm.describe.remote().result()
        # The direct engine gets the replica's thread count, so the comparison is like for like.
        torch.set_num_threads(int(arm_info["torch_threads"]))
        engine = RerankEngine.load(resolve_source(model_source), "fp32", config=fleet.engine_config(), device="cpu")

        def via_serve(body: dict) -> float:
            t = time.perf_counter()
            r = client.post("/v2/rerank", json=body)
            r.raise_for_status()
            return time.perf_counter() - t

        def direct(body: dict) -> float:
            request = score_request(body)
            with on_cpus(engine_cpus):
                t = time.perf_counter()
                engine.forward([engine.prepare(request)])
                return time.perf_counter() - t

        for body in load[:4]:  # warm both paths (allocator, tokenizer caches, Serve handles)
            via_serve(body)
            direct(body)

        # 1. Same load, one request at a time: Serve vs direct in alternated blocks, so drift hits
        # both alike (this machine's speed drifts 10-20 % within minutes: figures taken minutes
        # apart differ by more than what Serve adds). Served through section 5's client (aiohttp).
        overhead_load = text_requests(overhead_requests, docs_per_request, seed=3)
        note(f"1/5 overhead: {len(overhead_load)} requests through Serve and into the engine alone, one at a time, in alternated blocks of {OVERHEAD_BLOCK}")
        serve_s, direct_s = asyncio.run(alternated_blocks([f"{base}/v2/rerank", direct], overhead_load))
        floor_s = []
        for _ in range(50):  # HTTP + proxy + ingress, no arm: the floor of any Serve request here
            t = time.perf_counter()
            client.get("/health").raise_for_status()
            floor_s.append(time.perf_counter() - t)
        results["overhead"] = {
            "requests": len(overhead_load),
            "http_proxy_ingress_floor_ms": summary_ms(floor_s),
            "batch_wait_timeout_ms": fleet.arms[0].batching.batch_wait_timeout_s * 1000,
            "docs_per_request": docs_per_request,
            "direct_ms": summary_ms(direct_s),
            "serve_ms": summary_ms(serve_s),
            "ratio_mean": round(statistics.fmean(serve_s) / statistics.fmean(direct_s), 3),
            "added_ms_median": round((statistics.median(serve_s) - statistics.median(direct_s)) * 1000, 2),
        }

        # 2. Dynamic batching: throughput at concurrency 1 vs `concurrency`.
        def batch_totals() -> tuple[int, float]:
            arm = client.get("/v1/experiments").json()["arms"]["fp32"]
            return arm["requests"], (arm["mean_batch_requests"] or 0) * arm["requests"]

        def engine_alone_rates(bodies: list[dict]) -> tuple[float, float]:
            """Requests/s of the engine alone behind the arm's own batching (`BatchedEngine`: the
            replica's prepare pool and forward thread, no Serve) on the arm's CPUs, over the same
            bodies as the fleet: at 1 in flight (the first len(load)) and at `concurrency` (all).
            The fleet's gain over the engine's own says what Serve's machinery leaves of batching."""
            requests = [score_request(b) for b in bodies]

            async def rate(sent: list, in_flight: int) -> float:  # as the fleet's: the whole run at 1 in flight, `steady_rate` at more
                batched = BatchedEngine(engine, prepare_workers=int(arm_info["prepare_workers"]), name="bench")
                batched.set_batching(concurrency, 0.0)
                finished: list[float] = []
                _, wall = await each_once(lambda request: batched.score_request(request, {}), sent, in_flight, finished)
                await batched.aclose()
                return steady_rate(finished, in_flight) if in_flight > 1 else len(sent) / wall

            with on_cpus(engine_cpus):  # the pool's threads start here, so they run where the arm does
                return asyncio.run(rate(requests[: len(load)], 1)), asyncio.run(rate(requests, concurrency))

        note(f"2/5 batching: {batching_rounds} rounds of {len(load)} requests at 1 in flight, then {len(bursts[0])} at {concurrency}; the same into the engine alone")
        asyncio.run(closed_loop(f"{base}/v2/rerank", load[: 2 * concurrency], concurrency))  # warm: batches of this size
        rounds = []
        burst_requests = burst_merged = 0.0
        for burst in bursts:  # alternated: this machine's speed drifts by 10-20 % within minutes, and drift hits both alike
            _, wall_1 = asyncio.run(closed_loop(f"{base}/v2/rerank", burst[: len(load)], 1))
            finished: list[float] = []
            n0, merged0 = batch_totals()
            _, wall_n = asyncio.run(closed_loop(f"{base}/v2/rerank", burst, concurrency, finished))
            n1, merged1 = batch_totals()
            burst_requests, burst_merged = burst_requests + n1 - n0, burst_merged + merged1 - merged0
            engine_1, engine_n = engine_alone_rates(burst)
            rounds.append({"rps_1": len(load) / wall_1, "rps_n": steady_rate(finished, concurrency), "rps_n_whole_run": len(burst) / wall_n,
                           "engine_rps_1": engine_1, "engine_rps_n": engine_n})  # fmt: skip
        rps_1, rps_n = (statistics.median(r[k] for r in rounds) for k in ("rps_1", "rps_n"))
        results["batching"] = {
            "concurrency": concurrency,
            "rounds": len(rounds),
            # Medians over the rounds. At `concurrency`: while that many were in flight (bench/serve_cpu.py
            # `steady_rate`); the whole run, the loop's fill and drain included, apart.
            "rps_concurrency_1": round(rps_1, 2),
            f"rps_concurrency_{concurrency}": round(rps_n, 2),
            f"rps_concurrency_{concurrency}_whole_run": round(statistics.median(r["rps_n_whole_run"] for r in rounds), 2),
            "pairs_per_s_concurrency_1": round(rps_1 * docs_per_request, 1),
            f"pairs_per_s_concurrency_{concurrency}": round(rps_n * docs_per_request, 1),
            "gain": round(statistics.median(r["rps_n"] / r["rps_1"] for r in rounds), 2),  # each round's own ratio
            "gain_by_round": [round(r["rps_n"] / r["rps_1"], 2) for r in rounds],
            # The engine alone behind the same batching on the same CPUs (medians of the rounds'
            # own figures): its own gain, and what share of its rate at `concurrency` the fleet reaches.
            "engine_alone_rps_1": round(statistics.median(r["engine_rps_1"] for r in rounds), 2),
            f"engine_alone_rps_{concurrency}": round(statistics.median(r["engine_rps_n"] for r in rounds), 2),
            "engine_alone_gain": round(statistics.median(r["engine_rps_n"] / r["engine_rps_1"] for r in rounds), 2),
            "fleet_share_of_engine_alone": round(statistics.median(r["rps_n"] / r["engine_rps_n"] for r in rounds), 2),
            # Mean number of requests sharing an engine call, as seen by each request of the bursts.
            f"mean_batch_requests_concurrency_{concurrency}": round(burst_merged / burst_requests, 2),
        }

        # 3. Image-feature cache: new images (miss) vs the same images again (hit).
        def direct_with_features(body: dict) -> float:
            request = score_request(body)
            features = {f.cache_key: f for f in engine.encode_images(list(request.images()))}  # what a cache hit hands over
            with on_cpus(engine_cpus):
                t = time.perf_counter()
                engine.forward([engine.prepare(request, features)])
                return time.perf_counter() - t

        note(f"3/5 image cache: {image_requests} requests of {images_per_request} new images, each sent twice")
        miss_s, hit_s, direct_img_s, direct_feat_s = [], [], [], []
        for i in range(image_requests):
            body = image_request([1_000_000 + i * images_per_request + j for j in range(images_per_request)], image_side)
            miss_s.append(via_serve(body))
            hit_s.append(via_serve(body))
            direct_img_s.append(direct(body))
            direct_feat_s.append(direct_with_features(body))
        results["image_cache"] = {
            "requests": image_requests,
            "images_per_request": images_per_request,
            "image_px": f"{image_side}x{image_side} PNG",
            "miss_ms": summary_ms(miss_s),
            "hit_ms": summary_ms(hit_s),
            "direct_engine_uncached_ms": summary_ms(direct_img_s),
            "direct_engine_with_features_ms": summary_ms(direct_feat_s),
            "hit_speedup_median": round(statistics.median(miss_s) / statistics.median(hit_s), 2),
        }
        # 4. Long vs short query, 100 documents each, through Serve (one request at a time).
        from bench.engine import LONG_QUERY_PHRASES

        rng = random.Random(7)
        captions = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
        documents = [rng.choice(captions) for _ in range(100)]
        long_query = " and ".join(f"find {rng.choice(captions)}" for _ in range(LONG_QUERY_PHRASES))
        short_s, long_s = [], []
        note(f"4/5 shared prefix: {prefix_requests + 1} short and long queries x {len(documents)} documents")
        for i in range(prefix_requests + 1):
            short_body = {"query": rng.choice(captions), "documents": documents}
            long_body = {"query": long_query + f" {i}", "documents": documents}
            s_t, l_t = via_serve(short_body), via_serve(long_body)
            if i:  # the first pair warms up
                short_s.append(s_t)
                long_s.append(l_t)
        usage = client.post("/v1/rerank", json={"query": long_query, "documents": documents}).json()["usage"]["total_tokens"]
        results["shared_prefix"] = {
            "requests": prefix_requests,
            "documents": len(documents),
            "long_query_tokens": len(engine.tokenizer(long_query, add_special_tokens=False)["input_ids"]),
            "long_request_decoder_tokens": usage,
            "short_query_ms": summary_ms(short_s),
            "long_query_ms": summary_ms(long_s),
            "long_over_short_p50": round(statistics.median(long_s) / statistics.median(short_s), 2),
        }
        results["engine"] = {k: v for k, v in arm_info.items() if k != "cache"}

        # 5. The fleet against the echo app, same Serve instance and settings, one after the other.
        results["fleet_vs_echo"] = fleet_vs_echo(fleet, base, load, text_requests(compare_requests, docs_per_request, seed=2), in_flight, serve_mode, serve_env,
                                                 work_s=results["overhead"]["direct_ms"]["p50"] / 1000)  # fmt: skip
        results["goals"] = goal_verdicts(results)
        where = placement()

    results["setup"] = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()}-core CPU VM, no GPU ({platform.platform()})",
        "fleet": "one fp32 arm, 1 replica, no shadow, in-process feature cache" + (f" + Redis {redis_url}" if redis_url else ""),
        "ray_num_cpus": ray_cpus,
        "serve_mode": serve_mode,
        "layout": layout,
        "cores_kept_awake": awake,  # bench/awake_cores.py: a SCHED_IDLE busy loop on each (none: the machine as it is)
        "placement": where,
        "load_average_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "torch_threads": int(arm_info["torch_threads"]),
        "model": model_source,
    }
    out_file = Path(out)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(results, indent=2))
    print(format_table(results))
    print(f"layout {layout}: {format_placement(where)}" + (f"; cores kept awake: {awake}" if awake else ""))
    print(f"written {out_file}")
    return results


def format_table(r: dict[str, Any]) -> str:
    o, b, c, p = r["overhead"], r["batching"], r["image_cache"], r["shared_prefix"]
    n = b["concurrency"]
    rows = [
        ("direct engine, 1 at a time (ms, p50/p95)", f"{o['direct_ms']['p50']} / {o['direct_ms']['p95']}"),
        ("Serve path, 1 at a time (ms, p50/p95)", f"{o['serve_ms']['p50']} / {o['serve_ms']['p95']}"),
        ("Serve / direct (mean latency ratio)", f"{o['ratio_mean']}x  (+{o['added_ms_median']} ms median)"),
        ("  of which HTTP+proxy+ingress floor (ms, p50)", f"{o['http_proxy_ingress_floor_ms']['p50']}"),
        ("  of which batch wait when alone (ms, max)", f"{o['batch_wait_timeout_ms']:g}"),
        ("Serve throughput, concurrency 1 (req/s)", f"{b['rps_concurrency_1']}"),
        (f"Serve throughput, concurrency {n} (req/s)", f"{b[f'rps_concurrency_{n}']}  (whole run, fill and drain: {b.get(f'rps_concurrency_{n}_whole_run')})"),
        ("dynamic batching gain (median of rounds)", f"{b['gain']}x  (rounds: {', '.join(f'{g}x' for g in b.get('gain_by_round', []))})"),
        (f"  requests per engine call at concurrency {n} (mean)", f"{b[f'mean_batch_requests_concurrency_{n}']}"),
        (f"engine alone, the arm's batching without Serve (req/s, 1 -> {n})",
         f"{b['engine_alone_rps_1']} -> {b[f'engine_alone_rps_{n}']}: gain {b['engine_alone_gain']}x"),
        (f"  fleet at concurrency {n} / engine alone at {n}", f"{b['fleet_share_of_engine_alone']}"),
        ("image docs, cache miss (ms, p50/p95)", f"{c['miss_ms']['p50']} / {c['miss_ms']['p95']}"),
        ("image docs, cache hit (ms, p50/p95)", f"{c['hit_ms']['p50']} / {c['hit_ms']['p95']}"),
        ("cache hit speedup (median)", f"{c['hit_speedup_median']}x"),
        ("engine alone: decode+ViT vs cached features (ms, p50)",
         f"{c['direct_engine_uncached_ms']['p50']} vs {c['direct_engine_with_features_ms']['p50']}"),
        (f"short query x {p['documents']} docs through Serve (ms, p50/p95)", f"{p['short_query_ms']['p50']} / {p['short_query_ms']['p95']}"),
        (f"{p['long_query_tokens']}-token query x {p['documents']} docs (ms, p50/p95)", f"{p['long_query_ms']['p50']} / {p['long_query_ms']['p95']}"),
        ("long / short query (p50)", f"{p['long_over_short_p50']}x"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if "fleet_vs_echo" in r:
        from bench.fleet_vs_echo import format_fleet_vs_echo

        lines += ["", *format_fleet_vs_echo(r)]
    return "\n".join(lines)


if __name__ == "__main__":
    run_serving_bench()
