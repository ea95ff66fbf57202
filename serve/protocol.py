"""HTTP request and response models of the rerank API, apart from any serving logic.

The public shapes share one internal request (`RerankRequest`):

* Cohere v2 (`POST /v2/rerank`): `model`, `query`, `documents`, `top_n`, `return_documents`,
  `max_tokens_per_doc`; results carry `relevance_score`.
* Jina, Cohere v1 and vLLM's `/v1/rerank` (`POST /v1/rerank`): `model`, `query`, `documents`,
  `top_n`, `return_documents`; the answer carries `id` and `usage`.
* TEI (`POST /rerank` with `texts`): `query`, `texts`, `raw_scores`, `return_text`, `truncate`,
  `truncation_direction`; the response is a bare list with `score`.
* vLLM's and infinity's `/rerank` (with `documents`) and vLLM's `/score`: `serve.protocol_vllm`.

Every shape also takes the extensions `instruction`, `arm` (pin to a precision arm) and `user`
(sticky A/B key). Fields a peer server accepts but this fleet does not use are accepted and
ignored, each declared (and described) on the shape that takes it, so a drop-in client never
breaks and a misspelt field is still refused by name. A query or document is a plain string, an
object with `text` / `image` / `video`, or vLLM-style content parts. Each converts to
`RerankRequest`, whose items are structurally parsed (`ItemSpec`) but whose media are still
references (URL, data URI, base64): turning references into bytes is `serve.fetch`'s job.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, RootModel, StrictBool, model_validator

from engine.errors import InputError

if TYPE_CHECKING:
    from serve.config import LimitsConfig

# A sigmoid score of exactly 0 or 1 (float32 saturation) has an infinite logit, which JSON
# cannot carry; raw scores are clamped to this many units.
_MAX_ABS_LOGIT = 30.0


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _json_integer(value: Any) -> Any:
    if isinstance(value, (bool, str)):
        raise ValueError("Input should be a valid integer")
    return value


def _json_int(*constraints: Any) -> Any:
    """An integer as JSON (and the schema) says: 3 and 3.0, never true or "3" (which pydantic's lax
    int takes); constraints before the check, so the schema carries them as `minimum`."""
    return Annotated[int, *constraints, BeforeValidator(_json_integer)]


JsonInt = _json_int()
Count = _json_int(Field(ge=0))


# ---------------------------------------------------------------------------- item shapes


class URLRef(_Body):
    url: str = Field(..., description="http(s) URL, data URI, or raw base64 of the media.")


class ImageURLRef(URLRef):
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description="OpenAI's image detail level: accepted and ignored (an image is sized as the model's own processor sizes it)."
    )


FrameList = Annotated[list[str], Field(min_length=1)]


class TextPart(_Body):
    type: Literal["text"] = Field(..., description="A text part.")
    text: str = Field(..., description="The text.")


class ImageUrlPart(_Body):
    type: Literal["image_url"] = Field(..., description="An image given as {url} or a string.")
    image_url: ImageURLRef | str = Field(..., description="Image (URL, data URI or base64), as {url[, detail]} or a string.")


class ImagePart(_Body):
    type: Literal["image"] = Field(..., description="An image given as a string.")
    image: str = Field(..., description="Image (URL, data URI or base64).")


class VideoUrlPart(_Body):
    type: Literal["video_url"] = Field(..., description="A video file given as {url} or a string.")
    video_url: URLRef | str = Field(..., description="Video file (URL, data URI or base64), as {url} or a string.")


class VideoPart(_Body):
    type: Literal["video"] = Field(..., description="A video: a file reference or frames.")
    video: str | FrameList = Field(..., description="A video file reference, or a list of frame images in time order.")


# One vLLM/OpenAI-style content part: `type` names the one payload field it carries (the schema
# says so: a tagged union of closed objects).
ContentPart = Annotated[TextPart | ImageUrlPart | ImagePart | VideoUrlPart | VideoPart, Field(discriminator="type")]
CONTENT_PART_TAGS = frozenset(get_args(m.model_fields["type"].annotation)[0] for m in (TextPart, ImageUrlPart, ImagePart, VideoUrlPart, VideoPart))
ITEM_FIELDS = ("text", "image", "video")


def _item_json_schema(schema: dict[str, Any]) -> None:
    """The item object's schema says what its validator enforces: content parts or the
    text/image/video fields, never both."""
    schema["not"] = {"required": ["content"], "anyOf": [{"required": [f]} for f in ITEM_FIELDS]}


class InputItem(_Body):
    """A query or document: text, images and a video; or content parts (any number of texts, images and videos); or (on input) a plain string."""

    # Optional fields are absent rather than null (JSON null is refused), so the schema can say
    # "content or the fields" exactly.
    model_config = ConfigDict(extra="forbid", json_schema_extra=_item_json_schema)

    text: str = Field(None, description="Text of the item. An item with no text, image or video is scored as NULL (the official behaviour).")  # type: ignore[assignment]
    image: str | list[str] = Field(None, description="One image or a list: http(s) URL, data URI or base64 each.")  # type: ignore[assignment]
    video: str | FrameList = Field(  # type: ignore[assignment]
        None, description="A video file reference (URL, data URI, base64), or a list of frame images in time order."
    )
    content: list[ContentPart] = Field(  # type: ignore[assignment]
        None, min_length=1, description="vLLM-style content parts (text, image_url, image, video_url, video)."
    )

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        # On input an item may also be a plain string (its text): say so in the schema.
        return {"anyOf": [{"type": "string"}, handler(core_schema)]}

    @model_validator(mode="before")
    @classmethod
    def _plain_string_is_text(cls, value: Any) -> Any:
        return {"text": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_form(self) -> InputItem:
        if self.content is not None and (self.text is not None or self.image is not None or self.video is not None):
            raise ValueError("give either content parts or text/image/video fields, not both")
        return self

    def echo(self) -> dict[str, Any]:
        """The item as the client gave it (for return_documents), without unset fields; content
        parts as vLLM returns them (`{"multi_modal": [parts]}`, its null `text` left out as every
        null is)."""
        if self.content is not None:
            return {"multi_modal": [part.model_dump(exclude_none=True, mode="json") for part in self.content]}
        if self.image is None and self.video is None:  # text alone, most documents: what model_dump gives, at a fifth of its cost
            return {} if self.text is None else {"text": self.text}
        return self.model_dump(exclude_none=True, mode="json")

    def parse(self, field: str) -> ItemSpec:
        texts: list[str] = []
        images: list[MediaRef] = []
        videos: list[VideoSpec] = []
        if self.content is None:
            if self.text is not None:
                texts.append(self.text)
            for i, ref in enumerate(_as_list(self.image)):
                images.append(MediaRef(ref=ref, field=f"{field}.image" if isinstance(self.image, str) else f"{field}.image.{i}"))
            if self.video is not None:
                videos.append(_video_spec(self.video, f"{field}.video"))
        else:
            for i, part in enumerate(self.content):
                where = f"{field}.content.{i}"
                if part.type == "text":
                    texts.append(part.text)
                elif part.type in ("image_url", "image"):
                    value = part.image_url if part.type == "image_url" else part.image
                    ref = value.url if isinstance(value, URLRef) else value
                    images.append(MediaRef(ref=str(ref), field=f"{where}.{part.type}"))
                elif part.type == "video_url":
                    value = part.video_url
                    ref = value.url if isinstance(value, URLRef) else value
                    videos.append(VideoSpec(source=MediaRef(ref=str(ref), field=f"{where}.video_url"), field=f"{where}.video_url"))
                else:
                    videos.append(_video_spec(part.video, f"{where}.video"))  # type: ignore[arg-type]
        # Several texts render back to back, as the official template renders consecutive text parts.
        text = "".join(texts) if texts else None
        # Nothing at all ({} as an item) is scored as NULL, as the official reranker does.
        return ItemSpec(text=text, images=images, videos=videos, field=field)


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _video_spec(value: str | list[str], field: str) -> VideoSpec:
    if isinstance(value, str):
        return VideoSpec(source=MediaRef(ref=value, field=field), field=field)
    if not value:
        raise InputError(field, "a frame list must not be empty")
    return VideoSpec(frames=[MediaRef(ref=f, field=f"{field}.{i}") for i, f in enumerate(value)], field=field)


# ------------------------------------------------------------------------ internal request


class MediaRef(BaseModel):
    """A media reference still to be resolved to bytes, with the JSON path it came from."""

    model_config = ConfigDict(frozen=True)

    ref: str = Field(..., description="http(s) URL, data URI or raw base64.")
    field: str = Field(..., description="Dotted JSON path of the reference, for error messages (e.g. documents.3.image).")


class VideoSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    source: MediaRef | None = Field(None, description="A video file reference.")
    frames: list[MediaRef] = Field(default_factory=list, description="Frame images in time order.")
    field: str = Field(..., description="Dotted JSON path of the video.")


class ItemSpec(BaseModel):
    """A parsed query or document: text plus media references."""

    model_config = ConfigDict(frozen=True)

    text: str | None = Field(None, description="Text (content-part texts joined, as the template renders them).")
    images: list[MediaRef] = Field(default_factory=list, description="Image references in order.")
    videos: list[VideoSpec] = Field(default_factory=list, description="Video references in order.")
    field: str = Field(..., description="Dotted JSON path of the item (query, documents.3, texts.0).")

    def content(self) -> tuple:
        """What the item says, apart from where it says it (equal queries of different pairs are equal here)."""
        videos = tuple((v.source.ref if v.source else None, tuple(f.ref for f in v.frames)) for v in self.videos)
        return self.text, tuple(m.ref for m in self.images), videos


class RerankRequest(BaseModel):
    """The one internal request every API shape converts to."""

    api: Literal["cohere", "jina", "tei", "vllm", "score"] = Field(..., description="Which public shape the request came in.")
    query: ItemSpec = Field(..., description="The parsed query (the score API's N:N form: the first pair's).")
    documents: list[ItemSpec] = Field(..., description="The parsed documents, in request order.")
    documents_echo: list[Any] = Field(..., description="Documents as given, returned when asked to.")
    documents_field: str = Field("documents", description="The JSON field holding the documents in this request's shape (documents, texts, items, data_2, text_2).")
    pair_queries: list[ItemSpec] | None = Field(
        None, description="The score API's N:N form: documents[i] is scored against pair_queries[i]; None: every document against `query`."
    )
    top_n: int | None = Field(None, description="How many results to return; all when None.")
    return_documents: StrictBool = Field(False, description="Include each document in its result.")
    documents_as_text: StrictBool = Field(False, description="A document given as a plain string is returned as that string (infinity), not as {text}.")
    instruction: str | None = Field(None, description="Task instruction; the model's default when None.")
    arm: str | None = Field(None, description="Arm pinned by the body field `arm`.")
    user: str | None = Field(None, description="Sticky A/B key from the body field `user`.")
    raw_scores: StrictBool = Field(False, description="Return logits instead of probabilities (TEI's and infinity's raw_scores, vLLM's use_activation false).")
    max_tokens_per_doc: int | None = Field(None, description="Per-document token limit (Cohere's, vLLM's).")

    def served(self, score: float) -> float:
        """A score as this request asks for it: the probability, or its logit for raw scores."""
        return logit(score) if self.raw_scores else score

    def parts(self) -> list[RerankRequest]:
        """The engine requests this request is scored as, their documents in request order:
        itself, or (the score API's N:N form) one per run of consecutive pairs with the same query."""
        if self.pair_queries is None:
            return [self]
        runs: list[tuple[ItemSpec, list[int]]] = []
        for i, query in enumerate(self.pair_queries):
            if runs and runs[-1][0].content() == query.content():
                runs[-1][1].append(i)
            else:
                runs.append((query, [i]))
        return [
            self.model_copy(update={"query": query, "pair_queries": None, "documents": [self.documents[i] for i in run],
                                    "documents_echo": [self.documents_echo[i] for i in run]})
            for query, run in runs
        ]  # fmt: skip

    def check_limits(self, limits: LimitsConfig) -> None:
        """Raise `InputError` naming the first field over a configured limit."""
        if len(self.documents) > limits.max_documents:
            raise InputError(self.documents_field, f"{len(self.documents)} documents, over the limit of {limits.max_documents}")
        for item in [self.query, *(self.pair_queries or ()), *self.documents]:
            if item.text is not None and len(item.text) > limits.max_text_chars:
                raise InputError(item.field, f"text has {len(item.text)} characters, over the limit of {limits.max_text_chars}")
            if len(item.images) > limits.max_images_per_item:
                raise InputError(item.field, f"{len(item.images)} images, over the limit of {limits.max_images_per_item}")
            for video in item.videos:
                if len(video.frames) > limits.max_video_frames:
                    raise InputError(video.field, f"{len(video.frames)} frames, over the limit of {limits.max_video_frames}")
        if self.instruction is not None and len(self.instruction) > limits.max_text_chars:
            raise InputError("instruction", f"{len(self.instruction)} characters, over the limit of {limits.max_text_chars}")


# ------------------------------------------------------------------------ public requests


class _Extensions(_Body):
    instruction: str | None = Field(
        None, min_length=1, description="Task instruction for the reranker (vLLM's field of that name); the model's default when omitted."
    )
    arm: str | None = Field(None, description="Pin this request to a named precision arm (same as the pin header).")
    user: str | None = Field(None, min_length=1, description="Sticky A/B key: the same value stays on the same arm.")


class _OneOrList:
    """A list that may also be given as one item alone: its JSON schema says so."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        schema = handler(core_schema)
        return {"anyOf": [schema, schema["items"]]}


def _listed(value: Any) -> Any:
    return value if isinstance(value, list) or value is None else [value]


# Documents (or a side of a score request): a list, or one item alone, which is one document, as
# vLLM takes it (`ScoreInput | list[ScoreInput]`; `{"content": [...]}` alone is one document).
ItemList = Annotated[list[InputItem], BeforeValidator(_listed), Field(min_length=1), _OneOrList]

TOP_N = "Return only the n best results; 0 or null: all of them (vLLM's 0; infinity's and Xinference's null)."


class VllmFields(_Body):
    """The fields vLLM's rerank and score requests declare (one vLLM handler serves `/rerank`,
    `/v1/rerank`, `/v2/rerank`, `/score` and `/v1/score`), so its bodies are taken on each of them."""

    model: str | None = Field(None, description="Model name: accepted and ignored (the fleet serves one model; /v1/models names it).")
    use_activation: StrictBool | None = Field(
        None, description="vLLM: false returns raw scores (the logit log(s/(1-s)), within +-30) instead of the probability s; null or true: s."
    )
    max_tokens_per_doc: Count | None = Field(None, description="vLLM: documents longer than this many tokens are cut to it; null or 0: no cut.")
    truncate_prompt_tokens: _json_int(Field(ge=-1)) | None = Field(
        None, description="vLLM: accepted and ignored. Every pair is truncated as the official reranker truncates it, at the "
        "model's max_length (10240 tokens of body plus the final 5 by default), whatever this says.",
    )  # fmt: skip
    max_tokens_per_query: Count | None = Field(None, description="vLLM: accepted and ignored (no cut of the query; the pair's truncation applies).")
    truncation_side: Literal["left", "right"] | None = Field(None, description="vLLM: accepted and ignored (see truncate_prompt_tokens).")
    padding: Literal["max_length", "do_not_pad"] | None = Field(None, description="vLLM: accepted and ignored.")
    request_id: str | None = Field(None, description="vLLM: accepted and ignored (the answer's id is the x-request-id header's, else a new one).")
    priority: JsonInt | None = Field(None, description="vLLM and Cohere v2: accepted and ignored (no priority scheduling).")
    mm_processor_kwargs: dict[str, Any] | None = Field(None, description="vLLM: accepted and ignored (media are processed as the official reranker does).")
    cache_salt: str | None = Field(None, min_length=1, max_length=1024, description="vLLM: accepted and ignored.")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="vLLM: accepted and ignored (the official template is rendered as it is).")

    def vllm_settings(self) -> dict[str, Any]:
        """The internal request's fields these set: the per-document cut (0: none) and raw scores."""
        return {"max_tokens_per_doc": self.max_tokens_per_doc or None, "raw_scores": self.use_activation is False}


