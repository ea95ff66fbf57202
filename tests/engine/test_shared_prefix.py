"""Shared-prefix scoring: the tokens every pair of a request shares run once, and the scores equal
the unshared path (1e-5 in fp32) for text, image and video queries, across requests in one
batch, and at every CPU precision (bitsandbytes layers included). The head every request with
the same instruction renders (system turn, instruction) runs once per engine, not per batch."""

import random

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import RerankEngine
from engine.forward import KEPT_HEADS
from engine.inputs import ImageInput, RerankItem, ScoreRequest, VideoInput
from fused_reference import reference_scores
from workshop.tiny import Thing, caption, draw, query_text, random_thing

# fp32: the same arithmetic in other shapes. Lower precisions round differently when the prefix
# runs apart from the rest (bf16: 8-bit mantissa), and LLM.int8 picks its fp16 outlier columns per
# matmul input, so any change of batch composition moves int8 scores by ~1e-2 (measured 6.4e-3).
TOLERANCE = {"fp32": 1e-5, "bf16": 3e-2, "int8": 2e-2, "nf4": 1e-4}


def _img(rng, colour="red", shape="circle", side=96):
    return ImageInput.of(draw(Thing(colour, shape), rng, side=side))


@pytest.fixture(scope="module")
def requests():
    rng = random.Random(21)
    docs = [
        RerankItem(text="a red circle"),
        RerankItem(text="a blue square"),
        RerankItem(images=(_img(rng, "red", "circle"),)),
        RerankItem(text="caption", images=(_img(rng, "green", "cross", 128), _img(rng, "yellow", "square"))),
        RerankItem(text="an image showing a red circle " * 6),
        RerankItem(videos=(VideoInput.of_frames(tuple(_img(rng) for _ in range(4)), fps=2.0),)),
    ]
    long_query = " and ".join(f"find a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "cross")) * 3
    return {
        "text query": ScoreRequest.of("red circle", docs),
        "long text query": ScoreRequest.of(long_query, docs[:4]),
        "image query": ScoreRequest.of(RerankItem(images=(_img(rng, "blue", "square"),)), docs),
        "image+text query": ScoreRequest.of(RerankItem(text="like this", images=(_img(rng, "purple", "cross"), _img(rng))), docs[:3]),
        "video query": ScoreRequest.of(RerankItem(videos=(VideoInput.of_frames(tuple(_img(rng, "green") for _ in range(6)), fps=2.0),)), docs[:4]),
        "same query again": ScoreRequest.of("red circle", docs[2:], instruction=None),
        "custom instruction": ScoreRequest.of("red circle", docs[:3], instruction="Find shapes of the same colour."),
        "one document": ScoreRequest.of("red circle", docs[:1]),
    }


def _gap(a, b) -> float:
    """max |a - b|, NaN if any score is NaN (Python's max passes over a NaN that is not first)."""
    return float((torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)).abs().max())


def _unshared(engine: RerankEngine) -> RerankEngine:
    return RerankEngine(engine.loaded, engine.tokenizer, EngineConfig(share_prefix=False), model_id=engine.model_id)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "nf4"])
def test_shared_prefix_equals_unshared_in_one_mixed_batch(engine_for, requests, precision):
    shared = engine_for(precision)
    unshared = _unshared(shared)
    reqs = list(requests.values())
    a = shared.forward([shared.prepare(r) for r in reqs])
    b = unshared.forward([unshared.prepare(r) for r in reqs])
    worst = _gap([x for r in a for x in r.scores], [y for r in b for y in r.scores])
    assert worst <= TOLERANCE[precision], f"{precision}: max |shared - unshared| = {worst:.2e}"


@pytest.mark.parametrize("case", ["text query", "image query", "image+text query", "video query", "long text query"])
def test_shared_prefix_equals_the_models_own_forward(engine_for, requests, case):
    eng = engine_for("fp32")
    req = requests[case]
    prepared = eng.prepare(req)
    assert prepared.shared > 0, "every pair of a multi-document request shares its system turn, instruction and query"
    got = eng.forward([prepared])[0].scores
    assert _gap(got, reference_scores(eng, req)) <= 1e-5


