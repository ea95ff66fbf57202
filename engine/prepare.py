"""Phase one: a request becomes token ids, multimodal positions and pixel patches, on a CPU worker.

This is the only phase that can fail a request for its input, and it fails only that request,
with a named error: text that is not valid Unicode, an image that does not
decode or is over a limit, a request whose images decode to more pixels than its budget.
Nothing here touches the model's weights; `engine.forward` consumes the result.

Shared prefix: every pair of a request renders the same text up to the document (system turn,
instruction, query). `shared` is the number of leading tokens all rows have in common (cut so
that the prefix holds only whole query images/videos), and forward runs them once. `common` is
the part of them every request with the same instruction renders alike (system turn and
instruction, before the query): forward keeps its keys and values between batches.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from engine.config import EngineConfig
from engine.errors import InputError
from engine.features import FeatureSpec, ImageFeatures
from engine.inputs import ImageInput, RerankItem, ScoreRequest, VideoInput
from engine.prompt import (
    VisionSlot,
    build_messages,
    document_text,
    expand_vision_placeholders,
    render_around_document,
    render_before_query,
    truncate_keeping_final,
)
from engine.vision import PixelBudget, PixelPatches, VisionPreprocessor

log = logging.getLogger(__name__)

IMAGE, VIDEO = 1, 2  # mm_token_type_ids values, as the HF processors emit them
RopeIndex = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class PreparedRow:
    """One (query, document) pair, whole: the forward pass slices off the shared prefix."""

    ids: torch.Tensor  # (L,) token ids
    positions: torch.Tensor  # (3, L) multimodal rotary positions
    visuals: tuple[str, ...]  # feature keys of the pair's images/videos, in order of their tokens
    kinds: tuple[int, ...]  # IMAGE or VIDEO per visual

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class PreparedRequest:
    rows: list[PreparedRow]
    shared: int = 0  # leading tokens common to every row, computed once (0: not shared)
    shared_visuals: int = 0  # visuals inside those tokens
    common: int = 0  # leading tokens every request with this instruction has (text only; 0: none)
    features: dict[str, ImageFeatures] = field(default_factory=dict)  # known features, by key
    patches: dict[str, PixelPatches] = field(default_factory=dict)  # visuals the ViT must run, by key
    digests: dict[str, str] = field(default_factory=dict)  # key -> digest of each image to encode, for new features


def check_text(text: str, field_name: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(field_name, f"text is not valid Unicode (a lone surrogate at character {e.start})") from None


def head_cut(tokenizer, head: str, special_tokens: Sequence[str]) -> int:
    """An offset in `head` where tokenizing the two sides apart gives the tokens of the whole,
    whatever text follows the head: just after its last special token (added tokens split the
    input before anything else), or later at the end of a pre-token that no following text can
    move: at least 8 characters before the end of the head (a pre-token's extent depends on the
    next character or two), a pre-token that does not end in whitespace (lookahead patterns such
    as `\\s+(?!\\S)` look past it), in ASCII text (no normalizer composes across it).
    `Preparer.token_ids` still checks each request's first pair against the whole."""
    start = max((head.rfind(t) + len(t) for t in special_tokens if t and t in head), default=0)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    region = head[start:]
    if backend is None or backend.pre_tokenizer is None or not region.isascii():
        return start
    if backend.normalizer is not None and backend.normalizer.normalize_str(region) != region:
        return start
    cut = start
    for _, (_, end) in backend.pre_tokenizer.pre_tokenize_str(region):
        if 0 < end <= len(region) - 8 and not region[end - 1].isspace():
            cut = start + end
    return cut


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """How many leading items every sequence shares: those the lexicographically first and last
    share (two comparisons in C find them; no tensor per row)."""
    lo, hi = min(seqs), max(seqs)
    return next((i for i, (a, b) in enumerate(zip(lo, hi)) if a != b), min(len(lo), len(hi)))