def rerank_request(
    body: _Extensions, api: str, query: InputItem, documents: list[InputItem], docs_field: str = "documents", query_field: str = "query", **fields
) -> RerankRequest:
    """The internal request of a body: its items parsed, the extensions carried over."""
    return RerankRequest(
        api=api, query=query.parse(query_field), documents=[d.parse(f"{docs_field}.{i}") for i, d in enumerate(documents)],
        documents_echo=[d.echo() for d in documents], documents_field=docs_field, instruction=body.instruction, arm=body.arm,
        user=body.user, **fields,
    )  # fmt: skip


class DocumentsRerankRequest(_Extensions, VllmFields):
    """What every rerank body with `query` and `documents` has (Cohere v2, `/v1/rerank`, vLLM's `/rerank`)."""

    query: InputItem = Field(..., description="The search query: a string or a multimodal item.")
    documents: ItemList = Field(..., description="Documents to rank: strings or multimodal items (one alone is one document).")
    top_n: Count | None = Field(None, description=TOP_N)

    def _internal(self, api: str, **fields) -> RerankRequest:
        return rerank_request(self, api, self.query, self.documents, **{"top_n": self.top_n or None, **self.vllm_settings(), **fields})


class CohereRerankRequest(DocumentsRerankRequest):
    """Cohere v2 `/v2/rerank` request (and vLLM's rerank body: vLLM serves `/v2/rerank` with its rerank handler)."""

    return_documents: StrictBool | None = Field(None, description="Include each document in its result; null: false (Cohere's default).")
    max_tokens_per_doc: Count | None = Field(
        None, description="Documents longer than this many tokens are cut to it (before the pair's own truncation); "
        "null: 4096 (Cohere's default; LangChain sends null), 0: no cut (vLLM's 0).",
    )  # fmt: skip
    rank_fields: list[str] | None = Field(None, description="Cohere (older SDKs): accepted and ignored (a document is ranked by its text and media).")
    max_chunks_per_doc: JsonInt | None = Field(None, description="Cohere (older SDKs): accepted and ignored (a document is never chunked).")
    relevant_spans: dict[str, Any] | None = Field(None, description="Cohere (SDK 7.3): accepted and ignored; no spans are returned.")

    def to_internal(self) -> RerankRequest:
        cut = 4096 if self.max_tokens_per_doc is None else (self.max_tokens_per_doc or None)
        return self._internal("cohere", return_documents=bool(self.return_documents), max_tokens_per_doc=cut)


