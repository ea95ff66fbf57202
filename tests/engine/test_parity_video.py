"""Video (and mixed-media) parity with the official pipeline, against an independent reference:
the official reranker's path re-stated in `official_reference.py`, which runs qwen-vl-utils'
own `process_vision_info` (frame picking, sizing, torchvision resizing), transformers' Qwen3-VL
processor (patches, grids, timestamped prompt expansion) and the model's own forward, in a
process of its own. The engine must give the same token ids (timestamps included), the same
grids, the same pixel values and, in fp32, the same scores within 1e-6.

Issue 9's items: frame lists keep every frame up to 64 (an odd count padded with the last), pick
64 by `linspace` rounded down beyond that, time them at 2.0 fps, snap each frame as `fetch_image`
does and cap the whole video at `total_pixels`; video files get qwen-vl-utils' per-frame minimum
of 128·32²; several videos per side."""

from __future__ import annotations

import pytest
import torch
from media_testkit import mp4, picture, png
from parity_cases import Case, Side, engine_request, run_official

from engine.prepare import VIDEO
from engine.vision import sample_frame_indices


def frames(n: int, width: int, height: int, seed: int = 0) -> list[bytes]:
    return [png(picture(width, height, seed * 1000 + i)) for i in range(n)]


def cases() -> list[Case]:
    file_320 = mp4([picture(320, 240, 50 + i) for i in range(12)], fps=4)  # 3 s: 4 frames at 1 fps
    file_many = mp4([picture(96, 64, 70 + i) for i in range(100)], fps=30)  # 3.3 s: 4 of 100 by linspace
    mixed = [png(picture(100, 100, 90)), png(picture(101, 99, 91)), png(picture(100, 100, 92))]  # snap to one size
    return [
        Case("five_frames", Side(text="red circle"), [Side(videos=[("frames", frames(5, 96, 64, 1))]), Side(text="a red circle")]),
        Case("seventy_frames", Side(text="blue square"), [Side(videos=[("frames", frames(70, 40, 30, 2))], text="clip")]),
        Case("file_320x240", Side(text="green cross"), [Side(videos=[("file", file_320)])]),
        Case("file_100_frames", Side(text="q"), [Side(videos=[("file", file_many)])]),
        Case("mixed_frame_sizes", Side(text="q"), [Side(videos=[("frames", mixed)])]),
        Case("hd_64_frames", Side(text="q"), [Side(videos=[("frames", frames(64, 1280, 720, 9))])]),
        Case(
            "several_videos_per_side",
            Side(videos=[("frames", frames(4, 64, 48, 3))], text="query clip"),
            [
                Side(videos=[("file", file_320), ("frames", frames(3, 48, 48, 4))], images=[png(picture(80, 60, 5))], text="caption"),
                Side(text=["two ", "texts"], images=[png(picture(600, 12, 6)), png(picture(160, 96, 7, "RGBA"))]),
                Side(),  # nothing: NULL
            ],
            instruction="Find the clip.",
        ),
    ]


@pytest.fixture(scope="module")
def parity(engine_for, tiny_model_dir, tmp_path_factory):
    """(cases, official results by case, engine, prepared requests by case, engine scores by case)."""
    eng = engine_for("fp32")
    all_cases = cases()
    official = run_official(tiny_model_dir, all_cases, tmp_path_factory.mktemp("official"))
    prepared = {c.name: eng.prepare(engine_request(c)) for c in all_cases}
    scores = {c.name: eng.score_requests([engine_request(c)])[0].scores for c in all_cases}
    return {c.name: c for c in all_cases}, official, eng, prepared, scores


NAMES = [c.name for c in cases()]


@pytest.mark.parametrize("name", NAMES)
def test_token_ids_equal_the_official_ones(parity, name):
    """Ids include every `<t seconds>` block, so timestamps (fps 2.0 for frame lists, the file's
    own frame times otherwise), frame counts and tokens per frame all match."""
    _, official, _, prepared, _ = parity
    for row, ref in zip(prepared[name].rows, official[name], strict=True):
        assert row.ids.tolist() == ref["input_ids"]


