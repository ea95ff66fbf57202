"""The request bodies the benches send: texts drawn from the offline model's colours and shapes,
and generated images of them; and the engine request a body becomes (what a bench scores
directly, beside the same body through Serve)."""

from __future__ import annotations

import base64
import io
import random

from workshop.tiny import COLOURS as TINY_COLOURS
from workshop.tiny import SHAPES

# Five of the offline model's colours: the benches have always drawn their captions from these,
# so bodies stay comparable across sittings.
COLOURS = {c: rgb for c, rgb in TINY_COLOURS.items() if c != "orange"}


def text_requests(n: int, docs: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    captions = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    return [{"query": rng.choice(captions), "documents": [f"{rng.choice(captions)} #{i}-{j}" for j in range(docs)]} for i in range(n)]


def shape_png(seed: int, side: int) -> bytes:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    colour = rng.choice(list(COLOURS.values()))
    img = Image.new("RGB", (side, side), tuple(rng.randint(200, 250) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    a, b = rng.randint(side // 20, side // 3), rng.randint(side * 2 // 3, side - side // 20)
    draw.ellipse((a, a, b, b), fill=colour) if seed % 2 else draw.rectangle((a, a, b, b), fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_request(seeds: list[int], side: int) -> dict:
    return {"query": "a red circle", "documents": [{"image": base64.b64encode(shape_png(s, side)).decode()} for s in seeds]}


def score_request(body: dict):
    """The engine request the HTTP body becomes (what the direct path scores)."""
    from engine.inputs import ImageInput, RerankItem, ScoreRequest

    def item(x) -> RerankItem:
        if isinstance(x, str):
            return RerankItem(text=x)
        return RerankItem(images=(ImageInput.of(base64.b64decode(x["image"])),))

    return ScoreRequest.of(item(body["query"]), [item(d) for d in body["documents"]])
