"""Prompt building exactly as the official Qwen3-VL-Reranker does it. Pure: no model, no I/O.

Reference: QwenLM/Qwen3-VL-Embedding, src/models/qwen3_vl_reranker.py. The user turn is a list
of content parts: `<Instruct>: {instruction}`, `<Query>:`, the query's parts, `\\n<Document>:`,
the document's parts; each side renders videos, then images, then text, and an empty side is
the text `NULL`. The checkpoint's chat template (with the generation prompt) turns the
messages into text; the scored position is the last token.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.inputs import RerankItem

SYSTEM_PROMPT = (
    'Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
    'Note that the answer can only be "yes" or "no".'
)
DEFAULT_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
QUERY_PREFIX = "<Query>:"
DOCUMENT_PREFIX = "\n<Document>:"

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"

# The Qwen3-VL chat template, reduced to what a rerank conversation uses (system and user turns of
# text, image and video parts, generation prompt). Real checkpoints bring their own template;
# this one ships with the project's tiny model and renders the same text for these messages.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


def item_content(item: RerankItem, prefix: str) -> list[dict]:
    """Content parts of one side: prefix, then videos, images, text; `NULL` when the side is empty."""
    parts: list[dict] = [{"type": "text", "text": prefix}]
    if item.is_empty:
        parts.append({"type": "text", "text": "NULL"})
        return parts
    parts.extend({"type": "video"} for _ in item.videos)
    parts.extend({"type": "image"} for _ in item.images)
    if item.text is not None:
        parts.append({"type": "text", "text": item.text})
    return parts


def build_messages(query: RerankItem, document: RerankItem, instruction: str) -> list[dict]:
    """The chat messages the official reranker scores for one (query, document) pair."""
    return _messages(query, item_content(document, DOCUMENT_PREFIX), instruction)


def _messages(query: RerankItem, document_parts: list[dict], instruction: str) -> list[dict]:
    content = [{"type": "text", "text": "<Instruct>: " + instruction}]
    content += item_content(query, QUERY_PREFIX)
    content += document_parts
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": content},
    ]


# ---- one template render per request ---------------------------------------------------------
# The chat template is Jinja: rendering it per pair costs more than a small model's forward pass.
# Every pair of a request renders the same text around the document, so a request renders once
# with a sentinel where the document goes, and each document's parts are spliced in. The engine
# checks at load that this equals the full render for its checkpoint's template (else it renders
# each pair in full).

DOCUMENT_SENTINEL = "\x00rerank-document\x00"
_PART_TEXT = {"image": IMAGE_PLACEHOLDER, "video": VIDEO_PLACEHOLDER}


def render_around_document(render, query: RerankItem, instruction: str) -> tuple[str, str] | None:
    """(text before the document, text after it) for `render(messages) -> str`; None if the
    query itself contains the sentinel."""
    text = render(_messages(query, [{"type": "text", "text": DOCUMENT_SENTINEL}], instruction))
    pieces = text.split(DOCUMENT_SENTINEL)
    return (pieces[0], pieces[1]) if len(pieces) == 2 else None


QUERY_SENTINEL = "\x00rerank-query\x00"


def render_before_query(render, instruction: str) -> str | None:
    """The text every request with `instruction` renders before its query (system turn,
    instruction, the query's label), for `render(messages) -> str`; None if the template does not
    render the query's text once."""
    text = render(_messages(RerankItem(text=QUERY_SENTINEL), [{"type": "text", "text": DOCUMENT_SENTINEL}], instruction))
    pieces = text.split(QUERY_SENTINEL)
    return pieces[0] if len(pieces) == 2 else None


def document_text(document: RerankItem) -> str:
    """The document's parts as the Qwen chat templates render content parts: concatenated."""
    return "".join(part["text"] if part["type"] == "text" else _PART_TEXT[part["type"]] for part in item_content(document, DOCUMENT_PREFIX))


@dataclass(frozen=True)
class VisionSlot:
    """One image or video in a rendered prompt, in order of appearance."""

    kind: str  # "image" | "video"
    tokens_per_frame: int  # merged visual tokens per temporal group
    timestamps: tuple[float, ...] = ()  # video only: one per temporal group


def expand_vision_placeholders(text: str, slots: list[VisionSlot]) -> str:
    """Replace each single-token placeholder with as many pad tokens as the vision tower emits.

    Videos become one `<t seconds><|vision_start|>pads<|vision_end|>` block per temporal group,
    as the Qwen3-VL processor renders them.
    """
    out: list[str] = []
    pos = 0
    for slot in slots:
        ph = IMAGE_PLACEHOLDER if slot.kind == "image" else VIDEO_PLACEHOLDER
        at = text.find(ph, pos)
        if at < 0:
            raise ValueError(f"rendered prompt lacks a {slot.kind} placeholder")
        out.append(text[pos:at])
        if slot.kind == "image":
            out.append("<|vision_start|>" + "<|image_pad|>" * slot.tokens_per_frame + "<|vision_end|>")
        else:
            for t in slot.timestamps:
                out.append(f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * slot.tokens_per_frame + "<|vision_end|>")
        pos = at + len(ph)
    out.append(text[pos:])
    return "".join(out)


# The official reranker truncates all but the last 5 tokens (the end of the user turn and the
# generation prompt, `input_ids[:-5]`) to MAX_LENGTH and appends those 5: a pair has at most
# max_length + 5 tokens.
FINAL_TOKENS = 5


def truncate_keeping_final(ids: list[int], max_length: int, keep: set[int], tail: int = FINAL_TOKENS) -> list[int] | None:
    """Fit the body (all but the final `tail` tokens) into `max_length` by dropping ordinary
    tokens from its end, as the official `truncate_tokens_optimized` does.

    Special tokens (vision pads, turn markers: `keep`) and the final `tail` tokens (where the score
    is read) are never dropped, so vision tokens stay aligned with their features. Returns None
    when the body's special tokens alone exceed `max_length` (the official code would go on with an
    over-long sequence; here it is refused).
    """
    body, end = ids[: len(ids) - tail], ids[len(ids) - tail :]
    if len(body) <= max_length:
        return ids
    budget = max_length - sum(1 for t in body if t in keep)
    if budget < 0:
        return None
    kept: list[int] = []
    for t in body:
        if t in keep:
            kept.append(t)
        elif budget > 0:
            kept.append(t)
            budget -= 1
    return kept + end
