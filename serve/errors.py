"""Errors of the serving layer and the one mapping from any error to an HTTP answer.

`error_response` is the only place that decides status codes: a table from error type to
(status, kind), most specific first. 4xx answers name the field; 503 carries Retry-After;
a 500 never carries the exception's text. Engine errors arrive here as themselves, raised in
an arm replica and carried by Ray (`RayTaskError.cause`).
"""

from __future__ import annotations

import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import DeadlineExceeded, ImageDecodeError, ImageTooLarge, InputError, RerankError
from serve.config import RETRY_AFTER_S
from serve.ledger import AdminForbidden, AlreadyRecorded, ExperimentStopped, UnknownRequest
from serve.protocol import CONTENT_PART_TAGS, ErrorDetail, ErrorResponse
from serve.protocol_vllm import BODY_SHAPE_TAGS

log = logging.getLogger(__name__)


class ForbiddenURL(InputError):
    """A URL whose scheme or resolved address is not allowed."""


class FetchError(InputError):
    """A URL could not be fetched (status, timeout, size)."""


class RequestTooLarge(InputError):
    """The HTTP body is over `limits.max_request_bytes`."""


class Unauthorized(InputError):
    """No valid API key."""


class BodyTimeout(InputError):
    """The client did not send its request body in time."""


class ArmDown(RerankError):
    """A pinned arm is out of routed traffic (its replica died or its calls keep failing)."""


class FeaturesMissing(RerankError):
    """An arm has no cached features for images the ingress sent by digest only (a memoised URL
    whose features were evicted): the ingress downloads them and sends the request again. Never
    reaches a client (if it did, it would be a 500: the two sides disagree)."""

    def __init__(self, digests: list[str]):
        self.digests = digests
        super().__init__(f"no cached features for {len(digests)} image(s) sent by digest")

    def __reduce__(self):
        return (type(self), (self.digests,))


class Draining(RerankError):
    """The service is shutting down or redeploying: new requests are refused while in-flight ones finish."""


class ServiceUnavailable(RerankError):
    """Retryable: overloaded or no healthy replica."""


_UNAVAILABLE = (ServiceUnavailable, ArmDown, DeadlineExceeded, Draining, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError,
                ActorDiedError, ActorUnavailableError, RayActorError)  # fmt: skip

# (error type, HTTP status, error kind), most specific first; the first match wins.
ERROR_TABLE: tuple[tuple[type | tuple[type, ...], int, str], ...] = (
    (Unauthorized, 401, "unauthorized"),
    (AdminForbidden, 403, "forbidden"),
    (UnknownRequest, 404, "not_found"),
    (AlreadyRecorded, 409, "conflict"),
    (ExperimentStopped, 409, "conflict"),
    (RequestTooLarge, 413, "too_large"),
    (BodyTimeout, 408, "body_timeout"),
    (ImageTooLarge, 413, "too_large"),
    (ForbiddenURL, 400, "forbidden_url"),
    (FetchError, 422, "fetch_error"),
    (ImageDecodeError, 400, "image_decode_error"),
    (InputError, 400, "invalid_input"),
    (RequestValidationError, 422, "invalid_request"),
    (StarletteHTTPException, 0, "http_error"),  # status from the exception
    (_UNAVAILABLE, 503, "overloaded"),
    (TimeoutError, 504, "timeout"),
)


def classify(exc: BaseException) -> tuple[int, str]:
    """(status, kind) of an error; 500 "internal_error" when nothing in the table matches."""
    exc = unwrap(exc)
    for types, status, kind in ERROR_TABLE:
        if isinstance(exc, types):
            return (exc.status_code if isinstance(exc, StarletteHTTPException) else status), kind
    return 500, "internal_error"


def unwrap(exc: BaseException) -> BaseException:
    """The error an arm raised, out of Ray's task-error wrapper."""
    while isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    return exc


def error_response(exc: BaseException, request_id: str | None = None) -> JSONResponse:
    """The one mapping from exceptions to HTTP. Pure (no logging): see `log_if_internal`."""
    exc = unwrap(exc)
    status, kind = classify(exc)
    headers: dict[str, str] = {}  # Serve's proxy sets x-request-id on every response itself
    fld: str | None = None
    if isinstance(exc, InputError):
        fld, message = exc.field, str(exc)
    elif isinstance(exc, RequestValidationError):
        fld, message = _describe_validation(exc)
    elif isinstance(exc, StarletteHTTPException):
        message = str(exc.detail)
        headers.update(exc.headers or {})
    elif isinstance(exc, (ArmDown, DeadlineExceeded, Draining, ServiceUnavailable)):
        message = str(exc)
    elif status == 503:
        message = "no replica can take this request now; retry later"
    elif status == 504:
        message = "the request did not finish within the time limit"
    else:
        message = "internal error" + (f" (request {request_id})" if request_id else "")
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    if status == 503:
        headers["retry-after"] = str(RETRY_AFTER_S)
    body = ErrorResponse(error=ErrorDetail(type=kind, field=fld, message=message, code=status))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def log_if_internal(resp: JSONResponse, exc: BaseException, request_id: str | None) -> JSONResponse:
    if resp.status_code == 500:
        log.error("internal error (request %s)", request_id, exc_info=(type(exc), exc, exc.__traceback__))
    return resp


def input_error(exc: ValidationError) -> InputError:
    """A body validated outside FastAPI (the command line's items): its first problem as the
    `InputError` naming the field, as the API would name it."""
    fld, message = _describe_validation(RequestValidationError(exc.errors()))
    return InputError(fld, message.removeprefix(f"{fld}: "))


def _describe_validation(exc: RequestValidationError) -> tuple[str, str]:
    errors = exc.errors()
    if not errors:
        return "body", "invalid request body"
    first = errors[0]
    raw = tuple(first.get("loc", ()))
    # A content part is a tagged union: pydantic puts the part's type in the location
    # (content.0.image_url.image_url); the field is content.0.image_url.
    raw = tuple(
        p for i, p in enumerate(raw)
        if not (i >= 2 and raw[i - 2] == "content" and isinstance(raw[i - 1], int) and p in CONTENT_PART_TAGS)
    )  # fmt: skip
    loc = [str(p) for p in raw]
    if loc and loc[0] == "body":
        loc = loc[1:]
    if loc and loc[0] in BODY_SHAPE_TAGS:  # the shape a route's body union chose (/rerank, /score): not a field
        loc = loc[1:]
    fld = ".".join(loc) or "body"
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        fld, msg = "body", f"not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return fld, f"{fld}: {msg}{more}"
