"""Fan-out of large requests: an arm with `fan_out_above` scores a request of more documents than
that as several chunks, each a `ScoreRequest` of its own with the same query and instruction (so
each runs the shared query prefix once), which `serve.arm_calls.ArmCalls` sends at once (Serve's
handle spreads them over the arm's replicas) and merges in document order.

The whole request stays one request:
- the edge limits (`RerankRequest.check_limits`) are checked on it before it is split;
- the engine's decode budget (`limits.max_request_pixels`, charged per engine request) is charged
  here for the whole request, from the images' headers, in the engine's order and with its rules
  (`engine.image_header`), so a request over the budget is refused naming the same image as
  unsplit, and no chunk can pass it alone; a request with videos (charged while decoding) is
  never split;
- every document keeps its own field (`documents.700`), so an error raised in a chunk names the
  document's place in the whole request: the client sees what the unsplit request gives.
"""

from __future__ import annotations

from dataclasses import replace

from engine.config import DecodeBudgets
from engine.image_header import PixelBudget, open_image
from engine.inputs import ScoreRequest
from serve.config import ArmConfig


def chunk_bounds(documents: int, arm: ArmConfig) -> list[tuple[int, int]]:
    """[start, end) of each chunk a request of `documents` documents is scored as on `arm`: the
    whole unless it has more than `fan_out_above`; else as few chunks of at most `fan_out_chunk`
    (default `fan_out_above`) as will do, their sizes within one of each other."""
    if arm.fan_out_above is None or documents <= arm.fan_out_above:
        return [(0, documents)]
    size = arm.fan_out_chunk or arm.fan_out_above
    chunks = -(-documents // size)
    base, extra = divmod(documents, chunks)
    bounds, start = [], 0
    for i in range(chunks):
        end = start + base + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds


def split(job: ScoreRequest, arm: ArmConfig) -> list[ScoreRequest]:
    """The engine requests `job` is scored as on `arm`: itself, or its chunks in document order."""
    if any(item.videos for item in (job.query, *job.documents)):
        return [job]  # a video's pixels are charged while it decodes: only the whole request can hold its budget
    bounds = chunk_bounds(len(job.documents), arm)
    if len(bounds) == 1:
        return [job]
    return [replace(job, documents=job.documents[a:b]) for a, b in bounds]


def charge_whole(job: ScoreRequest, budgets: DecodeBudgets) -> None:
    """Charge the images of `job` (one request, before it is split) to one decode budget, as the
    engine's `prepare` charges an unsplit request: every image it has the bytes of, once per
    digest, query first, from its header; raises the engine's error naming the same field. (The
    engine leaves out images whose features it has cached; the ingress cannot know which, so a
    split request is charged for all of them.)"""
    budget = PixelBudget(budgets.max_request_pixels)
    images = {img.digest: img for item in (job.query, *job.documents) for img in item.images if img.data is not None}
    for img in images.values():
        w, h = open_image(img.data, field_name=img.field, max_bytes=budgets.max_image_bytes, max_pixels=budgets.max_image_pixels).size
        budget.charge(w * h, img.field)
