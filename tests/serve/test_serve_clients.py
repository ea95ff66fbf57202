"""Drop-in clients over real HTTP (issue 25): the request bodies other clients send, copied from
their own sources (repository, file and commit at each), sent to the real app, and the Cohere
SDK and LangChain's CohereRerank themselves; each answered as the system it comes from answers
it (status, order and indices, top_n, documents, raw scores, usage, ids). The same pair scores
the same (<= 1e-5) on every route. One fp32 arm: every answer comes from the same weights.

Where this fleet answers differently from the peer, the test says so (README "Routes and clients")."""

from __future__ import annotations

import base64
import json
import math

import httpx
import pytest
from conftest import _arm, _deployed, _fleet
from media_testkit import mp4, picture

pytestmark = pytest.mark.ray
TOL = 1e-5


@pytest.fixture(scope="module")
def app(ray_serve, tiny_model):
    arm = _arm("fp32", 1.0)
    arm["precision"] = "fp32"
    with _deployed(ray_serve, "clients", "/clients", _fleet(tiny_model, [arm], None)) as app:
        yield app


def post(app, path: str, body, status: int = 200):
    r = app.client.post(path, json=body)
    assert r.status_code == status, (path, r.text)
    return r.json()


def ranked(results: list[dict], key: str = "relevance_score") -> dict[int, float]:
    """index -> score of a ranked answer, checked best first with distinct indices."""
    scores = [r[key] for r in results]
    assert scores == sorted(scores, reverse=True) and len({r["index"] for r in results}) == len(results)
    return {r["index"]: r[key] for r in results}


def pair_scores(app, query, documents) -> list[float]:
    """The reference: vLLM's score API, one query against the documents, in pair order."""
    return [d["score"] for d in post(app, "/score", {"queries": query, "documents": documents})["data"]]


def close(got: dict[int, float] | list[float], want: list[float]) -> bool:
    """Each score within TOL of the reference's for its index (a list: one score per pair)."""
    if isinstance(got, list):
        assert len(got) == len(want), (got, want)
        got = dict(enumerate(got))
    return bool(got) and all(abs(s - want[i]) <= TOL for i, s in got.items())


def logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


# ------------------------------------------------------------------------ Cohere, LangChain


