"""The rendered prompt equals the official Qwen3-VL-Reranker layout, character for character."""

from serve.engine.inputs import RerankItem, ScorePair, VideoInput
from serve.engine.prompt import DEFAULT_INSTRUCTION, truncate_keeping_final

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
    got = eng.render_prompt(ScorePair(RerankItem(text="red circle"), RerankItem(text="a red circle")))
    want = SYSTEM + "<|im_start|>user\n<Instruct>: " + DEFAULT_INSTRUCTION + "<Query>:red circle\n<Document>:a red circle" + END
    assert got == want


def test_custom_instruction_and_parts_order_video_image_text(engine_for):
    eng = engine_for("fp32")
    doc = RerankItem(text="caption", images=(b"x", b"y"), video=VideoInput(frames=(b"f",)))
    got = eng.render_prompt(ScorePair(RerankItem(images=(b"q",)), doc, instruction="Find shapes."))
    want = SYSTEM + "<|im_start|>user\n<Instruct>: Find shapes.<Query>:" + IMG + "\n<Document>:" + VID + IMG + IMG + "caption" + END
    assert got == want


def test_empty_side_renders_null(engine_for):
    eng = engine_for("fp32")
    got = eng.render_prompt(ScorePair(RerankItem(text="q"), RerankItem()))
    assert got.endswith("<Query>:q\n<Document>:NULL" + END)


def test_truncation_keeps_special_tokens_and_final_tail():
    keep = {100, 101}
    ids = [100, 1, 2, 101, 101, 3, 4, 5, 6, 7, 100, 8, 9]
    out = truncate_keeping_final(ids, 9, keep, tail=2)
    assert out[-2:] == [8, 9]  # the final tokens (generation prompt) survive
    assert [t for t in out if t in keep] == [100, 101, 101, 100]  # vision/turn markers all kept
    assert len(out) == 9 and out[:6] == [100, 1, 2, 101, 101, 3]  # body text cut from its end
    assert truncate_keeping_final(ids, 5, keep, tail=2) is None  # cannot fit: caller raises
    assert truncate_keeping_final(ids, 20, keep, tail=2) == ids
