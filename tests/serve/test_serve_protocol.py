"""Request parsing (three API shapes, three item shapes), limits, and response building."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from engine.errors import InputError
from serve.config import LimitsConfig
from serve.protocol import (
    CohereRerankRequest,
    CohereRerankResponse,
    JinaRerankRequest,
    JinaRerankResponse,
    RerankOutcome,
    ServingMeta,
    TEIRerankRequest,
    TEIRerankResponse,
    logit,
)

META = ServingMeta(arm="fp32", precision="fp32", model="tiny", routed_by="weighted")


def locs(exc: ValidationError) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in exc.errors()]


def test_cohere_plain_strings():
    req = CohereRerankRequest.model_validate(
        {"model": "m", "query": "red", "documents": ["a", "b"], "top_n": 1, "return_documents": True, "user": "u1"}
    ).to_internal()
    assert req.api == "cohere" and req.query.text == "red" and req.query.field == "query"
    assert [d.text for d in req.documents] == ["a", "b"]
    assert [d.field for d in req.documents] == ["documents.0", "documents.1"]
    assert req.documents_echo == [{"text": "a"}, {"text": "b"}]
    assert (req.top_n, req.return_documents, req.user, req.max_tokens_per_doc) == (1, True, "u1", 4096)


def test_multimodal_item_shapes_and_field_paths():
    req = JinaRerankRequest.model_validate(
        {
            "query": {"text": "a red circle", "image": "data:image/png;base64,AAAA"},
            "documents": [
                {"image": ["https://x/1.png", "https://x/2.png"]},
                {"content": [{"type": "image_url", "image_url": {"url": "https://x/3.png"}}, {"type": "text", "text": "cap"},
                             {"type": "text", "text": "tion"}]},
                {"content": [{"type": "image", "image": "QUJD"}, {"type": "video", "video": ["f0", "f1"]}]},
                {"content": [{"type": "video_url", "video_url": "https://x/v.mp4"}]},
                {"video": "https://x/v2.mp4", "text": "clip"},
            ],
        }
    ).to_internal()  # fmt: skip
    q = req.query
    assert q.text == "a red circle" and [m.field for m in q.images] == ["query.image"]
    d0, d1, d2, d3, d4 = req.documents
    assert [m.ref for m in d0.images] == ["https://x/1.png", "https://x/2.png"]
    assert [m.field for m in d0.images] == ["documents.0.image.0", "documents.0.image.1"]
    assert d1.text == "caption" and d1.images[0].ref == "https://x/3.png"  # text parts back to back, as the template
    assert d1.images[0].field == "documents.1.content.0.image_url"
    assert d2.images[0].field == "documents.2.content.0.image"
    assert [f.field for f in d2.videos[0].frames] == ["documents.2.content.1.video.0", "documents.2.content.1.video.1"]
    assert d3.videos[0].source.ref == "https://x/v.mp4" and d3.videos[0].field == "documents.3.content.0.video_url"
    assert d4.videos[0].source.field == "documents.4.video" and d4.text == "clip"
    assert req.return_documents is True  # Jina's default


@pytest.mark.parametrize(
    "documents, expected_loc",
    [
        ([{"text": 3}], "documents.0.text"),
        ([{"imag": "x"}], "documents.0.imag"),
        ([{"content": [{"type": "image_url"}]}], "documents.0.content.0.image_url.image_url"),  # the part's kind, then its field
        ([{"content": [{"type": "image", "image": "x", "text": "y"}]}], "documents.0.content.0.image.text"),
        ([{"content": [{"type": "audio", "audio": "x"}]}], "documents.0.content.0"),
        ([{"text": None}], "documents.0.text"),
        ([{"content": [], "text": "x"}], "documents.0.content"),
        ([], "documents"),
        ([7], "documents.0"),
    ],
)
def test_malformed_items_name_the_field(documents, expected_loc):
    with pytest.raises(ValidationError) as e:
        CohereRerankRequest.model_validate({"query": "q", "documents": documents})
    assert expected_loc in locs(e.value)


def test_content_and_fields_together_rejected():
    with pytest.raises(ValidationError) as e:
        JinaRerankRequest.model_validate({"query": "q", "documents": [{"text": "t", "content": [{"type": "text", "text": "x"}]}]})
    assert "documents.0" in locs(e.value) and "not both" in str(e.value)


def test_unknown_top_level_field_and_bad_top_n():
    with pytest.raises(ValidationError) as e:
        CohereRerankRequest.model_validate({"query": "q", "documents": ["a"], "top_k": 3, "top_n": -1})
    assert {"top_k", "top_n"} <= set(locs(e.value))


def test_empty_items_are_kept_for_null_and_several_videos_per_side_are_accepted():
    req = CohereRerankRequest.model_validate({"query": "q", "documents": ["ok", {"text": ""}, {}]}).to_internal()
    # Official: an item with nothing is scored as NULL; an empty string is text, rendered as nothing.
    assert [(d.text, d.images, d.videos) for d in req.documents] == [("ok", [], []), ("", [], []), (None, [], [])]
    # Official `format_mm_content` takes a list of videos per side: each becomes a video part, in order.
    two = JinaRerankRequest.model_validate(
        {"query": {"content": [{"type": "video", "video": "a"}, {"type": "video_url", "video_url": "b"}]}, "documents": ["d"]}
    ).to_internal()
    assert [(v.source.ref, v.field) for v in two.query.videos] == [("a", "query.content.0.video"), ("b", "query.content.1.video_url")]


def test_limits_name_the_field():
    limits = LimitsConfig(max_documents=2, max_text_chars=5, max_images_per_item=1, max_video_frames=2)
    too_many = TEIRerankRequest.model_validate({"query": "q", "texts": ["a", "b", "c"]}).to_internal()
    with pytest.raises(InputError) as e:
        too_many.check_limits(limits)
    assert e.value.field == "texts" and "3 documents" in e.value.problem
    cases = [
        ({"query": "q", "documents": ["a", "toolong"]}, "documents.1"),
        ({"query": {"image": ["x", "y"]}, "documents": ["a"]}, "query"),
        ({"query": "q", "documents": [{"video": ["1", "2", "3"]}]}, "documents.0.video"),
        ({"query": "q", "documents": ["a"], "instruction": "longer"}, "instruction"),
    ]
    for body, field in cases:
        with pytest.raises(InputError) as e:
            CohereRerankRequest.model_validate(body).to_internal().check_limits(limits)
        assert e.value.field == field


def test_cohere_and_jina_responses_sorted_with_meta():
    req = CohereRerankRequest.model_validate({"query": "q", "documents": ["a", "b", "c"], "top_n": 2, "return_documents": True})
    outcome = RerankOutcome(scores=[0.2, 0.9, 0.5], meta=META, tokens=57)
    assert RerankOutcome(scores=[0.5], meta=META).tokens == 0
    resp = CohereRerankResponse.build(req.to_internal(), outcome, "rid").model_dump(exclude_none=True)
    assert [r["index"] for r in resp["results"]] == [1, 2]
    assert resp["results"][0] == {"index": 1, "relevance_score": 0.9, "document": {"text": "b"}}
    assert resp["meta"]["arm"] == "fp32" and resp["meta"]["api_version"]["version"] == "2"
    jreq = JinaRerankRequest.model_validate({"query": "q", "documents": ["a", "b", "c"], "return_documents": False})
    jresp = JinaRerankResponse.build(jreq.to_internal(), outcome, "rid").model_dump(exclude_none=True)
    assert [r["index"] for r in jresp["results"]] == [1, 2, 0] and "document" not in jresp["results"][0]
    assert jresp["model"] == "tiny" and jresp["meta"]["precision"] == "fp32" and jresp["id"] == "rid"
    assert jresp["usage"] == {"prompt_tokens": 57, "total_tokens": 57}  # the tokens the decoder ran for this request


def test_tei_raw_scores_are_logits_and_text_returned():
    req = TEIRerankRequest.model_validate({"query": "q", "texts": ["a", "b"], "raw_scores": True, "return_text": True})
    outcome = RerankOutcome(scores=[0.25, 0.75], meta=META)
    resp = TEIRerankResponse.build(req.to_internal(), outcome, "rid").model_dump(exclude_none=True)
    assert resp == [{"index": 1, "score": pytest.approx(math.log(3)), "text": "b"},
                    {"index": 0, "score": pytest.approx(-math.log(3)), "text": "a"}]  # fmt: skip
    assert logit(1.0) == 30.0 and logit(0.0) == -30.0 and logit(0.5) == 0.0
    plain = TEIRerankResponse.build(TEIRerankRequest.model_validate({"query": "q", "texts": ["a", "b"]}).to_internal(), outcome, "r")
    assert plain.model_dump(exclude_none=True) == [{"index": 1, "score": 0.75}, {"index": 0, "score": 0.25}]


def test_every_request_field_is_described():
    from serve.protocol_vllm import SCORE_SHAPES, VllmRerankRequest

    for model in (CohereRerankRequest, JinaRerankRequest, TEIRerankRequest, VllmRerankRequest, *SCORE_SHAPES.values()):
        undocumented = [name for name, f in model.model_fields.items() if not f.description]
        assert undocumented == [], (model.__name__, undocumented)
