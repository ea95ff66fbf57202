"""`rerank-fleet bench engine`: pairs/s, per-call latency percentiles and peak memory per
(precision, case, shared prefix on/off). Prints a table and writes JSON.

Cases are the shapes rerank traffic has (see `CASES`); `docsN` cases are one query with N
documents, half of them images (`--batch-sizes`). Each measured call is the full engine path a
replica runs, serially: prepare every request (decode, resize, tokenize), then one forward call
(ViT, decoder). The prepare and forward shares are reported apart: a replica overlaps them.
Memory is the CUDA allocator's peak on a GPU and the process's peak resident set (sampled) on
CPU, both relative to before the model loaded. MFU (GPU only) = decoder FLOPs actually run
(2 x projection weights x tokens) / (time x the GPU's dense peak).
"""

from __future__ import annotations

import gc
import json
import platform
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class PeakRSS:
    """Samples this process's resident set size in a thread (CPU has no allocator peak counter)."""

    def __init__(self, interval_s: float = 0.005):
        import psutil

        self._proc = psutil.Process()
        self.interval_s = interval_s
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class Case:
    name: str
    requests: int  # requests in one forward call (distinct queries)
    documents: int  # documents per request
    query: str  # "short" | "long" | "image"
    image_share: float  # share of documents that are images
    image_side: int | None = None  # pixels of a square image document; None: 96, 128 or 160 at random


CASES = {
    "short100": Case("short100", 1, 100, "short", 0.0),  # 1 short query x 100 short texts
    "batch32x8": Case("batch32x8", 32, 8, "short", 0.0),  # 32 requests x 8 texts, one forward call
    "long100": Case("long100", 1, 100, "long", 0.0),  # 1 ~400-token query x 100 texts
    "imgquery": Case("imgquery", 1, 100, "image", 0.0),  # an image query x 100 texts
    "imgdocs": Case("imgdocs", 1, 32, "short", 1.0),  # a text query x 32 image documents
}
LONG_QUERY_PHRASES = 80  # ~5 tokens each on the tiny tokenizer: ~400 tokens


def case_requests(case: Case, seed: int = 0):
    """The case's requests in the tiny model's synthetic world (same seed, same requests)."""
    from engine.inputs import ImageInput, RerankItem, ScoreRequest
    from workshop.tiny import caption, draw, query_text, random_thing

    rng = random.Random(seed)
    out = []
    for _ in range(case.requests):
        if case.query == "image":
            query = RerankItem(images=(ImageInput.of(draw(random_thing(rng), rng, side=160)),))
        elif case.query == "long":
            query = RerankItem(text=" and ".join(query_text(random_thing(rng), rng) for _ in range(LONG_QUERY_PHRASES)))
        else:
            query = RerankItem(text=query_text(random_thing(rng), rng))
        docs = [
            RerankItem(images=(ImageInput.of(draw(random_thing(rng), rng, side=case.image_side or rng.choice((96, 128, 160)))),)) if rng.random() < case.image_share
            else RerankItem(text=caption(random_thing(rng), rng))
            for _ in range(case.documents)
        ]  # fmt: skip
        out.append(ScoreRequest.of(query, docs))
    return out


# 1024 x 1024 pixels: 1024 merged visual tokens on Qwen3-VL (32 x 32 pixels each), the planner's typical image.
VISION_IMAGE_SIDE = 1024


def time_vision(engine, repeats: int) -> dict:
    """The vision tower alone on one typical image (decoding and resizing excluded): what a
    feature-cache hit saves, which the planner weighs against fetching the features from Redis."""
    from engine.inputs import ImageInput
    from workshop.tiny import draw, random_thing

    rng = random.Random(0)
    image = ImageInput.of(draw(random_thing(rng), rng, side=VISION_IMAGE_SIDE))
    patches = [engine.preprocessor.image(image.data, image.field)]  # what engine.encode_images does, its two steps timed apart
    tower = engine.forwarder.tower
    (features,) = tower.features(patches, [image.digest], engine.feature_spec)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tower.features(patches, [image.digest], engine.feature_spec)
        sync(engine)
        times.append(time.perf_counter() - t0)
    return {"image_tokens": features.num_tokens, "ms_per_image": 1000 * float(np.median(times))}