def test_cohere_sdk_langchain_and_llamaindex_cohere_calls(app):
    """The Cohere SDK (cohere 5.21.1: what langchain-cohere 0.6 installs with; 7.3.1's bytes on the
    wire are sent raw below) over real HTTP, with the calls LangChain and LlamaIndex make."""
    import cohere
    from langchain_cohere import CohereRerank
    from langchain_core.documents import Document

    sent: list[tuple[str, dict]] = []
    http = httpx.Client(timeout=120, event_hooks={"request": [lambda r: sent.append((r.url.path, json.loads(r.read())))]})
    v2 = cohere.ClientV2(api_key="unused", base_url=app.base_url, httpx_client=http)
    query, docs = "a red circle", ["a blue square", "a red circle", "a green cross", "a red square"]
    want = pair_scores(app, query, docs)
    best = sorted(range(4), key=lambda i: -want[i])

    # LlamaIndex CohereRerank: run-llama/llama_index llama-index-integrations/postprocessor/
    # llama-index-postprocessor-cohere-rerank/llama_index/postprocessor/cohere_rerank/base.py @ 0a6ebbd5
    # `self._client.rerank(model=self.model, top_n=self.top_n, query=..., documents=texts)`, top_n 2.
    r = v2.rerank(model="rerank-v3.5", top_n=2, query=query, documents=docs)
    assert sent[-1] == ("/clients/v2/rerank", {"model": "rerank-v3.5", "query": query, "documents": docs, "top_n": 2})
    assert [x.index for x in r.results] == best[:2] and close({x.index: x.relevance_score for x in r.results}, want)
    assert r.id

    # LangChain CohereRerank: langchain-ai/langchain-cohere libs/cohere/langchain_cohere/rerank.py @ 100cc84b
    # passes max_tokens_per_doc=None, which the SDK sends as null (the v2 route refused it before).
    lc = CohereRerank(client=v2, model="rerank-v3.5")
    out = lc.rerank(docs, query)
    assert sent[-1][1] == {"model": "rerank-v3.5", "query": query, "documents": docs, "top_n": 3, "max_tokens_per_doc": None}
    assert [x["index"] for x in out] == best[:3] and close({x["index"]: x["relevance_score"] for x in out}, want)
    every = CohereRerank(client=v2, model="rerank-v3.5", top_n=None).rerank(docs, query)  # top_n null: all
    assert sent[-1][1]["top_n"] is None and [x["index"] for x in every] == best
    compressed = lc.compress_documents([Document(page_content=d) for d in docs], query)
    assert [d.page_content for d in compressed] == [docs[i] for i in best[:3]]
    assert abs(compressed[0].metadata["relevance_score"] - want[best[0]]) <= TOL

    # cohere 7.3.1 on the wire (/tmp/issue25/probe_cohere.py: the SDK over httpx.MockTransport),
    # LangChain's default call and CohereRerank(top_n=None):
    for body, n in [({"model": "m", "query": query, "documents": docs, "top_n": 3, "max_tokens_per_doc": None}, 3),
                    ({"model": "m", "query": query, "documents": docs, "top_n": None, "max_tokens_per_doc": None}, 4)]:  # fmt: skip
        results = post(app, "/v2/rerank", body)["results"]
        assert list(ranked(results)) == best[:n] and close(ranked(results), want)

    # The v1 SDK (cohere-ai/cohere-python src/cohere/raw_base_client.py @ bc495daa: POST v1/rerank)
    # with every optional field it has; rank_fields and max_chunks_per_doc are accepted and ignored.
    v1 = cohere.Client(api_key="unused", base_url=app.base_url, httpx_client=http)
    r1 = v1.rerank(model="m", query=query, documents=docs, top_n=2, return_documents=True, rank_fields=["text"], max_chunks_per_doc=5)
    assert sent[-1][0] == "/clients/v1/rerank" and sent[-1][1]["max_chunks_per_doc"] == 5
    assert [x.index for x in r1.results] == best[:2] and [x.document.text for x in r1.results] == [docs[i] for i in best[:2]]
    assert r1.id and close({x.index: x.relevance_score for x in r1.results}, want)
    http.close()


# ------------------------------------------------------------------------------- vLLM rerank

# vllm-project/vllm examples/pooling/score/rerank_api_online.py @ 33f12637 (POST /rerank)
VLLM_RERANK = {"model": "BAAI/bge-reranker-base", "query": "What is the capital of France?",
               "documents": ["The capital of Brazil is Brasilia.", "The capital of France is Paris.", "Horses and cows are both animals"]}  # fmt: skip


def test_vllm_rerank_body_on_each_rerank_route(app):
    """vLLM serves /rerank, /v1/rerank and /v2/rerank with one handler: its body is taken on each.
    /rerank and /v1/rerank answer vLLM's fields (id, model, usage, every document); /v2/rerank
    answers Cohere's (documents only when asked)."""
    want = pair_scores(app, VLLM_RERANK["query"], VLLM_RERANK["documents"])
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        r = app.client.post(path, json=VLLM_RERANK)
        assert r.status_code == 200, (path, r.text)
        body = r.json()
        assert body["id"] == r.headers["x-request-id"] and body["model"] == str(app.model)
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
        scores = ranked(body["results"])
        assert sorted(scores) == [0, 1, 2] and close(scores, want), path
        documents = {x["index"]: x.get("document") for x in body["results"]}
        if path == "/v2/rerank":
            assert set(documents.values()) == {None}
        else:
            assert documents == {i: {"text": d} for i, d in enumerate(VLLM_RERANK["documents"])}
            assert body["object"] == "rerank" and body["created"] > 0


