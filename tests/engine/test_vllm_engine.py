"""The vLLM backend scores as the transformers engine (the parity reference): same expanded token
ids (the official layout, vLLM's own placeholder expansion), scores within 1e-5 in fp32, for text
pairs, image documents, image queries, multi-image items, thin images and truncated pairs; on both
vision paths: the project's vision tower feeding vLLM embeddings (the default, which the shared
feature cache feeds) and raw images through vLLM's own vision tower.

Runs in the vLLM environment (scripts/vllm-env.sh; `scripts/test.sh` runs it there with `-m vllm`);
elsewhere it is skipped, saying so. One vLLM engine serves the whole module."""

from __future__ import annotations

import asyncio

import pytest
from media_testkit import picture, png

from engine.errors import InputError, ModelLoadError, PrecisionUnsupported
from engine.inputs import ImageInput, RerankItem, ScoreRequest, VideoInput

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="the vLLM environment (scripts/vllm-env.sh) runs these")

MAX_LENGTH = 512  # small enough that one case is truncated, as the official code truncates


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module: vLLM's async engine serves the loop it first ran on."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir, loop):
    from engine.config import EngineConfig
    from engine.vllm_engine import VllmRerankEngine, VllmSettings

    eng = VllmRerankEngine(str(tiny_model_dir), "fp32", config=EngineConfig(max_length=MAX_LENGTH), settings=VllmSettings(enforce_eager=True))
    yield eng
    loop.run_until_complete(eng.aclose())


@pytest.fixture(scope="module")
def raw_images_engine(tiny_model_dir, loop):
    """The same arm with `vision_encoder: vllm`: raw images, vLLM's own vision tower."""
    from engine.config import EngineConfig
    from engine.vllm_engine import VllmRerankEngine, VllmSettings

    settings = VllmSettings(enforce_eager=True, vision_encoder="vllm")
    eng = VllmRerankEngine(str(tiny_model_dir), "fp32", config=EngineConfig(max_length=MAX_LENGTH), settings=settings)
    yield eng
    loop.run_until_complete(eng.aclose())


VISION_PATHS = {"project": "vllm_engine", "vllm": "raw_images_engine"}


def img(seed: int, width: int = 120, height: int = 90, field: str = "image") -> ImageInput:
    return ImageInput.of(png(picture(width, height, seed)), field)


def requests() -> dict[str, ScoreRequest]:
    a, b, thin = img(1), img(2, 200, 150), img(3, 600, 12)
    long_doc = "a red circle near a blue square " * 120
    return {
        "text pairs": ScoreRequest.of("a red circle", ["a red circle", "a blue square", "a red cross", ""]),
        "image documents": ScoreRequest.of("a red circle", [RerankItem(images=(a,)), RerankItem(text="caption", images=(b,)), RerankItem(images=(thin,))]),
        "image query": ScoreRequest.of(RerankItem(text="like this", images=(a,)), ["a red circle", RerankItem(images=(b,)), RerankItem()]),
        "multi-image items": ScoreRequest.of(RerankItem(images=(a, b)), [RerankItem(text="two", images=(b, thin, a))], instruction="Match the set."),
        "truncated pairs": ScoreRequest.of("a red circle", [long_doc, RerankItem(text=long_doc, images=(a,))]),
    }


def score_all(engine, loop) -> dict:
    async def run_all():
        return {name: await engine.score_request(r) for name, r in requests().items()}

    return loop.run_until_complete(run_all())


@pytest.fixture(scope="module")
def scored(request, loop):
    """Vision path -> request name -> RequestScores of the vLLM engine on that path (run once)."""
    return {path: score_all(request.getfixturevalue(fixture), loop) for path, fixture in VISION_PATHS.items()}


@pytest.mark.parametrize("path", list(VISION_PATHS))
@pytest.mark.parametrize("name", list(requests()))
def test_scores_equal_the_transformers_engine(scored, engine_for, path, name):
    want = engine_for("fp32", max_length=MAX_LENGTH).score_requests([requests()[name]])[0].scores
    assert max(abs(a - b) for a, b in zip(scored[path][name].scores, want, strict=True)) <= 1e-5


def test_project_vision_features_are_the_transformers_engines_under_the_same_cache_key(vllm_engine, engine_for, scored):
    """The vLLM arm's vision tower is the checkpoint's, run as the transformers engine runs it: the
    same fingerprint and dtype (so both backends share cache entries) and the same features."""
    hf = engine_for("fp32", max_length=MAX_LENGTH)
    assert vllm_engine.feature_spec == hf.feature_spec
    req = requests()["multi-image items"]
    new = scored["project"]["multi-image items"].new_features
    assert sorted(f.image_digest for f in new) == sorted({img.digest for img in req.images()})
    theirs = {f.image_digest: f for f in hf.encode_images(list({img.digest: img for img in req.images()}.values()))}
    for f in new:
        assert f.cache_key == theirs[f.image_digest].cache_key
        assert (f.embeds - theirs[f.image_digest].embeds).abs().max() <= 1e-5
        assert len(f.deepstack) == len(theirs[f.image_digest].deepstack) > 0
    assert scored["vllm"]["multi-image items"].new_features == []  # vLLM's own tower: nothing to cache