def raw_batch_encoder(tokenizer) -> Callable[[list[str]], list[list[int]] | None] | None:
    """Token ids of a batch of texts from the Rust tokenizer's batch encode without offsets
    (`encode_batch_fast`): 0.39 against 0.65 ms for a request of 8 documents (the tokenizer call's
    Python around the encode, and the offsets, cost the difference). Only for a fast tokenizer whose
    class keeps transformers' own encode path (some override it); and each call returns None, for
    the tokenizer's call to answer, while the backend would truncate or pad (the call turns both
    off first; a caller's `truncation=`/`padding=` leaves them on). None: not applicable."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(type(tokenizer), "_encode_plus", None) is not TokenizersBackend._encode_plus:
        return None
    encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch

    def ids(texts: list[str]) -> list[list[int]] | None:
        if backend.truncation is not None or backend.padding is not None:
            return None
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    return ids


class Preparer:
    """Turns `ScoreRequest`s into `PreparedRequest`s. Thread-safe: run several on a CPU pool."""

    def __init__(
        self,
        cfg: EngineConfig,
        tokenizer,
        chat_template: str,
        vision: VisionPreprocessor,
        feature_spec: FeatureSpec,
        rope_index: RopeIndex,
        *,
        image_token_id: int,
        video_token_id: int,
        video_refusal: str | None = None,
    ):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.vision = vision
        self.feature_spec = feature_spec
        self.rope_index = rope_index
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.video_refusal = video_refusal  # why this model takes no video (None: it does)
        self.merge = vision.params.merge_size**2
        self.keep_tokens = set(tokenizer.all_special_ids) | {image_token_id, video_token_id}
        self._special_strings = [t for t in tokenizer.all_special_tokens + list(getattr(tokenizer, "added_tokens_encoder", {})) if t]
        self._user_forbidden = [t for t in tokenizer.all_special_tokens if t]
        self.splice_ok = self._check_splice()
        self._heads: dict[str, torch.Tensor] = {}  # instruction -> its tokens before any query (`_common`)
        self._raw_ids = raw_batch_encoder(tokenizer)

    # ---- text ---------------------------------------------------------------------------------

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True)

    def render_pair(self, query: RerankItem, document: RerankItem, instruction: str | None = None) -> str:
        """The chat-templated text of one pair, one placeholder per image/video (before expansion)."""
        return self.render(build_messages(query, document, instruction or self.cfg.default_instruction))

    def _check_splice(self) -> bool:
        """Whether rendering once per request and splicing documents in equals a full render per
        pair for this checkpoint's template (true of the Qwen templates)."""
        probe = ImageInput("0" * 64, None)
        query = RerankItem(text="probe query", images=(probe,))
        around = render_around_document(self.render, query, self.cfg.default_instruction)
        if around is None:
            return False
        docs = (RerankItem(text="a document"), RerankItem(text="text", images=(probe, probe)), RerankItem(images=(probe,)))
        return all(self.render_pair(query, d) == around[0] + document_text(d) + around[1] for d in docs)

    def token_ids(self, req: ScoreRequest, query_slots: list[VisionSlot], doc_slots: list[list[VisionSlot]]) -> list[list[int]]:
        """Token ids of every pair of the request. The text before the document (system turn,
        instruction, query) is rendered once; when the template splices, its tokens up to a safe
        cut (`head_cut`) are computed once too, and each document tokenizes only the rest. The
        first pair is checked against a whole tokenization; on any difference the request falls
        back to tokenizing every pair whole."""
        instruction = req.instruction or self.cfg.default_instruction
        around = render_around_document(self.render, req.query, instruction) if self.splice_ok else None
        fields = [d.field for d in req.documents]
        if around is None:
            texts = [expand_vision_placeholders(self.render_pair(req.query, d, instruction), query_slots + s) for d, s in zip(req.documents, doc_slots)]
            return self.tokenize_many(texts, fields)
        head = expand_vision_placeholders(around[0], query_slots)
        rests = [expand_vision_placeholders(document_text(d) + around[1], s) for d, s in zip(req.documents, doc_slots)]
        cut = head_cut(self.tokenizer, head, self._special_strings)
        # One tokenizer call: the head, the first pair whole (the check), each document after the head.
        head_ids, first_whole, *tails = self.tokenize_many([head[:cut], head + rests[0], *(head[cut:] + rest for rest in rests)],
                                                           [req.query.field, fields[0], *fields])  # fmt: skip
        ids = [head_ids + tail for tail in tails]
        if ids[0] != first_whole:
            log.warning("split tokenization differs from the whole for this request; tokenizing every pair whole")
            ids = self.tokenize_many([head + rest for rest in rests], fields)
        return ids

    def tokenize(self, text: str, field_name: str) -> list[int]:
        try:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        except Exception as e:  # a tokenizer refusing text is that request's input problem
            raise InputError(field_name, f"text cannot be tokenized ({type(e).__name__})") from None

    def tokenize_many(self, texts: list[str], field_names: list[str]) -> list[list[int]]:
        """Token ids of each text, in one tokenizer call (the fast tokenizer's batch encode: a third
        of the per-text calls' time for 8 documents). Should the tokenizer refuse one, each is
        tokenized alone, so the error names that one's field."""
        try:
            ids = self._raw_ids(texts) if self._raw_ids is not None else None
            return ids if ids is not None else self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        except Exception:  # noqa: BLE001 - find which text, below
            return [self.tokenize(t, f) for t, f in zip(texts, field_names)]

    def cut_text(self, text: str, max_tokens: int) -> str:
        """Text cut to its first `max_tokens` tokens (Cohere `max_tokens_per_doc`)."""
        if len(text) <= max_tokens:  # a token is at least one character
            return text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= max_tokens else self.tokenizer.decode(ids[:max_tokens])

    # ---- the request --------------------------------------------------------------------------

    def prepare(self, req: ScoreRequest, features: Mapping[str, ImageFeatures] | None = None) -> PreparedRequest:
        """Validate and encode one request. `features` (cache key -> features) skips decoding
        those images; every other image is decoded and patchified here."""
        features = features or {}
        req = self.validated(req)
        items = (req.query, *req.documents)

        out = PreparedRequest(rows=[])
        # Every image to decode is charged from its header before any is decoded: a request over
        # its pixel budget is refused before it costs a decode.
        budget = PixelBudget(self.cfg.max_request_pixels)
        to_decode = {self.feature_spec.cache_key(img.digest): img for item in items for img in item.images if img.data is not None}
        for key, img in to_decode.items():
            if key not in features:
                self.vision.charge(img.data, img.field, budget)
        grids: dict[str, tuple[int, int, int]] = {}
        timestamps: dict[str, tuple[float, ...]] = {}
        for item in items:
            for video in item.videos:
                key = self._video(video, out, budget)
                grids[key], timestamps[key] = out.patches[key].grid_thw, out.patches[key].timestamps
            for img in item.images:
                key = self._image(img, features, out)
                grids[key] = (out.features[key] if key in out.features else out.patches[key]).grid_thw

        def slots(visuals: list[tuple[str, int]]) -> list[VisionSlot]:
            return [
                VisionSlot("video", grids[k][1] * grids[k][2] // self.merge, timestamps[k]) if kind == VIDEO
                else VisionSlot("image", grids[k][0] * grids[k][1] * grids[k][2] // self.merge)
                for k, kind in visuals
            ]  # fmt: skip

        query_visuals = self._visuals(req.query)
        doc_visuals = [self._visuals(d) for d in req.documents]
        token_ids = []
        for doc, visuals, ids in zip(req.documents, doc_visuals, self.token_ids(req, slots(query_visuals), [slots(v) for v in doc_visuals])):
            token_ids.append(self._truncated(ids, doc.field))  # a document's errors in document order
            out.rows.append(self._row(token_ids[-1], query_visuals + visuals, grids, doc.field))
        if self.cfg.share_prefix and len(out.rows) > 1:
            out.shared, out.shared_visuals = self._shared_prefix(token_ids, out.rows[0], len(query_visuals), grids)
        if self.cfg.share_prefix:
            out.common = self._common(req.instruction or self.cfg.default_instruction, out)
        return out

    def _common(self, instruction: str, out: PreparedRequest) -> int:
        """How many leading tokens of every row are `instruction`'s head (`_head_ids`): all of it
        when every row starts with it and has a token after it, else 0."""
        head = self._head_ids(instruction)
        n = len(head)
        if n < self.cfg.min_shared_tokens:
            return 0
        rows = out.rows[:1] if out.shared >= n else out.rows  # rows that share `shared` tokens: one says it for all
        if all(len(r) > n and torch.equal(r.ids[:n], head) for r in rows):
            return n
        return 0

    def _head_ids(self, instruction: str) -> torch.Tensor:
        """Token ids of the text every request with `instruction` renders before its query, up to
        a cut no following text changes (`head_cut`); empty if the template gives none."""
        head = self._heads.get(instruction)
        if head is None:
            text = render_before_query(self.render, instruction)
            ids = self.tokenize(text[: head_cut(self.tokenizer, text, self._special_strings)], "instruction") if text is not None else []
            if self.image_token_id in ids or self.video_token_id in ids:
                ids = []
            head = torch.tensor(ids, dtype=torch.long)
            if len(self._heads) >= 64:  # instructions are few; a client sending many new ones costs a render each
                self._heads.clear()
            self._heads[instruction] = head
        return head

    def validated(self, req: ScoreRequest) -> ScoreRequest:
        """The request's text checked (valid Unicode, no reserved tokens), videos refused where the
        model takes none, documents cut to `max_tokens_per_doc`: every backend's first step."""
        if not req.documents:
            raise InputError("documents", "must not be empty")
        for item in (req.query, *req.documents):
            if item.text:
                self._check_user_text(item.text, f"{item.field}.text")
            if item.videos and self.video_refusal:
                raise InputError(item.videos[0].field, self.video_refusal)
        if req.instruction:
            self._check_user_text(req.instruction, "instruction")
        if req.max_tokens_per_doc is not None:
            docs = tuple(replace(d, text=self.cut_text(d.text, req.max_tokens_per_doc)) if d.text else d for d in req.documents)
            req = replace(req, documents=docs)
        return req

    def _check_user_text(self, text: str, field_name: str) -> None:
        check_text(text, field_name)
        # A special token typed as text would become the real token (an image pad, a turn marker)
        # and misalign the prompt: refused, naming it.
        for token in self._user_forbidden:
            if token in text:
                raise InputError(field_name, f"text contains the reserved token {token!r}")

    def _image(self, img: ImageInput, features: Mapping[str, ImageFeatures], out: PreparedRequest) -> str:
        key = self.feature_spec.cache_key(img.digest)
        if key in out.features or key in out.patches:
            return key
        if key in features:
            out.features[key] = features[key]
        elif img.data is None:
            raise InputError(img.field, "image known only by its digest has no cached features; send its bytes")
        else:
            out.patches[key] = self.vision.image(img.data, img.field)  # charged in `prepare`
            out.digests[key] = img.digest
        return key

    def _video(self, video: VideoInput, out: PreparedRequest, budget: PixelBudget) -> str:
        key = self._video_key(video)
        if key not in out.patches:
            out.patches[key] = self.vision.video(video, video.field, budget)
        return key

    def _visuals(self, item: RerankItem) -> list[tuple[str, int]]:
        """(key, kind) of an item's visuals in prompt order: videos first, then images."""
        return [(self._video_key(v), VIDEO) for v in item.videos] + [(self.feature_spec.cache_key(img.digest), IMAGE) for img in item.images]

    def _video_key(self, video: VideoInput) -> str:
        """A video's key within a batch: videos are encoded per batch, never cached."""
        return "video:" + self.feature_spec.cache_key(video.digest)

    def _truncated(self, ids: list[int], doc_field: str) -> list[int]:
        cut = truncate_keeping_final(ids, self.cfg.max_length, self.keep_tokens)
        if cut is None:
            raise InputError(doc_field, f"images/video need more than max_length={self.cfg.max_length} tokens")
        return cut

    def _row(self, ids: list[int], visuals: list[tuple[str, int]], grids: Mapping[str, tuple[int, int, int]], doc_field: str) -> PreparedRow:
        ids_t = torch.tensor(ids, dtype=torch.long)
        if not visuals and self.image_token_id not in ids and self.video_token_id not in ids:  # text only (most rows): nothing to check
            return PreparedRow(ids_t, torch.arange(len(ids), dtype=torch.long).expand(3, -1), (), ())
        mm = self.mm_types(ids_t)
        expected = sum(grids[k][0] * grids[k][1] * grids[k][2] // self.merge for k, _ in visuals)
        if int((mm > 0).sum()) != expected:
            raise InputError(doc_field, "the prompt's vision tokens do not match its images and videos")
        if not visuals:  # text only: every rotary section is the plain position
            positions = torch.arange(len(ids), dtype=torch.long).expand(3, -1)
        else:
            img = [grids[k] for k, kind in visuals if kind == IMAGE]
            vid = [grids[k] for k, kind in visuals if kind == VIDEO]
            positions = self.rope_index(
                ids_t[None], mm[None], torch.tensor(img, dtype=torch.long) if img else None, torch.tensor(vid, dtype=torch.long) if vid else None
            )[:, 0]
        return PreparedRow(ids_t, positions, tuple(k for k, _ in visuals), tuple(kind for _, kind in visuals))

    def mm_types(self, ids: torch.Tensor) -> torch.Tensor:
        """mm_token_type_ids of token ids: IMAGE at image pads, VIDEO at video pads, 0 elsewhere."""
        mm = torch.zeros_like(ids, dtype=torch.int)
        mm[ids == self.image_token_id] = IMAGE
        mm[ids == self.video_token_id] = VIDEO
        return mm

    def _shared_prefix(self, ids: list[list[int]], first_row: PreparedRow, query_visuals: int, grids: Mapping[str, tuple[int, int, int]]) -> tuple[int, int]:
        """(tokens, visuals) every row shares: the longest common prefix of the rows' token ids
        (`ids`, the first row's as `first_row`), cut back to the start of the first visual it would
        split or that belongs to a document. At least one token of each row stays outside it (the
        scored position)."""
        lcp = min(common_prefix_length(ids), min(map(len, ids)) - 1)
        first = first_row.ids
        if not first_row.visuals:  # text only: no vision token to keep whole (`_row` checked)
            return (lcp, 0) if lcp >= self.cfg.min_shared_tokens else (0, 0)
        vis_pos = ((first == self.image_token_id) | (first == self.video_token_id)).nonzero().flatten().tolist()
        sizes = [grids[k][0] * grids[k][1] * grids[k][2] // self.merge for k in first_row.visuals]
        ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]  # visual tokens up to the end of visual i
        inside = bisect.bisect_left(vis_pos, lcp)  # visual tokens before the cut
        whole = bisect.bisect_right(ends, inside)  # visuals entirely before it
        if whole < len(ends) and inside > (ends[whole - 1] if whole else 0):
            lcp = vis_pos[ends[whole - 1] if whole else 0]  # the cut splits visual `whole`: cut before it
        if whole > query_visuals:
            whole = query_visuals
            lcp = vis_pos[ends[whole - 1] if whole else 0]
        if lcp < self.cfg.min_shared_tokens:
            return 0, 0
        return lcp, whole