def sync(engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def time_call(engine, requests) -> tuple[float, float, int]:
    """(prepare seconds, forward seconds, decoder tokens) of one serial engine call, preparation included."""
    t0 = time.perf_counter()
    prepared = [engine.prepare(r) for r in requests]
    t1 = time.perf_counter()
    results = engine.forward(prepared)
    sync(engine)
    return t1 - t0, time.perf_counter() - t1, sum(r.tokens for r in results)


def measure_case(engine, requests, repeats: int) -> dict:
    """One serial engine call on `requests`, as a replica makes it: preparation (CPU, timed once
    after a warm-up: it is deterministic), then the device step, timed `repeats` times after a
    warm-up on the same prepared requests. Latency = preparation + device step; peak memory of the
    device steps above what was held before (the allocator's on a GPU, resident set on CPU)."""
    engine.prepare(requests[0])  # warm-up: tokenizer and image-processor caches
    t0 = time.perf_counter()
    prepared = [engine.prepare(r) for r in requests]
    prepare_s = time.perf_counter() - t0
    engine.forward(prepared)  # warm-up: kernels, allocator
    sync(engine)
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else PeakRSS().peak
    forward_s, tokens = [], 0
    with PeakRSS() as rss:
        for _ in range(repeats):
            t0 = time.perf_counter()
            results = engine.forward(prepared)
            sync(engine)
            forward_s.append(time.perf_counter() - t0)
            tokens = sum(r.tokens for r in results)
    pairs = sum(len(p.rows) for p in prepared)
    visual_ids = (engine.forwarder.image_token_id, engine.forwarder.video_token_id)
    latency = [prepare_s + f for f in forward_s]
    forward = float(np.median(forward_s))
    return {
        "pairs": pairs,
        "pairs_per_s": pairs * len(latency) / sum(latency),
        "forward_pairs_per_s": pairs / forward,
        "p50_ms": 1000 * float(np.percentile(latency, 50)),
        "p95_ms": 1000 * float(np.percentile(latency, 95)),
        "prepare_ms": 1000 * prepare_s,
        "forward_ms": 1000 * forward,
        "decoder_tokens": tokens,  # tokens the decoder ran, each shared prefix once
        "pair_tokens": sum(len(row) for p in prepared for row in p.rows),  # whole pairs, as if nothing were shared
        "visual_tokens": sum(int(sum((row.ids == t).sum() for t in visual_ids)) for p in prepared for row in p.rows),
        "activation_peak_gib": _gib((torch.cuda.max_memory_allocated() if cuda else rss.peak) - base),
    }


def run_engine_bench(
    model: str = "tiny",
    precisions: list[str] | None = None,
    batch_sizes: list[int] | None = None,
    cases: list[str] | None = None,
    sharing: list[bool] | None = None,
    device: str = "auto",
    repeats: int = 5,
    out: str | None = None,
    random_config: str | None = None,
    peak_tflops=None,
) -> dict:
    """`peak_tflops(device_name, precision) -> float | None` gives the GPU's dense peak for MFU
    (the command line passes the placement catalogue's)."""
    from engine.config import EngineConfig
    from engine.engine import RerankEngine
    from engine.errors import PrecisionUnsupported
    from workshop.tiny import resolve_source
    from workshop.weight_bytes import decoder_matmul_parameters

    precisions = precisions or ["fp32", "bf16", "int8", "nf4"]
    selected = [CASES[c] for c in (cases if cases is not None else list(CASES))]
    selected += [Case(f"docs{n}", 1, n, "short", 0.5) for n in (batch_sizes or [])]
    sharing = sharing if sharing is not None else [False, True]
    if random_config:
        from workshop.random_model import build_random_model

        build_dev = "cuda" if torch.cuda.is_available() and device != "cpu" else "cpu"
        model = str(build_random_model(random_config, Path("out") / ("random-" + Path(random_config).stem), device=build_dev))
    source = resolve_source(model)
    rows = []
    vision_rows = []
    for precision in precisions:
        engines = {}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        sampler = PeakRSS()
        base_rss = sampler.peak
        try:
            with sampler:
                t_load = time.perf_counter()
                engines[True] = RerankEngine.load(source, precision, config=EngineConfig(max_batch_tokens=1 << 16), device=device)
                load_s = time.perf_counter() - t_load
        except PrecisionUnsupported as e:
            rows.append({"precision": precision, "skipped": str(e)})
            continue
        # The same loaded model with sharing off: one set of weights, two engines.
        first = engines[True]
        engines[False] = RerankEngine(first.loaded, first.tokenizer, EngineConfig(max_batch_tokens=1 << 16, share_prefix=False), model_id=first.model_id)
        engine_dev = first.device
        weights_gib = _gib(torch.cuda.memory_allocated() - base_alloc) if engine_dev.type == "cuda" else _gib(sampler.peak - base_rss)
        params = decoder_matmul_parameters(first.model)
        for case in selected:
            requests = case_requests(case)
            for share in sharing:
                m = measure_case(engines[share], requests, repeats)
                row = {"precision": precision, "case": case.name, "share_prefix": share, "batch_size": m["pairs"], **m,
                       "mean_pair_tokens": m["pair_tokens"] / m["pairs"], "image_share": case.image_share,
                       "peak_mem_gib": m["activation_peak_gib"] + weights_gib, "weights_mem_gib": weights_gib, "load_s": load_s}  # fmt: skip
                mfu = _mfu(params, m["decoder_tokens"], m["forward_ms"] / 1000, engine_dev, precision, peak_tflops)
                if mfu is not None:
                    row["mfu"] = mfu
                rows.append(row)
        vision_rows.append({"precision": precision, **time_vision(first, repeats)})
        del engines, first
    report = {
        "model": model,
        "device": _device_name(device),
        "repeats": repeats,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
        "vision": vision_rows,
    }
    print(format_table(report))
    write_json(report, out)
    return report


def _mfu(params: int, tokens: int, seconds: float, device: torch.device, precision: str, peak_tflops) -> float | None:
    if device.type != "cuda" or seconds <= 0 or peak_tflops is None:
        return None
    peak = peak_tflops(torch.cuda.get_device_name(), "fp8" if precision == "fp8" else "bf16")
    return (2 * params * tokens / seconds) / (peak * 1e12) if peak else None


def write_json(report: dict, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))


