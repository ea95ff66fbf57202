"""Safe media fetching against a real local HTTP server: address checks, pinned connections,
re-checked redirects, byte caps, time limits, inline decoding and the URL memo."""

from __future__ import annotations

import asyncio
import base64
import ipaddress

import pytest

from engine.errors import ImageTooLarge, InputError
from engine.inputs import ImageInput, RerankItem, VideoInput, sha256_hex
from serve.cache import FeatureCache
from serve.config import CacheConfig, LimitsConfig
from serve.errors import FetchError, ForbiddenURL, classify
from serve.fetch import MediaFetcher, address_problem, check_url, decode_inline
from serve.protocol import CohereRerankRequest, JinaRerankRequest, MediaRef


def fetch(limits: LimitsConfig, url: str, *, resolver=None, max_bytes: int | None = None) -> bytes:
    async def go():
        kwargs = {"resolver": resolver} if resolver else {}
        fetcher = MediaFetcher(limits, **kwargs)
        try:
            return await fetcher.fetch_url(url, "documents.0.image", max_bytes or limits.max_image_bytes)
        finally:
            await fetcher.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize(
    "address, problem",
    [
        ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.1", "private"), ("172.16.5.5", "private"),
        ("169.254.169.254", "metadata"), ("169.254.1.1", "link-local"), ("100.64.0.1", "non-public"),
        ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"), ("::1", "loopback"), ("fe80::1", "link-local"),
        ("fd00:ec2::254", "metadata"), ("fc00::1", "private"), ("::ffff:127.0.0.1", "loopback"), ("ff02::1", "multicast"),
        ("8.8.8.8", None), ("2001:4860:4860::8888", None),
    ],
)  # fmt: skip
def test_address_classification(address, problem):
    got = address_problem(ipaddress.ip_address(address))
    assert (got is None) if problem is None else (problem in got)


@pytest.mark.parametrize(
    "url, error",
    [
        ("file:///etc/passwd", ForbiddenURL), ("ftp://example.com/x.png", ForbiddenURL), ("gopher://x/", ForbiddenURL),
        ("http://user:pw@example.com/x.png", ForbiddenURL), ("http://127.0.0.1/x.png", ForbiddenURL),
        ("http://[::1]/x.png", ForbiddenURL), ("http://169.254.169.254/latest/meta-data/", ForbiddenURL),
        ("http:///nohost", InputError),
    ],
)  # fmt: skip
def test_urls_refused_before_any_connection(url, error):
    with pytest.raises(error) as e:
        check_url(url, LimitsConfig(), "query.image")
    assert e.value.field == "query.image"


def test_metadata_stays_refused_under_allow_private_but_opens_for_an_allowed_host():
    with pytest.raises(ForbiddenURL):
        check_url("http://169.254.169.254/", LimitsConfig(allow_private_urls=True), "f")
    check_url("http://169.254.169.254/", LimitsConfig(allowed_hosts=["169.254.169.254"]), "f")
    check_url("http://127.0.0.1/", LimitsConfig(allow_private_urls=True), "f")


def test_private_fetch_refused_by_default_allowed_when_configured(media_server):
    with pytest.raises(ForbiddenURL) as e:
        fetch(LimitsConfig(), media_server.url("/img.png"))
    assert "loopback" in e.value.problem
    before = media_server.hits["/img.png"]
    assert fetch(LimitsConfig(allow_private_urls=True), media_server.url("/img.png")) == media_server.images["/img.png"]
    assert media_server.hits["/img.png"] == before + 1


def test_redirect_to_private_is_rechecked(media_server):
    target = media_server.url("/img.png")  # 127.0.0.1: not an allowed host
    start = media_server.url(f"/redirect?to={target}", host="localhost")
    only_localhost = LimitsConfig(allowed_hosts=["localhost"])
    with pytest.raises(ForbiddenURL) as e:
        fetch(only_localhost, start, resolver=_fixed("127.0.0.1"))
    assert "127.0.0.1" in e.value.problem
    # The same chain with private addresses allowed is followed to the image.
    assert fetch(LimitsConfig(allow_private_urls=True), start, resolver=_fixed("127.0.0.1")) == media_server.images["/img.png"]


def test_redirect_limit(media_server):
    with pytest.raises(FetchError) as e:
        fetch(LimitsConfig(allow_private_urls=True, max_redirects=2), media_server.url("/loop"))
    assert "more than 2 redirects" in e.value.problem


def test_connection_is_pinned_to_the_checked_address(media_server):
    """`images.example` does not exist in DNS: the fetch can only succeed by connecting to the
    address the resolver returned (and checked), while sending the original Host header."""
    media_server.hosts.clear()
    limits = LimitsConfig(allowed_hosts=["images.example"])
    data = fetch(limits, media_server.url("/img.png", host="images.example"), resolver=_fixed("127.0.0.1"))
    assert data == media_server.images["/img.png"]
    assert media_server.hosts == [f"images.example:{media_server.port}"]


def test_rebinding_style_mixed_answer_is_refused(media_server):
    with pytest.raises(ForbiddenURL):
        fetch(LimitsConfig(), media_server.url("/img.png", host="cdn.example"), resolver=_fixed("93.184.216.34", "10.0.0.5"))


