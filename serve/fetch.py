"""Turning media references (http(s) URLs, data URIs, raw base64) into bytes, safely.

URL fetches defend against server-side request forgery:

* only http and https;
* the host is resolved once and every address checked: loopback, private, link-local,
  multicast, reserved, unspecified and cloud-metadata addresses are refused unless
  `limits.allow_private_urls` is set or the host is listed in `limits.allowed_hosts`
  (metadata addresses stay refused under `allow_private_urls`; only an explicit
  `allowed_hosts` entry opens them);
* the connection goes to the checked address (the URL's host is replaced by the IP, the
  Host header and TLS SNI keep the name), so a second DNS answer cannot redirect it
  (DNS rebinding); connections are not pooled, so one name's TLS session never serves another;
* redirects are followed by hand, each target re-checked, at most `limits.max_redirects`;
* the body is streamed with a byte cap, and the whole fetch has a time limit;
* proxies from the environment are ignored (they would bypass the address check).

Errors name the JSON field: `ForbiddenURL`, `FetchError`, `ImageTooLarge`. Each image is hashed
here, once, as it enters (`ImageInput.of`), and its digest travels with it to the engine.
A URL -> content-digest memo (kept in the feature-cache tiers) lets a repeated image URL
skip its download: the item then carries an `ImageInput` with its digest and URL but no bytes;
an arm that has no features for it says so (`FeaturesMissing`) and the ingress fetches it here
(`with_bytes`). This module is the only place media are fetched.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import contextvars
import ipaddress
import re
import socket
import urllib.parse
from dataclasses import replace
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import httpx

from engine.errors import ImageTooLarge, InputError
from engine.inputs import ImageInput, RerankItem, ScoreRequest, VideoInput
from serve.errors import FetchError, ForbiddenURL
from serve.protocol import ItemSpec, MediaRef, RerankRequest, VideoSpec

if TYPE_CHECKING:
    from serve.cache import FeatureCache
    from serve.config import LimitsConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

# Instance-metadata endpoints (AWS/GCP/Azure IMDS, AWS IPv6 IMDS, ECS task metadata, Alibaba).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200")
)
_REDIRECTS = (301, 302, 303, 307, 308)
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*):")
_DEFAULT_PORTS = {"http": 80, "https": 443}


# ------------------------------------------------------------------------ address policy


def address_problem(ip: IPAddress) -> str | None:
    """Why an address is not a public unicast one, or None if it is."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for attr, name in (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_reserved", "reserved"),
        ("is_private", "private"),
    ):
        if getattr(ip, attr):
            return f"a {name} address"
    if not ip.is_global:
        return "a non-public address"
    return None


def check_address(ip: IPAddress, host: str, limits: LimitsConfig, field: str) -> None:
    if _host_allowed(host, limits):
        return
    problem = address_problem(ip)
    if problem is None:
        return
    always_refused = ip in METADATA_ADDRESSES or ip.is_multicast or ip.is_unspecified
    if limits.allow_private_urls and not always_refused:
        return
    raise ForbiddenURL(field, f"host {host!r} resolves to {ip}, {problem}; not allowed")


def _host_allowed(host: str, limits: LimitsConfig) -> bool:
    host = host.rstrip(".").lower()
    return any(host == h.rstrip(".").lower() for h in limits.allowed_hosts)


