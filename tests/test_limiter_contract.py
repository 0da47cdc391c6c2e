"""One contract for every limiter backend, driven by explicit times: memory, one Redis, a
3-master Redis Cluster and a Sentinel-managed master.

The limiters are built by `limiter_from_url`, as the gateway builds them. The Redis ones must
never have fallen back to their local limiter during a test, or the suite would be testing the
wrong store: every test ends by checking that.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import AsyncIterator

import pytest

from gateway.config.settings import StoreSettings
from gateway.limiter import Decision, Limiter, Rate, ResilientLimiter, limiter_from_url, limiter_key

T0 = 1_700_000_000.0
OMS = Rate(limit=1, per=5.0)
DRRS = Rate(limit=1, per=30.0, reset_on_early_retry=True)
THREE = Rate(limit=3, per=10.0)
KEY = limiter_key("CN=jdoex1234,OU=people,O=CAISO,C=US", "OMS", "RetrieveOutages_OMSv1_AP")


def approx(x: float) -> object:
    return pytest.approx(x, abs=1e-6)


# backend -> the fixture that hands a test an empty store of that kind (tests/support/)
URL_FIXTURES = {
    "redis": "redis_url",
    "cluster": "redis_cluster_url",
    "sentinel": "redis_sentinel_url",
}


@pytest.fixture(params=["memory", "redis", "cluster", "sentinel"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[ResilientLimiter]:
    backend = request.param
    url = "memory://" if backend == "memory" else request.getfixturevalue(URL_FIXTURES[backend])
    lim = limiter_from_url(StoreSettings(url=url, timeout=1.0, connect_timeout=1.0))
    as_protocol: Limiter = lim  # the wrapper meets the Limiter protocol (mypy checks this)
    assert as_protocol.name == ("memory" if backend == "memory" else "redis")
    await lim.start()
    yield lim
    assert lim.store_errors == 0, lim.status()
    assert lim.fallback_decisions == 0
    await lim.close()


async def test_oms_once_per_window(limiter: ResilientLimiter) -> None:
    first = await limiter.decide(KEY, OMS, now=T0)
    assert (first.allowed, first.retry_after, first.remaining) == (True, 0.0, 0)
    assert first.reset_after == approx(5.0)
    assert first.now == approx(T0)

    for elapsed in (0.0, 1.0, 2.5, 4.999):
        d = await limiter.decide(KEY, OMS, now=T0 + elapsed)
        assert not d.allowed
        assert d.retry_after == approx(5.0 - elapsed)
        # A plain rejection neither records the call nor moves the window.
        assert d.reset_after == approx(5.0 - elapsed)
        assert d.remaining == 0

    again = await limiter.decide(KEY, OMS, now=T0 + 5.0)  # the window is (t - W, t]
    assert again.allowed
    assert not (await limiter.decide(KEY, OMS, now=T0 + 9.5)).allowed
    assert (await limiter.decide(KEY, OMS, now=T0 + 10.0)).allowed


async def test_three_per_ten_seconds_slides(limiter: ResilientLimiter) -> None:
    for i, remaining in enumerate((2, 1, 0)):
        d = await limiter.decide(KEY, THREE, now=T0 + i)
        assert d.allowed
        assert d.remaining == remaining
        assert d.reset_after == approx(10.0)  # the newest call leaves last

    full = await limiter.decide(KEY, THREE, now=T0 + 3)
    assert not full.allowed
    assert full.retry_after == approx(7.0)  # the oldest call (T0) leaves at T0 + 10
    assert full.reset_after == approx(9.0)  # the newest (T0 + 2) leaves at T0 + 12

    slid = await limiter.decide(KEY, THREE, now=T0 + 10)
    assert slid.allowed and slid.remaining == 0
    late = await limiter.decide(KEY, THREE, now=T0 + 10.5)
    assert not late.allowed
    assert late.retry_after == approx(0.5)  # now T0 + 1 is the oldest
    assert (await limiter.decide(KEY, THREE, now=T0 + 11)).allowed


async def test_drrs_early_retries_extend_the_lockout(limiter: ResilientLimiter) -> None:
    assert (await limiter.decide(KEY, DRRS, now=T0)).allowed
    lock_until = T0
    for t in (T0 + 10, T0 + 35, T0 + 64.9, T0 + 94.8):
        d = await limiter.decide(KEY, DRRS, now=t)
        assert not d.allowed
        assert d.retry_after == approx(30.0)  # the full window, from now, every time
        assert d.reset_after == approx(30.0)
        assert d.remaining == 0
        lock_until = t + 30
    state = await limiter.peek(KEY, DRRS, now=lock_until - 1)
    assert state.locked_until == approx(lock_until)
    assert state.retry_after == approx(1.0)

    assert (await limiter.decide(KEY, DRRS, now=lock_until)).allowed


async def test_drrs_quiet_window_is_allowed(limiter: ResilientLimiter) -> None:
    assert (await limiter.decide(KEY, DRRS, now=T0)).allowed
    assert (await limiter.decide(KEY, DRRS, now=T0 + 30)).allowed
    assert not (await limiter.decide(KEY, DRRS, now=T0 + 59.999)).allowed
    assert not (await limiter.decide(KEY, DRRS, now=T0 + 89.998)).allowed
    assert (await limiter.decide(KEY, DRRS, now=T0 + 119.998)).allowed


async def test_lockout_outlasts_free_slots(limiter: ResilientLimiter) -> None:
    """With limit 2, a slot frees up inside the lockout, but the lockout still wins."""
    rate = Rate(limit=2, per=10.0, reset_on_early_retry=True)
    assert (await limiter.decide(KEY, rate, now=T0)).allowed
    assert (await limiter.decide(KEY, rate, now=T0 + 1)).allowed
    locked = await limiter.decide(KEY, rate, now=T0 + 2)
    assert not locked.allowed and locked.retry_after == approx(10.0)
    # At T0 + 11 only one call (T0 + 1) is in the window, yet the key is locked until T0 + 12.
    still = await limiter.decide(KEY, rate, now=T0 + 11)
    assert not still.allowed and still.retry_after == approx(10.0)
    free = await limiter.decide(KEY, rate, now=T0 + 21)
    assert free.allowed and free.remaining == 1


async def test_peek_and_clear(limiter: ResilientLimiter) -> None:
    fresh = await limiter.peek(KEY, OMS, now=T0)
    assert (fresh.calls_in_window, fresh.locked_until, fresh.retry_after) == (0, 0.0, 0.0)
    assert fresh.now == approx(T0)

    await limiter.decide(KEY, THREE, now=T0)
    await limiter.decide(KEY, THREE, now=T0 + 1)
    state = await limiter.peek(KEY, THREE, now=T0 + 2)
    assert (state.calls_in_window, state.locked_until, state.retry_after) == (2, 0.0, 0.0)
    # peek is read-only: the same view twice, and the window still has its free slot.
    assert await limiter.peek(KEY, THREE, now=T0 + 2) == state
    await limiter.decide(KEY, THREE, now=T0 + 2)
    full = await limiter.peek(KEY, THREE, now=T0 + 4)
    assert full.calls_in_window == 3 and full.retry_after == approx(6.0)
    gone = await limiter.peek(KEY, THREE, now=T0 + 12)
    assert gone.calls_in_window == 0 and gone.retry_after == 0.0

    assert await limiter.clear(KEY) is True
    assert await limiter.clear(KEY) is False
    assert (await limiter.decide(KEY, THREE, now=T0 + 4)).allowed


async def test_keys_are_independent(limiter: ResilientLimiter) -> None:
    user = "CN=jdoex1234,OU=people,O=CAISO,C=US"
    other_user = "CN=asmithx5678,OU=people,O=CAISO,C=US"
    keys = [
        limiter_key(user, "DRRS", "RetrieveDRLocations_DRRSv2_AP"),
        limiter_key(user, "DRRS", "SubmitDRRegistrations_DRRSv2_AP"),
        limiter_key(other_user, "DRRS", "RetrieveDRLocations_DRRSv2_AP"),
        limiter_key(user, "OMS", "RetrieveDRLocations_DRRSv2_AP"),
        limiter_key("CN={odd}|name", "DRRS", "RetrieveDRLocations_DRRSv2_AP"),
    ]
    assert len(set(keys)) == len(keys)
    for key in keys:
        assert (await limiter.decide(key, DRRS, now=T0)).allowed
    for key in keys:
        assert not (await limiter.decide(key, DRRS, now=T0 + 1)).allowed
    await limiter.clear(keys[0])
    assert (await limiter.decide(keys[0], DRRS, now=T0 + 2)).allowed
    assert not (await limiter.decide(keys[1], DRRS, now=T0 + 2)).allowed


async def test_without_now_the_store_clock_decides(limiter: ResilientLimiter) -> None:
    before = time.time()
    d = await limiter.decide(KEY, Rate(limit=1, per=0.2))
    after = time.time()
    assert d.allowed
    # Memory reads the local clock, Redis its own TIME; on one machine both are "now".
    assert before - 0.05 <= d.now <= after + 0.05
    rejected = await limiter.decide(KEY, Rate(limit=1, per=0.2))
    assert not rejected.allowed
    assert 0.0 < rejected.retry_after <= 0.2
    assert rejected.now >= d.now


async def test_large_limit_stays_exact_under_bursts(limiter: ResilientLimiter) -> None:
    """10,000 per second, hit by bursts larger than the limit: exactly N allowed in any window,
    the retry time from the oldest call, and freed slots counted to the call (the sorted-set and
    list layouts must keep every call, not an approximation)."""
    n, per = 10_000, 1.0
    rate = Rate(limit=n, per=per)
    allowed_at: list[float] = []

    async def burst(start: float, count: int, step: float) -> list[bool]:
        answers: list[bool] = []
        for chunk in range(0, count, 1000):  # concurrent, as a real burst reaches the store
            times = [start + i * step for i in range(chunk, min(chunk + 1000, count))]
            decided = [await limiter.decide(KEY, rate, now=t) for t in times[:1]]
            decided += await _gather(limiter, rate, times[1:])
            for t, d in zip(times, decided, strict=True):
                answers.append(d.allowed)
                if d.allowed:
                    allowed_at.append(t)
        return answers

    first = await burst(T0, 12_000, 1e-5)  # 10 µs apart: 0.12 s of the window
    assert sum(first) == n
    over = await limiter.decide(KEY, rate, now=T0 + 0.5)
    assert not over.allowed
    assert over.retry_after == approx(0.5)  # the oldest call (T0) leaves at T0 + 1
    assert (await limiter.peek(KEY, rate, now=T0 + 0.5)).calls_in_window == n

    # At T0 + 1.05 the calls at T0 .. T0 + 0.05 have left: 5,001 slots, no more, no fewer, for
    # a burst of 6,000 in the same microsecond.
    second = await burst(T0 + 1.05, 6_000, 0.0)
    assert sum(second) == 5_001
    allowed_at.sort()
    assert max(_in_window(allowed_at, i, per) for i in range(len(allowed_at))) == n


async def _gather(limiter: ResilientLimiter, rate: Rate, times: list[float]) -> list[Decision]:
    return list(await asyncio.gather(*(limiter.decide(KEY, rate, now=t) for t in times)))


def _in_window(sorted_times: list[float], i: int, per: float) -> int:
    """Allowed calls in (t - per, t] for t the i-th allowed call."""
    end = sorted_times[i]
    return bisect.bisect_right(sorted_times, end) - bisect.bisect_right(sorted_times, end - per)
