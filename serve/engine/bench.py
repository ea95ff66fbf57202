"""`rerank-fleet bench engine`: pairs/s, per-batch latency percentiles and peak memory per
(precision, batch size). Prints a table and writes JSON.

Each measured call is the full engine path a replica runs: image decode and resize, the ViT,
prompt building, tokenisation and the decoder. Memory is the CUDA allocator's peak on a GPU and
the process's peak resident set (sampled) on CPU, both relative to before the model loaded.
"""

from __future__ import annotations

import gc
import json
import platform
import random
import threading
import time
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


def workload(n_pairs: int, image_share: float, seed: int = 0):
    """A query and `n_pairs` documents, `image_share` of them images (the tiny model's synthetic world)."""
    from serve.engine.inputs import RerankItem, ScorePair
    from serve.engine.tiny import caption, draw, query_text, random_thing

    rng = random.Random(seed)
    q = RerankItem(text=query_text(random_thing(rng), rng))
    docs = [
        RerankItem(images=(draw(random_thing(rng), rng, side=rng.choice((96, 128, 160))),)) if rng.random() < image_share
        else RerankItem(text=caption(random_thing(rng), rng))
        for _ in range(n_pairs)
    ]
    return [ScorePair(q, d, None, "query", f"documents.{i}") for i, d in enumerate(docs)]


def run_engine_bench(
    model: str = "tiny",
    precisions: list[str] | None = None,
    batch_sizes: list[int] | None = None,
    device: str = "auto",
    image_share: float = 0.5,
    repeats: int = 5,
    out: str | None = None,
    random_config: str | None = None,
) -> dict:
    from serve.config import ModelConfig
    from serve.engine.engine import RerankEngine
    from serve.engine.errors import PrecisionUnsupported

    precisions = precisions or ["fp32", "bf16", "int8", "nf4"]
    batch_sizes = batch_sizes or [1, 8, 32]
    if random_config:
        from serve.engine.random_model import build_random_model

        build_dev = "cuda" if torch.cuda.is_available() and device != "cpu" else "cpu"
        model = str(build_random_model(random_config, Path("out") / ("random-" + Path(random_config).stem), device=build_dev))
    rows = []
    for precision in precisions:
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
                engine = RerankEngine.load(ModelConfig(source=model, max_batch_tokens=1 << 20), precision, device=device)
                load_s = time.perf_counter() - t_load
        except PrecisionUnsupported as e:
            rows.append({"precision": precision, "skipped": str(e)})
            continue
        weights_gib = _gib(torch.cuda.memory_allocated() - base_alloc) if engine.device.type == "cuda" else _gib(sampler.peak - base_rss)
        for bs in batch_sizes:
            pairs = workload(bs, image_share)
            engine.score_pairs(pairs)  # warm-up: kernels, allocator
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            lat = []
            with PeakRSS() as run_peak:
                for _ in range(repeats):
                    t = time.perf_counter()
                    engine.score_pairs(pairs)
                    if engine.device.type == "cuda":
                        torch.cuda.synchronize()
                    lat.append(time.perf_counter() - t)
            peak = _gib(torch.cuda.max_memory_allocated() - base_alloc) if engine.device.type == "cuda" else _gib(run_peak.peak - base_rss)
            rows.append({
                "precision": precision,
                "batch_size": bs,
                "pairs_per_s": bs * len(lat) / sum(lat),
                "p50_ms": 1000 * float(np.percentile(lat, 50)),
                "p95_ms": 1000 * float(np.percentile(lat, 95)),
                "peak_mem_gib": peak,
                "weights_mem_gib": weights_gib,
                "load_s": load_s,
            })
        del engine
    report = {
        "model": model,
        "device": _device_name(device),
        "image_share": image_share,
        "repeats": repeats,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    print(format_table(report))
    write_json(report, out)
    return report


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
    lines = [f"model={report['model']} device={report['device']} image_share={report['image_share']}",
             "| precision | batch | pairs/s | p50 ms | p95 ms | peak mem GiB | weights GiB |",
             "|-----------|------:|--------:|-------:|-------:|-------------:|------------:|"]
    for r in report["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['precision']} | skipped: {r['skipped']} |||||")
            continue
        lines.append(
            f"| {r['precision']:9} | {r['batch_size']:5d} | {r['pairs_per_s']:7.1f} | {r['p50_ms']:6.1f} | {r['p95_ms']:6.1f} | "
            f"{r['peak_mem_gib']:12.3f} | {r['weights_mem_gib']:11.3f} |"
        )
    return "\n".join(lines)
