"""The arm replica's batch logic: a real `Arm-fp32` deployment on the session's Ray cluster, called
through its DeploymentHandle with the real tiny engine. Concurrent requests share one engine
call, a bad request fails alone, cache hits give identical scores, images known only by digest
are resolved from the cache or asked for, and batching limits follow `reconfigure`.

(Serve's in-process `_local_testing_mode` cannot run `@serve.batch` in Ray 2.60: the batch queue
asks for a replica context that mode does not set.)

Batches are made deterministic without timing: `max_batch_size` equals the number of requests
sent at once and `batch_wait_timeout_s` is long, so a batch closes exactly when all have arrived."""

from __future__ import annotations

import base64

import pytest
from serving_testkit import png_bytes

from serve.arm import ArmReplica, ArmResult, ImagesNeeded, InputRejected, ScoreJob
from serve.engine.errors import EmptyInput, ImageDecodeError
from serve.engine.inputs import RerankItem, ScorePair, image_digest
from serve.fetch import ImageRef


pytestmark = pytest.mark.ray

APP = "arm-under-test"


def deploy_arm(tiny_model, max_batch_size: int):
    """(Re)deploy the arm alone (no HTTP route); a changed batching config is applied in place."""
    from ray import serve

    from serve.app import arm_options
    from serve.config import FleetConfig

    config = {
        "model": {"source": str(tiny_model)},
        "arms": [{"name": "fp32", "precision": "fp32", "ray_actor_options": {"num_cpus": 0.5}}],
    }  # fmt: skip
    options = arm_options(FleetConfig.from_dict(config).arms[0])
    options["user_config"] = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": 1.0}
    return serve.run(ArmReplica.options(**options).bind(config, "fp32"), name=APP, route_prefix=None)


@pytest.fixture(scope="module")
def replica(ray_serve, tiny_model):
    from ray import serve

    handle = deploy_arm(tiny_model, max_batch_size=4)
    yield handle
    serve.delete(APP)


@pytest.fixture(scope="module")
def engine(engine_for):
    """The same model as a plain engine, for the reference scores."""
    return engine_for("fp32")


def text_job(*docs: str, query: str = "a red circle") -> ScoreJob:
    q = RerankItem(text=query)
    return ScoreJob(pairs=tuple(ScorePair(q, RerankItem(text=d), None, "query", f"documents.{i}") for i, d in enumerate(docs)))


def image_job(*images: bytes, query: str = "a red circle") -> ScoreJob:
    q = RerankItem(text=query)
    pairs = tuple(ScorePair(q, RerankItem(images=(img,)), None, "query", f"documents.{i}") for i, img in enumerate(images))
    return ScoreJob(pairs=pairs, image_fields={image_digest(img): f"documents.{i}.image" for i, img in enumerate(images)})


def run_concurrently(replica, *jobs):
    """Submit all jobs at once (so they can share a batch); each outcome or its exception."""
    responses = [replica.score.remote(j) for j in jobs]
    out = [r.result(timeout_s=300) for r in responses]
    return [o.to_error() if isinstance(o, InputRejected) else o for o in out]


def test_concurrent_requests_share_one_engine_call_and_bad_ones_fail_alone(replica, engine):
    good_text = text_job("a red circle", "a blue square")
    not_an_image = image_job(b"these bytes are not an image")
    empty_doc = ScoreJob(pairs=(ScorePair(RerankItem(text="q"), RerankItem(), None, "query", "documents.0"),))
    good_image = image_job(png_bytes((220, 40, 40), seed=101))
    out = run_concurrently(replica, good_text, not_an_image, empty_doc, good_image)  # one batch of 4
    assert isinstance(out[1], ImageDecodeError) and out[1].field == "documents.0.image"
    assert isinstance(out[2], EmptyInput) and out[2].field == "documents.0"
    for result, job in ((out[0], good_text), (out[3], good_image)):
        assert isinstance(result, ArmResult) and result.arm == "fp32" and result.precision == "fp32"
        # Merged with the others, yet the same as scoring this request alone on the engine (up to
        # float32 rounding: another batch composition pads and sums in another order).
        assert result.scores == pytest.approx(engine.score_pairs(list(job.pairs)), abs=1e-5)
    # The undecodable image was dropped before the engine call; the other three shared it (the
    # empty document then failed it, and the per-request retry isolated that one).
    assert out[0].batch_requests == out[3].batch_requests == 3


