"""The arm replica: a real `Arm-fp32` deployment on the session's Ray cluster, called through its
DeploymentHandle with the real tiny engine. Requests of a batch prepare apart and share one
forward call; a bad request fails alone and never fails its neighbours; cache hits
give identical scores; an image sent by digest only is fetched by the arm itself; batching
limits follow `reconfigure`.

Batches are made deterministic without timing: `max_batch_size` equals the number of requests
that reach the batch at once and `batch_wait_timeout_s` is long, so a batch closes exactly when
all have arrived."""

from __future__ import annotations

import base64

import pytest
from serving_testkit import png_bytes

from engine.errors import ImageDecodeError, InputError
from engine.inputs import ImageInput, RerankItem, ScoreRequest
from serve.arm import ArmReplica
from serve.arm_result import ArmResult
from serve.errors import FeaturesMissing

pytestmark = pytest.mark.ray

APP = "arm-under-test"


def deploy_arm(tiny_model, max_batch_size: int, **limits):
    """(Re)deploy the arm alone (no HTTP route); a changed batching config is applied in place."""
    from ray import serve

    from serve.config import FleetConfig
    from serve.deploy_options import arm_options

    config = {
        "model": {"source": str(tiny_model)},
        # A batch wait of 1 s makes the replica's measured pairs/s low: a queue budget that never
        # binds keeps these tests about batching (admission has its own, tests/serve/test_admission.py).
        "arms": [{"name": "fp32", "precision": "fp32", "ray_actor_options": {"num_cpus": 0.5}, "queue_budget_s": 600}],
        "limits": {"allow_private_urls": True, **limits},
    }  # fmt: skip
    fleet = FleetConfig.from_dict(config)
    options = arm_options(fleet.arms[0], fleet.http.drain_grace_s)
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


def text_request(*docs: str, query: str = "a red circle") -> ScoreRequest:
    return ScoreRequest.of(query, list(docs))


def image_request(*images: bytes, query: str = "a red circle") -> ScoreRequest:
    return ScoreRequest.of(query, [RerankItem(images=(ImageInput.of(img, f"documents.{i}.image"),)) for i, img in enumerate(images)])


