"""The peers' request shapes as models, no Ray (issue 25): what each field does, the choices where
the peers disagree (top_n 0 and null, returned documents, raw scores, max_tokens_per_doc null),
the fields accepted and ignored per route, the score API's pairing, and errors that name the
field whichever shape a route's body chose. Over HTTP, with each client's own bodies:
`test_serve_clients.py`."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from engine.errors import InputError
from serve.arm_result import ArmResult
from serve.errors import error_response
from serve.protocol import (
    CohereRerankRequest,
    CohereRerankResponse,
    JinaRerankRequest,
    JinaRerankResponse,
    RerankOutcome,
    ServingMeta,
    TEIRerankRequest,
    TEIRerankResponse,
)
from serve.protocol_vllm import SCORE_SHAPES, RerankBody, ScoreBody, ScoreResponse, VllmRerankRequest, VllmRerankResponse

META = ServingMeta(arm="fp32", precision="fp32", model="tiny", routed_by="weighted")
DOCUMENT_SHAPES = (CohereRerankRequest, JinaRerankRequest, VllmRerankRequest)
IMAGE = "data:image/png;base64,iVBORw0KGgo="
REPO = Path(__file__).resolve().parents[2]


def internal(model, body: dict):
    return model.model_validate(body).to_internal()


def locs(exc: ValidationError) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in exc.errors()]


def test_top_n_zero_and_null_answer_every_document_and_a_negative_one_is_refused_by_name():
    """The peers disagree: vLLM answers all for 0 and refuses null, infinity refuses 0 and answers
    all for null, Xinference answers none for 0. Chosen: 0 and null both mean all (no client
    breaks, and an empty answer is never what a client wants); a negative top_n is refused, as
    vLLM refuses it."""
    for model in DOCUMENT_SHAPES:
        body = {"query": "q", "documents": ["a", "b", "c"]}
        assert [internal(model, {**body, "top_n": n}).top_n for n in (0, None, 2, 9)] == [None, None, 2, 9]
        with pytest.raises(ValidationError) as e:
            model.model_validate({**body, "top_n": -1})
        assert locs(e.value) == ["top_n"]
    # TEI has no top_n: it answers every text whatever a client sends (rerankers' TEI provider sends one).
    tei = internal(TEIRerankRequest, {"query": "q", "texts": ["a", "b"], "top_n": 1})
    outcome = RerankOutcome(scores=[0.2, 0.9], meta=META)
    assert [r.index for r in TEIRerankResponse.build(tei, outcome, "r").root] == [1, 0]


def test_max_tokens_per_doc_null_zero_and_a_value():
    """Cohere's default (4096) when null, which LangChain always sends; vLLM's 0 is no cut; a value cuts."""
    body = {"query": "q", "documents": ["a"]}
    assert [internal(CohereRerankRequest, {**body, "max_tokens_per_doc": v}).max_tokens_per_doc for v in (None, 0, 10)] == [4096, None, 10]
    for model in (JinaRerankRequest, VllmRerankRequest):
        assert [internal(model, {**body, "max_tokens_per_doc": v}).max_tokens_per_doc for v in (None, 0, 10)] == [None, None, 10]
    score = TypeAdapter(ScoreBody).validate_python({"queries": "q", "documents": "a", "max_tokens_per_doc": 10}).to_internal()
    assert score.max_tokens_per_doc == 10


def test_raw_scores_are_the_same_logits_whichever_field_asks():
    """TEI's and infinity's raw_scores and vLLM's use_activation false give log(s/(1-s)); the
    default (use_activation null or true) is the probability, as in vLLM."""
    outcome = RerankOutcome(scores=[0.25, 0.75], meta=META, tokens=12)
    logits = {0: -math.log(3), 1: math.log(3)}
    raw_bodies = [
        (CohereRerankRequest, CohereRerankResponse, {"query": "q", "documents": ["a", "b"], "use_activation": False}),
        (JinaRerankRequest, JinaRerankResponse, {"query": "q", "documents": ["a", "b"], "use_activation": False}),
        (VllmRerankRequest, VllmRerankResponse, {"query": "q", "documents": ["a", "b"], "use_activation": False}),
        (VllmRerankRequest, VllmRerankResponse, {"query": "q", "documents": ["a", "b"], "raw_scores": True}),
    ]
    for model, shape, body in raw_bodies:
        results = shape.build(internal(model, body), outcome, "r").results
        assert {r.index: r.relevance_score for r in results} == pytest.approx(logits)
        for plain in (None, True):
            results = shape.build(internal(model, {**body, "use_activation": plain, "raw_scores": False} if model is VllmRerankRequest
                                           else {**body, "use_activation": plain}), outcome, "r").results  # fmt: skip
            assert {r.index: r.relevance_score for r in results} == {0: 0.25, 1: 0.75}
    tei = TEIRerankResponse.build(internal(TEIRerankRequest, {"query": "q", "texts": ["a", "b"], "raw_scores": True}), outcome, "r")
    assert {r.index: r.score for r in tei.root} == pytest.approx(logits)
    score = TypeAdapter(ScoreBody).validate_python({"text_1": "q", "text_2": ["a", "b"], "use_activation": False}).to_internal()
    data = ScoreResponse.build(score, outcome, "r").data
    assert [d.index for d in data] == [0, 1] and [d.score for d in data] == pytest.approx([logits[0], logits[1]])  # pair order


def test_one_document_alone_is_one_document_and_content_parts_come_back_as_vllm_returns_them():
    """vLLM's `"documents": {"content": [...]}` is one document whose parts are all of it (vLLM's
    newest reading; older vLLM made each part a document). An OpenAI image part's `detail` is
    accepted and ignored."""
    parts = [{"type": "text", "text": "a cat"}, {"type": "image_url", "image_url": {"url": IMAGE, "detail": "high"}}]
    for model in DOCUMENT_SHAPES:
        req = internal(model, {"query": "q", "documents": {"content": parts}, "return_documents": True})
        (doc,) = req.documents
        assert (doc.text, [m.ref for m in doc.images], doc.field) == ("a cat", [IMAGE], "documents.0")
        assert doc.images[0].field == "documents.0.content.1.image_url"
        assert req.documents_echo == [{"multi_modal": parts}]  # vLLM's RerankDocument; its null text left out
    assert [d.text for d in internal(VllmRerankRequest, {"query": "q", "documents": "a bare string"}).documents] == ["a bare string"]


def test_returned_documents_per_shape():
    """Cohere: only when asked; Jina and vLLM: by default, as objects ({text} for a string);
    infinity's return_documents true: a text document as its string (other documents stay
    objects), false: none."""
    docs = ["a", {"text": "b"}, {"content": [{"type": "text", "text": "c"}]}, {"image": IMAGE}]
    outcome = RerankOutcome(scores=[0.4, 0.3, 0.2, 0.1], meta=META)

    def documents(model, shape, **fields):
        return [r.document for r in shape.build(internal(model, {"query": "q", "documents": docs, **fields}), outcome, "r").results]

    objects = [{"text": "a"}, {"text": "b"}, {"multi_modal": [{"type": "text", "text": "c"}]}, {"image": IMAGE}]
    assert documents(CohereRerankRequest, CohereRerankResponse) == [None] * 4
    assert documents(CohereRerankRequest, CohereRerankResponse, return_documents=True) == objects
    assert documents(JinaRerankRequest, JinaRerankResponse) == objects == documents(JinaRerankRequest, JinaRerankResponse, return_documents=None)
    assert documents(VllmRerankRequest, VllmRerankResponse) == objects
    assert documents(VllmRerankRequest, VllmRerankResponse, return_documents=True) == ["a", "b", *objects[2:]]
    assert documents(VllmRerankRequest, VllmRerankResponse, return_documents=False) == [None] * 4


# Every field a route accepts and ignores, with a value a peer sends (each peer's source in README's
# "Routes and clients" table). None of them changes the internal request.
IGNORED = {
    CohereRerankRequest: {
        "rank_fields": ["text", "title"], "max_chunks_per_doc": 5, "relevant_spans": {"mode": "enabled"}, "priority": 0,
        "truncate_prompt_tokens": 512, "max_tokens_per_query": 16, "truncation_side": "left", "padding": "do_not_pad",
        "request_id": "r-1", "mm_processor_kwargs": {"fps": 1}, "cache_salt": "salt", "chat_template_kwargs": {"x": 1},
    },
    JinaRerankRequest: {
        "rank_fields": None, "max_chunks_per_doc": None, "return_len": None, "kwargs": "{}", "priority": 3,
        "truncate_prompt_tokens": -1, "max_tokens_per_query": 0, "truncation_side": "right", "padding": "max_length",
        "request_id": "r-2", "mm_processor_kwargs": None, "cache_salt": None, "chat_template_kwargs": None,
    },
    VllmRerankRequest: {
        "truncate_prompt_tokens": 99, "max_tokens_per_query": 0, "truncation_side": None, "padding": None, "request_id": "r-3",
        "priority": 0, "mm_processor_kwargs": {}, "cache_salt": "s", "chat_template_kwargs": {"enable_thinking": False},
    },
    TEIRerankRequest: {"model": "BAAI/bge-reranker-base", "top_n": 2, "truncate": None, "truncation_direction": "left"},
}  # fmt: skip


@pytest.mark.parametrize("model", list(IGNORED), ids=lambda m: m.__name__)
def test_fields_a_peer_sends_are_accepted_and_change_nothing(model):
    docs_field = "texts" if model is TEIRerankRequest else "documents"
    plain = {"query": "q", docs_field: ["a", "b"]}
    assert internal(model, {**plain, **IGNORED[model]}) == internal(model, plain)
    for name in IGNORED[model]:
        assert re.search(r"accepted and ignored|ignored, as TEI does|accepted for compatibility", model.model_fields[name].description, re.I), name
    # A misspelt field is still refused by name, and a wrong value of an ignored field too.
    with pytest.raises(ValidationError) as e:
        model.model_validate({**plain, "top_k": 3})
    assert locs(e.value) == ["top_k"]


def test_wrong_values_of_accepted_fields_are_refused_by_name():
    body = {"query": "q", "documents": ["a"]}
    for field, value in [("truncate_prompt_tokens", -2), ("padding", "left"), ("use_activation", "no"), ("cache_salt", ""), ("max_tokens_per_doc", -1)]:
        with pytest.raises(ValidationError) as e:
            VllmRerankRequest.model_validate({**body, field: value})
        assert locs(e.value)[0] == field, field


def test_score_pairs_one_to_one_one_to_n_and_n_to_n_and_names_a_mismatch():
    score = TypeAdapter(ScoreBody)
    one = score.validate_python({"queries": "q", "documents": "d"}).to_internal()
    assert (one.query.field, [d.field for d in one.documents], one.pair_queries) == ("queries.0", ["documents.0"], None)
    many = score.validate_python({"queries": ["q"], "items": ["a", "b"]}).to_internal()
    assert (many.documents_field, [d.text for d in many.documents], len(many.parts())) == ("items", ["a", "b"], 1)
    paired = score.validate_python({"data_1": ["q", "r"], "data_2": ["a", "b"]}).to_internal()
    assert [(p.query.text, [d.text for d in p.documents]) for p in paired.parts()] == [("q", ["a"]), ("r", ["b"])]
    assert [q.field for q in paired.pair_queries] == ["data_1.0", "data_1.1"]
    with pytest.raises(InputError) as e:
        score.validate_python({"text_1": ["q", "r"], "text_2": ["a", "b", "c"]}).to_internal()
    assert e.value.field == "text_2" and "1:1, 1:N or N:N" in e.value.problem
    assert set(SCORE_SHAPES) == {"shape:queries/documents", "shape:queries/items", "shape:data_1/data_2", "shape:text_1/text_2"}


def test_n_to_n_pairs_are_scored_as_one_engine_request_per_run_of_the_same_query():
    req = TypeAdapter(ScoreBody).validate_python(
        {"queries": ["q", {"text": "q"}, "r", "q"], "documents": ["a", "b", "c", {"image": IMAGE}]}
    ).to_internal()
    parts = req.parts()
    assert [(p.query.text, [d.field for d in p.documents]) for p in parts] == [
        ("q", ["documents.0", "documents.1"]), ("r", ["documents.2"]), ("q", ["documents.3"])]  # fmt: skip
    assert [p.query.field for p in parts] == ["queries.0", "queries.2", "queries.3"]
    assert all(p.pair_queries is None for p in parts)
    merged = ArmResult.concat([ArmResult([0.1, 0.2], "a", "fp32", "m", 1, 0, 2, {"hit": 1}, 10),
                               ArmResult([0.3], "a", "fp32", "m", 0, 1, 1, {"hit": 1, "miss": 1}, 5)])  # fmt: skip
    assert (merged.scores, merged.cache_hits, merged.cache_misses, merged.batch_requests, merged.cache_events, merged.tokens) == (
        [0.1, 0.2, 0.3], 1, 1, 2, {"hit": 2, "miss": 1}, 15)  # fmt: skip


@pytest.mark.parametrize(
    "union, body, field",
    [
        (RerankBody, {"query": "q", "texts": [1]}, "texts.0"),
        (RerankBody, {"query": "q"}, "documents"),
        (RerankBody, {"query": "q", "documents": ["a"], "top_n": -1}, "top_n"),
        (RerankBody, [1], "body"),
        (ScoreBody, {"queries": "q"}, "documents"),
        (ScoreBody, {"queries": "q", "items": ["a"], "documents": ["b"]}, "documents"),
        (ScoreBody, {"text_1": "a", "text_2": [{"content": [{"type": "image_url"}]}]}, "text_2.0.content.0.image_url"),
        (ScoreBody, {"data_1": "a", "data_2": "b", "use_activation": 3}, "use_activation"),
    ],
)
def test_a_body_union_names_the_field_not_the_shape_it_chose(union, body, field):
    with pytest.raises(ValidationError) as e:
        TypeAdapter(union).validate_python(body)
    errors = [{**err, "loc": ("body", *err["loc"])} for err in e.value.errors()]
    err = json.loads(error_response(RequestValidationError(errors)).body)["error"]
    assert (err["code"], err["field"]) == (422, field), err


def test_every_accepted_and_ignored_field_is_listed_in_the_readme_for_its_route():
    """README's "Routes and clients" lists, per route, the fields accepted and ignored: the models' lists."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Fields accepted and ignored") :]
    section = section[: section.index("\n#", 1)]
    routes = {"`/v2/rerank`": CohereRerankRequest, "`/v1/rerank`": JinaRerankRequest, "`/rerank` with `texts`": TEIRerankRequest,
              "`/rerank` with `documents`": VllmRerankRequest, "`/score`, `/v1/score`": SCORE_SHAPES["shape:queries/documents"]}  # fmt: skip
    for route, model in routes.items():
        line = next(line for line in section.splitlines() if line.startswith(f"| {route} |"))
        listed = set(re.findall(r"`(\w+)`", line.split("|")[2]))
        ignored = {name for name, f in model.model_fields.items() if re.search(r"accepted and ignored|ignored, as TEI does|accepted for compatibility", f.description, re.I)}
        assert listed == ignored, (route, sorted(listed ^ ignored))
