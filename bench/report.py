"""What the benches share at their ends: progress lines, a timed rerank pinned to an arm through the
fleet, latency samples summed up, and the figures printed as a table and written as JSON."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def progress(bench: str) -> Callable[[str], None]:
    """`note(text)`: a progress line of `rerank-fleet bench BENCH` on stderr, as it happens."""

    def note(text: str) -> None:
        print(f"[bench {bench}] {text}", file=sys.stderr, flush=True)

    return note


def nearest_rank(sorted_values: list[float], q: float) -> float:
    """The `q` quantile of non-empty `sorted_values` by nearest rank (no interpolation): the one
    definition every bench's percentiles use."""
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def summary_ms(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)
    return {"n": len(ms), "mean": round(statistics.fmean(ms), 2), "p50": round(nearest_rank(ms, 0.5), 2), "p95": round(nearest_rank(ms, 0.95), 2)}


def pinned_rerank(client, pin_header: str) -> Callable[[str, dict], tuple[float, dict]]:
    """`rerank(arm, body)`: the body sent to `/v2/rerank` pinned to `arm`, (seconds it took, the
    answer); any status but 200 raises, naming the arm."""

    def rerank(arm: str, body: dict) -> tuple[float, dict]:
        t = time.perf_counter()
        r = client.post("/v2/rerank", json=body, headers={pin_header: arm})
        elapsed = time.perf_counter() - t
        if r.status_code != 200:
            raise RuntimeError(f"arm {arm} answered {r.status_code}: {r.text[:300]}")
        return elapsed, r.json()

    return rerank


def finish(report: dict[str, Any], table: str, out: str | Path) -> dict[str, Any]:
    """Print a bench's table, write its report as JSON to `out`; the report."""
    print(table)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2))
    print(f"written {out}")
    return report