def test_vllm_top_n_use_activation_max_tokens_per_doc_and_truncate_prompt_tokens(app):
    """vllm-project/vllm tests/entrypoints/pooling/scoring/test_cross_encoder_online.py @ 29fda794."""
    model, query = "BAAI/bge-reranker-base", "What is the capital of France?"
    # test_rerank_api_top_n
    documents = ["The capital of Brazil is Brasilia.", "The capital of France is Paris.", "Cross-encoder models are neat"]
    assert len(post(app, "/rerank", {"model": model, "query": query, "documents": documents, "top_n": 2})["results"]) == 2

    # test_use_activation: left out is true; false gives raw scores whose sigmoid is the probability.
    def scores(use_activation):
        body = {"model": model, "query": query, "documents": documents[:2], "use_activation": use_activation}
        return ranked(post(app, "/rerank", body)["results"])

    default, w_activation, wo_activation = scores(None), scores(True), scores(False)
    # The same pair twice scores the same within TOL, not bit for bit: a request batched with another
    # (the noise floor's mirror of the request before, 5 % of them) rounds ~4e-8 differently, as in
    # vLLM, whose own test compares these with a tolerance.
    assert default.keys() == w_activation.keys() and close(default, w_activation)
    assert all(abs(1 / (1 + math.exp(-wo_activation[i])) - p) <= TOL for i, p in w_activation.items())
    assert all(abs(wo_activation[i] - logit(p)) <= 1e-4 for i, p in w_activation.items())

    # test_rerank_max_tokens_per_doc and _reduces_tokens: the cut is honoured (fewer tokens run).
    long_doc, short_doc = "The capital of France is Paris. " * 50, "The capital of Brazil is Brasilia."
    cut = post(app, "/rerank", {"model": model, "query": query, "documents": [long_doc, short_doc], "max_tokens_per_doc": 10})
    assert len(cut["results"]) == 2 and cut["usage"]["prompt_tokens"] > 0
    long_doc = "The capital of France is Paris. " * 10
    no_limit = post(app, "/rerank", {"model": model, "query": query, "documents": [long_doc], "truncate_prompt_tokens": 99})
    with_limit = post(app, "/rerank", {"model": model, "query": query, "documents": [long_doc], "max_tokens_per_doc": 10})
    assert with_limit["usage"]["prompt_tokens"] < no_limit["usage"]["prompt_tokens"]
    # truncate_prompt_tokens is accepted and ignored: pairs are truncated at the model's max_length,
    # the official truncation (vLLM would cut this pair to 99 tokens; its own test expects a 400 at
    # 101 over a 100-token model, test_score_api_max_model_len).
    plain = post(app, "/rerank", {"model": model, "query": query, "documents": [long_doc]})
    assert plain["usage"] == no_limit["usage"] and close(ranked(no_limit["results"]), [plain["results"][0]["relevance_score"]])