def _gib(n: int | float) -> float:
    return max(0.0, n) / 2**30


def _device_name(device: str) -> str:
    if torch.cuda.is_available() and device != "cpu":
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def format_table(report: dict) -> str:
    """The rows as Markdown, with the shared/unshared throughput ratio beside each shared row."""
    unshared = {(r["precision"], r["case"]): r["pairs_per_s"] for r in report["rows"] if not r.get("share_prefix", True) and "skipped" not in r}
    lines = [f"model={report['model']} device={report['device']} torch_threads={report.get('torch_threads')}",
             "| precision | case | shared prefix | pairs | pairs/s | vs unshared | p50 ms | p95 ms | prepare ms | forward ms | decoder tokens | peak mem GiB | MFU |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
    for r in report["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['precision']} | skipped: {r['skipped']} |||||||||||")
            continue
        base = unshared.get((r["precision"], r["case"]))
        ratio = f"{r['pairs_per_s'] / base:.2f}x" if r["share_prefix"] and base else ""
        mfu = f"{100 * r['mfu']:.1f} %" if "mfu" in r else "n/a"
        lines.append(
            f"| {r['precision']} | {r['case']} | {'on' if r['share_prefix'] else 'off'} | {r['pairs']} | {r['pairs_per_s']:.1f} | {ratio} | "
            f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['prepare_ms']:.1f} | {r['forward_ms']:.1f} | {r['decoder_tokens']} | "
            f"{r['peak_mem_gib']:.3f} | {mfu} |"
        )
    for v in report.get("vision", []):
        lines.append(f"vision tower ({v['precision']}): {v['ms_per_image']:.1f} ms per {v['image_tokens']}-token image")
    return "\n".join(lines)
