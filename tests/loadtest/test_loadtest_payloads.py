"""Traffic generation: shapes, shares, the image pool's repeats, determinism, and that every body
is a valid Cohere v2 request of the real protocol model."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from loadtest.payloads import ImagePool, TrafficConfig, TrafficGenerator, arm_of_request_name, pinned_class_name, request_name


def _images(body: dict) -> list[str]:
    return [d["image"] for d in body["documents"] if isinstance(d, dict)]


def _texts(body: dict) -> list[str]:
    return [d for d in body["documents"] if isinstance(d, str)]


def test_body_is_a_valid_cohere_request_with_decodable_pngs():
    from serve.protocol import CohereRerankRequest

    cfg = TrafficConfig(docs=12, image_share=0.5, pool_size=3, repeat_rate=0.5, top_n=20, seed=3)
    gen = TrafficGenerator(cfg, ImagePool(cfg.pool_size, cfg.seed), stream=0)
    for _ in range(5):
        generated = gen.next_request()
        internal = CohereRerankRequest.model_validate(generated.body).to_internal()
        assert len(internal.documents) == 12
        assert generated.body["top_n"] == 12  # capped at the number of documents
        assert generated.text_documents + generated.image_documents == 12
        for uri in _images(generated.body):
            assert uri.startswith("data:image/png;base64,")
            img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
            assert img.format == "PNG" and img.size == (96, 96)


def test_image_share_extremes():
    pool = ImagePool(2, 0)
    only_text = TrafficGenerator(TrafficConfig(docs=10, image_share=0.0), pool).next_request()
    only_images = TrafficGenerator(TrafficConfig(docs=10, image_share=1.0, repeat_rate=1.0), pool).next_request()
    assert len(_texts(only_text.body)) == 10 and only_text.image_documents == 0
    assert len(_images(only_images.body)) == 10 and only_images.text_documents == 0


def test_image_share_is_followed_over_many_documents():
    cfg = TrafficConfig(docs=50, image_share=0.3, repeat_rate=1.0, pool_size=4)
    gen = TrafficGenerator(cfg, ImagePool(cfg.pool_size, cfg.seed))
    images = sum(gen.next_request().image_documents for _ in range(20))
    assert 0.25 <= images / 1000 <= 0.35  # seeded: a fixed count, within sampling error of 0.3


def test_repeat_rate_one_reuses_only_pool_images_and_zero_never_does():
    cfg = TrafficConfig(docs=8, image_share=1.0, pool_size=3, repeat_rate=1.0)
    pool = ImagePool(cfg.pool_size, cfg.seed)
    repeated = [uri for _ in range(10) for uri in _images(TrafficGenerator(cfg, pool).next_request().body)]
    assert set(repeated) <= set(pool.uris) and len(repeated) == 80

    fresh_cfg = TrafficConfig(docs=8, image_share=1.0, pool_size=3, repeat_rate=0.0)
    gen = TrafficGenerator(fresh_cfg, pool)
    fresh = [uri for _ in range(4) for uri in _images(gen.next_request().body)]
    assert not set(fresh) & set(pool.uris)
    assert len(set(fresh)) == len(fresh) == 32  # every fresh image is new: a cache miss


def test_repeat_rate_between_mixes_pool_and_fresh_images():
    cfg = TrafficConfig(docs=20, image_share=1.0, pool_size=5, repeat_rate=0.75)
    pool = ImagePool(cfg.pool_size, cfg.seed)
    gen = TrafficGenerator(cfg, pool)
    requests = [gen.next_request() for _ in range(10)]
    pooled = sum(r.pool_images for r in requests)
    assert pooled == sum(uri in pool.uris for r in requests for uri in _images(r.body))
    assert 0.65 <= pooled / 200 <= 0.85


def test_text_documents_have_the_configured_length_and_keep_their_caption():
    from workshop.tiny import COLOURS, SHAPES

    cfg = TrafficConfig(docs=10, image_share=0.0, text_chars=300)
    texts = _texts(TrafficGenerator(cfg, ImagePool(1, 0)).next_request().body)
    assert all(len(t) == 300 for t in texts)
    for t in texts:  # the caption (colour and shape) opens the text; filler follows
        first_sentence = t.split(".")[0]
        assert any(c in first_sentence for c in COLOURS) and any(s in first_sentence for s in SHAPES)
    short = _texts(TrafficGenerator(TrafficConfig(docs=3, image_share=0.0, text_chars=5), ImagePool(1, 0)).next_request().body)
    assert all(len(t) == 5 for t in short)


def test_same_seed_and_stream_give_the_same_traffic_and_streams_differ():
    cfg = TrafficConfig(docs=6, pool_size=4, seed=11)
    a = TrafficGenerator(cfg, ImagePool(4, 11), stream=2)
    b = TrafficGenerator(cfg, ImagePool(4, 11), stream=2)
    c = TrafficGenerator(cfg, ImagePool(4, 11), stream=3)
    bodies_a = [a.next_request().body for _ in range(3)]
    assert bodies_a == [b.next_request().body for _ in range(3)]
    assert bodies_a != [c.next_request().body for _ in range(3)]
    assert ImagePool(4, 11).uris == ImagePool(4, 11).uris != ImagePool(4, 12).uris


def test_config_validation_and_environment_round_trip():
    with pytest.raises(ValueError, match="image_share"):
        TrafficConfig(image_share=1.5)
    with pytest.raises(ValueError, match="docs"):
        TrafficConfig(docs=0)
    with pytest.raises(ValueError, match="repeat_rate"):
        TrafficConfig(repeat_rate=-0.1)
    cfg = TrafficConfig(docs=16, text_chars=400, image_share=0.25, pool_size=64, repeat_rate=0.9, top_n=3, seed=7)
    env = cfg.to_env()
    assert env["RERANK_LOADTEST_DOCS"] == "16" and env["RERANK_LOADTEST_IMAGE_SHARE"] == "0.25"
    assert TrafficConfig.from_env(env) == cfg
    assert TrafficConfig.from_env({}) == TrafficConfig()


def test_names_shared_by_locustfile_runner_and_report():
    assert request_name("fp32") == "rerank[fp32]"
    assert arm_of_request_name(request_name("int8-awq")) == "int8-awq"
    assert arm_of_request_name("Aggregated") is None
    assert pinned_class_name("int8-awq") == "Pinned_int8_awq"


def test_capacity_is_the_best_step_within_the_slo():
    from loadtest.capacity import Step, capacity_of

    steps = [Step(1, 50, 0, 5.0, 100.0, 180.0), Step(2, 90, 0, 9.0, 150.0, 240.0), Step(4, 95, 0, 9.5, 300.0, 520.0)]
    assert capacity_of(steps, 500).users == 2  # 4 users: p95 over the SLO
    assert capacity_of(steps, 600).users == 4
    failing = [Step(1, 100, 5, 10.0, 50.0, 90.0)]  # 5 % failed: not within
    assert capacity_of(failing, 500) is None and capacity_of([], 500) is None
