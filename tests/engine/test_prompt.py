"""The rendered prompt equals the official Qwen3-VL-Reranker layout, character for character."""

from engine.inputs import ImageInput, RerankItem, VideoInput
from engine.prompt import DEFAULT_INSTRUCTION, truncate_keeping_final

X = ImageInput("0" * 64, None)

SYSTEM = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
)
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"
END = "<|im_end|>\n<|im_start|>assistant\n"


def test_default_instruction_is_the_official_one():
    assert DEFAULT_INSTRUCTION == "Given a search query, retrieve relevant candidates that answer the query."


def test_text_pair_renders_official_layout(engine_for):
    eng = engine_for("fp32")
    got = eng.render_prompt(RerankItem(text="red circle"), RerankItem(text="a red circle"))
    want = SYSTEM + "<|im_start|>user\n<Instruct>: " + DEFAULT_INSTRUCTION + "<Query>:red circle\n<Document>:a red circle" + END
    assert got == want


def test_custom_instruction_and_parts_order_video_image_text(engine_for):
    eng = engine_for("fp32")
    doc = RerankItem(text="caption", images=(X, X), video=VideoInput.of_frames((X,)))
    got = eng.render_prompt(RerankItem(images=(X,)), doc, instruction="Find shapes.")
    want = SYSTEM + "<|im_start|>user\n<Instruct>: Find shapes.<Query>:" + IMG + "\n<Document>:" + VID + IMG + IMG + "caption" + END
    assert got == want


def test_empty_side_renders_null(engine_for):
    eng = engine_for("fp32")
    got = eng.render_prompt(RerankItem(text="q"), RerankItem())
    assert got.endswith("<Query>:q\n<Document>:NULL" + END)


def test_truncation_keeps_special_tokens_and_final_tail():
    keep = {100, 101}
    ids = [100, 1, 2, 101, 101, 3, 4, 5, 6, 7, 100, 8, 9]
    out = truncate_keeping_final(ids, 9, keep, tail=2)  # the body (11 tokens) must fit 9
    assert out[-2:] == [8, 9]  # the final tokens (generation prompt) survive, on top of the 9
    assert [t for t in out if t in keep] == [100, 101, 101, 100]  # vision/turn markers all kept
    assert out == [100, 1, 2, 101, 101, 3, 4, 5, 100, 8, 9]  # body text cut from its end
    assert truncate_keeping_final(ids, 3, keep, tail=2) is None  # 4 special tokens cannot fit 3
    assert truncate_keeping_final(ids, 11, keep, tail=2) == ids  # a body of exactly max_length stays


def test_one_render_per_request_equals_a_render_per_pair(engine_for):
    """The engine renders the template once per request and splices each document in; for the
    checkpoint's template that must be the text a full render of each pair gives."""
    from engine.prompt import document_text, render_around_document

    eng = engine_for("fp32")
    assert eng.preparer.splice_ok
    query = RerankItem(text="q <Document>: tricky?\n", images=(X,))
    head, tail = render_around_document(eng.preparer.render, query, DEFAULT_INSTRUCTION)
    for doc in (RerankItem(text="plain"), RerankItem(text="t", images=(X, X)), RerankItem(video=VideoInput.of_frames((X,))), RerankItem()):
        assert head + document_text(doc) + tail == eng.render_prompt(query, doc)
