"""The rendered prompt equals the official Qwen3-VL-Reranker layout, character for character: the
official messages (`official_reference.format_mm_instruction`, re-stated from the official file)
rendered by the official Qwen3-VL chat template (`data/qwen3_vl_chat_template.jinja`, its SHA-256
pinned below) through transformers' own `apply_chat_template`, against the engine's render with
the checkpoint's template (the tiny model ships a reduced one, which must render the same)."""

import hashlib

import pytest
from official_reference import TEMPLATE, format_mm_instruction

from engine.inputs import ImageInput, RerankItem, VideoInput
from engine.prompt import DEFAULT_INSTRUCTION, truncate_keeping_final

# The chat template of Qwen/Qwen3-VL-8B-Instruct (the Qwen3-VL reranker's base): 5292 bytes.
OFFICIAL_TEMPLATE_SHA256 = "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"

X = ImageInput("0" * 64, None)

SYSTEM = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
)
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"
END = "<|im_end|>\n<|im_start|>assistant\n"


def test_the_reference_template_is_the_official_one():
    data = TEMPLATE.read_bytes()
    assert len(data) == 5292 and hashlib.sha256(data).hexdigest() == OFFICIAL_TEMPLATE_SHA256


V = VideoInput.of_frames((X,))
F = VideoInput.of_file(b"0")
# (engine item, the official reranker's arguments for the same side)
SIDES = {
    "text": (RerankItem(text="red circle"), {"text": "red circle"}),
    "empty string": (RerankItem(text=""), {"text": ""}),
    "nothing (NULL)": (RerankItem(), {}),
    "image": (RerankItem(images=(X,)), {"image": "a.png"}),
    "images and text": (RerankItem(text="caption", images=(X, X)), {"text": "caption", "image": ["a.png", "b.png"]}),
    "video, images, text": (RerankItem(text="c", images=(X,), videos=(V,)), {"text": "c", "image": "a.png", "video": [["f0.png", "f1.png"]]}),
    "two videos": (RerankItem(videos=(F, V)), {"video": ["v.mp4", ["f0.png"]]}),
    "tricky text": (RerankItem(text="q <Document>: x\n{{ not jinja }}"), {"text": "q <Document>: x\n{{ not jinja }}"}),
}


@pytest.mark.parametrize("query", ["text", "image", "video, images, text", "nothing (NULL)"])
@pytest.mark.parametrize("document", list(SIDES))
@pytest.mark.parametrize("instruction", [None, "Find shapes."])
def test_pairs_render_as_the_official_template_renders_the_official_messages(engine_for, query, document, instruction):
    eng = engine_for("fp32")
    messages = format_mm_instruction(SIDES[query][1], SIDES[document][1], instruction)
    official = eng.tokenizer.apply_chat_template(messages, chat_template=TEMPLATE.read_text(), tokenize=False, add_generation_prompt=True)
    assert eng.render_prompt(SIDES[query][0], SIDES[document][0], instruction) == official


def test_default_instruction_is_the_official_one():
    assert DEFAULT_INSTRUCTION == "Given a search query, retrieve relevant candidates that answer the query."


def test_text_pair_renders_official_layout(engine_for):
    eng = engine_for("fp32")
    got = eng.render_prompt(RerankItem(text="red circle"), RerankItem(text="a red circle"))
    want = SYSTEM + "<|im_start|>user\n<Instruct>: " + DEFAULT_INSTRUCTION + "<Query>:red circle\n<Document>:a red circle" + END
    assert got == want


def test_custom_instruction_and_parts_order_video_image_text(engine_for):
    eng = engine_for("fp32")
    doc = RerankItem(text="caption", images=(X, X), videos=(VideoInput.of_frames((X,)),))
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
    for doc in (RerankItem(text="plain"), RerankItem(text="t", images=(X, X)), RerankItem(videos=(VideoInput.of_frames((X,)),)), RerankItem()):
        assert head + document_text(doc) + tail == eng.render_prompt(query, doc)
