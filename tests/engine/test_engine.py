"""The engine on the trained tiny model: every CPU precision scores, batching and the split
vision path are exact, features serialise losslessly, bad input gets a named error."""

import io
import random

import pytest
import torch
from PIL import Image

from serve.engine.errors import EmptyInput, ImageDecodeError, ImageTooLarge, InputError, PrecisionUnsupported, UnknownPrecision
from serve.engine.features import FeatureDecodeError, ImageFeatures
from serve.engine.inputs import RerankItem, ScorePair, VideoInput
from serve.engine.tiny import Thing, draw, eval_set, evaluate_ndcg
from serve.ranking import agreement

CPU_PRECISIONS = ["fp32", "bf16", "int8", "nf4"]


def _png(w, h, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def mixed_pairs():
    rng = random.Random(7)
    q_text = RerankItem(text="red circle")
    q_img = RerankItem(images=(draw(Thing("blue", "square"), rng),))
    docs = [
        RerankItem(images=(draw(Thing("red", "circle"), rng),)),
        RerankItem(text="a blue square"),
        RerankItem(text="a green cross", images=(draw(Thing("green", "cross"), rng),)),
        RerankItem(images=(draw(Thing("red", "triangle"), rng), draw(Thing("yellow", "circle"), rng))),
        RerankItem(text="an image showing a red circle and a very long tail of words " * 3),
    ]
    return [ScorePair(q, d) for q in (q_text, q_img) for d in docs]


def test_fp32_tiny_model_ranks_heldout_set(engine_for):
    # The offline model is only useful if it really ranks: held-out NDCG@10 >= 0.9.
    assert evaluate_ndcg(engine_for("fp32")) >= 0.9


@pytest.mark.parametrize("precision", CPU_PRECISIONS)
def test_every_cpu_precision_scores_end_to_end(engine_for, mixed_pairs, precision):
    eng = engine_for(precision)
    scores = eng.score_pairs(mixed_pairs)
    assert len(scores) == len(mixed_pairs)
    assert all(0.0 < s < 1.0 for s in scores)
    # The exact match outranks the non-matches for the text query.
    assert scores[0] > scores[1] and scores[0] > scores[2]


# Bounds from `rerank-fleet eval` on the held-out set (docs/BENCHMARKS.md, "Fidelity"), with margin:
# rankings barely move; absolute scores move more under nf4, so the ranking bound is the tight one.
FIDELITY_BOUNDS = {"bf16": (0.99, 0.15), "int8": (0.99, 0.15), "nf4": (0.98, 0.50)}


@pytest.mark.parametrize("precision", ["bf16", "int8", "nf4"])
def test_quantized_agrees_with_fp32_within_documented_bound(engine_for, precision):
    ref, cand = engine_for("fp32"), engine_for(precision)
    max_abs, spearmans = 0.0, []
    for q, docs, _ in eval_set():
        a, b = ref.score(q, docs), cand.score(q, docs)
        max_abs = max(max_abs, max(abs(x - y) for x, y in zip(a, b)))
        spearmans.append(agreement(a, b)["spearman"])
    min_mean_spearman, max_abs_bound = FIDELITY_BOUNDS[precision]
    assert sum(spearmans) / len(spearmans) >= min_mean_spearman
    assert max_abs <= max_abs_bound, f"{precision}: max |score - fp32| = {max_abs:.4f} > {max_abs_bound}"


def test_batched_equals_single(engine_for, mixed_pairs):
    eng = engine_for("fp32")
    batched = eng.score_pairs(mixed_pairs)
    single = [eng.score_pairs([p])[0] for p in mixed_pairs]
    assert max(abs(a - b) for a, b in zip(batched, single)) <= 1e-5


def test_token_budget_splits_into_micro_batches_in_input_order(engine_for, mixed_pairs):
    small = engine_for("fp32", max_batch_tokens=256)
    plan = small.plan_batches([120, 30, 200, 90, 31])
    assert sorted(i for b in plan for i in b) == [0, 1, 2, 3, 4]
    lengths = [120, 30, 200, 90, 31]
    assert all(max(lengths[i] for i in b) * len(b) <= 256 or len(b) == 1 for b in plan)
    assert len(plan) > 1
    # Same scores as one big batch: order is restored after length sorting.
    big = engine_for("fp32").score_pairs(mixed_pairs)
    assert max(abs(a - b) for a, b in zip(small.score_pairs(mixed_pairs), big)) <= 1e-5


def test_split_vision_path_equals_fused_forward(engine_for, mixed_pairs):
    eng = engine_for("fp32")
    images = [b for p in mixed_pairs for item in (p.query, p.document) for b in item.images]
    feats = {f.cache_key: f for f in eng.encode_images(images)}
    split = eng.score_pairs(mixed_pairs, image_features=feats)
    fused = eng.fused_scores(mixed_pairs)
    assert max(abs(a - b) for a, b in zip(split, fused)) <= 1e-5


def test_image_known_only_by_digest_scores_from_its_features(engine_for):
    from serve.engine.inputs import ImageRef, image_digest

    eng = engine_for("fp32")
    img = draw(Thing("green", "triangle"), random.Random(2))
    ref = ImageRef(digest=image_digest(img), url="https://cdn.example/t.png", field="documents.0.image")
    q = RerankItem(text="green triangle")
    feats = {f.cache_key: f for f in eng.encode_images([img])}
    from_bytes = eng.score_pairs([ScorePair(q, RerankItem(images=(img,)))])
    from_ref = eng.score_pairs([ScorePair(q, RerankItem(images=(ref,)))], image_features=feats)
    assert from_ref == from_bytes
    with pytest.raises(InputError, match="documents.0.image.*no cached features"):
        eng.score_pairs([ScorePair(q, RerankItem(images=(ref,)))])


def test_image_features_roundtrip_bytes_losslessly(engine_for):
    eng = engine_for("fp32")
    f = eng.encode_images([draw(Thing("purple", "cross"), random.Random(1))])[0]
    g = ImageFeatures.from_bytes(f.to_bytes())
    assert torch.equal(f.embeds, g.embeds) and len(g.deepstack) == len(f.deepstack) == 2
    assert all(torch.equal(a, b) for a, b in zip(f.deepstack, g.deepstack))
    assert (g.grid_thw, g.spec, g.image_digest, g.cache_key) == (f.grid_thw, f.spec, f.image_digest, f.cache_key)
    with pytest.raises(FeatureDecodeError):
        ImageFeatures.from_bytes(b"not a tensor file at all")


def test_cache_key_changes_with_pixel_limits_and_precision(engine_for):
    a = engine_for("fp32").feature_spec
    b = engine_for("fp32", max_pixels=64 * 32 * 32).feature_spec
    c = engine_for("bf16").feature_spec
    assert len({a.cache_key("d"), b.cache_key("d"), c.cache_key("d")}) == 3
    assert a.cache_key("d") != a.cache_key("e")


def test_video_frames_score_as_video(engine_for):
    eng = engine_for("fp32")
    rng = random.Random(3)
    frames = tuple(draw(Thing("red", "circle"), rng) for _ in range(4))
    pair = ScorePair(RerankItem(text="red circle"), RerankItem(video=VideoInput(frames=frames, fps=2.0)))
    enc = eng._encode_pair(pair, {})
    assert enc.kinds == [2] and enc.visuals[0].grid_thw[0] == 2  # 4 frames -> 2 temporal groups
    assert "<0.2 seconds>" in eng.tokenizer.decode(enc.input_ids) or 2 in enc.mm_types
    (s,) = eng.score_pairs([pair])
    assert 0.0 < s < 1.0


def test_a_shared_query_video_runs_the_vit_once(engine_for, monkeypatch):
    eng = engine_for("fp32")
    rng = random.Random(5)
    video = VideoInput(frames=tuple(draw(Thing("red", "circle"), rng) for _ in range(4)), fps=2.0)
    docs = [RerankItem(text="a red circle"), RerankItem(text="a blue square"), RerankItem(text="a red cross")]
    calls = []
    real_run_vision = eng._run_vision
    monkeypatch.setattr(eng, "_run_vision", lambda patches: calls.append(len(patches)) or real_run_vision(patches))
    shared = eng.score(RerankItem(video=video), docs)
    assert calls == [1]
    monkeypatch.undo()
    alone = [eng.score(RerankItem(video=video), [d])[0] for d in docs]
    assert max(abs(a - b) for a, b in zip(shared, alone)) <= 1e-5


def test_bad_input_gets_named_errors(engine_for):
    eng = engine_for("fp32")
    with pytest.raises(EmptyInput, match="documents.0"):
        eng.score(RerankItem(text="q"), [RerankItem()])
    with pytest.raises(EmptyInput, match="query"):
        eng.score(RerankItem(text=""), [RerankItem(text="d")])
    with pytest.raises(ImageDecodeError, match=r"documents.0.images.0"):
        eng.score(RerankItem(text="q"), [RerankItem(images=(b"\x89PNG garbage",))])
    with pytest.raises(ImageTooLarge, match="pixels"):
        eng.score(RerankItem(text="q"), [RerankItem(images=(_png(9000, 8000),))])
    from serve.config import ModelConfig
    from serve.engine.engine import RerankEngine

    tight = RerankEngine.load(ModelConfig(source=eng.loaded.source), "fp32", device="cpu", max_image_bytes=100)
    with pytest.raises(ImageTooLarge, match="bytes"):
        tight.score(RerankItem(text="q"), [RerankItem(images=(_png(64, 64),))])
    assert all(isinstance(e, InputError) for e in (EmptyInput("f", "p"), ImageTooLarge("f", "p")))


def test_unknown_and_unsupported_precisions_are_refused(tiny_model_dir):
    from serve.config import ModelConfig
    from serve.engine.engine import RerankEngine

    cfg = ModelConfig(source=str(tiny_model_dir))
    with pytest.raises(UnknownPrecision, match="int3"):
        RerankEngine.load(cfg, "int3", device="cpu")
    with pytest.raises(PrecisionUnsupported, match="fp8 needs a CUDA GPU"):
        RerankEngine.load(cfg, "fp8", device="cpu")
    with pytest.raises(PrecisionUnsupported, match="pre-quantized W4A16"):
        RerankEngine.load(cfg, "awq", device="cpu")  # a plain checkpoint is not AWQ


def _mp4(frames: list[bytes], fps: int = 4) -> bytes:
    av = pytest.importorskip("av")
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 96, 96, "yuv420p"
        for png in frames:
            frame = av.VideoFrame.from_ndarray(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


def test_video_file_is_sampled_at_fps_and_scored(engine_for):
    from serve.engine.vision import sample_frame_indices

    eng = engine_for("fp32")
    rng = random.Random(11)
    data = _mp4([draw(Thing("blue", "square"), rng) for _ in range(12)], fps=4)  # 3 seconds
    pair = ScorePair(RerankItem(text="blue square"), RerankItem(video=VideoInput(data=data)))
    enc = eng._encode_pair(pair, {})
    # 3 s at the default 1 fps -> the reference's minimum of 4 frames -> 2 temporal groups.
    assert sample_frame_indices(12, 4.0, 1.0, 64) == [0, 4, 7, 11]
    assert enc.kinds == [2] and enc.visuals[0].grid_thw[0] == 2
    (s,) = eng.score_pairs([pair])
    assert 0.0 < s < 1.0
    with pytest.raises(ImageDecodeError, match="document.video"):
        eng.score_pairs([ScorePair(RerankItem(text="q"), RerankItem(video=VideoInput(data=b"not a video")))])
