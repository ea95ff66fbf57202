"""What the engine scores: one request is a query, its documents and an instruction.

Images arrive as encoded bytes (PNG, JPEG, ...) with their SHA-256 digest, computed once where
the image enters the system (`ImageInput.of`) and carried with it: the digest is the image's
identity for the feature cache. An image whose bytes were not downloaded (the serving layer
knew its URL's digest) has `data=None` and is scored from cached features.
Pure data: no PIL, no torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ImageInput:
    digest: str  # sha256 of the encoded bytes
    data: bytes | None  # None: known only by digest, scored from cached features
    field: str = "image"  # dotted JSON path, for error messages
    url: str | None = None  # where the bytes can be fetched again (digest-only images)

    @classmethod
    def of(cls, data: bytes, field: str = "image", url: str | None = None) -> ImageInput:
        return cls(sha256_hex(data), data, field, url)

    def __repr__(self) -> str:  # never print megabytes of image bytes
        size = "no bytes" if self.data is None else f"{len(self.data)} bytes"
        return f"ImageInput({self.digest[:12]}, {size}, {self.field!r})"


@dataclass(frozen=True)
class VideoInput:
    """A video: already-sampled frames (images, in time order) or an encoded video file."""

    frames: tuple[ImageInput, ...] = ()
    data: bytes | None = None
    fps: float | None = None  # frame rate of `frames` for their timestamps; None: the official 2.0
    field: str = "video"
    digest: str = ""  # identity: hash of the file bytes or of the frame digests

    @classmethod
    def of_file(cls, data: bytes, field: str = "video") -> VideoInput:
        return cls(data=data, field=field, digest=sha256_hex(data))

    @classmethod
    def of_frames(cls, frames: tuple[ImageInput, ...], field: str = "video", fps: float | None = None) -> VideoInput:
        return cls(frames=tuple(frames), fps=fps, field=field, digest=sha256_hex("|".join(f.digest for f in frames).encode()))

    def __repr__(self) -> str:
        what = f"{len(self.frames)} frames" if self.frames else f"file of {len(self.data or b'')} bytes"
        return f"VideoInput({what}, {self.field!r})"


@dataclass(frozen=True)
class RerankItem:
    """One side of a pair. Rendered videos first, then images, then text, as the reference does."""

    text: str | None = None
    images: tuple[ImageInput, ...] = ()
    videos: tuple[VideoInput, ...] = ()  # several per side, as the official `format_mm_content` takes
    field: str = "item"  # dotted JSON path (query, documents.3)

    @property
    def is_empty(self) -> bool:
        """Nothing given (text None, no image, no video): scored as `NULL`, as the official
        reranker does. An empty string is text, rendered as nothing."""
        return self.text is None and not self.images and not self.videos


@dataclass(frozen=True)
class ScoreRequest:
    """One rerank request: every document is scored against the same query and instruction."""

    query: RerankItem
    documents: tuple[RerankItem, ...]
    instruction: str | None = None  # None: the engine's default instruction
    max_tokens_per_doc: int | None = None  # cut each document's text to this many tokens (Cohere)

    @classmethod
    def of(cls, query: RerankItem | str, documents, instruction: str | None = None, max_tokens_per_doc: int | None = None) -> ScoreRequest:
        """Convenience for code and tests: strings become text items; fields are set by position."""
        from dataclasses import replace

        def item(x, field: str) -> RerankItem:
            x = RerankItem(text=x) if isinstance(x, str) else x
            return replace(x, field=field) if x.field == "item" else x

        docs = tuple(item(d, f"documents.{i}") for i, d in enumerate(documents))
        return cls(item(query, "query"), docs, instruction, max_tokens_per_doc)

    def images(self):
        """Every image of the request (query first), frames of frame-list videos excluded."""
        for item in (self.query, *self.documents):
            yield from item.images