class JinaRerankRequest(DocumentsRerankRequest):
    """`/v1/rerank` request: Jina's, the Cohere v1 SDK's, Xinference's client's, and vLLM's rerank body."""

    return_documents: StrictBool | None = Field(None, description="Include each document in its result; null: true (Jina's default; vLLM always returns them).")
    rank_fields: list[str] | None = Field(None, description="Cohere v1: accepted and ignored (a document is ranked by its text and media).")
    max_chunks_per_doc: JsonInt | None = Field(None, description="Cohere v1, Xinference: accepted and ignored (a document is never chunked).")
    return_len: StrictBool | None = Field(None, description="Xinference: accepted and ignored (token counts are always in `usage`).")
    kwargs: str | None = Field(None, description="Xinference's client (its extra arguments as a JSON string): accepted and ignored.")

    def to_internal(self) -> RerankRequest:
        return self._internal("jina", return_documents=self.return_documents is not False)


class TEIRerankRequest(_Extensions):
    """Text Embeddings Inference `/rerank` request (a body with `texts`)."""

    query: InputItem = Field(..., description="The search query: a string or a multimodal item.")
    texts: list[InputItem] = Field(..., min_length=1, description="Documents to rank: strings or multimodal items.")
    raw_scores: StrictBool = Field(False, description="Return the logit log(s/(1-s)) instead of the probability s.")
    return_text: StrictBool = Field(False, description="Include each text in its result.")
    truncate: StrictBool | None = Field(
        None,
        description="Accepted for compatibility (null too, as TEI's schema allows): inputs over the model's max_length are always "
        "truncated (keeping the final tokens), so this flag does not change results.",
    )
    truncation_direction: Literal["Left", "Right", "left", "right"] = Field(
        "Right", description="Accepted for compatibility (see truncate)."
    )
    model: str | None = Field(None, description="Accepted and ignored, as TEI does (rerankers' TEI provider sends it).")
    top_n: JsonInt | None = Field(None, description="Accepted and ignored, as TEI does: every text is answered (rerankers' TEI provider sends the text count).")

    def to_internal(self) -> RerankRequest:
        return rerank_request(self, "tei", self.query, self.texts, "texts", return_documents=self.return_text, raw_scores=self.raw_scores)


