"""`BatchedEngine` on its own (no Ray): a request that finds the engine empty prepares and
forwards in one job on the forward thread; requests that arrive meanwhile wait for it and share
the next forward call; a caller that goes away never leaves the engine marked busy. Scores are
the plain engine's. Nothing here is timed: order comes from the forward thread being one thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from engine.inputs import ScoreRequest
from serve.batched_engine import BatchedEngine


@pytest.fixture(scope="module")
def engine(engine_for):
    return engine_for("fp32")


def text_request(i: int, docs: int = 2) -> ScoreRequest:
    return ScoreRequest.of(f"query {i}", [f"document {i}-{j}" for j in range(docs)])


def reference(engine, request: ScoreRequest) -> list[float]:
    return engine.forward([engine.prepare(request)])[0].scores


class GatedForward:
    """The engine's forward, held at a gate: the test decides when the forward thread may go on."""

    def __init__(self, engine):
        self.engine, self.gate, self.calls = engine, threading.Event(), []

    def __call__(self, prepared):
        self.calls.append(len(prepared))
        self.gate.wait(timeout=60)
        return type(self.engine).forward(self.engine, prepared)


def test_a_lone_request_is_one_job_and_what_arrives_meanwhile_shares_the_next_call(engine, monkeypatch):
    gated = GatedForward(engine)
    monkeypatch.setattr(engine, "forward", gated)
    batches: list[int] = []
    batched = BatchedEngine(engine, prepare_workers=1, name="test", on_batch=batches.append)

    async def scenario():
        first = asyncio.create_task(batched.score_request(text_request(0), {}))
        while not gated.calls:  # the lone job holds the forward thread, at the gate
            await asyncio.sleep(0.001)
        assert batched._alone is not None
        rest = [asyncio.create_task(batched.score_request(text_request(i), {})) for i in range(1, 5)]
        while len(batched._waiting) < 4:  # all four prepared on the pool while the lone job runs
            await asyncio.sleep(0.001)
        gated.gate.set()
        return await first, await asyncio.gather(*rest)

    try:
        first, rest = asyncio.run(scenario())
    finally:
        monkeypatch.undo()
    assert gated.calls == [1, 4]  # the lone request alone, then the four that waited, together
    assert first.batch_requests == 1 and [r.batch_requests for r in rest] == [4] * 4
    assert batches == [2, 8]  # pairs per device call
    for i, result in enumerate([first, *rest]):
        assert result.scores == pytest.approx(reference(engine, text_request(i)), abs=1e-5)


def test_a_gone_lone_caller_frees_the_engine_when_its_job_ends(engine, monkeypatch):
    gated = GatedForward(engine)
    monkeypatch.setattr(engine, "forward", gated)
    batched = BatchedEngine(engine, prepare_workers=1, name="test")

    async def scenario():
        gone = asyncio.create_task(batched.score_request(text_request(0), {}))
        while not gated.calls:
            await asyncio.sleep(0.001)
        gone.cancel()  # the caller went away; the forward thread still runs its job
        await asyncio.sleep(0.01)
        busy_after_cancel = batched._alone is not None
        gated.gate.set()
        while batched._alone is not None:
            await asyncio.sleep(0.001)
        return busy_after_cancel, await batched.score_request(text_request(1), {})

    try:
        busy_after_cancel, after = asyncio.run(scenario())
    finally:
        monkeypatch.undo()
    assert busy_after_cancel  # the engine stays busy while the thread works, caller or not
    assert gated.calls == [1, 1] and after.batch_requests == 1
    assert after.scores == pytest.approx(reference(engine, text_request(1)), abs=1e-5)


def test_a_bad_lone_request_fails_alone_and_the_engine_goes_on(engine):
    batched = BatchedEngine(engine, prepare_workers=1, name="test")
    bad = ScoreRequest.of("bad \ud800 query", ["fine"])

    async def scenario():
        with pytest.raises(Exception) as failed:
            await batched.score_request(bad, {})
        return failed.value, await batched.score_request(text_request(2), {})

    error, good = asyncio.run(scenario())
    assert getattr(error, "field", None) == "query.text" and "lone surrogate" in error.problem
    assert good.scores == pytest.approx(reference(engine, text_request(2)), abs=1e-5)
