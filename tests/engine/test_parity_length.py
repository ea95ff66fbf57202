"""Length parity with the official reranker (QwenLM/Qwen3-VL-Embedding, `tokenize`): all but the
final 5 tokens are truncated to MAX_LENGTH = 10240 keeping every special token, then the 5 are
appended, so pairs of up to 10245 tokens are kept whole. The reference is that code, re-stated in
`official_reference.py` (not the engine's), run on the same rendered text."""

import pytest
from official_reference import truncate_tokens as official_truncate

from engine.config import EngineConfig
from engine.inputs import RerankItem, ScoreRequest


def official_ids(engine, query: RerankItem, document: RerankItem, max_length: int) -> list[int]:
    ids = engine.tokenizer(engine.render_prompt(query, document), add_special_tokens=False)["input_ids"]
    return official_truncate(ids[:-5], max_length, engine.tokenizer.all_special_ids) + ids[-5:]


def test_the_default_is_the_official_max_length():
    assert EngineConfig().max_length == 10240


@pytest.mark.parametrize("extra", [-3, 0, 2, 5, 6, 40, 400])
def test_long_pairs_are_cut_exactly_as_the_official_code_cuts_them(engine_for, extra):
    max_length = 200
    eng = engine_for("fp32", max_length=max_length)
    query = RerankItem(text="red circle")
    base = len(eng.tokenizer(eng.render_prompt(query, RerankItem(text="a")), add_special_tokens=False)["input_ids"])
    # One more word adds one token on the tiny tokenizer: aim at max_length + 5 + extra tokens.
    words = max(1, max_length + 5 + extra - base + 1)
    doc = RerankItem(text=" ".join(["circle"] * words))
    want = official_ids(eng, query, doc, max_length)
    got = eng.prepare(ScoreRequest.of(query, [doc])).rows[0].ids.tolist()
    assert got == want
    assert len(got) <= max_length + 5


def test_a_pair_of_10245_tokens_is_not_cut_at_the_default(engine_for):
    eng = engine_for("fp32")
    query = RerankItem(text="red circle")
    base = len(eng.tokenizer(eng.render_prompt(query, RerankItem(text="a")), add_special_tokens=False)["input_ids"])
    doc = RerankItem(text=" ".join(["circle"] * (10245 - base + 1)))
    whole = eng.tokenizer(eng.render_prompt(query, doc), add_special_tokens=False)["input_ids"]
    assert len(whole) == 10245
    assert eng.prepare(ScoreRequest.of(query, [doc])).rows[0].ids.tolist() == whole == official_ids(eng, query, doc, 10240)


SYSTEM = 'Judge whether the Document meets the requirements based on the Query and the Instruct provided. Note that the answer can only be "yes" or "no".'
INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."


def official_messages(query_parts: list[str], doc_parts: list[str]) -> list[dict]:
    """`format_mm_instruction` of the official file for text-only sides: each side is a prefix
    part, then one part per text, or the single part NULL when the side has nothing."""
    def side(prefix: str, texts: list[str]) -> list[dict]:
        return [{"type": "text", "text": prefix}] + [{"type": "text", "text": t} for t in (texts or ["NULL"])]

    content = [{"type": "text", "text": "<Instruct>: " + INSTRUCTION}] + side("<Query>:", query_parts) + side("\n<Document>:", doc_parts)
    return [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}, {"role": "user", "content": content}]


@pytest.mark.parametrize(
    "query, document, query_parts, doc_parts",
    [
        (RerankItem(text="q"), RerankItem(), ["q"], []),  # nothing given: NULL
        (RerankItem(), RerankItem(text="d"), [], ["d"]),
        (RerankItem(text="q"), RerankItem(text=""), ["q"], [""]),  # an empty string is text: rendered as nothing
        (RerankItem(text="  "), RerankItem(text="d"), ["  "], ["d"]),
    ],
)
def test_empty_sides_tokenize_as_the_official_layout(engine_for, query, document, query_parts, doc_parts):
    eng = engine_for("fp32")
    text = eng.tokenizer.apply_chat_template(
        official_messages(query_parts, doc_parts), chat_template=eng.chat_template, tokenize=False, add_generation_prompt=True
    )
    want = eng.tokenizer(text, add_special_tokens=False)["input_ids"]
    prepared = eng.prepare(ScoreRequest.of(query, [document]))
    assert prepared.rows[0].ids.tolist() == want
    (score,) = eng.forward([prepared])[0].scores
    assert 0.0 < score < 1.0
