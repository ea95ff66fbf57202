"""A vLLM arm behind the same router, API and experiments as any arm, over real HTTP: the same
requests pinned to the transformers arm and to the vLLM arm get the same scores (within 1e-5 in
fp32), shadowing the vLLM arm records its agreement, and the vLLM arm's images go through the
shared feature cache (a repeated image skips the vision tower; features one backend stored feed
the other). Runs in the vLLM environment
(`scripts/test.sh` runs `-m vllm` there); the start-failure test runs in both environments."""

from __future__ import annotations

import base64
import importlib.util
import time

import pytest
from media_testkit import picture, png
from serving_testkit import same_results

pytestmark = pytest.mark.ray
HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def b64(seed: int, width: int = 120, height: int = 90) -> str:
    return base64.b64encode(png(picture(width, height, seed))).decode()


BODIES = {
    "text pairs": {"query": "a red circle", "documents": ["a red circle", "a blue square", "a red cross"]},
    "image documents": {"query": "a red circle", "documents": [{"image": b64(1)}, {"text": "caption", "image": b64(2, 200, 150)}, {"image": b64(3, 600, 12)}]},
    "image query": {"query": {"text": "like this", "image": b64(1)}, "documents": ["a red circle", {"image": b64(2)}, {}]},
    "multi-image items": {"query": {"image": [b64(1), b64(2)]}, "documents": [{"text": "two", "image": [b64(2), b64(3, 600, 12), b64(1)]}, "x"]},
}


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="the vLLM environment (scripts/vllm-env.sh) runs this")
@pytest.mark.parametrize("name", list(BODIES))
def test_pinned_to_either_backend_the_scores_agree(vllm_app, name):
    scores = {}
    for arm in ("hf", "vllm"):
        r = vllm_app.client.post("/v2/rerank", json=BODIES[name], headers={"x-rerank-arm": arm})
        assert r.status_code == 200, r.text
        assert r.headers["x-rerank-arm"] == arm
        scores[arm] = {res["index"]: res["relevance_score"] for res in r.json()["results"]}
    assert scores["hf"].keys() == scores["vllm"].keys()
    assert max(abs(scores["hf"][i] - scores["vllm"][i]) for i in scores["hf"]) <= 1e-5, scores


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="the vLLM environment (scripts/vllm-env.sh) runs this")
def test_shadowing_vllm_against_transformers_records_agreement(vllm_app):
    docs = ["a red circle", "a blue square", "a green cross", "a red triangle", "a yellow circle", "a purple square"]
    for i in range(6):
        assert vllm_app.client.post("/v2/rerank", json={"query": f"a red circle {i}", "documents": docs}, headers={"x-rerank-arm": "hf"}).status_code == 200
    deadline = time.monotonic() + 120
    while True:
        shadow = vllm_app.client.get("/v1/experiments").json()["arms"]["vllm"]["shadow"]
        if shadow["agreement"]["n"] >= 6 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    agreement = shadow["agreement"]
    assert agreement["n"] >= 6 and agreement["against"].get("hf", 0) >= 6 and shadow["errors"] == 0
    # Same precision, same model: the rankings agree exactly.
    assert agreement["spearman"] == pytest.approx(1.0) and agreement["ndcg"] == pytest.approx(1.0) and agreement["rbo"] == pytest.approx(1.0)


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="the vLLM environment (scripts/vllm-env.sh) runs this")
def test_the_vllm_arm_reads_and_fills_the_shared_feature_cache(vllm_app):
    """A new image sent to the vLLM arm is a miss, then a hit with the same scores; an image the
    transformers arm saw first is a hit on the vLLM arm (same vision weights and dtype: one cache
    key), served from Redis, since the two arms share no process."""
    def rerank(arm: str, image: str) -> dict:
        r = vllm_app.client.post("/v2/rerank", json={"query": "a red circle", "documents": [{"image": image}, "text"]}, headers={"x-rerank-arm": arm})
        assert r.status_code == 200, r.text
        return r.json()

    fresh = b64(41, 96, 64)
    first, second = rerank("vllm", fresh), rerank("vllm", fresh)
    assert first["meta"]["image_cache"] == {"hits": 0, "misses": 1}
    assert second["meta"]["image_cache"] == {"hits": 1, "misses": 0}
    assert same_results(second["results"], first["results"])

    seen_by_hf = b64(42, 80, 112)
    via_hf = rerank("hf", seen_by_hf)
    assert via_hf["meta"]["image_cache"] == {"hits": 0, "misses": 1}
    via_vllm = rerank("vllm", seen_by_hf)  # an arm stores new features before it answers
    assert via_vllm["meta"]["image_cache"] == {"hits": 1, "misses": 0}
    hf_scores = {r["index"]: r["relevance_score"] for r in via_hf["results"]}
    assert all(abs(r["relevance_score"] - hf_scores[r["index"]]) <= 1e-5 for r in via_vllm["results"])
    events = vllm_app.client.get("/v1/experiments").json()["arms"]["vllm"]["image_cache"]["events"]
    assert events.get("hit_redis", 0) >= 1, events


def test_a_vllm_arm_that_cannot_start_fails_naming_arm_backend_and_reason(ray_serve, tiny_model):
    """Without vLLM installed the reason is that; with it, fp8 on a CPU machine is refused. Either
    way the deployment fails at once with the arm, its backend and the reason in its message."""
    from ray import serve

    from serve.app import build_app

    fleet = {
        "model": {"source": str(tiny_model)},
        "arms": [{"name": "broken", "precision": "fp8", "backend": "vllm", "ray_actor_options": {"num_cpus": 0.5}}],
    }
    reason = "fp8 on the vllm backend needs a GPU" if HAVE_VLLM else "vllm is not installed"
    with pytest.raises(RuntimeError, match="Deploying application broken failed"):
        serve.run(build_app({"config": fleet}), name="broken", route_prefix="/broken")
    try:
        message = serve.status().applications["broken"].deployments["Arm-broken"].message
        assert "arm 'broken' (backend vllm, precision fp8) cannot start" in message and reason in message, message
    finally:
        serve.delete("broken")