# -------------------------------------------------------------------------------- results


class ImageCacheUse(BaseModel):
    hits: int = Field(0, description="Images of this request whose features came from the cache.")
    misses: int = Field(0, description="Images of this request encoded by the vision tower.")


class ScoreCacheUse(BaseModel):
    hits: int = Field(0, description="Pairs of this request answered from the score cache (scored before; no arm computed them now).")
    misses: int = Field(0, description="Pairs of this request the arm scored now.")


class CascadeUse(BaseModel):
    first: str = Field(..., description="The arm that scored every document (a cascade's cheap stage).")
    then: str = Field(..., description="The arm that rescored the first arm's top k (its expensive stage).")
    k: int = Field(..., description="How many of the first arm's best documents the then arm rescores.")
    then_scored: list[int] = Field(
        ..., description="Documents (indices in the request; pairs, for a score request) whose score is the then arm's; every other "
        "score is the first arm's (scaled down by one factor where needed to sort below every then-arm score).",
    )
    degraded: str | None = Field(None, description="Why the then arm did not rescore (it is down): the answer is the first arm's order and scores alone.")


class ServingMeta(BaseModel):
    arm: str = Field(..., description="Arm that answered.")
    precision: str = Field(..., description="Numeric precision of that arm (a cascade's: first>then, e.g. nf4>fp32).")
    model: str = Field(..., description="Model id the arm serves.")
    routed_by: str = Field(..., description="Why this arm: pinned, sticky, weighted, failover or interleaved (two arms, `arm` is a+b).")
    image_cache: ImageCacheUse = Field(default_factory=ImageCacheUse, description="Image-feature cache use.")
    score_cache: ScoreCacheUse | None = Field(None, description="Score-cache use (absent where the fleet runs no score cache, and for interleaved answers).")
    cascade: CascadeUse | None = Field(None, description="A cascade arm's answer: its two arms and which documents each scored (absent for a plain arm).")


