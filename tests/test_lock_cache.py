"""The lock cache: a key the store has locked is answered without a round trip, never wrongly.

Real Redis; the cache is timed by an injected monotonic clock, the store by its own TIME, so
each test moves both: it sleeps the (short) windows for real and checks the store's view.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.config.settings import StoreSettings
from gateway.limiter import Rate, ResilientLimiter, limiter_from_url
from tests.test_redis_store import key

OMS = Rate(1, 0.6)
DRRS = Rate(1, 0.6, reset_on_early_retry=True)


@pytest.fixture
async def limiter(redis_url: str) -> AsyncIterator[ResilientLimiter]:
    lim = limiter_from_url(StoreSettings(url=redis_url, timeout=0.5))
    await lim.start()
    yield lim
    await lim.close()


async def test_a_locked_key_is_answered_without_asking_the_store(limiter: ResilientLimiter) -> None:
    k = key("CN=cachex0001")
    assert (await limiter.decide_with_source(k, OMS))[1] == "store"
    first_reject, source = await limiter.decide_with_source(k, OMS)
    assert source == "store" and not first_reject.allowed
    calls = limiter.store_calls
    for _ in range(50):
        decision, source = await limiter.decide_with_source(k, OMS)
        assert source == "cache" and not decision.allowed
        assert 0 < decision.retry_after <= first_reject.retry_after
    assert limiter.store_calls == calls  # none of the 50 reached Redis

    await asyncio.sleep(first_reject.retry_after + 0.02)  # the lock ends: the store decides
    decision, source = await limiter.decide_with_source(k, OMS)
    assert source == "store" and decision.allowed


async def test_the_cache_never_outlasts_the_stores_lock(limiter: ResilientLimiter) -> None:
    """Polling just past the lock's end: the first call after it is always allowed."""
    k = key("CN=cachex0002")
    assert (await limiter.decide(k, OMS)).allowed
    while True:
        decision, source = await limiter.decide_with_source(k, OMS)
        if decision.allowed:
            break
        await asyncio.sleep(0.005)
    assert source == "store"


async def test_early_retries_of_a_reset_policy_still_move_the_stores_lockout(
    limiter: ResilientLimiter,
) -> None:
    k = key("CN=cachex0003", "RetrieveDRLocations_DRRSv2_AP")
    assert (await limiter.decide(k, DRRS)).allowed
    assert not (await limiter.decide(k, DRRS)).allowed  # the store locks it: cached from now
    for _ in range(4):  # 0.8 s of early retries, each answered from the cache
        await asyncio.sleep(0.2)
        decision, source = await limiter.decide_with_source(k, DRRS)
        assert source == "cache" and decision.retry_after == pytest.approx(0.6)
    await asyncio.sleep(0.05)  # let the background recording land
    state = await limiter.primary.peek(k, DRRS)
    assert state.locked_until > 0 and state.retry_after > 0.3  # the store saw the last retry
    await asyncio.sleep(0.65)  # a full quiet window
    assert (await limiter.decide(k, DRRS)).allowed


async def test_clearing_a_key_drops_its_cached_lock(limiter: ResilientLimiter) -> None:
    k = key("CN=cachex0004")
    slow = Rate(1, 60.0)
    assert (await limiter.decide(k, slow)).allowed
    assert not (await limiter.decide(k, slow)).allowed
    assert (await limiter.decide_with_source(k, slow))[1] == "cache"
    await limiter.clear(k)
    assert (await limiter.decide(k, slow)).allowed


async def test_a_changed_policy_is_decided_by_the_store(limiter: ResilientLimiter) -> None:
    k = key("CN=cachex0005")
    assert (await limiter.decide(k, Rate(1, 60.0))).allowed
    assert not (await limiter.decide(k, Rate(1, 60.0))).allowed
    decision, source = await limiter.decide_with_source(k, Rate(2, 60.0))  # reloaded: limit 2
    assert source == "store" and decision.allowed


async def test_the_memory_store_has_no_cache() -> None:
    lim = limiter_from_url(StoreSettings(url="memory://"))
    assert lim.locks is None
