"""An image's limits read from its header, before any pixel is decoded: its encoded bytes, its
pixels and a request's decode budget (`PixelBudget`). PIL only (no torch, no transformers), so the
serving layer's ingress charges a request it splits (fan-out) with the engine's own rules, and
names the same field with the same error as the engine would."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from engine.errors import ImageDecodeError, ImageTooLarge


class PixelBudget:
    """Decoded pixels one request may still spend (`EngineConfig.max_request_pixels`): every image
    and video frame is charged from its header, before its pixels are decoded."""

    def __init__(self, limit: int):
        self.limit = limit
        self.spent = 0

    def charge(self, pixels: int, field: str) -> None:
        self.spent += pixels
        if self.spent > self.limit:
            raise ImageTooLarge(field, f"the request's images and frames decode to over {self.limit} pixels (max_request_pixels)")


def open_image(data: bytes, *, field_name: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """Open encoded bytes (header only: no pixels decoded yet), refusing oversize input."""
    if len(data) > max_bytes:
        raise ImageTooLarge(field_name, f"image is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
    except UnidentifiedImageError:  # its text names the BytesIO object's address: a different answer every time
        raise ImageDecodeError(field_name, "not a decodable image (UnidentifiedImageError: cannot identify image file)") from None
    except Exception as e:  # PIL raises many types for corrupt data
        raise ImageDecodeError(field_name, f"not a decodable image ({type(e).__name__}: {e})") from None
    if w < 1 or h < 1:
        raise ImageDecodeError(field_name, f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageTooLarge(field_name, f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} (max_image_pixels)")
    return img