def test_vllm_multimodal_documents_rerank_and_score(app, media_server):
    """vllm-project/vllm tests/entrypoints/pooling/scoring/test_cross_encoder_online_vision.py @ 01e4fce0
    and examples/pooling/score/vision_rerank_api_online.py @ 41c5903d: documents as one
    {"content": [...]} object (one document, all its parts), as a list mixing strings and content
    objects, image URLs (here the local media server: no outside network), base64 data URLs, a
    video URL (here an MP4 data URL) and an OpenAI image part with `detail` (accepted, ignored)."""
    query = "A cat standing in the snow."
    document = "This product was excellent and exceeded my expectations."
    image_url = media_server.url("/img.png", host="localhost")
    video = data_url(mp4([picture(64, 48, 40 + i) for i in range(4)], fps=2), "video/mp4")
    documents = [
        {"type": "text", "text": document},
        {"type": "image_url", "image_url": {"url": image_url}},
        {"type": "image_url", "image_url": {"url": data_url(media_server.images["/img.png"])}},
        {"type": "video_url", "video_url": {"url": video}},
    ]
    model = app.client.get("/v1/models").json()["data"][0]["id"]  # as vLLM's example asks for the model

    def one(path, body):
        return post(app, path, body)["data" if path == "/score" else "results"]

    # One content object is one document whatever its parts (newest vLLM; older vLLM made each part a document).
    single = {}
    for name, content in {"text": [documents[0]], "image url": [documents[1]], "image base64": [documents[2]], "video url": [documents[3]],
                          "text + image url": [documents[0], documents[1]]}.items():  # fmt: skip
        (scored,) = one("/score", {"model": model, "queries": query, "documents": {"content": content}})
        (reranked,) = one("/rerank", {"model": model, "query": query, "documents": {"content": content}})
        assert abs(scored["score"] - reranked["relevance_score"]) <= TOL and reranked["document"] == {"multi_modal": content}
        single[name] = scored["score"]
    assert abs(single["image url"] - single["image base64"]) <= TOL  # the same image, by URL or inline
    assert len(set(round(s, 4) for s in single.values())) >= 3  # text, image and video really differ

    # The list of test_rerank_api_queries_str_documents_list / test_score_api_queries_str_documents_list.
    mixed = [document, {"content": [documents[0]]}, {"content": [documents[1]]}, {"content": [documents[0], documents[1]]}]
    want = [single["text"], single["text"], single["image url"], single["text + image url"]]
    assert close([d["score"] for d in one("/score", {"model": model, "queries": query, "documents": mixed})], want)
    assert close([d["score"] for d in one("/score", {"model": model, "queries": [query] * 4, "documents": mixed})], want)
    results = one("/rerank", {"model": model, "query": query, "documents": mixed})
    assert len(results) == 4 and close(ranked(results), want)

    # An OpenAI-style image part with detail scores as the part without it.
    detailed = {"content": [{"type": "image_url", "image_url": {"url": image_url, "detail": "low"}}]}
    assert abs(one("/score", {"queries": query, "documents": detailed})[0]["score"] - single["image url"]) <= TOL

    # The older multimodal score example (examples/pooling/score/openai_cross_encoder_score_for_multimodal.py
    # @ d9d94afa, "text_2 is a image list"; the two Jina image URLs here the local server's):
    m0 = {"model": "jinaai/jina-reranker-m0", "text_1": "slm markdown",
          "text_2": {"content": [{"type": "image_url", "image_url": {"url": media_server.url("/img.png", host="localhost")}},
                                 {"type": "image_url", "image_url": {"url": media_server.url("/other.png", host="localhost")}}]}}  # fmt: skip
    assert len(one("/score", m0)) == 1  # one document of two images, as newest vLLM reads it


# --------------------------------------------------------------------------------- vLLM score

# vllm-project/vllm tests/entrypoints/pooling/scoring/test_cross_encoder_online.py @ 29fda794
TEXTS_1 = ["What is the capital of France?", "What is the capital of Germany?"]
TEXTS_2 = ["The capital of France is Paris.", "The capital of Germany is Berlin."]


