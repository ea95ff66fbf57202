"""Rerank traffic for load tests: Cohere v2 `/v2/rerank` bodies with text and image documents.

Pure and seeded: no I/O, no network. The images are the tiny model's coloured shapes
(`workshop.tiny.draw`) and the texts its captions and queries, so the tiny model ranks them
meaningfully and a real reranker still gets well-formed multimodal traffic.

Image documents come from two sources:

* a pool of `pool_size` images drawn once per load-generator process (seeded), so the same
  bytes recur across requests and users: the image-feature cache sees hits;
* fresh images drawn for one document only, never seen before: cache misses.

`repeat_rate` is the share of image documents taken from the pool. Once each pool image has been
seen by an arm, that arm's expected cache hit rate is about `repeat_rate`.
"""

from __future__ import annotations

import base64
import os
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from types import ModuleType


def _tiny() -> ModuleType:
    """The tiny model's synthetic world (imported on first use: it pulls in torch, which the
    command line and the runner do not need)."""
    from workshop import tiny

    return tiny

# Relevance grades of a document to the query (2: same colour and shape, 1: one of them, 0: neither),
# drawn with these weights so rankings have a few good answers among many weak ones.
GRADE_WEIGHTS = {2: 0.2, 1: 0.3, 0: 0.5}

# Neutral sentences that lengthen a caption to the configured text length without changing what
# it describes (the reranker still has to find the colour and shape in a longer text).
FILLER_SENTENCES = (
    "The photo was taken in soft daylight.", "It sits on a plain, light background.",
    "There is some grain in the picture.", "No other objects are nearby.", "The shape is slightly off centre.",
    "The edges are clear and simple.", "It is a flat drawing without shading.",
    "The picture was scanned from a printed page.", "Nothing else in the frame draws the eye.",
    "The catalogue lists it among the basic figures.",
)  # fmt: skip

ENV_PREFIX = "RERANK_LOADTEST_"


# Names shared by the locustfile (which defines them), the runner (which asks Locust for them)
# and the report (which reads Locust's rows by them).
def request_name(arm: str) -> str:
    """Locust's row name for requests answered by (or pinned to) `arm`."""
    return f"rerank[{arm}]"


def arm_of_request_name(name: str) -> str | None:
    return name[len("rerank[") : -1] if name.startswith("rerank[") and name.endswith("]") else None


def pinned_class_name(arm: str) -> str:
    """Locust user class pinned to `arm` (arm names are [a-z0-9_-])."""
    return "Pinned_" + arm.replace("-", "_")


@dataclass(frozen=True)
class TrafficConfig:
    """What one rerank request looks like. Environment names: `RERANK_LOADTEST_<FIELD>` upper-cased."""

    docs: int = 8  # documents per request
    text_chars: int = 120  # length of each text document (caption plus neutral filler)
    image_share: float = 0.5  # share of documents that are images
    pool_size: int = 32  # images drawn once per process and reused
    repeat_rate: float = 0.8  # share of image documents taken from the pool
    top_n: int = 5  # results asked for (capped at docs)
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.docs <= 1000:
            problems.append(f"docs must be 1..1000, got {self.docs}")
        if not 1 <= self.text_chars <= 32_000:
            problems.append(f"text_chars must be 1..32000, got {self.text_chars}")
        if not 0.0 <= self.image_share <= 1.0:
            problems.append(f"image_share must be in [0, 1], got {self.image_share}")
        if not 0.0 <= self.repeat_rate <= 1.0:
            problems.append(f"repeat_rate must be in [0, 1], got {self.repeat_rate}")
        if self.pool_size < 1:
            problems.append(f"pool_size must be >= 1, got {self.pool_size}")
        if self.top_n < 1:
            problems.append(f"top_n must be >= 1, got {self.top_n}")
        if problems:
            raise ValueError("; ".join(problems))

    def to_env(self) -> dict[str, str]:
        return {ENV_PREFIX + k.upper(): str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> TrafficConfig:
        values = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = float(raw) if f.type == "float" else int(raw)
        return cls(**values)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class ImagePool:
    """`size` images drawn once from `seed`: the recurring images of a load-generator process."""

    def __init__(self, size: int, seed: int):
        tiny = _tiny()
        rng = random.Random(seed * 1_000_003 + 17)  # independent of the request streams' seeds
        self.things = []
        self.uris: list[str] = []
        for _ in range(size):
            thing = tiny.random_thing(rng)
            self.things.append(thing)
            self.uris.append(data_uri(tiny.draw(thing, rng)))

    def __len__(self) -> int:
        return len(self.uris)


@dataclass(frozen=True)
class GeneratedRequest:
    body: dict  # the JSON body of POST /v2/rerank
    text_documents: int
    pool_images: int  # image documents taken from the pool (repeats)
    fresh_images: int  # image documents drawn for this request only

    @property
    def image_documents(self) -> int:
        return self.pool_images + self.fresh_images


class TrafficGenerator:
    """An endless, seeded stream of rerank requests; one per simulated user."""

    def __init__(self, config: TrafficConfig, pool: ImagePool, stream: int = 0):
        self.config = config
        self.pool = pool
        self.rng = random.Random(config.seed * 7919 + stream)
        self.tiny = _tiny()

    def next_request(self) -> GeneratedRequest:
        cfg, rng, tiny = self.config, self.rng, self.tiny
        query = tiny.random_thing(rng)
        documents: list[str | dict] = []
        texts = pooled = fresh = 0
        for _ in range(cfg.docs):
            grade = rng.choices(list(GRADE_WEIGHTS), weights=list(GRADE_WEIGHTS.values()))[0]
            thing = tiny.neighbour(query, rng, grade)
            if rng.random() < cfg.image_share:
                if rng.random() < cfg.repeat_rate:
                    documents.append({"image": self.pool.uris[rng.randrange(len(self.pool))]})
                    pooled += 1
                else:
                    documents.append({"image": data_uri(tiny.draw(thing, rng))})
                    fresh += 1
            else:
                documents.append(self._text(thing))
                texts += 1
        body = {
            "query": tiny.query_text(query, rng),
            "documents": documents,
            "top_n": min(cfg.top_n, cfg.docs),
            "return_documents": False,
        }
        return GeneratedRequest(body=body, text_documents=texts, pool_images=pooled, fresh_images=fresh)

    def _text(self, thing) -> str:
        """A caption of `thing`, lengthened with filler sentences to `text_chars` characters."""
        text = self.tiny.caption(thing, self.rng)
        limit = self.config.text_chars
        if len(text) >= limit:
            return text[:limit]
        parts = [text + "."]  # lower-case as the tiny model was trained
        length = len(parts[0])
        while length < limit:  # each sentence adds > 20 characters: ends within limit/20 steps
            sentence = self.rng.choice(FILLER_SENTENCES)
            parts.append(sentence)
            length += 1 + len(sentence)
        return " ".join(parts)[:limit]
