"""Decoding is bounded by a compute budget, not only a byte limit: a few kilobytes that decode to
tens of megapixels, a request of many such images, a tiny video file of thousands of frames are
refused from their headers with a 4xx-class error naming the field and the limit, before their
pixels are decoded; a long video is sampled while decoding, keeping only the sampled frames."""

import io
import random

import psutil
import pytest
from PIL import Image

from engine.errors import ImageTooLarge
from engine.inputs import ImageInput, RerankItem, ScoreRequest, VideoInput

MIB = 1 << 20


def one_bit_png(side: int) -> bytes:
    """A black 1-bit square: compresses to kilobytes, decodes to side*side pixels (x3 as RGB)."""
    buf = io.BytesIO()
    Image.new("1", (side, side), 0).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def rss() -> int:
    return psutil.Process().memory_info().rss


def test_a_kilobyte_image_of_64_megapixels_is_refused_from_its_header(engine_for):
    eng = engine_for("fp32")
    bomb = one_bit_png(8000)
    assert len(bomb) < 64 * 1024
    before = rss()
    req = ScoreRequest.of("q", [RerankItem(images=(ImageInput.of(bomb, "documents.0.image"),))])
    with pytest.raises(ImageTooLarge, match=r"documents.0.image: image is 8000x8000 = 64000000 pixels, over the limit .*max_image_pixels"):
        eng.prepare(req)
    assert rss() - before < 64 * MIB  # decoded, it would be 192 MB of RGB


def test_a_request_of_many_large_images_is_refused_before_any_is_decoded(engine_for):
    eng = engine_for("fp32")
    big = one_bit_png(4000)  # 16 Mpx: under the per-image limit
    docs = [RerankItem(images=(ImageInput.of(big + bytes([i]), f"documents.{i}.image"),)) for i in range(45)]
    decoded = []
    real = eng.preprocessor.image
    eng.preprocessor.image = lambda *a, **k: decoded.append(1) or real(*a, **k)
    try:
        with pytest.raises(ImageTooLarge, match=r"documents.8.image: the request's images and frames decode to over .*max_request_pixels"):
            eng.prepare(ScoreRequest.of("q", docs))
    finally:
        del eng.preprocessor.image
    assert decoded == []  # refused from the headers


def _mp4(n_frames: int, side: int, fps: int = 24) -> bytes:
    av = pytest.importorskip("av")
    import numpy as np

    rng = random.Random(0)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = side, side, "yuv420p"
        base = np.zeros((side, side, 3), dtype=np.uint8)
        for i in range(n_frames):
            base[:, :, 0] = (i * 3) % 256
            base[rng.randrange(side), :, 1] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(base, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def test_a_small_video_of_thousands_of_frames_is_refused_before_decoding(engine_for):
    eng = engine_for("fp32")
    data = _mp4(6000, 32)
    assert len(data) < 2 * MIB
    before = rss()
    req = ScoreRequest.of("q", [RerankItem(videos=(VideoInput.of_file(data, "documents.0.video"),))])
    with pytest.raises(ImageTooLarge, match=r"documents.0.video: video has 6000 frames, over the limit of 4096 \(max_video_file_frames\)"):
        eng.prepare(req)
    assert rss() - before < 64 * MIB


def test_a_long_video_is_sampled_while_decoding_with_bounded_memory(engine_for):
    eng = engine_for("fp32")
    data = _mp4(720, 320)  # 30 s at 24 fps: 720 frames of 300 KB as RGB (216 MB if all were kept)
    req = ScoreRequest.of("q", [RerankItem(videos=(VideoInput.of_file(data, "documents.0.video"),))])
    before = rss()
    prepared = eng.prepare(req)
    grown = rss() - before
    (patches,) = prepared.patches.values()
    assert patches.grid_thw[0] == 15  # 30 frames at 1 fps -> 15 temporal groups
    assert grown < 96 * MIB, f"prepare grew the process by {grown / MIB:.0f} MiB"
    (s,) = eng.forward([prepared])[0].scores
    assert 0.0 < s < 1.0


def test_the_request_budget_counts_video_frames_too(engine_for):
    eng = engine_for("fp32", max_request_pixels=100 * 320 * 320)
    req = ScoreRequest.of("q", [RerankItem(videos=(VideoInput.of_file(_mp4(240, 320), "documents.0.video"),))])
    with pytest.raises(ImageTooLarge, match="documents.0.video: .*max_request_pixels"):
        eng.prepare(req)
