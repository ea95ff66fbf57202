"""The engine on the trained tiny model: every CPU precision scores, batching and the split
vision path equal the model's own forward, features serialise losslessly, bad input gets a
named error."""

import io
import random

import pytest
import torch
from PIL import Image

from engine.errors import ImageDecodeError, ImageTooLarge, InputError, PrecisionUnsupported, UnknownPrecision
from engine.features import FeatureDecodeError, ImageFeatures
from engine.inputs import ImageInput, RerankItem, ScoreRequest, VideoInput
from engine.prepare import VIDEO
from fused_reference import reference_scores
from ranking.metrics import agreement
from workshop.tiny import Thing, draw, eval_set, evaluate_ndcg

CPU_PRECISIONS = ["fp32", "bf16", "int8", "nf4"]


def _png(w, h, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def _img(thing: Thing, rng: random.Random, **kw) -> ImageInput:
    return ImageInput.of(draw(thing, rng, **kw))


@pytest.fixture(scope="module")
def mixed_requests():
    rng = random.Random(7)
    docs = [
        RerankItem(images=(_img(Thing("red", "circle"), rng),)),
        RerankItem(text="a blue square"),
        RerankItem(text="a green cross", images=(_img(Thing("green", "cross"), rng),)),
        RerankItem(images=(_img(Thing("red", "triangle"), rng), _img(Thing("yellow", "circle"), rng))),
        RerankItem(text="an image showing a red circle and a very long tail of words " * 3),
    ]
    return [
        ScoreRequest.of("red circle", docs),
        ScoreRequest.of(RerankItem(images=(_img(Thing("blue", "square"), rng),)), docs),
    ]


def test_fp32_tiny_model_ranks_heldout_set(engine_for):
    # The offline model is only useful if it really ranks. The seeded build is deterministic for
    # given library versions (two builds on 2026-12-04 gave 0.7050 to the last digit, with Pillow 13
    # and with Pillow 12.3 alike), but not across them: 0.705 with the packages a fresh install
    # resolved on 2026-12-04, 0.875 and 0.92 with earlier sets. A random order of these candidate
    # sets scores 0.43, so 0.65 still says the model ranks.
    assert evaluate_ndcg(engine_for("fp32")) >= 0.65


@pytest.mark.parametrize("precision", CPU_PRECISIONS)
def test_every_cpu_precision_scores_end_to_end(engine_for, mixed_requests, precision):
    eng = engine_for(precision)
    results = eng.score_requests(mixed_requests)
    scores = results[0].scores
    assert [len(r.scores) for r in results] == [5, 5]
    assert all(0.0 < s < 1.0 for r in results for s in r.scores)
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


def test_engine_equals_the_models_own_forward_pair_by_pair(engine_for, mixed_requests):
    """Reference: HF's fused forward from pixel values, one pair at a time, no precomputed
    features, no shared prefix, no padding. The engine: batched, split vision path, shared prefix."""
    eng = engine_for("fp32")
    for req, result in zip(mixed_requests, eng.score_requests(mixed_requests)):
        reference = reference_scores(eng, req)
        assert max(abs(a - b) for a, b in zip(result.scores, reference)) <= 1e-5


def test_batched_equals_single(engine_for, mixed_requests):
    eng = engine_for("fp32")
    batched = [s for r in eng.score_requests(mixed_requests) for s in r.scores]
    single = [eng.score(req.query, [d])[0] for req in mixed_requests for d in req.documents]
    assert max(abs(a - b) for a, b in zip(batched, single)) <= 1e-5


def test_token_budget_splits_into_micro_batches_with_the_same_scores(engine_for, mixed_requests):
    small, big = engine_for("fp32", max_batch_tokens=256), engine_for("fp32")
    calls = []
    real = small.forwarder._decode
    small.forwarder._decode = lambda rows, *a, **k: calls.append(len(rows)) or real(rows, *a, **k)
    try:
        a = [s for r in small.score_requests(mixed_requests) for s in r.scores]
    finally:
        del small.forwarder._decode
    b = [s for r in big.score_requests(mixed_requests) for s in r.scores]
    assert len(calls) > 3 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5


def test_split_vision_path_with_precomputed_features(engine_for, mixed_requests):
    eng = engine_for("fp32")
    images = [img for req in mixed_requests for img in req.images()]
    feats = {f.cache_key: f for f in eng.encode_images(images)}
    with_features = eng.score_requests(mixed_requests, feats)
    prepared = eng.prepare(mixed_requests[1], feats)
    assert not prepared.patches  # nothing left for the ViT
    assert all(not r.new_features for r in with_features)
    for req, res in zip(mixed_requests, with_features):
        assert max(abs(a - b) for a, b in zip(res.scores, reference_scores(eng, req))) <= 1e-5


def test_forward_returns_the_features_it_encoded_once(engine_for):
    eng = engine_for("fp32")
    rng = random.Random(4)
    shared = _img(Thing("red", "circle"), rng)
    reqs = [ScoreRequest.of("red circle", [RerankItem(images=(shared,)), RerankItem(images=(shared,))]) for _ in range(2)]
    results = eng.score_requests(reqs)
    new = [f for r in results for f in r.new_features]
    assert len({f.cache_key for f in new}) == 1 and new[0].image_digest == shared.digest


def test_image_known_only_by_digest_scores_from_its_features(engine_for):
    eng = engine_for("fp32")
    img = _img(Thing("green", "triangle"), random.Random(2))
    digest_only = ImageInput(img.digest, None, "documents.0.image", url="https://cdn.example/t.png")
    feats = {f.cache_key: f for f in eng.encode_images([img])}
    from_bytes = eng.score_requests([ScoreRequest.of("green triangle", [RerankItem(images=(img,))])])[0].scores
    from_ref = eng.score_requests([ScoreRequest.of("green triangle", [RerankItem(images=(digest_only,))])], feats)[0].scores
    assert from_ref == from_bytes
    with pytest.raises(InputError, match="documents.0.image.*no cached features"):
        eng.prepare(ScoreRequest.of("green triangle", [RerankItem(images=(digest_only,))]))


def test_image_features_roundtrip_bytes_losslessly(engine_for):
    eng = engine_for("fp32")
    f = eng.encode_images([_img(Thing("purple", "cross"), random.Random(1))])[0]
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
    frames = tuple(_img(Thing("red", "circle"), rng) for _ in range(4))
    req = ScoreRequest.of("red circle", [RerankItem(videos=(VideoInput.of_frames(frames, fps=2.0),))])
    prepared = eng.prepare(req)
    (row,) = prepared.rows
    assert row.kinds == (VIDEO,)
    (patches,) = prepared.patches.values()
    assert patches.grid_thw[0] == 2  # 4 frames -> 2 temporal groups
    # Frames 0-1 and 2-3 at 2 fps: groups centred at 0.25 s and 1.25 s.
    assert patches.timestamps == (0.25, 1.25)
    assert int((row.ids == eng.model.config.video_token_id).sum()) == 2 * patches.grid_thw[1] * patches.grid_thw[2] // 4
    (s,) = eng.forward([prepared])[0].scores
    assert 0.0 < s < 1.0
    assert abs(s - reference_scores(eng, req)[0]) <= 1e-5


def test_a_shared_query_video_runs_the_vit_once(engine_for, monkeypatch):
    eng = engine_for("fp32")
    rng = random.Random(5)
    video = VideoInput.of_frames(tuple(_img(Thing("red", "circle"), rng) for _ in range(4)), fps=2.0)
    docs = [RerankItem(text="a red circle"), RerankItem(text="a blue square"), RerankItem(text="a red cross")]
    calls = []
    real_vit = eng.forwarder.tower._run
    monkeypatch.setattr(eng.forwarder.tower, "_run", lambda patches: calls.append(len(patches)) or real_vit(patches))
    shared = eng.score(RerankItem(videos=(video,)), docs)
    assert calls == [1]
    monkeypatch.undo()
    alone = [eng.score(RerankItem(videos=(video,)), [d])[0] for d in docs]
    assert max(abs(a - b) for a, b in zip(shared, alone)) <= 1e-5


def test_bad_input_gets_named_errors(engine_for, tiny_model_dir):
    eng = engine_for("fp32")
    with pytest.raises(InputError, match="documents: must not be empty"):
        eng.score("q", [])
    with pytest.raises(ImageDecodeError, match=r"documents.0.image"):
        eng.score("q", [RerankItem(images=(ImageInput.of(b"\x89PNG garbage", "documents.0.image"),))])
    with pytest.raises(ImageTooLarge, match="pixels"):
        eng.score("q", [RerankItem(images=(ImageInput.of(_png(9000, 8000)),))])
    with pytest.raises(InputError, match=r"query.text: text is not valid Unicode \(a lone surrogate at character 3\)"):
        eng.score("abc\ud800", ["d"])
    with pytest.raises(InputError, match="instruction: text is not valid Unicode"):
        eng.score("q", ["d"], instruction="\udfff")
    # A special token typed as text would become the real token (an image pad here) and misalign
    # the prompt for every request in its batch: refused, naming the field and the token.
    with pytest.raises(InputError, match=r"documents.0.text: text contains the reserved token '<\|image_pad\|>'"):
        eng.score(RerankItem(text="q", images=(ImageInput.of(_png(64, 64)),)), ["doc <|image_pad|> x"])
    with pytest.raises(InputError, match="query.text: text contains the reserved token '<\\|im_end\\|>'"):
        eng.score("q <|im_end|>", ["d"])
    tight = engine_for("fp32", max_image_bytes=100)
    with pytest.raises(ImageTooLarge, match="bytes"):
        tight.score("q", [RerankItem(images=(ImageInput.of(_png(64, 64)),))])
    assert all(isinstance(e, InputError) for e in (ImageDecodeError("f", "p"), ImageTooLarge("f", "p")))


def test_max_tokens_per_doc_cuts_document_text(engine_for):
    eng = engine_for("fp32")
    long_doc = "a red circle " * 50
    cut = eng.prepare(ScoreRequest.of("red circle", [long_doc], max_tokens_per_doc=5))
    whole = eng.prepare(ScoreRequest.of("red circle", [long_doc]))
    assert len(whole.rows[0]) - len(cut.rows[0]) >= 100


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_quantized_precisions_quantize_the_decoder_alone(engine_for, precision):
    """bitsandbytes replaces the decoder's projections; the vision tower and lm_head stay plain
    linears in the compute dtype, so a quantized arm's tower is the fp32 arm's (equal feature-cache
    keys: image features are shared between the arms)."""
    model = engine_for(precision).model
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    kept = {n: m for n, m in linears.items() if n.startswith("model.visual") or n == "lm_head"}
    assert kept and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in kept.values())
    decoder = [m for n, m in linears.items() if n.startswith("model.language_model")]
    assert decoder and all(type(m) is not torch.nn.Linear for m in decoder)
    assert engine_for(precision).feature_spec == engine_for("fp32").feature_spec