def test_the_prefix_holds_the_query_and_no_document(engine_for, requests):
    eng = engine_for("fp32")
    image_query = eng.prepare(requests["image query"])
    assert image_query.shared_visuals == 1  # the query image, not the image documents
    first_doc_visual = (image_query.rows[2].ids == eng.model.config.image_token_id).nonzero().flatten()
    query_tokens = int((image_query.rows[0].ids == eng.model.config.image_token_id).sum())
    assert int(first_doc_visual[query_tokens]) >= image_query.shared  # the document's image starts after it
    text_query = eng.prepare(requests["text query"])
    assert text_query.shared_visuals == 0
    assert all(len(r) > text_query.shared for r in text_query.rows)  # each row keeps its scored token


def _forward_counting_calls(eng: RerankEngine, prepared: list, keep_heads: bool = False) -> tuple[list, list]:
    """`eng.forward(prepared)` and its decoder calls, each as (parts, whether it follows prefixes).
    The kept instruction heads are dropped first unless `keep_heads`: the first call then computes the head."""
    calls = []
    if not keep_heads:
        eng.forwarder._heads.clear()
    real = eng.forwarder._decode
    eng.forwarder._decode = lambda parts, features, prefix_cache=None, *a, **k: (
        calls.append((len(parts), prefix_cache is not None)) or real(parts, features, prefix_cache, *a, **k)
    )
    try:
        return eng.forward(prepared), calls
    finally:
        del eng.forwarder._decode


def test_requests_with_the_same_prefix_share_one_prefix_pass(engine_for, requests):
    eng = engine_for("fp32")
    results, calls = _forward_counting_calls(eng, [eng.prepare(requests["text query"]), eng.prepare(requests["same query again"])])
    # The instruction head, then the rest of the one prefix, once for both requests, then every
    # row of both after it in one call.
    assert calls == [(1, False), (1, True), (6 + 4, True)]
    assert [len(r.scores) for r in results] == [6, 4]


def _queries(n: int) -> list[ScoreRequest]:
    rng = random.Random(5)
    docs = [RerankItem(text=caption(random_thing(rng), rng)) for _ in range(3 * n)]
    return [ScoreRequest.of(query_text(random_thing(rng), rng), docs[3 * i : 3 * i + 2 + i % 2]) for i in range(n)]


def test_requests_with_different_queries_run_their_prefixes_in_one_call(engine_for):
    """Each request its own query (prefixes of different lengths: right-padded together): all the
    prefixes in one decoder call, all the rows in one more, each row after its own prefix; the
    scores equal each request scored alone and the unshared path."""
    eng = engine_for("fp32")
    reqs = _queries(8)
    prepared = [eng.prepare(r) for r in reqs]
    assert len({p.shared for p in prepared}) > 1, "prefixes of several lengths (padding inside the prefix call)"
    together, calls = _forward_counting_calls(eng, prepared)
    assert calls == [(1, False), (8, True), (sum(len(r.documents) for r in reqs), True)]
    alone = [eng.forward([eng.prepare(r)])[0] for r in reqs]
    unshared = _unshared(eng).score_requests(reqs)
    for t, a, u in zip(together, alone, unshared):
        assert _gap(t.scores, a.scores) <= 1e-5 and _gap(t.scores, u.scores) <= 1e-5
    assert [t.tokens for t in together] == [a.tokens for a in alone]  # each request's prefix counted once, its own


def test_a_long_query_runs_its_prefix_apart_from_short_ones(engine_for):
    """Padded to a ~400-token query, four short prefixes would run several times their own tokens:
    the long one takes a prefix call of its own (and its rows a micro-batch of their own)."""
    eng = engine_for("fp32")
    rng = random.Random(8)
    long_query = " and ".join(query_text(random_thing(rng), rng) for _ in range(60))
    reqs = [*_queries(4), ScoreRequest.of(long_query, ["a red circle", "a blue square"])]
    got, calls = _forward_counting_calls(eng, [eng.prepare(r) for r in reqs])
    assert calls == [(1, False), (4, True), (sum(len(r.documents) for r in reqs[:4]), True), (1, True), (2, True)]
    assert _gap(got[4].scores, eng.forward([eng.prepare(reqs[4])])[0].scores) <= 1e-5


