"""The score cache's parts without Ray: the plan (which pairs go to the arm, the merge after), the
header, and the two tiers over real Redis (db 11), every Redis fault degrading to a counted miss."""

from __future__ import annotations

import asyncio
import struct

import pytest
import redis
from serving_testkit import free_port

from engine.errors import InputError
from engine.inputs import ScoreRequest
from engine.score_key import pair_keys
from serve.cache import BYPASS, CORRUPT, HIT_LOCAL, HIT_REDIS, MISS, REDIS_ERROR
from serve.config import CacheConfig, ScoreCacheConfig
from serve.score_cache import SCORE_CACHE_HEADER, CachePlan, ScoreStore, wants_cache


def run(coro):
    return asyncio.run(coro)


JOBS = [ScoreRequest.of("q1", ["a", "b", "c"]), ScoreRequest.of("q2", ["d", "a"])]


def plan_with(found_docs: dict[tuple[int, int], float]) -> CachePlan:
    plan = CachePlan.of("scorer", JOBS)
    return CachePlan(plan.jobs, plan.keys, {plan.keys[j][d]: s for (j, d), s in found_docs.items()})


def test_the_plan_sends_only_the_missing_pairs_and_merges_in_request_order():
    plan = plan_with({(0, 1): 0.25, (1, 0): 0.75})
    missing = plan.missing()
    assert [[d.text for d in job.documents] for job in missing] == [["a", "c"], ["a"]]
    assert [[d.field for d in job.documents] for job in missing] == [["documents.0", "documents.2"], ["documents.1"]]  # errors name the request's own documents
    assert [job.query.text for job in missing] == ["q1", "q2"] and (plan.hits, plan.misses) == (2, 3)
    assert plan.merged([0.1, 0.3, 0.5]) == [0.1, 0.25, 0.3, 0.75, 0.5]
    with pytest.raises(ValueError):
        plan.merged([0.1, 0.3, 0.5, 0.9])


def test_a_fully_cached_plan_sends_nothing():
    plan = plan_with({(j, d): 0.1 * (j + d) for j, job in enumerate(JOBS) for d in range(len(job.documents))})
    assert plan.missing() == [] and plan.misses == 0 and plan.merged([]) == pytest.approx([0.0, 0.1, 0.2, 0.1, 0.2])


def test_keys_are_those_of_the_pure_key_function():
    assert CachePlan.of("s", JOBS).keys == tuple(tuple(pair_keys("s", j)) for j in JOBS)


def test_the_header():
    assert wants_cache(None) and wants_cache("use") and not wants_cache("bypass") and not wants_cache(" Bypass ")
    with pytest.raises(InputError) as e:
        wants_cache("off")
    assert e.value.field == SCORE_CACHE_HEADER


# ------------------------------------------------------------------------------------ tiers


def test_scores_round_trip_exactly_through_redis_and_expire(unit_redis):
    url, prefix = unit_redis
    cfg = ScoreCacheConfig(mode="shared", ttl_s=120).tiers(CacheConfig(redis_url=url))
    writer, reader = ScoreStore(cfg, key_prefix=prefix), ScoreStore(cfg, key_prefix=prefix)
    scores = {"k1": 0.1234567890123456789, "k2": 1.0, "k3": 0.0, "nan": float("nan")}
    run(writer.put_many(scores))
    got = run(reader.get_many(["k1", "k2", "k3", "nan", "k4"]))
    assert got == {"k1": scores["k1"], "k2": 1.0, "k3": 0.0}  # bit for bit; a NaN is never stored
    assert reader.counts[HIT_REDIS] == 3 and reader.counts[MISS] == 2
    assert run(reader.get_many(["k1"])) == {"k1": scores["k1"]} and reader.counts[HIT_LOCAL] == 1  # kept in the LRU
    assert 0 < redis.Redis.from_url(url).ttl(prefix + "k1") <= 120


def test_a_corrupt_entry_is_a_counted_miss(unit_redis):
    url, prefix = unit_redis
    store = ScoreStore(CacheConfig(redis_url=url), key_prefix=prefix)
    client = redis.Redis.from_url(url)
    client.set(prefix + "short", b"123")
    client.set(prefix + "nan", struct.pack("<d", float("nan")))
    client.set(prefix + "out-of-range", struct.pack("<d", 7.5))
    assert run(store.get_many(["short", "nan", "out-of-range"])) == {}
    assert store.counts[CORRUPT] == 3 and store.counts[MISS] == 3


def test_a_dead_redis_is_counted_and_bypassed_never_raised():
    cfg = ScoreCacheConfig(mode="shared").tiers(CacheConfig(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_s=0.2, retry_after_s=30))
    store = ScoreStore(cfg)

    async def go():
        await store.put_many({"a": 0.5})  # Redis fails: the LRU still holds it
        first = await store.get_many(["a", "b"])
        second = await store.get_many(["b"])
        return first, second

    first, second = run(go())
    assert first == {"a": 0.5} and second == {}
    assert store.counts[REDIS_ERROR] == 1 and store.counts[BYPASS] >= 1


def test_local_mode_has_no_redis_and_off_keeps_the_arms_path():
    assert ScoreCacheConfig(mode="local").tiers(CacheConfig(redis_url="redis://x:1/0")).redis_url is None
    shared = ScoreCacheConfig(mode="shared", ttl_s=60, local_max_bytes=1000).tiers(CacheConfig(redis_url="redis://x:1/0", ttl_s=5))
    assert (shared.redis_url, shared.ttl_s, shared.local_max_bytes) == ("redis://x:1/0", 60, 1000)
    assert ScoreCacheConfig().mode == "off"
