"""Two-tier caches: a bytes-bounded in-process LRU in front of an optional Redis (`TieredCache`),
and the image-feature cache built on it (`FeatureCache`; the ingress's score cache,
`serve.score_cache.ScoreStore`, is the other).

Feature keys come from `FeatureSpec.cache_key(image_digest)`, i.e. the image's content hash plus
everything that changes its features (vision weights, vision precision, pixel limits); they are
never derived from URLs or other display strings. The same tiers also hold a URL -> content
digest memo so a repeated image URL can skip its download when its features are cached.

A cache is an optimisation and must never fail a request: any Redis error, timeout or
undecodable entry is counted, Redis is bypassed for `retry_after_s`, and the caller recomputes.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from engine.features import FeatureDecodeError, ImageFeatures

if TYPE_CHECKING:
    from serve.config import CacheConfig

log = logging.getLogger(__name__)

# Events counted (and reported through `on_event`):
HIT_LOCAL = "hit_local"  # served from the in-process LRU
HIT_REDIS = "hit_redis"  # served from Redis
MISS = "miss"  # in neither tier
REDIS_ERROR = "redis_error"  # Redis unreachable, slow or failing: Redis is bypassed for a while
CORRUPT = "corrupt"  # a Redis value that does not decode to the features asked for
BYPASS = "bypass"  # an operation that skipped Redis because of a recent error
TOO_LARGE = "too_large"  # an entry over max_item_bytes, not cached
EVENTS = (HIT_LOCAL, HIT_REDIS, MISS, REDIS_ERROR, CORRUPT, BYPASS, TOO_LARGE)

# The events of the request being served: each request sets its own Counter (asyncio tasks copy
# the context), so concurrent requests on one replica never see each other's events.
_request_events: contextvars.ContextVar[Counter | None] = contextvars.ContextVar("request_events", default=None)


def track_request_events() -> Counter:
    """Count this task's cache events (from now on, in this asyncio task only) into the returned Counter."""
    events: Counter = Counter()
    _request_events.set(events)
    return events

# Fixed per-entry overhead charged to the LRU byte budget (dict slot, tuple, key string).
_ENTRY_OVERHEAD = 256


class ByteLRU:
    """Thread-safe LRU bounded by the sum of entry sizes (as given by the caller), with optional expiry."""

    def __init__(self, max_bytes: int, *, clock: Callable[[], float] = time.monotonic):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[Any, int, float | None]] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self._clock = clock

    def get(self, key: str) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            value, size, expires = entry
            if expires is not None and self._clock() >= expires:
                del self._entries[key]
                self._nbytes -= size
                return None
            self._entries.move_to_end(key)
            return value

    def put(self, key: str, value: Any, size: int, *, ttl_s: float | None = None) -> bool:
        """Store unless the entry alone exceeds the budget; evicts least-recently-used entries to fit."""
        size += _ENTRY_OVERHEAD
        if size > self.max_bytes:
            return False
        expires = None if ttl_s is None else self._clock() + ttl_s
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._nbytes -= old[1]
            self._entries[key] = (value, size, expires)
            self._nbytes += size
            while self._nbytes > self.max_bytes:
                _, (_, evicted, _) = self._entries.popitem(last=False)
                self._nbytes -= evicted
        return True

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __len__(self) -> int:
        return len(self._entries)


def features_nbytes(features: ImageFeatures) -> int:
    """In-memory size of the tensors (what the LRU budget counts)."""
    return sum(t.numel() * t.element_size() for t in (features.embeds, *features.deepstack))


def url_memo_key(url: str) -> str:
    return "urlmemo:" + hashlib.sha256(url.encode("utf-8")).hexdigest()