def test_byte_caps_declared_and_streamed(media_server):
    limits = LimitsConfig(allow_private_urls=True, max_image_bytes=1024 * 1024)
    with pytest.raises(ImageTooLarge) as e:
        fetch(limits, media_server.url("/big-declared"))
    assert classify(e.value) == (413, "too_large") and e.value.field == "documents.0.image"
    with pytest.raises(ImageTooLarge):
        fetch(limits, media_server.url("/big-chunked?n=64"))  # 4 MiB without Content-Length


def test_time_limit_and_http_errors(media_server):
    with pytest.raises(FetchError) as e:
        fetch(LimitsConfig(allow_private_urls=True, fetch_timeout_s=0.3), media_server.url("/slow?s=2"))
    assert "longer than 0.3s" in e.value.problem and classify(e.value) == (422, "fetch_error")
    with pytest.raises(FetchError) as e:
        fetch(LimitsConfig(allow_private_urls=True), media_server.url("/missing.png"))
    assert "HTTP 404" in e.value.problem


def test_inline_media():
    png = b"\x89PNG fake"
    b64 = base64.b64encode(png).decode()
    assert decode_inline(f"data:image/png;base64,{b64}", "f", 100) == png
    assert decode_inline(b64, "f", 100) == png
    assert decode_inline(b64[:-2] + "\n" + b64[-2:], "f", 100) == png  # whitespace tolerated
    with pytest.raises(InputError) as e:
        decode_inline("not base64 at all!", "documents.2.image", 100)
    assert e.value.field == "documents.2.image" and "base64" in e.value.problem
    with pytest.raises(ImageTooLarge):
        decode_inline(base64.b64encode(b"x" * 1000).decode(), "f", 100)
    with pytest.raises(InputError):
        decode_inline("data:image/png;base64", "f", 100)


def test_item_resolution_and_url_memo(media_server):
    """A repeated URL is served from the memo (no second download) as an ImageInput with the
    content digest and the URL but no bytes; a fetch that skips the memo still records it."""
    limits = LimitsConfig(allow_private_urls=True)
    url = media_server.url("/other.png")
    spec = CohereRerankRequest.model_validate({"query": {"text": "q", "image": url}, "documents": ["d"]}).to_internal().query

    async def go():
        memo = FeatureCache(CacheConfig())
        fetcher = MediaFetcher(limits, memo=memo)
        try:
            first = await fetcher.resolve_item(spec)
            second = await fetcher.resolve_item(spec)
            fresh = await fetcher.image(MediaRef(ref=url, field="query.image"), use_memo=False)
            no_memo = await fetcher.resolve_item(spec, use_memo=False)
            other_memo = FeatureCache(CacheConfig())
            downloaded = await MediaFetcher(limits, memo=other_memo).download_image(url, "documents.4.image")
            recorded = await other_memo.get_url_digest(url)
            return first, second, fresh, no_memo, downloaded, recorded
        finally:
            await fetcher.aclose()

    before = media_server.hits["/other.png"]
    first, second, fresh, no_memo, downloaded, recorded = asyncio.run(go())
    data = media_server.images["/other.png"]
    digest = sha256_hex(data)
    assert isinstance(first, RerankItem) and (first.text, first.field, first.videos) == ("q", "query", ())
    assert first.images == (ImageInput(digest, data, "query.image", url),)
    assert second.images == (ImageInput(digest=digest, data=None, field="query.image", url=url),)
    assert (second.text, second.field) == ("q", "query")
    assert fresh == first.images[0] and no_memo == first
    assert downloaded == ImageInput(digest, data, "documents.4.image", url) and recorded == digest
    # first resolve + the explicit no-memo fetch + the no-memo resolve + download_image
    assert media_server.hits["/other.png"] == before + 4


def test_resolve_request_keeps_order_and_fields_and_raises_the_first_failure(media_server):
    png = media_server.images["/img.png"]
    b64 = base64.b64encode(png).decode()
    req = JinaRerankRequest.model_validate({
        "query": {"text": "q", "image": b64},
        "documents": ["a", {"image": [b64, media_server.url("/other.png")]}, {"video": [b64, b64]}],
    }).to_internal()  # fmt: skip
    bad = JinaRerankRequest.model_validate({
        "query": "q",
        "documents": ["a", {"image": media_server.url("/missing.png")}, {"image": "http://127.0.0.1:1/x.png"}],
    }).to_internal()  # fmt: skip

    async def go():
        fetcher = MediaFetcher(LimitsConfig(allow_private_urls=True))
        try:
            job = await fetcher.resolve_request(req)
            with pytest.raises(FetchError) as e:
                await fetcher.resolve_request(bad)
            return [job.query, *job.documents], e.value
        finally:
            await fetcher.aclose()

    items, error = asyncio.run(go())
    assert [(i.text, i.field) for i in items] == [("q", "query"), ("a", "documents.0"), (None, "documents.1"), (None, "documents.2")]
    assert items[0].images == (ImageInput.of(png, "query.image"),)
    other = media_server.images["/other.png"]
    assert items[1].images == ()
    assert items[2].images == (ImageInput.of(png, "documents.1.image.0"), ImageInput.of(other, "documents.1.image.1", media_server.url("/other.png")))
    frames = (ImageInput.of(png, "documents.2.video.0"), ImageInput.of(png, "documents.2.video.1"))
    assert items[3].videos == (VideoInput.of_frames(frames, "documents.2.video"),) and items[3].images == ()
    assert error.field == "documents.1.image" and "HTTP 404" in error.problem  # the first failure in field order


def _fixed(*addresses: str):
    async def resolve(host: str, port: int) -> list[str]:
        return list(addresses)

    return resolve