def test_cached_features_skip_the_vision_tower_and_score_the_same(vllm_engine, engine_for, scored, loop):
    """Features from a cache (here: the transformers engine's, as another arm would have stored
    them) are used as they are: no image is encoded, scores equal, and an image sent by digest
    only (a memoised URL whose bytes the arm never saw) scores from its features."""
    from dataclasses import replace

    req = requests()["image documents"]
    hf = engine_for("fp32", max_length=MAX_LENGTH)
    cached = {f.cache_key: f for f in hf.encode_images(list({img.digest: img for img in req.images()}.values()))}
    again = loop.run_until_complete(vllm_engine.score_request(req, cached))
    assert again.new_features == []
    assert max(abs(a - b) for a, b in zip(again.scores, scored["project"]["image documents"].scores, strict=True)) <= 1e-6
    by_digest = replace(req, documents=tuple(replace(d, images=tuple(replace(i, data=None) for i in d.images)) for d in req.documents))
    assert loop.run_until_complete(vllm_engine.score_request(by_digest, cached)).scores == again.scores
    with pytest.raises(InputError, match=r"image known only by its digest has no cached features; send its bytes"):
        vllm_engine.prompts(by_digest)


@pytest.mark.parametrize("path", list(VISION_PATHS))
@pytest.mark.parametrize("name", list(requests()))
def test_vllm_expands_the_same_token_ids(request, engine_for, loop, path, name):
    """vLLM expands each image placeholder itself: its prompt ids must be the ids the transformers
    engine builds for the same pair (the official layout, vision tokens, truncation)."""
    from vllm import PoolingParams

    vllm_engine = request.getfixturevalue(VISION_PATHS[path])
    req = requests()[name]
    want = [row.ids.tolist() for row in engine_for("fp32", max_length=MAX_LENGTH).prepare(req).rows]

    async def expanded():
        out = []
        for i, prompt in enumerate(vllm_engine.prompts(req)[0]):
            async for o in vllm_engine.llm.encode(prompt, PoolingParams(task="classify"), request_id=f"ids-{path}-{name}-{i}"):
                last = o
            out.append(list(last.prompt_token_ids))
        return out

    assert loop.run_until_complete(expanded()) == want
    if name == "truncated pairs":
        assert all(len(ids) == MAX_LENGTH + 5 for ids in want)


def test_video_and_bad_input_are_named_errors(vllm_engine):
    frames = tuple(img(i, 64, 64, f"documents.0.video.0.{i}") for i in range(4))
    with pytest.raises(InputError, match=r"documents.0.video.0: video is not supported on the vllm backend"):
        vllm_engine.prompts(ScoreRequest.of("q", [RerankItem(videos=(VideoInput.of_frames(frames, "documents.0.video.0"),))]))
    with pytest.raises(InputError, match=r"query.text: text contains the reserved token"):
        vllm_engine.prompts(ScoreRequest.of("q <|im_end|>", ["d"]))
    with pytest.raises(InputError, match=r"documents.0.image: image cannot be resized"):
        vllm_engine.prompts(ScoreRequest.of("q", [RerankItem(images=(img(5, 4020, 20, "documents.0.image"),))]))


def test_precisions_this_backend_cannot_run_here_are_refused(tiny_model_dir):
    from engine.config import EngineConfig
    from engine.vllm_engine import VllmRerankEngine, VllmSettings

    for precision, reason in (("fp8", "fp8 on the vllm backend needs a GPU"), ("nf4", "bitsandbytes.*needs a GPU")):
        with pytest.raises(PrecisionUnsupported, match=reason):
            VllmRerankEngine(str(tiny_model_dir), precision, config=EngineConfig(), settings=VllmSettings(), device="cpu")


def test_a_lychee_checkpoint_is_refused_by_this_backend(tmp_path):
    from engine.config import EngineConfig
    from engine.vllm_engine import VllmRerankEngine, VllmSettings

    (tmp_path / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    with pytest.raises(ModelLoadError, match="serves Qwen3-VL rerankers"):
        VllmRerankEngine(str(tmp_path), "fp32", config=EngineConfig(), settings=VllmSettings())


def test_a_w8a8_checkpoint_runs_on_vllms_int8_kernels_and_ranks_like_fp32(tiny_model_dir, engine_for, loop, tmp_path):
    """`rerank-fleet quantize --scheme w8a8` (SmoothQuant + GPTQ, llm-compressor: the default
    environment, which has it) writes int8 weights and dynamic per-token int8 activations with the
    vision tower and lm_head left out; vLLM (this environment) serves it with its int8 kernels and
    it ranks like fp32 (measured: Spearman 0.998 on the held-out set; bound below)."""
    import json
    import os
    import subprocess
    from pathlib import Path

    from engine.config import EngineConfig
    from engine.vllm_engine import VllmRerankEngine, VllmSettings
    from ranking.metrics import agreement
    from workshop.tiny import eval_set

    cli = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "rerank-fleet"
    if not cli.exists():
        pytest.fail(f"quantizing needs the default environment's {cli} (scripts/bootstrap.sh)")
    out = tmp_path / "w8a8"
    subprocess.run([str(cli), "quantize", "--model", str(tiny_model_dir), "--scheme", "w8a8", "--out", str(out)],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)  # fmt: skip
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert (group["weights"]["num_bits"], group["weights"]["strategy"], group["weights"]["type"]) == (8, "channel", "int")
    acts = group["input_activations"]
    assert (acts["num_bits"], acts["strategy"], acts["dynamic"]) == (8, "token", True)
    assert "lm_head" in qc["ignore"] and all("visual" in n or n == "lm_head" for n in qc["ignore"])

    w8a8 = VllmRerankEngine(str(out), "w8a8", config=EngineConfig(), settings=VllmSettings(enforce_eager=True))
    try:
        ref = engine_for("fp32")
        spearmans = [
            agreement(ref.score(q, docs), loop.run_until_complete(w8a8.score_request(ScoreRequest.of(q, docs))).scores)["spearman"]
            for q, docs, _ in eval_set(seed=5, n_queries=4)
        ]
    finally:
        loop.run_until_complete(w8a8.aclose())
    assert min(spearmans) >= 0.9, spearmans