def check_url(url: str, limits: LimitsConfig, field: str) -> httpx.URL:
    """Parse and check the parts of a URL that need no DNS: scheme, host, literal IPs."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as e:
        raise InputError(field, f"not a valid URL ({e})") from None
    if parsed.scheme not in ("http", "https"):
        raise ForbiddenURL(field, f"URL scheme {parsed.scheme!r} is not allowed; use http or https")
    if not parsed.host:
        raise InputError(field, "URL has no host")
    if parsed.userinfo:
        raise ForbiddenURL(field, "URLs with credentials are not allowed")
    literal = _ip_literal(parsed.host)
    if literal is not None:
        check_address(literal, parsed.host, limits, field)
    return parsed


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


# -------------------------------------------------------------------- inline references


def decode_inline(ref: str, field: str, max_bytes: int) -> bytes:
    """Decode a data URI or raw base64 string, refusing oversize payloads before decoding them."""
    if ref.startswith("data:"):
        header, sep, payload = ref[5:].partition(",")
        if not sep:
            raise InputError(field, "data URI without a ',' separator")
        if header.endswith(";base64"):
            return _b64(payload, field, max_bytes)
        data = urllib.parse.unquote_to_bytes(payload)
        _cap(len(data), field, max_bytes)
        return data
    return _b64(ref, field, max_bytes)


def _b64(text: str, field: str, max_bytes: int) -> bytes:
    compact = "".join(text.split())
    _cap(len(compact) * 3 // 4, field, max_bytes)
    try:
        data = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(field, "not an http(s) URL, a data URI or valid base64") from None
    if not data:
        raise InputError(field, "empty media")
    _cap(len(data), field, max_bytes)
    return data


def _cap(n: int, field: str, max_bytes: int) -> None:
    if n > max_bytes:
        raise ImageTooLarge(field, f"media is {n} bytes, over the limit of {max_bytes}")


# --------------------------------------------------------------------------------- fetcher

# The download slots of the request being resolved (set by `resolve_request`; the tasks it gathers
# inherit it). Unset (`with_bytes`, one retry's few images): only the replica-wide slots apply.
_REQUEST_DOWNLOADS: contextvars.ContextVar[asyncio.Semaphore | None] = contextvars.ContextVar("request_downloads", default=None)


class MediaFetcher:
    """Resolves an item's media references. One per ingress replica; safe for concurrent use."""

    def __init__(
        self,
        limits: LimitsConfig,
        *,
        memo: FeatureCache | None = None,
        resolver: Resolver = system_resolver,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.limits = limits
        self.memo = memo
        self._resolve = resolver
        self._downloads = asyncio.Semaphore(limits.max_downloads)
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(limits.fetch_timeout_s),
            limits=httpx.Limits(max_keepalive_connections=0),
            transport=transport,
            headers={"User-Agent": "rerank-fleet/1 (media fetch)"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def resolve_request(self, req: RerankRequest) -> ScoreRequest:
        """The engine's request: every media reference of the query and documents fetched or
        decoded (each image hashed once, here), concurrently within the request's share: at most
        `max_downloads_per_request` downloads at a time (so one request with many slow URLs cannot
        hold every slot of the replica) and `download_deadline_s` for all of them. The first
        failure (in field order) is raised. A memoised image URL becomes a digest-only image."""
        return (await self.resolve_requests([req]))[0]

    async def resolve_requests(self, parts: list[RerankRequest]) -> list[ScoreRequest]:
        """The engine requests of one request's parts (`RerankRequest.parts`), resolved as one
        request: they share its download slots and deadline."""
        items = await self._resolve_items([spec for p in parts for spec in (p.query, *p.documents)], parts[0].documents_field)
        jobs, start = [], 0
        for p in parts:
            query, *documents = items[start : start + 1 + len(p.documents)]
            start += 1 + len(p.documents)
            jobs.append(ScoreRequest(query, tuple(documents), p.instruction, p.max_tokens_per_doc))
        return jobs

    async def with_bytes(self, request: ScoreRequest, digests: set[str]) -> ScoreRequest:
        """The request with the bytes of each digest-only image among `digests` (an arm had no
        features for them) downloaded, once per URL; every reference keeps its own field."""
        urls = {img.url: img.field for img in request.images() if img.data is None and img.digest in digests and img.url}
        async with asyncio.timeout(self.limits.download_deadline_s):
            fetched = dict(zip(urls, await asyncio.gather(*(self.download_image(url, field) for url, field in urls.items()))))

        def swap(item: RerankItem) -> RerankItem:
            images = tuple(replace(fetched[img.url], field=img.field) if img.data is None and img.url in fetched else img for img in item.images)
            return item if images == item.images else replace(item, images=images)

        return replace(request, query=swap(request.query), documents=tuple(map(swap, request.documents)))

    async def _resolve_items(self, specs: list[ItemSpec], documents_field: str) -> list[RerankItem]:
        if not any(s.images or s.videos for s in specs):  # text only: nothing to fetch, no task per item
            return [RerankItem(text=s.text, field=s.field) for s in specs]
        limits = self.limits
        token = _REQUEST_DOWNLOADS.set(asyncio.Semaphore(limits.max_downloads_per_request))
        try:
            async with asyncio.timeout(limits.download_deadline_s):
                results = await asyncio.gather(*(self.resolve_item(s) for s in specs), return_exceptions=True)
        except TimeoutError:
            raise FetchError(documents_field, f"the request's media downloads took longer than {limits.download_deadline_s:g}s together") from None
        finally:
            _REQUEST_DOWNLOADS.reset(token)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    async def resolve_item(self, spec: ItemSpec, *, use_memo: bool = True) -> RerankItem:
        images = await asyncio.gather(*(self.image(ref, use_memo=use_memo) for ref in spec.images))
        videos = await asyncio.gather(*(self.video(v) for v in spec.videos))
        return RerankItem(text=spec.text, images=tuple(images), videos=tuple(videos), field=spec.field)

    async def image(self, ref: MediaRef, *, use_memo: bool = True) -> ImageInput:
        if not _is_url(ref.ref):
            return ImageInput.of(decode_inline(ref.ref, ref.field, self.limits.max_image_bytes), ref.field)
        check_url(ref.ref, self.limits, ref.field)
        if use_memo and self.memo is not None:
            digest = await self.memo.get_url_digest(ref.ref)
            if digest is not None:
                return ImageInput(digest=digest, data=None, field=ref.field, url=ref.ref)
        return await self.download_image(ref.ref, ref.field)

    async def download_image(self, url: str, field: str) -> ImageInput:
        """Fetch an image URL (and remember its digest in the memo, when there is one)."""
        image = ImageInput.of(await self.fetch_url(url, field, self.limits.max_image_bytes), field, url)
        if self.memo is not None:
            await self.memo.put_url_digest(url, image.digest)
        return image

    async def video(self, spec: VideoSpec) -> VideoInput:
        if spec.source is not None:
            ref = spec.source
            if _is_url(ref.ref):
                data = await self.fetch_url(ref.ref, ref.field, self.limits.max_video_bytes)
            else:
                data = decode_inline(ref.ref, ref.field, self.limits.max_video_bytes)
            return VideoInput.of_file(data, spec.field)
        frames = await asyncio.gather(*(self.image(f, use_memo=False) for f in spec.frames))
        total = sum(len(f.data or b"") for f in frames)
        if total > self.limits.max_video_bytes:
            raise ImageTooLarge(spec.field, f"frames total {total} bytes, over the limit of {self.limits.max_video_bytes}")
        return VideoInput.of_frames(tuple(frames), spec.field)

    async def fetch_url(self, url: str, field: str, max_bytes: int) -> bytes:
        """GET with the address check on every hop, a byte cap and an overall time limit."""
        timeout = self.limits.fetch_timeout_s
        try:
            async with _REQUEST_DOWNLOADS.get() or contextlib.nullcontext(), self._downloads:  # the request's share first
                async with asyncio.timeout(timeout):
                    return await self._fetch(url, field, max_bytes)
        except TimeoutError:
            raise FetchError(field, f"fetching the URL took longer than {timeout:g}s") from None

    async def _fetch(self, url: str, field: str, max_bytes: int) -> bytes:
        current = url
        for hop in range(self.limits.max_redirects + 1):
            parsed = check_url(current, self.limits, field)
            status, location, body = await self._get_pinned(parsed, field, max_bytes)
            if status in _REDIRECTS and location:
                if hop == self.limits.max_redirects:
                    break
                current = urllib.parse.urljoin(str(parsed), location)
                continue
            if not 200 <= status < 300:
                raise FetchError(field, f"{parsed.host} answered HTTP {status}")
            if not body:
                raise FetchError(field, "empty response body")
            return body
        raise FetchError(field, f"more than {self.limits.max_redirects} redirects")

    async def _get_pinned(self, url: httpx.URL, field: str, max_bytes: int) -> tuple[int, str | None, bytes]:
        host = url.host
        port = url.port or _DEFAULT_PORTS[url.scheme]
        literal = _ip_literal(host)
        if literal is not None:
            addresses = [str(literal)]
        else:
            try:
                addresses = await self._resolve(host, port)
            except OSError as e:
                raise FetchError(field, f"cannot resolve host {host!r} ({e.strerror or e})") from None
            if not addresses:
                raise FetchError(field, f"host {host!r} has no addresses")
            # Every answer must pass: a mixed public/private answer is how rebinding attacks start.
            for a in addresses:
                check_address(ipaddress.ip_address(a.split("%")[0]), host, self.limits, field)
        host_header = host if url.port is None else f"{host}:{url.port}"
        extensions = {"sni_hostname": host} if url.scheme == "https" and literal is None else {}
        last_error: Exception | None = None
        for address in addresses:
            pinned = url.copy_with(host=address.split("%")[0])
            try:
                async with self._client.stream("GET", pinned, headers={"Host": host_header}, extensions=extensions) as resp:
                    if resp.status_code in _REDIRECTS:
                        return resp.status_code, resp.headers.get("location"), b""
                    if not 200 <= resp.status_code < 300:
                        return resp.status_code, None, b""
                    declared = resp.headers.get("content-length")
                    if declared is not None and declared.isdigit():
                        _cap(int(declared), field, max_bytes)
                    chunks, size = [], 0
                    async for chunk in resp.aiter_bytes():
                        size += len(chunk)
                        _cap(size, field, max_bytes)
                        chunks.append(chunk)
                    return resp.status_code, None, b"".join(chunks)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                last_error = e
                continue
            except httpx.TimeoutException:
                raise FetchError(field, f"{host} did not answer within {self.limits.fetch_timeout_s:g}s") from None
            except httpx.HTTPError as e:
                raise FetchError(field, f"fetching from {host} failed ({type(e).__name__})") from None
        raise FetchError(field, f"could not connect to {host} ({type(last_error).__name__})")


def _is_url(ref: str) -> bool:
    """A reference with a scheme (other than data:) is a URL; base64 never contains ':'."""
    m = _SCHEME.match(ref)
    return m is not None and m.group(1).lower() != "data"