class RerankOutcome(BaseModel):
    """Scores of one request in document order, plus who computed them."""

    scores: list[float] = Field(..., description="Sigmoid score per document, in request order.")
    meta: ServingMeta = Field(..., description="Which arm answered and how.")
    tokens: int = Field(0, description="Tokens the decoder ran for this request (a shared prefix counted once).")
    order: list[int] | None = Field(None, description="The documents best first when not by score alone (an interleaved answer; a cascade's, whose ties it settles).")

    def ranked(self, top_n: int | None) -> list[int]:
        order = self.order if self.order is not None else sorted(range(len(self.scores)), key=lambda i: -self.scores[i])
        return order if top_n is None else order[:top_n]


def logit(p: float) -> float:
    """log(p / (1 - p)), clamped so saturated probabilities stay finite."""
    if p <= 0.0:
        return -_MAX_ABS_LOGIT
    if p >= 1.0:
        return _MAX_ABS_LOGIT
    return max(-_MAX_ABS_LOGIT, min(_MAX_ABS_LOGIT, math.log(p) - math.log1p(-p)))


class RankedDocument(BaseModel):
    index: int = Field(..., description="Position of the document in the request.")
    relevance_score: float = Field(..., description="Probability that the document answers the query (0..1), or its logit when raw scores were asked for.")
    document: dict[str, Any] | str | None = Field(
        None, description="The document, when asked for: as given ({text} for a string, {multi_modal: [parts]} for content parts), "
        "or a text document's string alone (infinity's return_documents).",
    )  # fmt: skip