def test_token_budget_counts_the_prefix_once(engine_for, requests):
    req = requests["long text query"]
    eng = engine_for("fp32")
    prepared = eng.prepare(req)
    p = prepared.shared
    longest_rest = max(len(r) for r in prepared.rows) - p
    rows = len(prepared.rows)
    # Fits when the prefix counts once, not when every row carries it.
    budget = p + rows * longest_rest
    assert budget < rows * (p + longest_rest)
    tight = engine_for("fp32", max_batch_tokens=budget)
    (got,), calls = _forward_counting_calls(tight, [tight.prepare(req)])
    assert calls == [(1, False), (1, True), (rows, True)]  # the head, the rest of the prefix, then every row in one micro-batch
    assert got.tokens == p + sum(len(r) - p for r in prepared.rows)


def test_sharing_off_runs_every_row_whole(engine_for, requests):
    eng = _unshared(engine_for("fp32"))
    prepared = eng.prepare(requests["text query"])
    assert prepared.shared == 0
    assert eng.forward([prepared])[0].tokens == sum(len(r) for r in prepared.rows)


def test_the_head_is_the_system_turn_and_instruction_before_the_query(engine_for, requests):
    eng = engine_for("fp32")
    prepared = eng.prepare(requests["text query"])
    def text(prepared, n):  # the tiny tokenizer decodes without spaces
        return eng.tokenizer.decode(prepared.rows[0].ids[:n]).replace(" ", "")

    head = text(prepared, prepared.common)
    assert 16 <= prepared.common < prepared.shared
    assert "Givenasearchquery" in head and "redcircle" not in head and "redcircle" in text(prepared, prepared.shared)
    custom = eng.prepare(requests["custom instruction"])
    assert custom.common and "Findshapesofthesamecolour" in text(custom, custom.common)
    one = eng.prepare(requests["one document"])
    assert one.shared == 0 and one.common == prepared.common  # a lone pair shares nothing, but has the head
    assert _unshared(eng).prepare(requests["text query"]).common == 0


def test_the_head_is_computed_once_and_kept_between_batches(engine_for):
    eng = engine_for("fp32")
    first, second = _queries(8)[:4], _queries(8)[4:]
    _, calls = _forward_counting_calls(eng, [eng.prepare(r) for r in first])
    assert calls[0] == (1, False) and all(follows for _, follows in calls[1:])
    got, calls = _forward_counting_calls(eng, [eng.prepare(r) for r in second], keep_heads=True)
    assert all(follows for _, follows in calls), "the second batch computes no head again"
    for g, u in zip(got, _unshared(eng).score_requests(second)):
        assert _gap(g.scores, u.scores) <= 1e-5


def test_one_document_requests_follow_the_kept_head_and_equal_the_models_own_forward(engine_for, requests):
    eng = engine_for("fp32")
    lone = [requests["one document"], ScoreRequest.of("a blue square", ["a blue square"]), ScoreRequest.of("x", [RerankItem(images=(_img(random.Random(3)),))])]
    got, calls = _forward_counting_calls(eng, [eng.prepare(r) for r in lone])
    assert calls == [(1, False), (3, True)]  # the head, then the three pairs after it in one call
    for g, r in zip(got, lone):
        assert _gap(g.scores, reference_scores(eng, r)) <= 1e-5


def test_kept_heads_are_bounded(engine_for):
    eng = engine_for("fp32")
    eng.forwarder._heads.clear()
    for i in range(KEPT_HEADS + 3):
        eng.forward([eng.prepare(ScoreRequest.of("a red circle", ["a red circle", "a blue cross"], instruction=f"Rank shapes, rule {i}."))])
    assert len(eng.forwarder._heads) == KEPT_HEADS