def test_vllm_score_bodies(app):
    """Each body of vLLM's score tests: 1:1, 1:N, N:N under each pair of field names, scores in
    pair order; /v1/score the same; the Qwen3 example; an unpairable body is a 400 naming the field."""
    model = "BAAI/bge-reranker-base"
    q0 = pair_scores(app, TEXTS_1[0], TEXTS_2)
    q1 = pair_scores(app, TEXTS_1[1], TEXTS_2)
    cases = [
        ({"model": model, "queries": TEXTS_1[0], "documents": TEXTS_2[0]}, [q0[0]]),  # test_score_api_queries_str_1_documents_str_1
        ({"model": model, "queries": TEXTS_1[0], "documents": TEXTS_2}, q0),  # ..._str_1_documents_str_n
        ({"model": model, "queries": TEXTS_1, "documents": TEXTS_2}, [q0[0], q1[1]]),  # ..._str_n_documents_str_n
        ({"model": model, "queries": TEXTS_1, "items": TEXTS_2}, [q0[0], q1[1]]),  # test_score_api_queries_vs_items
        ({"model": model, "text_1": TEXTS_1, "text_2": TEXTS_2}, [q0[0], q1[1]]),  # test_score_api_text_1_vs_text_2
        ({"model": model, "data_1": TEXTS_1, "data_2": TEXTS_2}, [q0[0], q1[1]]),  # test_score_api_data_1_vs_data_2
    ]
    for body, want in cases:
        for path in ("/score", "/v1/score"):
            r = app.client.post(path, json=body)
            assert r.status_code == 200, (path, body, r.text)
            answer = r.json()
            assert answer["id"] == r.headers["x-request-id"] and answer["object"] == "list" and answer["model"] == str(app.model)
            assert answer["created"] > 0 and answer["usage"]["prompt_tokens"] == answer["usage"]["total_tokens"] > 0
            assert [(d["index"], d["object"]) for d in answer["data"]] == [(i, "score") for i in range(len(want))]
            assert close([d["score"] for d in answer["data"]], want), (path, body)
    # use_activation false: raw scores, pair order.
    raw = post(app, "/score", {"model": model, "text_1": TEXTS_1, "text_2": TEXTS_2, "use_activation": False})["data"]
    assert [abs(d["score"] - logit(p)) <= 1e-4 for d, p in zip(raw, [q0[0], q1[1]])] == [True, True]
    # vllm-project/vllm examples/pooling/score/qwen3_reranker_online.py @ 41c5903d
    queries = ["What is the capital of China?", "Explain gravity"]
    documents = [
        "The capital of China is Beijing.",
        "Gravity is a force that attracts two bodies towards each other. It gives weight to physical objects and is responsible for the movement of planets around the sun.",
    ]
    data = post(app, "/score", {"model": "Qwen/Qwen3-Reranker-0.6B", "queries": queries, "documents": documents})["data"]
    assert close([d["score"] for d in data], [pair_scores(app, q, [d])[0] for q, d in zip(queries, documents)])
    # vLLM: "Input lengths must be either 1:1, 1:N or N:N" (a 400 there too); named here.
    err = post(app, "/score", {"queries": TEXTS_1, "documents": TEXTS_2 + ["x"]}, status=400)["error"]
    assert err["field"] == "documents" and "1:1, 1:N or N:N" in err["message"]


# --------------------------------------------------------------------- every route, one pair


def test_the_same_pairs_score_the_same_on_every_route(app):
    """One query and three documents through every route and body shape; raw scores likewise."""
    query, docs = "a red circle", ["a red circle", "a blue square", {"text": "a red cross"}]
    texts = ["a red circle", "a blue square", "a red cross"]
    want = pair_scores(app, query, docs)
    answers = {
        "/v2/rerank": ranked(post(app, "/v2/rerank", {"query": query, "documents": docs})["results"]),
        "/v1/rerank": ranked(post(app, "/v1/rerank", {"query": query, "documents": docs})["results"]),
        "/rerank documents": ranked(post(app, "/rerank", {"query": query, "documents": docs})["results"]),
        "/rerank texts": ranked(post(app, "/rerank", {"query": query, "texts": docs}), "score"),
        "/v1/score 1:N": dict(enumerate(d["score"] for d in post(app, "/v1/score", {"text_1": query, "text_2": texts})["data"])),
        "/score N:N": dict(enumerate(d["score"] for d in post(app, "/score", {"queries": [query] * 3, "documents": docs})["data"])),
        "/score 1:1": {i: post(app, "/score", {"queries": query, "documents": d})["data"][0]["score"] for i, d in enumerate(docs)},
    }
    for route, scores in answers.items():
        assert sorted(scores) == [0, 1, 2] and close(scores, want), (route, scores, want)
    raw = {
        "/rerank texts raw_scores": ranked(post(app, "/rerank", {"query": query, "texts": texts, "raw_scores": True}), "score"),
        "/rerank infinity raw_scores": ranked(post(app, "/rerank", {"query": query, "documents": texts, "raw_scores": True})["results"]),
        "/v2/rerank use_activation": ranked(post(app, "/v2/rerank", {"query": query, "documents": texts, "use_activation": False})["results"]),
        "/v1/rerank use_activation": ranked(post(app, "/v1/rerank", {"query": query, "documents": texts, "use_activation": False})["results"]),
        "/score use_activation": dict(enumerate(d["score"] for d in post(app, "/score", {"queries": query, "documents": texts, "use_activation": False})["data"])),
    }  # fmt: skip
    first = next(iter(raw.values()))
    for route, scores in raw.items():
        assert all(abs(scores[i] - first[i]) <= TOL and abs(scores[i] - logit(want[i])) <= 1e-4 for i in range(3)), route


