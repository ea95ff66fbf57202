"""`ServingEngine`: the one contract a replica scores through, whichever backend is behind it.

    scores = await engine.score_request(request, features, deadline)

`request` is a `ScoreRequest` whose images carry bytes or, when their features were cached, only
their digest; `features` maps the cache keys of `feature_spec` to cached `ImageFeatures` (empty
when the backend keeps image features to itself: `feature_spec` is then None). The answer holds
the scores in document order, the features computed now (for the cache), the decoder tokens run
and how many requests shared the device call. `deadline` (this process's `time.monotonic()`, or
None): work not started by then is refused with `engine.errors.DeadlineExceeded`.

Two implementations: `engine.vllm_engine.VllmRerankEngine` (vLLM batches across requests itself)
and, for the transformers engine, the serving layer's `serve.batched_engine.BatchedEngine`
(every prepared request waiting when the forward thread is free goes into one `RerankEngine.forward`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from engine.features import FeatureSpec, ImageFeatures
from engine.forward import RequestScores
from engine.inputs import ScoreRequest
from engine.score_key import ScoreSpec


@runtime_checkable
class ServingEngine(Protocol):
    model_id: str
    precision: str
    feature_spec: FeatureSpec | None  # None: image features never leave the backend (no cache key)
    score_spec: ScoreSpec  # what besides the pair determines a score (the score cache's keys)

    def describe(self) -> dict:
        """What the replica reports about itself (model, precision, device, ...)."""
        ...

    async def score_request(self, request: ScoreRequest, features: Mapping[str, ImageFeatures], deadline: float | None = None) -> RequestScores:
        """Scores of one request; raises `engine.errors.InputError` naming the field for bad input."""
        ...

    async def aclose(self) -> None:
        """Release threads and devices (the replica is shutting down)."""
        ...
