"""vLLM's (and infinity's) request and response models: `/rerank` with `documents`, and
`/score` / `/v1/score`; plus the body unions of the routes whose body decides its shape.

* `/rerank`: a body with `texts` is TEI's (`serve.protocol.TEIRerankRequest`), answered with TEI's
  bare list; any other is vLLM's (`query`, `documents`), which infinity's body also is, answered
  with vLLM's fields (`id`, `model`, `usage`, `results` with `document`) and infinity's (`object`,
  `created`).
* `/score`, `/v1/score`: vLLM's four pairs of field names (`queries`/`documents`,
  `queries`/`items`, `data_1`/`data_2`, `text_1`/`text_2`), each side one item or a list, paired
  1:1, 1:N or N:N; scores in pair order.

They convert to the same `RerankRequest` as every other shape (an N:N score request carries each
pair's query: `RerankRequest.pair_queries`).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, Discriminator, Field, StrictBool, Tag

from engine.errors import InputError
from serve.protocol import (
    DocumentsRerankRequest,
    ItemList,
    JinaRerankResponse,
    RerankOutcome,
    RerankRequest,
    ServingMeta,
    TEIRerankRequest,
    VllmFields,
    _Extensions,
    rerank_request,
)


class VllmRerankRequest(DocumentsRerankRequest):
    """`/rerank` with `documents`: vLLM's rerank body; infinity's `/rerank` body is the same with
    `return_documents` and `raw_scores`."""

    return_documents: StrictBool | None = Field(
        None, description="infinity: true returns a text document as its string, false returns none; null: every document "
        "as an object ({text} or {multi_modal: [parts]}), as vLLM returns them.",
    )  # fmt: skip
    raw_scores: StrictBool = Field(False, description="infinity: return the logit instead of the probability (as vLLM's use_activation false).")

    def to_internal(self) -> RerankRequest:
        return self._internal(
            "vllm", return_documents=self.return_documents is not False, documents_as_text=self.return_documents is True,
            raw_scores=self.raw_scores or self.use_activation is False,
        )  # fmt: skip


class VllmRerankResponse(JinaRerankResponse):
    """The answer of `/rerank` with `documents`: the same fields as `/v1/rerank`'s (vLLM answers both alike)."""


# A body-shape union names the shape it chose by a tag in validation errors' locations;
# `serve.errors` leaves these tags out of the field it names.
SHAPE_TEXTS, SHAPE_DOCUMENTS = "shape:texts", "shape:documents"


def _rerank_shape(body: Any) -> str:
    return SHAPE_TEXTS if isinstance(body, dict) and "texts" in body or isinstance(body, TEIRerankRequest) else SHAPE_DOCUMENTS


RerankBody = Annotated[
    Union[Annotated[TEIRerankRequest, Tag(SHAPE_TEXTS)], Annotated[VllmRerankRequest, Tag(SHAPE_DOCUMENTS)]],
    Discriminator(_rerank_shape),
]


# ------------------------------------------------------------------------------------ score


class _ScoreRequest(_Extensions, VllmFields):
    """What the four score shapes share; `SIDES` names the shape's two fields."""

    SIDES: ClassVar[tuple[str, str]]

    def to_internal(self) -> RerankRequest:
        first, second = self.SIDES
        queries, documents = getattr(self, first), getattr(self, second)
        if len(queries) > 1 and len(queries) != len(documents):
            raise InputError(second, f"{len(queries)} {first} and {len(documents)} {second}: pair them 1:1, 1:N or N:N")
        pair_queries = [q.parse(f"{first}.{i}") for i, q in enumerate(queries)] if len(queries) > 1 else None
        return rerank_request(self, "score", queries[0], documents, second, f"{first}.0", pair_queries=pair_queries, **self.vllm_settings())


_SIDE = "one item or a list"


class ScoreQueriesDocuments(_ScoreRequest):
    SIDES = ("queries", "documents")
    queries: ItemList = Field(..., description=f"The queries: {_SIDE}.")
    documents: ItemList = Field(..., description=f"The documents, each scored against its query (1:1, N:N) or against the one query (1:N): {_SIDE}.")


class ScoreQueriesItems(_ScoreRequest):
    SIDES = ("queries", "items")
    queries: ItemList = Field(..., description=f"The queries: {_SIDE}.")
    items: ItemList = Field(..., description=f"The items, each scored against its query (1:1, N:N) or against the one query (1:N): {_SIDE}.")


class ScoreData(_ScoreRequest):
    SIDES = ("data_1", "data_2")
    data_1: ItemList = Field(..., description=f"The first side of each pair (the query): {_SIDE}.")
    data_2: ItemList = Field(..., description=f"The second side (the document), 1:1, 1:N or N:N: {_SIDE}.")


class ScoreTexts(_ScoreRequest):
    SIDES = ("text_1", "text_2")
    text_1: ItemList = Field(..., description=f"The first side of each pair (the query): {_SIDE}.")
    text_2: ItemList = Field(..., description=f"The second side (the document), 1:1, 1:N or N:N: {_SIDE}.")


SCORE_SHAPES = {f"shape:{'/'.join(m.SIDES)}": m for m in (ScoreQueriesDocuments, ScoreQueriesItems, ScoreData, ScoreTexts)}


def _score_shape(body: Any) -> str:
    keys = set(body) if isinstance(body, dict) else set(type(body).model_fields) if isinstance(body, _ScoreRequest) else set()
    for tag, model in reversed(SCORE_SHAPES.items()):  # the most specific names first; queries/documents otherwise
        if keys & set(model.SIDES) - {"queries", "documents"}:
            return tag
    return next(iter(SCORE_SHAPES))


ScoreBody = Annotated[
    Union[tuple(Annotated[model, Tag(tag)] for tag, model in SCORE_SHAPES.items())],  # type: ignore[valid-type]
    Discriminator(_score_shape),
]

BODY_SHAPE_TAGS = frozenset({SHAPE_TEXTS, SHAPE_DOCUMENTS, *SCORE_SHAPES})


class ScoreUsage(BaseModel):
    prompt_tokens: int = Field(0, description="Tokens the decoder ran for this request (a shared prefix once).")
    total_tokens: int = Field(0, description="The same count: nothing is generated.")
    completion_tokens: int = Field(0, description="Always 0 (vLLM's field).")


class ScorePair(BaseModel):
    index: int = Field(..., description="Position of the pair in the request.")
    object: Literal["score"] = Field("score", description="Object type.")
    score: float = Field(..., description="Probability that the second side answers the first (0..1), or its logit for use_activation false.")


class ScoreResponse(BaseModel):
    """vLLM's score answer: one score per pair, in pair order."""

    id: str = Field(..., description="Request id.")
    object: Literal["list"] = Field("list", description="Object type.")
    created: int = Field(..., description="Unix time of the answer.")
    model: str = Field(..., description="Model that scored.")
    data: list[ScorePair] = Field(..., description="One score per pair, in pair order.")
    usage: ScoreUsage = Field(default_factory=ScoreUsage, description="Token usage.")
    meta: ServingMeta = Field(..., description="Serving metadata: arm, precision, model.")

    @classmethod
    def build(cls, req: RerankRequest, outcome: RerankOutcome, request_id: str) -> ScoreResponse:
        return cls(
            id=request_id, created=int(time.time()), model=outcome.meta.model,
            data=[ScorePair(index=i, score=req.served(s)) for i, s in enumerate(outcome.scores)],
            usage=ScoreUsage(prompt_tokens=outcome.tokens, total_tokens=outcome.tokens), meta=outcome.meta,
        )  # fmt: skip