# ------------------------------------------------------------------ TEI, rerankers, LlamaIndex


def test_tei_bodies_rerankers_and_llamaindex(app):
    """TEI answers a bare list, best first, every text (it has no top_n), `text` only with return_text."""
    query, texts = "a red circle", ["a blue square", "a red circle", "a red cross"]
    want = pair_scores(app, query, texts)
    # huggingface/text-embeddings-inference router/src/http/types.rs @ 0d124dc9: `truncate` is
    # nullable (Option<bool>), falling back to the server's setting.
    bodies = [
        {"query": query, "texts": texts, "truncate": None},
        {"query": query, "texts": texts, "truncate": False, "truncation_direction": "Left", "raw_scores": False, "return_text": False},
        # run-llama/llama_index llama-index-integrations/postprocessor/llama-index-postprocessor-tei-rerank/
        # llama_index/postprocessor/tei_rerank/base.py: `json_data = {"query": query, "texts": texts}`;
        # it asserts one score per text.
        {"query": query, "texts": texts},
    ]
    for body in bodies:
        answer = post(app, "/rerank", body)
        assert isinstance(answer, list) and len(answer) == 3 and all(set(x) == {"index", "score"} for x in answer)
        assert close(ranked(answer, "score"), want)
    # AnswerDotAI/rerankers rerankers/models/api_rankers.py @ 7bb25217, provider
    # "text-embeddings-inference": `{"model", "query", texts, "top_n": len(docs), "return_text": True}`
    # (TEI ignores model and top_n); it reads a bare list, then r["index"] and r["score"].
    answer = post(app, "/rerank", {"model": "BAAI/bge-reranker-base", "query": query, "texts": texts, "top_n": len(texts), "return_text": True})
    assert [x["text"] for x in answer] == [texts[x["index"]] for x in answer] and close(ranked(answer, "score"), want)
    assert len(post(app, "/rerank", {"model": "m", "query": query, "texts": texts, "top_n": 1})) == 3  # TEI: every text