def test_unknown_and_unsupported_precisions_are_refused(tiny_model_dir):
    from engine.engine import RerankEngine

    with pytest.raises(UnknownPrecision, match="int3"):
        RerankEngine.load(str(tiny_model_dir), "int3", device="cpu")
    with pytest.raises(PrecisionUnsupported, match="fp8 needs a CUDA GPU"):
        RerankEngine.load(str(tiny_model_dir), "fp8", device="cpu")
    with pytest.raises(PrecisionUnsupported, match="pre-quantized W4A16"):
        RerankEngine.load(str(tiny_model_dir), "awq", device="cpu")  # a plain checkpoint is not AWQ


def mp4(frames: list[bytes], fps: int = 4, side: int = 96) -> bytes:
    av = pytest.importorskip("av")
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = side, side, "yuv420p"
        for png in frames:
            frame = av.VideoFrame.from_ndarray(np.asarray(Image.open(io.BytesIO(png)).convert("RGB").resize((side, side))), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


def test_video_file_is_sampled_at_fps_and_scored(engine_for):
    from engine.vision import sample_frame_indices

    eng = engine_for("fp32")
    rng = random.Random(11)
    data = mp4([draw(Thing("blue", "square"), rng) for _ in range(12)], fps=4)  # 3 seconds
    req = ScoreRequest.of("blue square", [RerankItem(videos=(VideoInput.of_file(data, "documents.0.video"),))])
    prepared = eng.prepare(req)
    # 3 s at the default 1 fps -> the reference's minimum of 4 frames -> 2 temporal groups.
    assert sample_frame_indices(12, 4.0, 1.0, 64) == [0, 4, 7, 11]
    (patches,) = prepared.patches.values()
    assert prepared.rows[0].kinds == (VIDEO,) and patches.grid_thw[0] == 2
    assert patches.timestamps == ((0 / 4 + 4 / 4) / 2, (7 / 4 + 11 / 4) / 2)  # frames [0, 4] and [7, 11] at 4 fps
    (s,) = eng.forward([prepared])[0].scores
    assert 0.0 < s < 1.0
    with pytest.raises(ImageDecodeError, match="documents.0.video"):
        eng.score("q", [RerankItem(videos=(VideoInput.of_file(b"not a video", "documents.0.video"),))])
