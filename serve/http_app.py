"""The FastAPI application of the ingress: its guard (API keys, body cap, admission), the one
exception handler (`serve.errors`) and the error answers each route documents. The routes are
functions in `serve.rerank_routes` and `serve.experiment_routes`; each is handed the replica's
`serve.ingress.Ingress` (the serving objects) by the `this_ingress` dependency.

The guard's settings are the replica's (`Ingress.guard`), found like the routes' serving objects
through Serve's replica context.
"""

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import InputError
from serve.errors import error_response, log_if_internal
from serve.guard import GuardMiddleware
from serve.protocol import ErrorResponse

app = FastAPI(
    title="rerank-fleet",
    version="1",
    description="Multimodal reranking (Qwen3-VL-Reranker, lychee-rerank-mm) across precision arms. "
    "Cohere v2 (`/v2/rerank`), Jina, Cohere v1 and vLLM (`/v1/rerank`), TEI or vLLM/infinity (`/rerank`, by the body) "
    "request shapes, and vLLM's score API (`/score`, `/v1/score`).",
)


def _this_ingress():
    """The `Ingress` of the replica serving this request (Serve's public replica context)."""
    from ray import serve

    return serve.get_replica_context().servable_object


app.add_middleware(GuardMiddleware, guard_of=lambda: _this_ingress().guard)


async def _handle_any(request: Request, exc: Exception) -> JSONResponse:
    request_id = request.headers.get("x-request-id")
    return log_if_internal(error_response(exc, request_id), exc, request_id)


for _exc_type in (RequestValidationError, StarletteHTTPException, InputError, Exception):
    app.add_exception_handler(_exc_type, _handle_any)


def documented(*statuses: int) -> dict:
    """The error answers a route documents in its OpenAPI entry."""
    return {s: {"model": ErrorResponse} for s in statuses}


ERRORS = documented(400, 401, 408, 413, 422, 503, 504)
ADMIN_ERRORS = documented(400, 403, 408, 413, 422, 503)


async def _ingress_dependency():
    # async: FastAPI runs a plain-def dependency on its thread pool, a thread hop per request (7.7 %
    # of the ingress's busy CPU under load, py-spy); this one only reads the replica context.
    return _this_ingress()


this_ingress = Depends(_ingress_dependency)  # a route's parameter `ingress=this_ingress`: the replica's Ingress