def test_jina_shaped_clients_rerankers_llamaindex_and_xinference(app):
    query, docs = "a red circle", ["a blue square", "a red circle", "a red cross"]
    want = pair_scores(app, query, docs)
    best = sorted(range(3), key=lambda i: -want[i])
    # AnswerDotAI/rerankers rerankers/models/api_rankers.py @ 7bb25217, providers "cohere" and "jina"
    # (their URLs end in /v1/rerank): reads results[].index and .relevance_score.
    body = {"model": "jina-reranker-v2-base-multilingual", "query": query, "documents": docs, "top_n": len(docs), "return_documents": True}
    answer = post(app, "/v1/rerank", body)
    assert list(ranked(answer["results"])) == best and close(ranked(answer["results"]), want)
    assert [x["document"] for x in answer["results"]] == [{"text": docs[i]} for i in best]
    # run-llama/llama_index .../llama-index-postprocessor-jinaai-rerank/llama_index/postprocessor/jinaai_rerank/base.py
    # @ bdc56a68: posts to f"{base_url}/rerank" (default base https://api.jina.ai/v1): with this
    # service as the base, /rerank; with .../v1 as the base, /v1/rerank. Reads results[].
    for path in ("/rerank", "/v1/rerank"):
        results = post(app, path, {"query": query, "documents": docs, "model": "jina-reranker-v1-base-en", "top_n": 2})["results"]
        assert list(ranked(results)) == best[:2] and close(ranked(results), want)
    # xorbitsai/inference xinference/client/restful/restful_client.py @ 7ecec16b (RESTfulRerankModelHandle.rerank
    # with its defaults): every key sent, null where unset, kwargs as a JSON string. return_documents
    # null is the route's default (documents returned; Xinference's server returns none).
    xinference = {"model": "bge-reranker-base", "documents": docs, "query": query, "top_n": None, "max_chunks_per_doc": None,
                  "return_documents": None, "return_len": None, "kwargs": json.dumps({})}  # fmt: skip
    answer = post(app, "/v1/rerank", xinference)
    assert answer["id"] and list(ranked(answer["results"])) == best and close(ranked(answer["results"]), want)


def test_infinity_bodies(app):
    """michaelfeil/infinity libs/infinity_emb/tests/end_to_end/test_torch_reranker.py @ fcb951cb: its
    /rerank bodies; a text document comes back as the string when return_documents is true."""
    query = "Where is the Eiffel Tower located?"
    documents = ["The Eiffel Tower is located in the United States.", "The Eiffel Tower is located in Paris, France",
                 "The Eiffel Tower is located in the United Kingdom."]  # fmt: skip
    model = "mixedbread-ai/mxbai-rerank-xsmall-v1"
    want = pair_scores(app, query, documents)
    plain = post(app, "/rerank", {"model": model, "query": query, "documents": documents})  # test_reranker
    assert "model" in plain and "usage" in plain and close(ranked(plain["results"]), want)
    for top_n, return_docs in [(1, True), (2, False), (8000, True)]:  # test_reranker_top_n
        answer = post(app, "/rerank", {"model": model, "query": query, "documents": documents, "top_n": top_n, "return_documents": return_docs})
        results = answer["results"]
        assert len(results) == min(top_n, len(documents)) and answer["object"] == "rerank"
        assert [x.get("document") for x in results] == [documents[x["index"]] if return_docs else None for x in results]
    # test_reranker_invalid_top_n: a negative top_n is refused (422), naming it.
    assert post(app, "/rerank", {"model": model, "query": query, "documents": documents, "top_n": -1}, status=422)["error"]["field"] == "top_n"


def test_top_n_zero_and_null_answer_everything_and_misspelt_fields_are_named(app):
    """top_n 0 and null answer every document on each documents route (the peers disagree: README);
    a field no peer accepts is refused by name, on every route."""
    query, docs = "a red circle", ["a blue square", "a red circle", "a red cross"]
    for path in ("/v2/rerank", "/v1/rerank", "/rerank"):
        for top_n in (0, None):
            assert len(post(app, path, {"query": query, "documents": docs, "top_n": top_n})["results"]) == 3
    for path, body in [("/v2/rerank", {"query": query, "documents": docs}), ("/v1/rerank", {"query": query, "documents": docs}),
                       ("/rerank", {"query": query, "texts": docs}), ("/rerank", {"query": query, "documents": docs}),
                       ("/score", {"queries": query, "documents": docs})]:  # fmt: skip
        err = post(app, path, {**body, "top_k": 2}, status=422)["error"]
        assert err["field"] == "top_k" and err["type"] == "invalid_request", (path, err)
