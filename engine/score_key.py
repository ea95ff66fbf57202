"""What a pair's score depends on, as cache keys. Pure: hashlib only, no model, no I/O.

A score is a function of the scorer and the pair:

- the scorer (`ScoreSpec`): the checkpoint's fingerprint (every weight, the tokenizer, the chat
  template and the processor settings: `engine.fingerprint`), the precision, the backend, and
  every engine setting that shapes how a pair is read (max length, pixel and video limits, the
  default instruction, the compute dtype, the shared-prefix layout; a vLLM arm's engine
  arguments too). Decode budgets are left out: they refuse a request, never change a score;
- the request's own parts: its instruction (None: the scorer's default) and `max_tokens_per_doc`;
- the query's and the document's content: text, and the digests of their images and videos as
  hashed where they entered the system (`ImageInput.of`, `VideoInput`), never their URLs.

`ScoreSpec.digest` names the scorer in a few dozen characters (an arm reports it with every
answer); `pair_keys(scorer, request)` gives one key per document. Equal keys mean equal scores up
to the float noise of batching (which pairs shared a device call), which the key leaves out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

from engine.inputs import RerankItem, ScoreRequest, VideoInput, sha256_hex

FORMAT_VERSION = "1"
KEY_HEX = 32  # 128 bits: collisions are out of reach at any cache size, and keys stay short in Redis


@dataclass(frozen=True)
class ScoreSpec:
    """Everything besides the pair that determines a score."""

    weights_fingerprint: str
    precision: str
    backend: str
    settings: tuple[tuple[str, str], ...] = ()  # (name, JSON value), sorted by name

    @classmethod
    def of(cls, weights_fingerprint: str, precision: str, backend: str, settings: Mapping[str, object]) -> ScoreSpec:
        """A spec from settings as plain values (numbers, strings, lists; anything JSON can write)."""
        pairs = tuple(sorted((name, json.dumps(value, sort_keys=True, default=str)) for name, value in settings.items()))
        return cls(weights_fingerprint, precision, backend, pairs)

    @property
    def digest(self) -> str:
        """The scorer's name in keys: equal digests score every pair alike."""
        text = json.dumps([FORMAT_VERSION, self.weights_fingerprint, self.precision, self.backend, list(self.settings)])
        return hashlib.sha256(text.encode()).hexdigest()[:KEY_HEX]


def _put(h, tag: bytes, value: str | None) -> None:
    """One tagged, length-prefixed field: no two different items hash alike by shifting bytes between fields."""
    h.update(tag)
    if value is None:
        h.update(b"\xff")
        return
    data = value.encode("utf-8", "surrogatepass")
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def _video_digest(video: VideoInput) -> str:
    if video.digest:
        return video.digest
    if video.data is not None:
        return sha256_hex(video.data)
    return sha256_hex("|".join(f.digest for f in video.frames).encode())


def item_digest(item: RerankItem) -> str:
    """The content of one side of a pair: its text and its media's digests, in order (the field
    path it came from is left out: equal items in different places are equal here)."""
    h = hashlib.sha256(FORMAT_VERSION.encode())
    _put(h, b"t", item.text)
    for image in item.images:
        _put(h, b"i", image.digest)
    for video in item.videos:
        _put(h, b"v", _video_digest(video))
        _put(h, b"f", None if video.fps is None else repr(float(video.fps)))
    return h.hexdigest()


def pair_keys(scorer: str, request: ScoreRequest) -> list[str]:
    """One key per document of `request` under the scorer named `scorer` (`ScoreSpec.digest`)."""
    head = hashlib.sha256(FORMAT_VERSION.encode())
    _put(head, b"s", scorer)
    _put(head, b"n", request.instruction)
    _put(head, b"m", None if request.max_tokens_per_doc is None else str(request.max_tokens_per_doc))
    _put(head, b"q", item_digest(request.query))
    keys = []
    for document in request.documents:
        h = head.copy()
        _put(h, b"d", item_digest(document))
        keys.append(h.hexdigest()[:KEY_HEX])
    return keys
