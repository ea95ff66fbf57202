"""The image-feature cache: LRU bounds, the Redis tier (real Redis), and every way Redis can
fail (dead, silent, garbage) degrading to a counted miss instead of an error."""

from __future__ import annotations

import asyncio
import socket
import threading

import redis
import torch
from serving_testkit import free_port

from engine.features import FeatureSpec, ImageFeatures
from serve.cache import BYPASS, CORRUPT, HIT_LOCAL, HIT_REDIS, MISS, REDIS_ERROR, TOO_LARGE, ByteLRU, FeatureCache
from serve.config import CacheConfig

SPEC = FeatureSpec(vision_fingerprint="fp-test", vision_precision="float32", min_pixels=4096, max_pixels=1843200)


def features(seed: int, tokens: int = 9, hidden: int = 16) -> ImageFeatures:
    g = torch.Generator().manual_seed(seed)
    return ImageFeatures(
        embeds=torch.randn(tokens, hidden, generator=g),
        deepstack=(torch.randn(tokens, hidden, generator=g), torch.randn(tokens, hidden, generator=g)),
        grid_thw=(1, 6, 6),
        spec=SPEC,
        image_digest=f"{seed:064x}",
    )


def same(a: ImageFeatures, b: ImageFeatures) -> bool:
    return (
        torch.equal(a.embeds, b.embeds)
        and all(torch.equal(x, y) for x, y in zip(a.deepstack, b.deepstack))
        and a.grid_thw == b.grid_thw
        and a.cache_key == b.cache_key
    )


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro):
    return asyncio.run(coro)


# ------------------------------------------------------------------------------------ LRU


def test_lru_is_bounded_by_bytes_and_evicts_least_recent():
    lru = ByteLRU(max_bytes=3 * (100 + 256))
    for k in "abc":
        assert lru.put(k, k.upper(), 100)
    assert lru.get("a") == "A"  # a becomes most recent
    lru.put("d", "D", 100)
    assert lru.get("b") is None and lru.get("a") == "A" and lru.get("d") == "D"
    assert lru.nbytes <= lru.max_bytes and len(lru) == 3
    assert not lru.put("huge", "x", 10_000)  # larger than the whole budget: refused, nothing evicted
    assert len(lru) == 3


