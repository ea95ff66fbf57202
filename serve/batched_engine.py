"""`BatchedEngine`: the transformers `RerankEngine` behind the `ServingEngine` contract, merging
the requests that wait into one device call (continuous batching, as vLLM and infinity do).

Each request prepares on the CPU pool as it arrives (`engine.prepare`: decode, resize, tokenize),
while the forward thread scores earlier ones; a bad input fails its own request only. One
forward loop takes every prepared request waiting when the forward thread is free (up to
`max_batch_size`) and scores them in one `engine.forward` call: under load, everything that
arrived during a forward pass is the next batch. A failure of the forward pass fails the requests
of that batch; the loop goes on, and no caller is left waiting.

A request that finds the engine empty (nothing preparing, waiting or forwarding, and no batch
wait configured) has no one to merge with: it prepares and forwards in one job on the forward
thread, one thread hop instead of three (~0.3-0.5 ms of a lone request's latency on 2 cores).
Requests arriving meanwhile prepare on the pool and form the next batch, as during any forward.

Why not `@serve.batch`: Ray Serve 2.60's batch queue closes a batch before it waits for a free
slot (`_process_batches` takes `wait_for_batch()` and only then `max_concurrent_batches`'
semaphore), so requests that arrive while the engine is busy each close a batch of one and queue
behind it: at 32 requests in flight, 1.03-1.08 requests per engine call were measured, with 14
requests waiting. Merging at the forward stage takes what waits when the engine is free.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from engine.engine import RerankEngine
from engine.errors import DeadlineExceeded
from engine.features import ImageFeatures
from engine.forward import RequestScores
from engine.inputs import ScoreRequest
from engine.prepare import PreparedRequest


def check_deadline(deadline: float | None, where: str) -> None:
    """`deadline` is this process's `time.monotonic()`: the caller sent a time budget, never a
    wall-clock time (clocks of two nodes differ)."""
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded(f"the request's deadline passed {where} (the arm is overloaded); retry later")


@dataclass
class _Waiting:
    prepared: PreparedRequest
    deadline: float | None
    answer: asyncio.Future


class BatchedEngine:
    def __init__(self, engine: RerankEngine, *, prepare_workers: int, name: str, on_batch: Callable[[int], None] = lambda pairs: None):
        self.engine = engine
        self.model_id, self.precision, self.feature_spec = engine.model_id, engine.precision, engine.feature_spec
        self.prepare_workers = prepare_workers
        self.max_batch_size, self.batch_wait_timeout_s = 32, 0.0
        self._on_batch = on_batch  # pairs per merged device call (a metric)
        self._prepare_pool = ThreadPoolExecutor(prepare_workers, thread_name_prefix=f"prepare-{name}")
        self._forward_thread = ThreadPoolExecutor(1, thread_name_prefix=f"forward-{name}")
        self._waiting: list[_Waiting] = []  # prepared, in arrival order
        self._arrived: asyncio.Event | None = None  # made in the replica's event loop, with the loop
        self._forward_loop: asyncio.Task | None = None
        self._preparing = 0  # requests on the prepare pool
        self._forwarding = False  # the forward loop's call is on the forward thread
        self._alone: asyncio.Future | None = None  # a lone request's job is on the forward thread; done when it ends

    @property
    def score_spec(self):
        return self.engine.score_spec

    def set_batching(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        """`max_batch_size`: most requests in one forward call. `batch_wait_timeout_s`: how long a
        request prepared while the engine is idle waits for others (0: it starts at once)."""
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s

    def describe(self) -> dict:
        return {**self.engine.describe(), "prepare_workers": self.prepare_workers, "max_batch_size": self.max_batch_size}

    async def score_request(self, request: ScoreRequest, features: Mapping[str, ImageFeatures], deadline: float | None = None) -> RequestScores:
        """This request's scores, from a forward call it may share with others. Its own input error
        (from prepare) or passed deadline is raised for it alone."""
        check_deadline(deadline, "while it waited to be prepared")
        if self._engine_empty():
            return await self._score_alone(request, features)
        self._preparing += 1
        try:
            prepared = await self._run(self._prepare_pool, self.engine.prepare, request, features)
        finally:
            self._preparing -= 1
        answer = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(prepared, deadline, answer))
        self._start_forward_loop().set()
        return await answer

    def _engine_empty(self) -> bool:
        return not (self._preparing or self._waiting or self._forwarding or self._alone or self.batch_wait_timeout_s)

    async def _score_alone(self, request: ScoreRequest, features: Mapping[str, ImageFeatures]) -> RequestScores:
        job = asyncio.get_running_loop().run_in_executor(self._forward_thread, self._prepare_and_forward, request, features)
        self._alone = job
        job.add_done_callback(self._alone_done)  # when the thread is free, even if this caller has gone
        result = await asyncio.shield(job)
        self._on_batch(len(result.scores))
        return result

    def _alone_done(self, job: asyncio.Future) -> None:
        if self._alone is job:
            self._alone = None
        if not job.cancelled():
            job.exception()  # retrieved: a gone caller's failed job is not an unhandled error

    def _prepare_and_forward(self, request: ScoreRequest, features: Mapping[str, ImageFeatures]) -> RequestScores:
        (result,) = self.engine.forward([self.engine.prepare(request, features)])
        return result

    async def aclose(self) -> None:
        if self._forward_loop is not None:
            self._forward_loop.cancel()
        for w in self._waiting:
            if not w.answer.done():
                w.answer.set_exception(RuntimeError("the arm replica is shutting down"))
        self._prepare_pool.shutdown(wait=False)
        self._forward_thread.shutdown(wait=False)

    def _start_forward_loop(self) -> asyncio.Event:
        if self._forward_loop is None or self._forward_loop.done():
            self._arrived = asyncio.Event()
            self._forward_loop = asyncio.create_task(self._forward_batches(), name="forward-batches")
        return self._arrived

    async def _forward_batches(self) -> None:
        while True:
            if not self._arrived.is_set():  # idle: the first arrival may wait for company
                await self._arrived.wait()
                if self.batch_wait_timeout_s:
                    await self._fill(self.batch_wait_timeout_s)
            if self._alone is not None:  # a lone request holds the forward thread: what waits meanwhile goes next, together
                await asyncio.wait([self._alone])
            batch, self._waiting = self._waiting[: self.max_batch_size], self._waiting[self.max_batch_size :]
            if self._waiting:  # more than one batch waited: the rest goes next, without waiting
                self._arrived.set()
            else:
                self._arrived.clear()
            batch = [w for w in batch if not w.answer.done() and self._in_time(w)]  # a gone caller's request is not scored
            if not batch:
                continue
            try:
                self._on_batch(sum(len(w.prepared.rows) for w in batch))
                self._forwarding = True
                results = await self._run(self._forward_thread, self.engine.forward, [w.prepared for w in batch])
            except Exception as e:  # noqa: BLE001 - the batch's callers get it; the loop goes on
                for w in batch:
                    if not w.answer.done():
                        w.answer.set_exception(e)
                continue
            finally:
                self._forwarding = False
            for w, result in zip(batch, results, strict=True):
                if not w.answer.done():
                    w.answer.set_result(result)

    async def _fill(self, wait_s: float) -> None:
        """Wait up to `wait_s` for the batch to fill (the engine is idle: nothing else to merge)."""
        until = time.monotonic() + wait_s
        while len(self._waiting) < self.max_batch_size and (left := until - time.monotonic()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                break

    @staticmethod
    def _in_time(w: _Waiting) -> bool:
        try:
            check_deadline(w.deadline, "while it waited for the engine")
        except DeadlineExceeded as e:
            w.answer.set_exception(e)
            return False
        return True

    async def _run(self, pool: ThreadPoolExecutor, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))