def _png_of(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def run_concurrently(replica, *requests):
    """Submit all at once (so they can share a batch); each result or its exception."""
    responses = [replica.score.remote(r) for r in requests]
    out = []
    for r in responses:
        try:
            out.append(r.result(timeout_s=300))
        except Exception as e:  # noqa: BLE001 - the test inspects it
            out.append(e)
    return out


def test_bad_requests_fail_alone_and_never_fail_their_batch(replica, engine):
    good_text = text_request("a red circle", "a blue square")
    not_an_image = image_request(b"these bytes are not an image")
    too_thin = image_request(_png_of(4020, 20))  # aspect ratio over 200
    lone_surrogate = text_request("fine", query="bad \ud800 query")
    good_image = image_request(png_bytes((220, 40, 40), seed=101))
    # Seven requests make one batch (max_batch_size 7): the three bad ones fail in prepare, each
    # alone, and the four good ones are forwarded together.
    good = [good_text, good_image, text_request("x"), text_request("y", "z")]
    replica.reconfigure.remote({"max_batch_size": 7, "batch_wait_timeout_s": 1.0}).result(timeout_s=60)
    try:
        out = run_concurrently(replica, good[0], not_an_image, too_thin, good[1], lone_surrogate, good[2], good[3])
    finally:
        replica.reconfigure.remote({"max_batch_size": 4, "batch_wait_timeout_s": 1.0}).result(timeout_s=60)
    bad = {1: (ImageDecodeError, "documents.0.image"), 2: (InputError, "documents.0.image"), 4: (InputError, "query.text")}
    for i, (kind, field) in bad.items():
        assert isinstance(out[i], kind) and out[i].field == field, repr(out[i])
    results = [out[0], out[3], out[5], out[6]]
    for result, request in zip(results, good):
        assert isinstance(result, ArmResult) and result.arm == "fp32" and result.precision == "fp32"
        # Merged with the others, yet the same as scoring this request alone on the engine (up to
        # float32 rounding: another batch composition pads and sums in another order).
        assert result.scores == pytest.approx(engine.forward([engine.prepare(request)])[0].scores, abs=1e-5)
        assert result.batch_requests == 4
    assert "lone surrogate" in out[4].problem


def test_cache_hit_gives_identical_scores(replica):
    request = image_request(png_bytes((40, 80, 220), seed=202), png_bytes((40, 170, 60), seed=203), query="a blue square")
    first, second = run_concurrently(replica, request)[0], run_concurrently(replica, request)[0]  # batches of 1 (wait timeout)
    assert (first.cache_hits, first.cache_misses) == (0, 2)
    assert (second.cache_hits, second.cache_misses) == (2, 0)
    assert second.scores == first.scores
    assert second.cache_events.get("hit_local") == 2 and first.cache_events.get("miss") == 2


def test_an_image_sent_by_digest_is_scored_from_cache_or_named_back(replica, media_server):
    """An image sent by digest only (the ingress memoised its URL) is scored from the arm's cache;
    one the arm has no features for is named back (`FeaturesMissing`: the ingress fetches media,
    the arm never does) and nothing is downloaded here."""
    url = media_server.url("/img.png")
    data = media_server.images["/img.png"]
    digest = ImageInput.of(data).digest
    digest_only = ScoreRequest.of("a red circle", [RerankItem(images=(ImageInput(digest, None, "documents.0.image", url),))])
    hits_before = media_server.hits.get("/img.png", 0)
    (missing,) = run_concurrently(replica, digest_only)
    assert isinstance(missing, FeaturesMissing) and missing.digests == [digest], repr(missing)
    with_bytes = run_concurrently(replica, image_request(data))[0]  # its features enter the cache
    again = run_concurrently(replica, digest_only)[0]
    assert isinstance(again, ArmResult) and again.cache_hits == 1 and again.scores == with_bytes.scores
    assert media_server.hits.get("/img.png", 0) == hits_before


def test_batch_size_follows_reconfigure(replica):
    """Batching limits come from `user_config` through `reconfigure`, applied to the running replica
    (a Serve config redeploy that changes only `user_config` calls it the same way)."""
    out = run_concurrently(replica, *(text_request(f"doc {i}") for i in range(4)))
    assert [r.batch_requests for r in out] == [4, 4, 4, 4]
    before = replica.describe.remote().result(timeout_s=60)
    try:
        replica.reconfigure.remote({"max_batch_size": 1, "batch_wait_timeout_s": 1.0}).result(timeout_s=60)
        out = run_concurrently(replica, *(text_request(f"doc {i}") for i in range(3)))
        assert [r.batch_requests for r in out] == [1, 1, 1]
        after = replica.describe.remote().result(timeout_s=60)
        assert (before["max_batch_size"], after["max_batch_size"]) == (4, 1) and after["pid"] == before["pid"]
    finally:
        replica.reconfigure.remote({"max_batch_size": 4, "batch_wait_timeout_s": 1.0}).result(timeout_s=60)


def test_requests_that_arrive_during_a_forward_pass_share_the_next_one(replica, engine):
    """Continuous batching, with no batch wait: the requests that arrive one by one while a forward
    pass runs are prepared meanwhile and merged into the next call. (Serve's `@serve.batch` closed
    a batch of one for each of them: 9 calls for these 9 requests.) The pauses between submissions
    only spread the arrivals; nothing here is timed."""
    import time

    slow = text_request(*(f"a long document about red circles and blue squares, number {i}" for i in range(256)))
    quick = [text_request(f"doc {i}", f"other {i}", query=f"query {i}") for i in range(8)]
    replica.reconfigure.remote({"max_batch_size": 32, "batch_wait_timeout_s": 0.0}).result(timeout_s=60)
    try:
        replica.score.remote(slow).result(timeout_s=300)  # warm
        first = replica.score.remote(slow)
        responses = []
        for request in quick:
            time.sleep(0.01)
            responses.append(replica.score.remote(request))
        out = [r.result(timeout_s=300) for r in responses]
        results = [first.result(timeout_s=300), *out]
    finally:
        replica.reconfigure.remote({"max_batch_size": 4, "batch_wait_timeout_s": 1.0}).result(timeout_s=60)
    forward_calls = sum(1 / r.batch_requests for r in results)  # each call counted once over its requests
    assert forward_calls <= 3, [r.batch_requests for r in results]
    for result, request in zip(out, quick):
        assert result.scores == pytest.approx(engine.forward([engine.prepare(request)])[0].scores, abs=1e-5)


def test_max_tokens_per_doc_truncates_document_text(replica, engine):
    long_doc = "red circle " * 200
    full = run_concurrently(replica, text_request(long_doc))[0]
    cut = run_concurrently(replica, ScoreRequest.of("a red circle", [long_doc], max_tokens_per_doc=8))[0]
    tok = engine.tokenizer
    short = tok.decode(tok(long_doc, add_special_tokens=False)["input_ids"][:8])
    assert cut.scores == pytest.approx(engine.score("a red circle", [short]), abs=1e-6)
    assert cut.scores != full.scores and cut.tokens < full.tokens


def test_base64_roundtrip_sanity():
    # The image helper produces real, distinct PNGs (guards the fixtures above).
    a, b = png_bytes(seed=1), png_bytes(seed=2)
    assert a[:4] == b"\x89PNG" and a != b and base64.b64decode(base64.b64encode(a)) == a
