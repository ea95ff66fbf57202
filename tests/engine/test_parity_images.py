"""Image preprocessing parity with the official pipeline, against an independent reference:
qwen-vl-utils' `fetch_image` (what QwenLM/Qwen3-VL-Embedding's reranker calls, with
image_patch_size=16 and the reranker's min/max pixels) followed by the processor. Transparent
images are composited onto white; a side under the patch factor is clamped up as its
`smart_resize` does; the pixel tensors and grids are identical, so are the scores.

The `qwen_vl_utils` fixture (conftest) imports qwen-vl-utils' image functions in this process;
its video path runs in the official reference's own process (`test_parity_video.py`)."""

import io

import pytest
import torch
from PIL import Image

from engine.config import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from engine.inputs import ImageInput, RerankItem, ScoreRequest


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def logo_rgba() -> Image.Image:
    """A logo on a transparent background whose hidden colour is not white (Δ 0.027 in the issue)."""
    img = Image.new("RGBA", (160, 96), (255, 0, 255, 0))  # magenta under full transparency
    for x in range(30, 130):
        for y in range(20, 76):
            img.putpixel((x, y), (20, 60, 200, 255 if (x + y) % 7 else 128))
    return img


def cases() -> dict[str, Image.Image]:
    thin = Image.new("RGB", (600, 12), (200, 40, 40))
    tall = Image.new("RGB", (12, 600), (40, 200, 40))
    grey = Image.new("L", (97, 61), 128)
    palette = Image.new("P", (64, 64), 3)
    big = Image.effect_noise((2100, 1500), 60).convert("RGB")
    return {"rgba logo": logo_rgba(), "thin 600x12": thin, "tall 12x600": tall, "grey 97x61": grey,
            "palette": palette, "2100x1500 noise": big, "tiny 10x10": Image.new("RGB", (10, 10), (1, 2, 3))}  # fmt: skip


def reference_patches(vp, engine, img: Image.Image):
    """The official path: fetch_image with the reranker's settings, then the processor."""
    resized = vp.fetch_image({"image": img, "min_pixels": DEFAULT_MIN_PIXELS, "max_pixels": DEFAULT_MAX_PIXELS}, image_patch_size=16)
    out = engine.preprocessor._image_processor(images=[resized], return_tensors="pt")
    return out["pixel_values"].to(torch.float32), tuple(int(x) for x in out["image_grid_thw"][0])


@pytest.mark.parametrize("name", list(cases()))
def test_pixels_and_grid_equal_qwen_vl_utils(qwen_vl_utils, engine_for, name):
    eng = engine_for("fp32")
    img = cases()[name]
    want_pixels, want_grid = reference_patches(qwen_vl_utils, eng, img)
    got = eng.preprocessor.image(_png(img), "documents.0.image")
    assert got.grid_thw == want_grid
    assert torch.equal(got.pixel_values, want_pixels)


def test_the_thin_image_case_of_the_issue(qwen_vl_utils):
    # 12x600: the reference clamps the short side up to the factor first (19 tokens), where the
    # processor's own smart_resize alone gives 15.
    h, w = qwen_vl_utils.smart_resize(12, 600, factor=32, min_pixels=DEFAULT_MIN_PIXELS, max_pixels=DEFAULT_MAX_PIXELS)
    assert (h, w) == (32, 608) and h * w // (32 * 32) == 19
    from engine.vision import reference_size

    for dims in [(12, 600), (600, 12), (31, 31), (33, 4000), (5000, 3000), (1, 150), (64, 64), (40000, 200)]:
        assert reference_size(*dims, 32, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS) == qwen_vl_utils.smart_resize(
            *dims, factor=32, min_pixels=DEFAULT_MIN_PIXELS, max_pixels=DEFAULT_MAX_PIXELS
        )


def test_transparency_is_white_as_in_the_reference(qwen_vl_utils, engine_for):
    eng = engine_for("fp32")
    img = logo_rgba()
    ours = ScoreRequest.of("a blue logo", [RerankItem(images=(ImageInput.of(_png(img)),))])
    white = Image.new("RGB", img.size, (255, 255, 255))
    white.paste(img, mask=img.split()[3])
    flattened = ScoreRequest.of("a blue logo", [RerankItem(images=(ImageInput.of(_png(white)),))])
    assert eng.score_requests([ours])[0].scores == eng.score_requests([flattened])[0].scores
    magenta = ScoreRequest.of("a blue logo", [RerankItem(images=(ImageInput.of(_png(img.convert("RGB"))),))])
    assert eng.score_requests([magenta])[0].scores != eng.score_requests([ours])[0].scores  # the old behaviour differed


def test_an_aspect_ratio_over_200_is_a_named_input_error(engine_for):
    from engine.errors import InputError

    eng = engine_for("fp32")
    with pytest.raises(InputError, match="documents.0.image: image cannot be resized: absolute aspect ratio must be smaller than 200"):
        eng.preprocessor.image(_png(Image.new("RGB", (4020, 20))), "documents.0.image")
