"""Keep this machine's cores from idling during a bench, as dedicated cores would.

Some VMs hand a vCPU that halts back to the host at once (the 2-core VM of docs/BENCHMARKS.md runs
`cpuidle-haltpoll` with `guest_halt_poll_ns=0` under a nested hypervisor): another tenant runs on
the physical core meanwhile, and the vCPU comes back with cold caches. Measured on such a VM
(docs/BENCHMARKS.md): the tiny engine's 8-document request takes 13.7 ms back to back and 24.7 ms
after a 0.5 ms pause. At 1 request in flight every process on the request path pauses between
hops, so every hop pays it, and what is measured is the host's scheduler, not Serve or the engine.

`awake_cores` runs one busy loop per core under `SCHED_IDLE`, the lowest CPU class: it runs only
when nothing else wants the core, and a waking task preempts it at once. The vCPU never halts,
and the figures are those of dedicated cores (a bare-metal node, or a Kubernetes pod with
static CPU-manager cores). `rerank-fleet bench idle-gap` measures the effect on the engine alone.
Its cost: while a task of the bench competes with it for a core, the
loop's share is CFS's weight 3 against the task's (1024 at nice 0, 36 at Ray's worker niceness
15): at most ~8 % of that core. Each loop ends by itself after `max_s`, and with the bench.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

LOOP = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    pass
"""


@contextlib.contextmanager
def awake_cores(enabled: bool, max_s: float = 3600) -> Iterator[list[int]]:
    """A `SCHED_IDLE` busy loop on each of this process's CPUs while the block runs (when
    `enabled`); yields the CPUs it keeps awake."""
    with awake_cores_on(sorted(os.sched_getaffinity(0)) if enabled else [], max_s) as cpus:
        yield cpus


@contextlib.contextmanager
def awake_cores_on(cpus: list[int], max_s: float = 3600) -> Iterator[list[int]]:
    loops = [subprocess.Popen([sys.executable, "-c", LOOP, str(cpu), str(max_s)]) for cpu in cpus]
    try:
        yield cpus
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def run_idle_gap_bench(*, out: str = "out/bench-idle-gap.json", model_source: str = "tiny", requests: int = 100,
                       gaps_ms: tuple[float, ...] = (0, 0.5, 2, 10), docs_per_request: int = 8) -> dict:  # fmt: skip
    """What a pause before each request costs on this machine: the engine's latency for requests
    sent back to back, and after each pause of `gaps_ms`, on one CPU, with and without a
    `SCHED_IDLE` loop keeping that CPU awake. Prints a table, writes JSON."""
    import datetime as dt
    import json
    import platform
    import statistics
    import time
    from pathlib import Path

    import torch

    from bench.serving import score_request, text_requests
    from engine.engine import RerankEngine
    from workshop.tiny import resolve_source

    cpu = max(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    try:
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
    finally:
        os.sched_setaffinity(0, before)
    result = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()}-core CPU", "cpu": cpu,
              "model": model_source, "docs_per_request": docs_per_request, "requests": requests, "rows": rows}  # fmt: skip
    print(f"engine p50 (ms) per {docs_per_request}-document request, one CPU ({cpu}), after a pause before each request")
    print("| pause (ms) | idle CPU may halt | CPU kept awake (SCHED_IDLE loop) |\n|--:|--:|--:|")
    for gap in gaps_ms:
        plain, awake = (next(r["p50_ms"] for r in rows if r["pause_ms"] == gap and r["cpu_kept_awake"] is a) for a in (False, True))
        print(f"| {gap:g} | {plain} | {awake} |")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(f"written {out}")
    return result
