"""Test media shared by the engine and serving tests: structured pictures, PNG and MP4 bytes
(importable from any test folder: pytest puts this one on sys.path for its conftest)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def picture(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Smooth colour ramps with a few hard-edged blocks: enough structure that resampling differences show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    chans = [(np.sin(x / (7 + 5 * c + seed % 5)) + np.cos(y / (9 + 3 * c))) * 60 + 120 for c in range(3)]
    arr = np.stack(chans, -1)
    for _ in range(4):
        x0, y0 = rng.integers(0, max(1, width - 4)), rng.integers(0, max(1, height - 4))
        arr[y0 : y0 + max(2, height // 5), x0 : x0 + max(2, width // 5)] = rng.integers(0, 255, 3)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if mode == "RGBA":
        alpha = Image.fromarray(((x * 3 + y * 5) % 256).astype(np.uint8), "L")
        img.putalpha(alpha)
    return img


def mp4(frames: list[Image.Image], fps: int) -> bytes:
    import av

    buf = io.BytesIO()
    w, h = frames[0].size
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for img in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(img.convert("RGB")), format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()