@pytest.mark.parametrize("name", NAMES)
def test_video_grids_and_pixels_equal_the_official_ones(parity, name):
    _, official, _, prepared, _ = parity
    p = prepared[name]
    for row, ref in zip(p.rows, official[name], strict=True):
        videos = [p.patches[k] for k, kind in zip(row.visuals, row.kinds) if kind == VIDEO]
        if not videos:
            assert "video_grid_thw" not in ref
            continue
        assert [list(v.grid_thw) for v in videos] == ref["video_grid_thw"].tolist()
        ours = torch.cat([v.pixel_values for v in videos])
        assert ours.shape == ref["pixel_values_videos"].shape
        assert torch.equal(ours, ref["pixel_values_videos"].float())  # bit-identical (measured: 0 difference)


@pytest.mark.parametrize("name", NAMES)
def test_scores_equal_the_official_ones_in_fp32(parity, name):
    _, official, _, _, scores = parity
    ref = [r["score"] for r in official[name]]
    assert max(abs(a - b) for a, b in zip(scores[name], ref, strict=True)) <= 1e-6, (scores[name], ref)


def test_frame_lists_follow_the_official_rules(parity):
    """The figures the issue names, read off the official run: 5 frames are kept and padded to 6
    (not resampled to 4); 70 frames become 64; a 320x240 file gets 140 tokens per frame group
    (per-frame minimum 128·32²), not 80."""
    _, official, _, prepared, _ = parity
    assert official["five_frames"][0]["frame_indices"] == [list(range(6))]
    assert official["five_frames"][0]["video_grid_thw"].tolist()[0][0] == 3
    assert official["seventy_frames"][0]["frame_indices"] == [list(range(64))]
    t, h, w = official["file_320x240"][0]["video_grid_thw"].tolist()[0]
    assert h * w // 4 == 140
    p = prepared["file_320x240"]
    assert [v.grid_thw for v in p.patches.values()] == [(t, h, w)]


def test_video_file_frames_are_the_official_indices(parity):
    _, official, _, _, _ = parity
    assert official["file_100_frames"][0]["frame_indices"] == [sample_frame_indices(100, 30.0, 1.0, 64)]
    assert official["file_320x240"][0]["frame_indices"] == [sample_frame_indices(12, 4.0, 1.0, 64)]


def test_sixty_four_720p_frames_fit_the_official_total(parity):
    """64 frames of 1280x720: the whole-video cap (10·768·32² pixels) sizes each frame to 352x640,
    7040 video tokens in all (23040 without the cap), on both sides."""
    _, official, _, prepared, _ = parity
    assert official["hd_64_frames"][0]["video_grid_thw"].tolist() == [[32, 22, 40]]
    (video,) = prepared["hd_64_frames"].patches.values()
    assert video.grid_thw == (32, 22, 40) and 32 * 22 * 40 // 4 == 7040


def test_frames_of_different_sizes_are_a_named_input_error(engine_for):
    """Frames that do not snap to one size make the official `torch.stack` fail (the reranker then
    scores a bare NULL prompt); here the request gets a 4xx naming the video."""
    from engine.errors import InputError

    eng = engine_for("fp32")
    odd = [png(picture(100, 100, 1)), png(picture(300, 200, 2))]
    req = engine_request(Case("odd", Side(text="q"), [Side(videos=[("frames", odd)])]))
    with pytest.raises(InputError, match=r"documents.0.video.0: all video frames must have the same size"):
        eng.prepare(req)


def test_the_split_vision_path_scores_as_the_official_pipeline(parity):
    """Images scored from features computed earlier (what the feature cache feeds back) give the
    official scores too: the split path is held against the official process, not the engine."""
    cases, official, eng, _, _ = parity
    req = engine_request(cases["several_videos_per_side"])
    features = {f.cache_key: f for f in eng.encode_images(list(req.images()))}
    assert len(features) == 3
    result = eng.score_requests([req], features)[0]
    assert not result.new_features  # every image came from the given features
    ref = [r["score"] for r in official["several_videos_per_side"]]
    assert max(abs(a - b) for a, b in zip(result.scores, ref, strict=True)) <= 1e-6