def test_lru_expiry_and_threads():
    clock = Clock()
    lru = ByteLRU(max_bytes=50_000, clock=clock)
    lru.put("k", "v", 10, ttl_s=5)
    clock.now += 4.9
    assert lru.get("k") == "v"
    clock.now += 0.2
    assert lru.get("k") is None

    def hammer(t: int):
        for i in range(2000):
            lru.put(f"{t}-{i}", i, 100 + i % 7)
            lru.get(f"{t}-{i // 2}")

    threads = [threading.Thread(target=hammer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 0 < lru.nbytes <= lru.max_bytes
    assert lru.nbytes == sum(size for _, size, _ in lru._entries.values())


# ----------------------------------------------------------------------------- local tier


def test_local_tier_hit_and_miss():
    cache = FeatureCache(CacheConfig())
    f = features(1)
    assert run(cache.get_many([f.cache_key])) == {}
    run(cache.put_many([f]))
    got = run(cache.get_many([f.cache_key, features(2).cache_key]))
    assert list(got) == [f.cache_key] and same(got[f.cache_key], f)
    assert cache.counts[HIT_LOCAL] == 1 and cache.counts[MISS] == 2


def test_item_cap_applies_to_both_tiers(unit_redis):
    url, prefix = unit_redis
    big = features(3, tokens=64, hidden=64)  # 3 x 64 x 64 x 4 bytes = 48 KiB
    cache = FeatureCache(CacheConfig(redis_url=url, max_item_bytes=16 * 1024), key_prefix=prefix)
    run(cache.put_many([big]))
    assert cache.counts[TOO_LARGE] == 1
    assert run(cache.get_many([big.cache_key])) == {}
    assert redis.Redis.from_url(url).exists(prefix + big.cache_key) == 0


# ----------------------------------------------------------------------------- redis tier


def test_redis_tier_shared_between_replicas(unit_redis):
    url, prefix = unit_redis
    cfg = CacheConfig(redis_url=url, ttl_s=60)
    writer, reader = FeatureCache(cfg, key_prefix=prefix), FeatureCache(cfg, key_prefix=prefix)
    f = features(4)
    run(writer.put_many([f]))
    assert 0 < redis.Redis.from_url(url).ttl(prefix + f.cache_key) <= 60
    got = run(reader.get_many([f.cache_key]))
    assert same(got[f.cache_key], f) and reader.counts[HIT_REDIS] == 1
    again = run(reader.get_many([f.cache_key]))  # now promoted to the reader's LRU
    assert same(again[f.cache_key], f) and reader.counts[HIT_LOCAL] == 1


def test_garbage_in_redis_is_a_counted_miss_then_repaired(unit_redis):
    url, prefix = unit_redis
    f, other = features(5), features(6)
    client = redis.Redis.from_url(url)
    client.set(prefix + f.cache_key, b"\x00garbage, not safetensors")
    client.set(prefix + other.cache_key, f.to_bytes())  # valid features, but of another key
    cache = FeatureCache(CacheConfig(redis_url=url), key_prefix=prefix)
    assert run(cache.get_many([f.cache_key, other.cache_key])) == {}
    assert cache.counts[CORRUPT] == 2 and cache.counts[MISS] == 2 and cache.counts[REDIS_ERROR] == 0
    run(cache.put_many([f]))  # the recomputed value overwrites the bad one
    fresh = FeatureCache(CacheConfig(redis_url=url), key_prefix=prefix)
    assert same(run(fresh.get_many([f.cache_key]))[f.cache_key], f)


def test_dead_redis_is_bypassed_for_retry_after_then_retried():
    clock = Clock()
    cfg = CacheConfig(redis_url=f"redis://127.0.0.1:{free_port()}/0", retry_after_s=5, redis_timeout_s=0.2)
    cache = FeatureCache(cfg, clock=clock)
    f = features(7)
    assert run(cache.get_many([f.cache_key])) == {}
    assert cache.counts[REDIS_ERROR] == 1 and cache.counts[MISS] == 1
    run(cache.put_many([f]))  # still stored locally; Redis skipped during the window
    assert cache.counts[BYPASS] == 1
    assert same(run(cache.get_many([f.cache_key]))[f.cache_key], f)
    clock.now += 6
    run(cache.get_many([features(8).cache_key]))  # window over: Redis tried (and fails) again
    assert cache.counts[REDIS_ERROR] == 2


def test_silent_redis_times_out_into_a_miss():
    """A server that accepts connections and never answers: the per-operation timeout turns it into a miss."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        cfg = CacheConfig(redis_url=f"redis://127.0.0.1:{listener.getsockname()[1]}/0", redis_timeout_s=0.1)
        cache = FeatureCache(cfg)
        assert run(cache.get_many([features(9).cache_key])) == {}
        assert cache.counts[REDIS_ERROR] == 1
    finally:
        listener.close()


def test_url_memo_through_redis(unit_redis):
    url, prefix = unit_redis
    cfg = CacheConfig(redis_url=url)
    digest = "ab" * 32
    run(FeatureCache(cfg, key_prefix=prefix).put_url_digest("https://x/1.png", digest))
    reader = FeatureCache(cfg, key_prefix=prefix)
    assert run(reader.get_url_digest("https://x/1.png")) == digest
    assert run(reader.get_url_digest("https://x/2.png")) is None
    from serve.cache import url_memo_key

    redis.Redis.from_url(url).set(prefix + url_memo_key("https://x/3.png"), b"\xffnot-a-digest")
    assert run(reader.get_url_digest("https://x/3.png")) is None and reader.counts[CORRUPT] == 1


def test_metrics_hook_sees_every_event():
    seen: list[tuple[str, int]] = []
    cache = FeatureCache(CacheConfig(), on_event=lambda e, n: seen.append((e, n)))
    f = features(10)
    run(cache.put_many([f]))
    run(cache.get_many([f.cache_key, features(11).cache_key]))
    assert (HIT_LOCAL, 1) in seen and (MISS, 1) in seen
    assert cache.snapshot()[HIT_LOCAL] == 1


def test_each_request_counts_only_its_own_events():
    """Concurrent requests on one replica share the cache but each sees only the events of its own
    lookups and stores (what an arm reports per request as `cache_events`)."""
    from serve.cache import track_request_events

    cache = FeatureCache(CacheConfig(max_item_bytes=16 * 1024))
    known = features(12)
    run(cache.put_many([known]))
    started = asyncio.Event()

    async def request(keys: list[str], stores: list[ImageFeatures], wait: bool):
        events = track_request_events()
        if wait:
            await started.wait()  # interleave with the other request
        else:
            started.set()
        await cache.get_many(keys)
        await asyncio.sleep(0)
        await cache.put_many(stores)
        await cache.get_many(keys)
        return events

    async def go():
        big = features(13, tokens=64, hidden=64)  # 48 KiB: over max_item_bytes
        a = asyncio.create_task(request([known.cache_key], [], wait=True))
        b = asyncio.create_task(request([features(14).cache_key, features(15).cache_key], [big], wait=False))
        return await asyncio.gather(a, b)

    a, b = run(go())
    assert a == {HIT_LOCAL: 2}
    assert b == {MISS: 4, TOO_LARGE: 1}
    assert cache.counts[HIT_LOCAL] == 2 and cache.counts[MISS] == 4 and cache.counts[TOO_LARGE] == 1
