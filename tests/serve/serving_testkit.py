"""Small helpers shared by the serving tests (importable: pytest puts this folder on sys.path)."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable

from serve.local import free_port  # noqa: F401 - the tests' port picker is the main job's


def png_bytes(colour=(200, 30, 30), side: int = 96, seed: int = 0) -> bytes:
    """A small PNG; `seed` varies a pixel so distinct seeds give distinct content."""
    from PIL import Image

    img = Image.new("RGB", (side, side), colour)
    img.putpixel((seed % side, (seed // side) % side), (seed % 251, 7, 7))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def rerank_through(base_url: str, body: Callable[[int], dict], during: Callable[[], None], *, first: int = 10, at_least: int = 40) -> list:
    """`/v2/rerank` requests `body(0)`, `body(1)`, ... back to back from a thread of their own;
    once `first` are answered, `during()` runs here (e.g. kills a Redis), and the requests go on
    until `at_least` have been sent. Every response, in order."""
    import httpx

    responses: list[httpx.Response] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=base_url, timeout=120) as c:
            while not stop.is_set() or len(responses) < at_least:
                responses.append(c.post("/v2/rerank", json=body(len(responses))))

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while len(responses) < first and time.monotonic() < deadline:
            time.sleep(0.05)
        during()
    finally:
        stop.set()
        worker.join(timeout=300)
    assert not worker.is_alive()
    return responses


def same_results(a: list[dict], b: list[dict], tol: float = 1e-6) -> bool:
    """Two answers to the same request: the same documents in the same order, each score within
    `tol`. Not bit for bit: the arm merges concurrent requests into one forward (the noise floor's
    mirror of the request before among them), and a request batched with another rounds ~1e-8
    differently."""
    return [x["index"] for x in a] == [x["index"] for x in b] and all(
        abs(x["relevance_score"] - y["relevance_score"]) <= tol for x, y in zip(a, b, strict=True)
    )