class TieredCache:
    """Values by key in two tiers: the LRU (`config.local_max_bytes`, 0: none) and Redis
    (`config.redis_url`, None: none), entries in Redis expiring after `config.ttl_s`. A subclass
    says how its values are sized, written to bytes and read back (`_get_tiers`, `_put_tiers`).

    Async because the Redis tier is network I/O; the LRU tier is synchronous and thread-safe.
    The Redis client is created lazily on the running event loop (and again if the loop changes).
    Every lookup, store and fault is counted (`counts`, `snapshot`) and reported to `on_event`.
    """

    name = "cache"  # in log lines

    def __init__(
        self,
        config: CacheConfig,
        *,
        key_prefix: str = "rerank:",
        on_event: Callable[[str, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self.key_prefix = key_prefix
        self.local = ByteLRU(config.local_max_bytes, clock=clock) if config.local_max_bytes > 0 else None
        self.counts: Counter[str] = Counter()
        self._on_event = on_event
        self._clock = clock
        self._bypass_until = 0.0
        self._redis = None
        self._redis_loop: asyncio.AbstractEventLoop | None = None

    async def _get_tiers(self, keys: Sequence[str], decode: Callable[[str, Any], Any | None], size: Callable[[Any], int],
                         local_ttl_s: float | None = None) -> dict[str, Any]:  # fmt: skip
        """The values of `keys` found in either tier (each key looked up once); a Redis hit is kept
        in the LRU too. `decode(key, raw)` reads a Redis value, None for an entry it refuses."""
        found: dict[str, Any] = {}
        remote: list[str] = []
        for key in dict.fromkeys(keys):
            hit = self.local.get(key) if self.local is not None else None
            if hit is not None:
                found[key] = hit
            else:
                remote.append(key)
        self._count(HIT_LOCAL, len(found))
        if remote:
            values = await self._redis_call(lambda r: r.mget([self.key_prefix + k for k in remote]))
            misses = 0
            for key, raw in zip(remote, values or [None] * len(remote)):
                value = decode(key, raw) if raw is not None else None
                if value is None:
                    misses += 1
                    continue
                found[key] = value
                self._count(HIT_REDIS)
                self._put_local(key, value, size(value), local_ttl_s)
            self._count(MISS, misses)
        return found

    async def _put_tiers(self, items: Iterable[tuple[str, Any, int]], encode: Callable[[Any], bytes], local_ttl_s: float | None = None) -> None:
        """Store (key, value, size) items in the LRU and, written by `encode`, in Redis; an item
        over `config.max_item_bytes` is counted (too_large) and not stored."""
        blobs: dict[str, bytes] = {}
        for key, value, nbytes in items:
            if nbytes > self.config.max_item_bytes:
                self._count(TOO_LARGE)
                continue
            self._put_local(key, value, nbytes, local_ttl_s)
            if self.config.redis_url is not None:
                blob = encode(value)
                if len(blob) > self.config.max_item_bytes:
                    self._count(TOO_LARGE)
                    continue
                blobs[key] = blob
        if blobs:
            ttl = self.config.ttl_s

            async def _store(r):
                async with r.pipeline(transaction=False) as pipe:
                    for key, blob in blobs.items():
                        pipe.set(self.key_prefix + key, blob, ex=ttl)
                    return await pipe.execute()

            await self._redis_call(_store)

    # ------------------------------------------------------------------ plumbing

    def snapshot(self) -> dict[str, int]:
        return {e: self.counts.get(e, 0) for e in EVENTS}

    async def aclose(self) -> None:
        client, self._redis = self._redis, None
        if client is not None:
            try:
                await client.aclose()
            except Exception:  # noqa: BLE001 - closing a dead connection must not raise
                pass

    def _put_local(self, key: str, value: Any, nbytes: int, ttl_s: float | None = None) -> None:
        if self.local is not None:
            self.local.put(key, value, nbytes, ttl_s=ttl_s)

    def _corrupt(self, key: str) -> None:
        # A bad value is that entry's problem, not Redis's: count it and let the recomputed value
        # overwrite it; Redis stays in use for other keys.
        self._count(CORRUPT)

    def _count(self, event: str, n: int = 1) -> None:
        if n <= 0:
            return
        self.counts[event] += n
        mine = _request_events.get()
        if mine is not None:
            mine[event] += n
        if self._on_event is not None:
            try:
                self._on_event(event, n)
            except Exception:  # noqa: BLE001 - metrics must never fail a request
                log.exception("cache metrics hook failed")

    def _client(self):
        loop = asyncio.get_running_loop()
        if self._redis is None or self._redis_loop is not loop:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            timeout = self.config.redis_timeout_s
            self._redis = Redis.from_url(
                self.config.redis_url,
                password=self.config.redis_password.get_secret_value() if self.config.redis_password else None,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),  # a failed call means bypass, not a retry storm
            )
            self._redis_loop = loop
        return self._redis

    async def _redis_call(self, op: Callable[[Any], Any]) -> Any:
        """Run one Redis operation under the timeout; None on bypass or failure (never raises)."""
        if self.config.redis_url is None:
            return None
        if self._clock() < self._bypass_until:
            self._count(BYPASS)
            return None
        try:
            # The socket timeout bounds each read; this bounds the whole operation (connect + pipeline).
            async with asyncio.timeout(self.config.redis_timeout_s * 4):
                return await op(self._client())
        except Exception as e:  # noqa: BLE001 - any Redis failure degrades to a cache miss
            self._bypass_until = self._clock() + self.config.retry_after_s
            self._count(REDIS_ERROR)
            log.warning(
                "%s: Redis failed (%s: %s); bypassing it for %.1fs",
                self.name, type(e).__name__, e, self.config.retry_after_s,
            )  # fmt: skip
            client, self._redis = self._redis, None
            if client is not None:
                asyncio.get_running_loop().create_task(_close_quietly(client))
            return None


class FeatureCache(TieredCache):
    """`get_many` / `put_many` of `ImageFeatures` by cache key, plus the URL -> digest memo."""

    name = "image-feature cache"

    # ------------------------------------------------------------------ features

    async def get_many(self, keys: Sequence[str]) -> dict[str, ImageFeatures]:
        return await self._get_tiers(keys, self._decode, features_nbytes)

    async def put_many(self, items: Iterable[ImageFeatures]) -> None:
        await self._put_tiers(((f.cache_key, f, features_nbytes(f)) for f in items), ImageFeatures.to_bytes)

    # ------------------------------------------------------------------ URL memo

    async def get_url_digest(self, url: str) -> str | None:
        key = url_memo_key(url)
        digest = self.local.get(key) if self.local is not None else None
        if digest is not None:
            return digest
        raw = await self._redis_call(lambda r: r.get(self.key_prefix + key))
        if raw is None:
            return None
        try:
            digest = raw.decode("ascii")
        except UnicodeDecodeError:
            digest = ""
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            self._corrupt(key)
            return None
        self._put_memo_local(key, digest)
        return digest

    async def put_url_digest(self, url: str, digest: str) -> None:
        key = url_memo_key(url)
        self._put_memo_local(key, digest)
        await self._redis_call(lambda r: r.set(self.key_prefix + key, digest.encode("ascii"), ex=self.config.ttl_s))

    def _put_memo_local(self, key: str, digest: str) -> None:
        self._put_local(key, digest, len(key) + len(digest), self.config.ttl_s)

    def _decode(self, key: str, raw: Any) -> ImageFeatures | None:
        try:
            features = ImageFeatures.from_bytes(bytes(raw))
        except (FeatureDecodeError, TypeError) as e:
            log.warning("image-feature cache: undecodable entry %s (%s); recomputing", key, e)
            self._corrupt(key)
            return None
        if features.cache_key != key:
            log.warning("image-feature cache: entry %s holds features of another key; recomputing", key)
            self._corrupt(key)
            return None
        return features


async def _close_quietly(client) -> None:
    try:
        await client.aclose()
    except Exception:  # noqa: BLE001
        pass