class RerankUsage(BaseModel):
    prompt_tokens: int = Field(0, description="Tokens the decoder ran for this request (its shared prefix once).")
    total_tokens: int = Field(0, description="The same count: nothing is generated.")

    @classmethod
    def of(cls, outcome: RerankOutcome) -> RerankUsage:
        return cls(prompt_tokens=outcome.tokens, total_tokens=outcome.tokens)


class CohereApiVersion(BaseModel):
    version: str = Field("2", description="API version.")


class CohereBilledUnits(BaseModel):
    search_units: int = Field(1, description="One search unit per request.")


class CohereMeta(ServingMeta):
    api_version: CohereApiVersion = Field(default_factory=CohereApiVersion, description="Cohere API version.")
    billed_units: CohereBilledUnits = Field(default_factory=CohereBilledUnits, description="Cohere billing units.")


class CohereRerankResponse(BaseModel):
    id: str = Field(..., description="Request id.")
    model: str = Field(..., description="Model that ranked (vLLM's field; Cohere clients ignore it).")
    usage: RerankUsage = Field(default_factory=RerankUsage, description="Token usage (vLLM's field; Cohere clients ignore it).")
    results: list[RankedDocument] = Field(..., description="Results, best first.")
    meta: CohereMeta = Field(..., description="Serving metadata: arm, precision, model.")

    @classmethod
    def build(cls, req: RerankRequest, outcome: RerankOutcome, request_id: str) -> CohereRerankResponse:
        return cls(id=request_id, model=outcome.meta.model, usage=RerankUsage.of(outcome), results=_ranked_documents(req, outcome),
                   meta=CohereMeta(**outcome.meta.model_dump()))  # fmt: skip