def test_cache_hit_gives_identical_scores(replica):
    job = image_job(png_bytes((40, 80, 220), seed=202), png_bytes((40, 170, 60), seed=203), query="a blue square")
    first, second = run_concurrently(replica, job)[0], run_concurrently(replica, job)[0]  # batches of 1 (wait timeout)
    assert (first.cache_hits, first.cache_misses) == (0, 2)
    assert (second.cache_hits, second.cache_misses) == (2, 0)
    assert second.scores == first.scores
    assert second.cache_events.get("hit_local") == 2


def test_image_refs_are_resolved_from_cache_or_asked_for(replica):
    img = png_bytes((230, 210, 40), seed=303)
    digest = image_digest(img)
    ref_job = ScoreJob(
        pairs=(ScorePair(RerankItem(text="a yellow circle"), RerankItem(images=(ImageRef(digest, "https://x/y.png", "documents.0.image"),)),
                         None, "query", "documents.0"),),
        image_fields={digest: "documents.0.image"},
    )  # fmt: skip
    asked = run_concurrently(replica, ref_job)[0]
    assert asked == ImagesNeeded((digest,))
    with_bytes = run_concurrently(replica, image_job(img, query="a yellow circle"))[0]
    by_ref = run_concurrently(replica, ref_job)[0]
    assert isinstance(by_ref, ArmResult) and by_ref.cache_hits == 1
    assert by_ref.scores == with_bytes.scores


def test_batch_size_follows_reconfigure(replica):
    """Batching limits come from `user_config` through `reconfigure`, applied to the running replica
    (a Serve config redeploy that changes only `user_config` calls it the same way)."""
    out = run_concurrently(replica, *(text_job(f"doc {i}") for i in range(4)))
    assert [r.batch_requests for r in out] == [4, 4, 4, 4]
    before = replica.describe.remote().result(timeout_s=60)
    try:
        replica.reconfigure.remote({"max_batch_size": 1, "batch_wait_timeout_s": 1.0}).result(timeout_s=60)
        out = run_concurrently(replica, *(text_job(f"doc {i}") for i in range(3)))
        assert [r.batch_requests for r in out] == [1, 1, 1]
        after = replica.describe.remote().result(timeout_s=60)
        assert (before["max_batch_size"], after["max_batch_size"]) == (4, 1) and after["pid"] == before["pid"]
    finally:
        replica.reconfigure.remote({"max_batch_size": 4, "batch_wait_timeout_s": 1.0}).result(timeout_s=60)


def test_max_tokens_per_doc_truncates_document_text(replica, engine):
    long_doc = "red circle " * 200
    full = run_concurrently(replica, text_job(long_doc))[0].scores
    cut_job = ScoreJob(pairs=text_job(long_doc).pairs, max_tokens_per_doc=8)
    cut = run_concurrently(replica, cut_job)[0].scores
    tok = engine.tokenizer
    short = tok.decode(tok(long_doc, add_special_tokens=False)["input_ids"][:8])
    assert cut == engine.score_pairs([ScorePair(RerankItem(text="a red circle"), RerankItem(text=short), None)])
    assert cut != full


def test_base64_roundtrip_sanity():
    # The image helper produces real, distinct PNGs (guards the fixtures above).
    a, b = png_bytes(seed=1), png_bytes(seed=2)
    assert a[:4] == b"\x89PNG" and a != b and base64.b64decode(base64.b64encode(a)) == a
