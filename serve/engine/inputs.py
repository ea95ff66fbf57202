"""What the engine scores: items (text, images, video) and (query, document) pairs.

Images arrive as encoded bytes (PNG, JPEG, ...): fetching URLs and decoding base64 is the
ingress's job, decoding pixels the engine's. The content hash of those bytes is the image's
identity for the feature cache.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

from PIL import Image

from serve.engine.errors import EmptyInput, ImageDecodeError, ImageTooLarge, InputError


@dataclass(frozen=True)
class ImageRef:
    """An image known only by its content digest (a URL-memo hit at the ingress): its bytes were
    not downloaded. The engine scores it from precomputed features; it cannot decode it."""

    digest: str
    url: str
    field: str


@dataclass(frozen=True)
class VideoInput:
    """A video: either already-sampled frames (encoded images, in time order) or a video file."""

    frames: tuple[bytes, ...] = ()
    data: bytes | None = None
    fps: float | None = None  # native frame rate of `frames`; timestamps need it

    def __post_init__(self):
        if bool(self.frames) == (self.data is not None):
            raise InputError("video", "give either frames or a video file, not both or neither")


@dataclass(frozen=True)
class RerankItem:
    """One side of a pair. Rendered videos first, then images, then text, as the reference does."""

    text: str | None = None
    images: tuple[bytes | ImageRef, ...] = ()
    video: VideoInput | None = None

    @property
    def is_empty(self) -> bool:
        return not self.text and not self.images and self.video is None


@dataclass(frozen=True)
class ScorePair:
    query: RerankItem
    document: RerankItem
    instruction: str | None = None  # None: the engine's default instruction
    # Where this pair came from, for error messages (e.g. "documents.3").
    query_field: str = "query"
    document_field: str = field(default="document")


def image_digest(data: bytes | ImageRef) -> str:
    """Content identity of encoded image bytes (the cache key's first part)."""
    if isinstance(data, ImageRef):
        return data.digest
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, *, field_name: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode bytes to an RGB image, refusing oversize input before and after the header is read."""
    if len(data) > max_bytes:
        raise ImageTooLarge(field_name, f"image is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size  # header only: cheap, happens before pixel decode
        if w * h > max_pixels:
            raise ImageTooLarge(field_name, f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
        if w < 1 or h < 1:
            raise ImageDecodeError(field_name, f"image has no pixels ({w}x{h})")
        img.load()
        return img.convert("RGB")
    except InputError:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise ImageDecodeError(field_name, f"not a decodable image ({type(e).__name__}: {e})") from None


def check_not_empty(item: RerankItem, field_name: str) -> None:
    if item.is_empty:
        raise EmptyInput(field_name, "must have text, an image or a video")