class JinaRerankResponse(BaseModel):
    """The answer of `/v1/rerank`: Jina's and vLLM's fields (id, model, usage, results), infinity's `object` and `created`."""

    id: str = Field(..., description="Request id.")
    object: Literal["rerank"] = Field("rerank", description="Object type (infinity's).")
    created: int = Field(..., description="Unix time of the answer (infinity's).")
    model: str = Field(..., description="Model that ranked.")
    usage: RerankUsage = Field(default_factory=RerankUsage, description="Token usage.")
    results: list[RankedDocument] = Field(..., description="Results, best first.")
    meta: ServingMeta = Field(..., description="Serving metadata: arm, precision, model.")

    @classmethod
    def build(cls, req: RerankRequest, outcome: RerankOutcome, request_id: str):
        return cls(id=request_id, created=int(time.time()), model=outcome.meta.model, usage=RerankUsage.of(outcome),
                   results=_ranked_documents(req, outcome), meta=outcome.meta)  # fmt: skip


class TEIRank(BaseModel):
    index: int = Field(..., description="Position of the text in the request.")
    score: float = Field(..., description="Probability (0..1), or the logit when raw_scores is set.")
    text: str | None = Field(None, description="The text, when return_text is set.")


class TEIRerankResponse(RootModel[list[TEIRank]]):
    """TEI answers with a bare list, best first, every text (TEI has no top_n); arm and precision travel in headers."""

    @classmethod
    def build(cls, req: RerankRequest, outcome: RerankOutcome, request_id: str) -> TEIRerankResponse:
        ranks = []
        for i in outcome.ranked(req.top_n):
            text = req.documents[i].text if req.return_documents else None
            ranks.append(TEIRank(index=i, score=req.served(outcome.scores[i]), text=text))
        return cls(ranks)


