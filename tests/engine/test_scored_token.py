"""The last decoder layer's feed-forward runs for each row's scored token only: scores equal the
whole layer's (and the model's own forward), at every CPU precision, with and without a shared
prefix; the prefix passes, whose keys and values are kept, run every token."""

import random

import pytest
import torch

from engine.inputs import ImageInput, RerankItem, ScoreRequest
from engine.scored_token import ScoredTokenLayer
from fused_reference import reference_scores
from workshop.tiny import Thing, caption, draw, random_thing

# fp32: the same arithmetic on fewer rows. bf16 rounds per matmul shape; LLM.int8 picks its fp16
# outlier columns from the rows it is given (as test_shared_prefix's tolerances say).
TOLERANCE = {"fp32": 1e-5, "bf16": 3e-2, "int8": 2e-2, "nf4": 1e-4}


@pytest.fixture(scope="module")
def requests():
    rng = random.Random(4)
    image = ImageInput.of(draw(Thing("red", "circle"), rng, side=96))
    docs = [RerankItem(text=caption(random_thing(rng), rng)) for _ in range(5)] + [RerankItem(images=(image,))]
    return [
        ScoreRequest.of("a red circle", docs),
        ScoreRequest.of(RerankItem(text="like this", images=(image,)), docs[:3]),
        ScoreRequest.of("a blue square", docs[:1]),
    ]


def _mlp_inputs(eng) -> list:
    """Records, per call of the last layer's MLP: (whether a scoring pass runs, rows, tokens)."""
    seen = []
    wrapper = eng.forwarder.scored_token
    eng.model.model.language_model.layers[-1].mlp.register_forward_hook(
        lambda m, args, out: seen.append((wrapper.positions is not None, *args[0].shape[:2]))
    )
    return seen


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "nf4"])
def test_scores_equal_the_whole_last_layer(engine_for, requests, precision):
    eng = engine_for(precision)
    prepared = [eng.prepare(r) for r in requests]
    trimmed = eng.forward(prepared)
    wrapper, eng.forwarder.scored_token = eng.forwarder.scored_token, None
    try:
        whole = eng.forward(prepared)
    finally:
        eng.forwarder.scored_token = wrapper
    gap = max(abs(a - b) for t, w in zip(trimmed, whole) for a, b in zip(t.scores, w.scores))
    assert gap <= TOLERANCE[precision], f"{precision}: max |trimmed - whole| = {gap:.2e}"


def test_only_the_scored_tokens_reach_the_last_feed_forward(engine_for, requests):
    eng = engine_for("fp32")
    seen = _mlp_inputs(eng)
    try:
        eng.forwarder._heads.clear()
        got = eng.forward([eng.prepare(r) for r in requests])
    finally:
        eng.model.model.language_model.layers[-1].mlp._forward_hooks.clear()
    # The head and the prefixes run every token (their keys and values are kept); each scoring
    # pass hands the MLP one token per row, every row once.
    kept = [(rows, tokens) for scoring, rows, tokens in seen if not scoring]
    scored = [(rows, tokens) for scoring, rows, tokens in seen if scoring]
    assert kept[0] == (1, eng.prepare(requests[0]).common) and all(tokens > 1 for _, tokens in kept)
    assert {tokens for _, tokens in scored} == {1} and sum(rows for rows, _ in scored) == sum(len(r.documents) for r in requests)
    for g, r in zip(got, requests):
        assert max(abs(a - b) for a, b in zip(g.scores, reference_scores(eng, r))) <= 1e-5


def test_a_last_layer_that_deepstack_reaches_stays_whole(engine_for):
    lm = engine_for("fp32").model.model.language_model
    assert ScoredTokenLayer.wrap_last(lm, deepstack_layers=len(lm.layers)) is None
    assert ScoredTokenLayer.wrap_last(lm, deepstack_layers=0) is ScoredTokenLayer.wrap_last(lm, deepstack_layers=0)  # one wrapper per layer


def test_the_wrapper_leaves_the_parameters_and_the_stock_forward_alone(engine_for, requests):
    eng = engine_for("fp32")
    names = [n for n, _ in eng.model.named_parameters()]
    assert all(".layer." not in n for n in names) and any(n.endswith("layers.3.mlp.down_proj.weight") for n in names)
    # Outside a scoring pass the model is the stock one: its own forward gives the scores.
    row = eng.prepare(requests[0]).rows[0]
    with torch.inference_mode():
        logits = eng.model(input_ids=row.ids[None], attention_mask=torch.ones((1, len(row)), dtype=torch.long)).logits[0, -1].float()
    assert float(torch.sigmoid(logits[eng.yes_id] - logits[eng.no_id])) == pytest.approx(eng.forward([eng.prepare(requests[0])])[0].scores[0], abs=1e-5)
