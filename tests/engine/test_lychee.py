"""lychee-rerank-mm (Qwen2.5-VL based): its image limits come from its checkpoint, never from
Qwen3-VL-Reranker's; video is refused with a clear error until its path is implemented.

The checkpoint is a random-weight Qwen2.5-VL of the real structure (patch 14, window attention,
no deepstack) with lychee's processor limits (4·28² … 1280·28²) in its preprocessor_config.json.
Sizing is checked against qwen-vl-utils' `fetch_image` with those limits and patch 14, followed
by the checkpoint's own image processor; scores against the model's own fused forward."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from engine.errors import InputError
from engine.inputs import ImageInput, RerankItem, ScoreRequest, VideoInput
from fused_reference import reference_scores

LYCHEE_MIN, LYCHEE_MAX = 4 * 28 * 28, 1280 * 28 * 28


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def lychee_dir(tiny_model_dir, tmp_path_factory):
    from workshop.random_model import build_random_model

    tiny = json.loads((tiny_model_dir / "config.json").read_text())
    config = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "text_config": {
            "model_type": "qwen2_5_vl_text", "vocab_size": tiny["text_config"]["vocab_size"], "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 32768, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "rope_theta": 1000000.0, "tie_word_embeddings": False,
        },
        "vision_config": {
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "out_hidden_size": 64, "window_size": 112, "fullatt_block_indexes": [1], "in_channels": 3,
        },
    }  # fmt: skip
    folder = tmp_path_factory.mktemp("lychee")
    (folder / "source.json").write_text(json.dumps(config))
    out = build_random_model(folder / "source.json", folder / "model", dtype=torch.float32)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": LYCHEE_MIN, "max_pixels": LYCHEE_MAX,
    }))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def lychee(lychee_dir):
    from engine.engine import RerankEngine

    return RerankEngine.load(str(lychee_dir), "fp32", device="cpu")


def test_limits_are_the_checkpoints_not_qwen3_vls(lychee):
    p = lychee.vision_params
    assert lychee.loaded.family == "lychee" and p.factor == 28
    assert (p.min_pixels, p.max_pixels) == (LYCHEE_MIN, LYCHEE_MAX)
    assert (lychee.feature_spec.min_pixels, lychee.feature_spec.max_pixels) == (LYCHEE_MIN, LYCHEE_MAX)


@pytest.mark.parametrize("size", [(1000, 1000), (2100, 1500), (20, 20), (600, 12), (333, 777)])
def test_image_sizing_equals_qwen_vl_utils_and_the_checkpoints_processor(lychee, lychee_dir, qwen_vl_utils, size):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    img = Image.effect_noise(size, 50).convert("RGB")
    resized = qwen_vl_utils.fetch_image({"image": img, "min_pixels": LYCHEE_MIN, "max_pixels": LYCHEE_MAX}, image_patch_size=14)
    processor = Qwen2VLImageProcessorPil.from_pretrained(lychee_dir)  # the checkpoint's processor (PIL backend: no torchvision here)
    want = processor(images=[resized], return_tensors="pt", do_resize=False)
    got = lychee.preprocessor.image(_png(img), "documents.0.image")
    assert got.grid_thw == tuple(int(x) for x in want["image_grid_thw"][0])
    assert (got.pixel_values - want["pixel_values"].float()).abs().max() <= 1e-5


def test_1000x1000_is_sized_by_lychees_limit_not_qwen3_vls(lychee):
    # lychee: 1008x1008 = 1016064 > 1280·28² -> scaled to 980x980 (1225 tokens); Qwen3-VL would give 992x992.
    got = lychee.preprocessor.image(_png(Image.new("RGB", (1000, 1000), (9, 9, 9))), "f")
    assert got.grid_thw == (1, 70, 70)


def test_video_is_refused_naming_the_field(lychee):
    frames = tuple(ImageInput.of(_png(Image.new("RGB", (56, 56), (i, 0, 0))), f"documents.0.video.0.{i}") for i in range(4))
    req = ScoreRequest.of("q", [RerankItem(videos=(VideoInput.of_frames(frames, "documents.0.video.0"),))])
    with pytest.raises(InputError, match=r"documents.0.video.0: video is not supported for lychee-rerank-mm"):
        lychee.prepare(req)


def test_text_and_image_pairs_score_as_the_models_own_forward(lychee):
    img = ImageInput.of(_png(Image.effect_noise((120, 90), 40).convert("RGB")), "documents.1.image")
    req = ScoreRequest.of("a red circle", ["a red circle", RerankItem(text="x", images=(img,)), RerankItem(images=(img,))])
    got = lychee.score_requests([req])[0].scores
    want = reference_scores(lychee, req)
    assert all(0.0 < s < 1.0 for s in got)
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-5