def _ranked_documents(req: RerankRequest, outcome: RerankOutcome) -> list[RankedDocument]:
    return [RankedDocument(index=i, relevance_score=req.served(outcome.scores[i]), document=_document(req, i)) for i in outcome.ranked(req.top_n)]


def _document(req: RerankRequest, i: int) -> dict[str, Any] | str | None:
    if not req.return_documents:
        return None
    echo = req.documents_echo[i]
    return echo["text"] if req.documents_as_text and set(echo) == {"text"} else echo


# ----------------------------------------------------------------------- other endpoints


class ErrorDetail(BaseModel):
    type: str = Field(..., description="Error class, e.g. invalid_input, forbidden_url, unauthorized, overloaded.")
    field: str | None = Field(None, description="Dotted path of the offending field, when one is to blame.")
    message: str = Field(..., description="What is wrong.")
    code: int = Field(..., description="HTTP status.")


class ErrorResponse(BaseModel):
    error: ErrorDetail = Field(..., description="The error.")


class ModelCard(BaseModel):
    id: str = Field(..., description="Model id.")
    object: Literal["model"] = Field("model", description="Object type (OpenAI list-models shape).")
    owned_by: str = Field("rerank-fleet", description="Owner.")
    arms: list[ArmCard] = Field(..., description="Precision arms serving this model.")


class ArmCard(BaseModel):
    name: str = Field(..., description="Arm name (or a cascade's).")
    precision: str = Field(..., description="Numeric precision (a cascade's: first>then, e.g. nf4>fp32; it has no device nor replicas of its own).")
    weight: float = Field(..., description="Normalised traffic share (live: after runtime changes, guardrails and the ramp).")
    device: str | None = Field(None, description="What the arm's replicas run on, e.g. 'NVIDIA L4' or 'cpu'.")
    replicas: int | None = Field(None, description="Live replicas of the arm now (from Ray's actor table).")


class ModelList(BaseModel):
    object: Literal["list"] = Field("list", description="Object type.")
    data: list[ModelCard] = Field(..., description="Served models.")


ModelCard.model_rebuild()


# ------------------------------------------------------------------ experiments and feedback

DocumentIndices = Annotated[list[Annotated[int, Field(ge=0, le=1_000_000)]], Field(max_length=1000)]


class FeedbackRequest(_Body):
    request_id: str = Field(..., min_length=1, max_length=200, description="The id of the rerank response (Cohere `id`, or its x-request-id header).")
    clicked: DocumentIndices = Field(default_factory=list, description="Indices (in the request) of the documents the user clicked.")
    purchased: DocumentIndices | None = Field(None, description="Indices of documents that led to a purchase (each also counts as a click).")


class FeedbackResponse(BaseModel):
    request_id: str = Field(..., description="The request the feedback joined to.")
    arms: list[str] = Field(..., description="The arm that answered it (two for an interleaved answer).")
    credit: dict[str, int] | None = Field(None, description="Interleaved answers: clicks credited to each arm's team.")


class WeightsChange(_Body):
    weights: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(
        ..., min_length=1, description="New relative weights of some or all arms (a tripped arm given a weight > 0 is back in routed traffic)."
    )


class ShadowChange(_Body):
    """Mirrored and interleaved traffic."""

    arm: str | None = Field(..., description="Arm that receives mirrored traffic; null stops shadowing.")
    fraction: float | None = Field(None, ge=0, le=1, description="Share of requests mirrored; unchanged when left out.")
    noise_floor_fraction: float | None = Field(None, ge=0, le=1, description="Share of the reference arm's requests it scores again; unchanged when left out.")
    interleave_fraction: float | None = Field(None, ge=0, le=1, description="Share of unpinned requests answered interleaved (router.interleave's arms); unchanged when left out.")


class ExperimentStart(_Body):
    name: str = Field(..., min_length=1, max_length=100, description="Name of the new experiment (the running one's results are archived).")
