"""`BatchedEngine`: the transformers `RerankEngine` behind the `ServingEngine` contract, with Ray
Serve's `@serve.batch` merging the requests that wait into one device call.

A batch prepares each of its requests on the CPU pool (`engine.prepare`: decode, resize,
tokenize), concurrently, and a bad input fails its own request only; then `engine.forward` scores
the prepared ones in one call on the forward thread. Two batches are in flight
(`max_concurrent_batches=2`): while batch k is on the forward thread, batch k+1 prepares. A
failure of the forward pass fails the requests of that batch; no caller is left waiting.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from engine.engine import RerankEngine
from engine.errors import DeadlineExceeded
from engine.features import ImageFeatures
from engine.forward import RequestScores
from engine.inputs import ScoreRequest


def check_deadline(deadline: float | None, where: str) -> None:
    """`deadline` is this process's `time.monotonic()`: the caller sent a time budget, never a
    wall-clock time (clocks of two nodes differ)."""
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded(f"the request's deadline passed {where} (the arm is overloaded); retry later")


class BatchedEngine:
    def __init__(self, engine: RerankEngine, *, prepare_workers: int, name: str, on_batch: Callable[[int], None] = lambda pairs: None):
        self.engine = engine
        self.model_id, self.precision, self.feature_spec = engine.model_id, engine.precision, engine.feature_spec
        self.prepare_workers = prepare_workers
        self._on_batch = on_batch  # pairs per merged device call (a metric)
        self._prepare_pool = ThreadPoolExecutor(prepare_workers, thread_name_prefix=f"prepare-{name}")
        self._forward_thread = ThreadPoolExecutor(1, thread_name_prefix=f"forward-{name}")

    @property
    def score_spec(self):
        return self.engine.score_spec

    def set_batching(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def describe(self) -> dict:
        return {**self.engine.describe(), "prepare_workers": self.prepare_workers, "max_batch_size": self._score_batch._get_max_batch_size()}

    async def score_request(self, request: ScoreRequest, features: Mapping[str, ImageFeatures], deadline: float | None = None) -> RequestScores:
        outcome = await self._score_batch((request, features, deadline))
        if isinstance(outcome, BaseException):  # this request's own input error or passed deadline
            raise outcome
        return outcome

    async def aclose(self) -> None:
        self._prepare_pool.shutdown(wait=False)
        self._forward_thread.shutdown(wait=False)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0, max_concurrent_batches=2)
    async def _score_batch(self, items: list) -> list:
        """[(request, cached features, deadline)] -> per request its RequestScores, or the exception
        its preparation raised (that request's alone). A failure of the forward pass raises, for all."""
        prepared = await asyncio.gather(*(self._prepare(*item) for item in items), return_exceptions=True)
        good = [p for p in prepared if not isinstance(p, BaseException)]
        self._on_batch(sum(len(p.rows) for p in good))
        results = iter(await self._run(self._forward_thread, self.engine.forward, good) if good else [])
        return [p if isinstance(p, BaseException) else next(results) for p in prepared]

    async def _prepare(self, request: ScoreRequest, features: Mapping[str, ImageFeatures], deadline: float | None):
        check_deadline(deadline, "while it waited for a batch")
        return await self._run(self._prepare_pool, self.engine.prepare, request, features)

    async def _run(self, pool: ThreadPoolExecutor, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))
