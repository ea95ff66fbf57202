"""The benches' load generators, over aiohttp (about 0.2 ms of client CPU a request against
httpx's ~4 ms on the 2-core VM: the load generator runs on the machine it measures, so the cores go
to the server under test). Loopback only, bounded in requests and time.

- `open_loop`: a fixed arrival rate for a while (arrivals never wait for answers);
  `closed_loop_capacity`: clients sending back to back for a while. Both return every request's
  `Outcome` (answered with any status, hung, or no HTTP answer) in a `LoadResult`, whose `row` is
  one line of `bench reliability`'s table.
- `closed_loop`: each body once, N in flight, every answer a 200 (`bench serving`); `steady_rate`
  its answers per second with N in flight.
- `alternated_blocks`: the same bodies one at a time to several sides (URLs, or the engine alone)
  in alternated blocks, so the machine's drift hits every side alike.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx

from bench.report import nearest_rank

HUNG_S = 30.0  # a request not answered within this is counted "hung" (and abandoned)


@dataclass
class Outcome:
    sent_at: float
    latency_s: float | None  # None: hung
    status: int | None  # None: hung or no HTTP answer
    retry_after: bool = False


@dataclass
class LoadResult:
    outcomes: list[Outcome] = field(default_factory=list)

    def row(self, scenario: str, **extra: Any) -> dict[str, Any]:
        counts = Counter(outcome_kind(o) for o in self.outcomes)
        ok = sorted(o.latency_s for o in self.outcomes if o.status == 200)
        refused = sorted(o.latency_s for o in self.outcomes if o.status == 503)
        return {
            "scenario": scenario, "sent": len(self.outcomes),
            "200": counts["200"], "4xx": counts["4xx"], "503": counts["503"], "other": counts["other"], "hung": counts["hung"],
            "p50_ms": percentile_ms(ok, 0.50), "p99_ms": percentile_ms(ok, 0.99), "refusal_p99_ms": percentile_ms(refused, 0.99),
            "max_ms": percentile_ms(sorted(o.latency_s for o in self.outcomes if o.latency_s is not None), 1.0),
            "refusals_with_retry_after": sum(o.retry_after for o in self.outcomes if o.status == 503), **extra,
        }  # fmt: skip

    @property
    def answered(self) -> int:
        return sum(o.status == 200 for o in self.outcomes)

    def stall_s(self) -> float:
        """Longest time with no request answered 200 (from the first send to the last answer)."""
        done = sorted(o.sent_at + o.latency_s for o in self.outcomes if o.status == 200 and o.latency_s is not None)
        if not self.outcomes:
            return 0.0
        marks = [min(o.sent_at for o in self.outcomes), *done]
        return round(max((b - a for a, b in zip(marks, marks[1:])), default=0.0), 3)


def outcome_kind(o: Outcome) -> str:
    if o.status is None:
        return "hung"
    if o.status == 200:
        return "200"
    if o.status == 503:
        return "503"
    return "4xx" if 400 <= o.status < 500 else "other"


def percentile_ms(sorted_s: list[float], q: float) -> float | None:
    """The `q` quantile of sorted seconds in ms, to 0.1 ms (None: no samples)."""
    return round(1000 * nearest_rank(sorted_s, q), 1) if sorted_s else None


def check_loopback(base_url: str) -> None:
    host = httpx.URL(base_url).host
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"the benches send traffic to loopback only, not {host!r}")


TIMEOUT = aiohttp.ClientTimeout(total=HUNG_S)


async def post_rerank(session: aiohttp.ClientSession, sent_at: float, body: dict, headers: dict | None = None) -> Outcome:
    """One rerank, as an outcome: answered (any status), hung (no answer in HUNG_S) or 599 (no HTTP answer)."""
    t0 = time.perf_counter()
    try:
        async with session.post("v2/rerank", json=body, headers=headers) as r:
            await r.read()
            return Outcome(sent_at, time.perf_counter() - t0, r.status, "retry-after" in r.headers)
    except TimeoutError:
        return Outcome(sent_at, None, None)
    except aiohttp.ClientError:
        return Outcome(sent_at, time.perf_counter() - t0, 599)


def loopback_session(base_url: str) -> aiohttp.ClientSession:
    check_loopback(base_url)
    return aiohttp.ClientSession(base_url.rstrip("/") + "/", timeout=TIMEOUT, connector=aiohttp.TCPConnector(limit=1000))


async def open_loop(base_url: str, rate: float, duration_s: float, bodies: list[dict], *, headers: dict | None = None,
                    during=None) -> LoadResult:  # fmt: skip
    """Requests at a fixed arrival rate (open loop: arrivals never wait for answers) for
    `duration_s`; `during(elapsed)` (async, optional) runs alongside, e.g. to kill a replica."""
    result = LoadResult()
    async with loopback_session(base_url) as session:

        async def one(i: int, sent_at: float) -> None:
            result.outcomes.append(await post_rerank(session, sent_at, bodies[i % len(bodies)], headers))

        start = time.perf_counter()
        tasks, side = [], asyncio.ensure_future(during(start)) if during else None
        n = round(rate * duration_s)  # not int(): 48 / r * r can fall a hair short of 48
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i, time.perf_counter())))
        await asyncio.gather(*tasks)
        if side is not None:
            await side
    return result


async def closed_loop_capacity(base_url: str, concurrency: int, duration_s: float, bodies: list[dict],
                               headers: dict | None = None) -> tuple[float, LoadResult]:  # fmt: skip
    """Requests per second answered with `concurrency` clients sending back to back."""
    result = LoadResult()
    async with loopback_session(base_url) as session:
        stop = time.perf_counter() + duration_s

        async def worker(w: int) -> None:
            i = w
            while time.perf_counter() < stop:
                result.outcomes.append(await post_rerank(session, time.perf_counter(), bodies[i % len(bodies)], headers))
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - t0
    return result.answered / wall, result


async def health_latency(base_url: str) -> float:
    async with httpx.AsyncClient(base_url=base_url, timeout=HUNG_S) as client:
        t0 = time.perf_counter()
        await client.get("/health")
        return time.perf_counter() - t0


async def post_ok(session, url: str, body: dict) -> None:
    """POST `body` and read the answer; any non-200 answer raises."""
    async with session.post(url, json=body) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{url} answered {r.status}: {(await r.text())[:200]}")


async def each_once(send: Callable[[Any], Awaitable[Any]], items: list, in_flight: int, finished: list[float] | None = None) -> tuple[list[float], float]:
    """Each item sent once by `send`, `in_flight` at a time; returns each one's latency (s) and the
    wall time, and appends to `finished` when each answer came (s from the start, in order)."""
    latencies: list[float] = []
    finished = [] if finished is None else finished
    queue = iter(items)

    async def worker() -> None:
        for item in queue:
            t0 = time.perf_counter()
            await send(item)
            latencies.append(time.perf_counter() - t0)
            finished.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return latencies, time.perf_counter() - start


async def closed_loop(url: str, bodies: list[dict], in_flight: int, finished: list[float] | None = None) -> tuple[list[float], float]:
    """Each body POSTed once, `in_flight` at a time (aiohttp: ~0.2 ms of client CPU a request):
    `each_once` over HTTP. Any non-200 answer raises."""
    check_loopback(url)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300), connector=aiohttp.TCPConnector(limit=in_flight)) as session:
        return await each_once(lambda body: post_ok(session, url, body), bodies, in_flight, finished)


OVERHEAD_BLOCK = 12  # requests per block of an alternation at 1 in flight


async def alternated_blocks(sides: Sequence[str | Callable[[dict], float]], bodies: list[dict], block: int = OVERHEAD_BLOCK) -> list[list[float]]:
    """`bodies` in blocks of `block`, one request at a time, each block sent to every side in turn;
    each side's latencies (s). A side is a URL (POSTed through aiohttp; any non-200 raises) or a
    callable that runs one body and returns its own time (the engine alone: nothing else runs in
    this loop meanwhile). Blocks, not single requests: a request into another side between two
    puts its working set in the caches the first side left, and the request after it pays for
    that (alternated request by request, Serve's p50 came out 0.3-6.6 ms over a back-to-back loop
    in four runs on the 2-core VM). Blocks a fraction of a second long still share the machine's
    drift."""
    for side in sides:
        if isinstance(side, str):
            check_loopback(side)
    times: list[list[float]] = [[] for _ in sides]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        for i in range(0, len(bodies), block):
            for side, out in zip(sides, times):
                for body in bodies[i : i + block]:
                    if isinstance(side, str):
                        t = time.perf_counter()
                        await post_ok(session, side, body)
                        out.append(time.perf_counter() - t)
                    else:
                        out.append(side(body))
    return times


def steady_rate(finished: list[float], in_flight: int) -> float:
    """Answers per second while `in_flight` requests were in flight: between the `in_flight`-th
    answer and the `in_flight`-th from last. A closed loop fills up at its start (the first
    answers wait for a batch to form) and drains at its end (the last `in_flight` requests run
    with fewer and fewer beside them), and both ends would count fewer in flight than asked."""
    k = in_flight
    if len(finished) <= 2 * k + 1:
        raise ValueError(f"{len(finished)} answers are too few to measure {in_flight} in flight: send more than {2 * k + 1}")
    return (len(finished) - 2 * k) / (finished[-k - 1] - finished[k - 1])
