"""`bench engine`'s vision-tower timing, and that the planner reads it as written."""

from __future__ import annotations

from placement.profiles import BenchEngineReport
from bench.engine import VISION_IMAGE_SIDE, format_table, time_vision


def test_vision_timing_covers_a_typical_image_and_feeds_the_planner(engine_for, qwen_vl_utils):
    engine = engine_for("fp32")
    row = time_vision(engine, repeats=2)
    # The whole image reached the tower: its tokens are what qwen-vl-utils makes of 1024 x 1024 pixels.
    p = engine.preprocessor.params
    factor = p.patch_size * p.merge_size
    height, width = qwen_vl_utils.smart_resize(VISION_IMAGE_SIDE, VISION_IMAGE_SIDE, factor=factor, min_pixels=p.min_pixels, max_pixels=p.max_pixels)
    assert row["image_tokens"] == height * width // factor**2 and row["ms_per_image"] > 0
    report = {"model": "tiny", "device": "cpu", "rows": [], "vision": [{"precision": "fp32", **row}]}
    parsed = BenchEngineReport.model_validate(report)
    assert parsed.vision[0].image_tokens == row["image_tokens"] and parsed.vision[0].ms_per_image == row["ms_per_image"]
    assert f"vision tower (fp32): {row['ms_per_image']:.1f} ms per {row['image_tokens']}-token image" in format_table(report)
