"""The ASGI guard in front of the app: API-key check (admin keys for the experiment admin
endpoints), request-body cap and the admission gate, before any body is parsed.

The admission gate is a safety bound on count, and the cheapest refusal there is: when this
ingress replica already works on as many rerank requests as the arms' Serve bounds hold and
queue, a new one is answered 503 + Retry-After before its body is read, parsed, routed or handed
to Serve (under overload a malformed request may thus get 503 rather than its 4xx: it was not
read). What decides admission is each arm's queue budget, in time (`serve.admission`): only the
arm replica knows its queue and its pairs/s, and which arm a request goes to is known only once
its body is routed. The gate, derived from Serve's bounds set far above what the budgets admit,
stops a flood the budgets cannot see (requests still being read and parsed)."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from serve.errors import BodyTimeout, RequestTooLarge, ServiceUnavailable, Unauthorized, error_response
from serve.ledger import AdminForbidden

PUBLIC_PATHS = frozenset({"/health", "/ready", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
ADMIN_PATH = "/v1/experiments/"  # POST below it changes the live experiment: admin keys only
EXPERIMENTS_PATH = "/v1/experiments"
RERANK_PATHS = ("/v2/rerank", "/v1/rerank", "/rerank", "/score", "/v1/score")  # the scoring endpoints: the only ones the gate counts


class GuardMiddleware:
    """API-key check and request-body cap, before any body is parsed (pure ASGI). `guard_of()`
    gives the settings of the replica it runs in (the ingress's `Guard`)."""

    def __init__(self, app, guard_of: Callable[[], Guard]):
        self.app = app
        self.guard_of = guard_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        guard = self.guard_of()
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if ADMIN_PATH in path and scope.get("method") != "GET":
            if not guard.admin_keys:
                err = AdminForbidden("authorization", "no admin key is configured (admin_keys): experiment changes are refused")
                return await error_response(err)(scope, receive, send)
            admin = guard.admin(headers.get("authorization"))
            if admin is None:
                return await error_response(AdminForbidden("authorization", "missing or invalid admin Bearer key"))(scope, receive, send)
            scope.setdefault("state", {})["admin"] = admin  # request.state.admin: who made the change
        elif guard.api_keys and not path.endswith(tuple(PUBLIC_PATHS)):
            header = headers.get("authorization")
            reads_results = EXPERIMENTS_PATH in path and guard.admin(header) is not None  # admins read what they change
            if not (guard.authorized(header) or reads_results):
                return await error_response(Unauthorized("authorization", "missing or invalid Bearer API key"))(scope, receive, send)
        gated = guard.admission if scope.get("method") == "POST" and path.endswith(RERANK_PATHS) else None
        if gated is not None and gated.full():
            return await error_response(gated.refusal())(scope, receive, send)
        declared = next((v for k, v in scope.get("headers", []) if k.lower() == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > guard.max_request_bytes:
            err = RequestTooLarge("body", f"request body is {int(declared)} bytes, over the limit of {guard.max_request_bytes}")
            return await error_response(err)(scope, receive, send)
        # Read the body up to the cap and within the time limit before the app parses it (FastAPI
        # would turn an exception raised mid-read into a generic 400); then replay it. A client
        # sending a byte at a time would otherwise hold one of the replica's request slots.
        chunks, seen = [], 0
        try:
            async with asyncio.timeout(guard.body_read_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # client went away
                    chunk = message.get("body", b"")
                    seen += len(chunk)
                    if seen > guard.max_request_bytes:
                        err = RequestTooLarge("body", f"request body is over the limit of {guard.max_request_bytes} bytes")
                        return await error_response(err)(scope, receive, send)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            err = BodyTimeout("body", f"the request body did not arrive within {guard.body_read_timeout_s:g}s (body_read_timeout_s)")
            return await error_response(err)(scope, receive, send)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if gated is None:
            return await self.app(scope, replay, send)
        # A slot is taken only once the body is in hand (a slow sender holds none), and checked
        # again: others may have taken the last ones while this body arrived.
        if gated.full():
            return await error_response(gated.refusal())(scope, receive, send)
        gated.in_flight += 1
        try:
            return await self.app(scope, replay, send)
        finally:
            gated.in_flight -= 1


@dataclass
class Admission:
    """Rerank requests this ingress replica works on (from body read to answer sent) and its bound."""

    limit: int | None  # None: no gate, only counting
    on_refusal: Callable[[], None] | None = None  # e.g. the ingress's request metric
    in_flight: int = 0
    refused: int = 0

    def full(self) -> bool:
        return self.limit is not None and self.in_flight >= self.limit

    def refusal(self) -> ServiceUnavailable:
        self.refused += 1
        if self.on_refusal is not None:
            self.on_refusal()
        return ServiceUnavailable(
            f"overloaded: this ingress replica is working on {self.in_flight} rerank requests, its limit "
            "(ingress.max_in_flight); retry later"
        )


@dataclass(frozen=True)
class Guard:
    api_keys: tuple[str, ...]
    max_request_bytes: int
    body_read_timeout_s: float = 10.0
    admin_keys: tuple[tuple[str, str], ...] = ()  # (name, key)
    admission: Admission | None = None  # None: rerank requests are neither counted nor gated here

    def authorized(self, header: str | None) -> bool:
        return _matches(header, self.api_keys) is not None

    def admin(self, header: str | None) -> str | None:
        """The name of the admin key the header carries, or None."""
        i = _matches(header, tuple(k for _, k in self.admin_keys))
        return None if i is None else self.admin_keys[i][0]


def _matches(header: str | None, keys: tuple[str, ...]) -> int | None:
    """Index of the key a `Bearer` header carries. Every key is compared (no early exit), so
    timing says nothing about which matched."""
    if not header or not header.lower().startswith("bearer "):
        return None
    given = header[7:].strip().encode()
    hits = [hmac.compare_digest(given, k.encode()) for k in keys]
    return hits.index(True) if any(hits) else None
