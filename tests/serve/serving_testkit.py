"""Small helpers shared by the serving tests (importable: pytest puts this folder on sys.path)."""

from __future__ import annotations

import io

from serve.local import free_port  # noqa: F401 - the tests' port picker is the main job's


def png_bytes(colour=(200, 30, 30), side: int = 96, seed: int = 0) -> bytes:
    """A small PNG; `seed` varies a pixel so distinct seeds give distinct content."""
    from PIL import Image

    img = Image.new("RGB", (side, side), colour)
    img.putpixel((seed % side, (seed // side) % side), (seed % 251, 7, 7))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
