"""The pipelined decision path of the one-server Redis store, against a real redis-server:
coalescing into few writes, exactness, NOSCRIPT mid-stream, cancelled callers, and a killed, a
frozen and a restarted Redis (every waiting call fails fast; the next call reconnects).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from gateway.config.settings import StoreSettings
from gateway.errors import StoreUnavailable
from gateway.limiter import Rate, RedisLimiter, limiter_from_url, limiter_key
from gateway.limiter.redis import Pipeline
from tests.support.redis import RedisServer

TIMEOUT = 0.1
MARGIN = 0.05


def key(identity: str) -> str:
    return limiter_key(identity, "OMS", "RetrieveOutages_OMSv1_AP")


def redis_store(url: str, **overrides: Any) -> RedisLimiter:
    settings = replace(StoreSettings(url=url, timeout=TIMEOUT, connect_timeout=0.25), **overrides)
    primary = limiter_from_url(settings).primary
    assert isinstance(primary, RedisLimiter)
    return primary


def pipeline(lim: RedisLimiter) -> Pipeline:
    pipe = lim._pipeline  # the tests look inside: how many writes, how many connects
    assert pipe is not None
    return pipe


@pytest.fixture
async def lim(redis_url: str) -> AsyncIterator[RedisLimiter]:
    limiter = redis_store(redis_url, timeout=1.0)
    await limiter.start()
    yield limiter
    await limiter.close()


async def timed_failures(calls: list[asyncio.Task[Any]]) -> list[float]:
    """Each call's time to fail; every call must fail with StoreUnavailable."""
    started = time.monotonic()
    elapsed: list[float] = []
    for call in calls:
        with pytest.raises(StoreUnavailable):
            await call
        elapsed.append(time.monotonic() - started)
    return elapsed


async def test_concurrent_decisions_share_writes(
    redis_server: RedisServer, lim: RedisLimiter
) -> None:
    rate = Rate(limit=3, per=60.0)
    await lim.decide(key("CN=warm"), rate)  # connected
    pipe = pipeline(lim)
    writes = pipe.writes
    client = redis_server.client()
    evalshas = client.info("commandstats")["cmdstat_evalsha"]["calls"]
    decisions = await asyncio.gather(*(lim.decide(key(f"CN=u{i}"), rate) for i in range(500)))
    assert all(d.allowed and d.remaining == 2 for d in decisions)
    print(f"\n500 concurrent decisions in {pipe.writes - writes} writes")
    assert pipe.writes - writes <= 5
    # Still one EVALSHA per decision: pipelining shares round trips, never merges decisions.
    assert client.info("commandstats")["cmdstat_evalsha"]["calls"] - evalshas == 500
    assert pipe.connects == 1
    client.close()


async def test_two_hundred_concurrent_calls_with_limit_three(redis_url: str) -> None:
    replicas = [redis_store(redis_url, timeout=1.0) for _ in range(2)]
    rate = Rate(limit=3, per=60.0)
    decisions = await asyncio.gather(
        *(replicas[i % 2].decide(key("CN=burst"), rate) for i in range(200))
    )
    assert sum(d.allowed for d in decisions) == 3
    assert sorted(d.remaining for d in decisions if d.allowed) == [0, 1, 2]
    assert all(0 < d.retry_after <= 60 for d in decisions if not d.allowed)
    for r in replicas:
        await r.close()


async def test_noscript_mid_stream(redis_server: RedisServer, lim: RedisLimiter) -> None:
    client = redis_server.client()
    rate = Rate(limit=1000, per=60.0)
    loads = lim.script_loads
    for _ in range(5):
        client.script_flush()
        batch = await asyncio.gather(*(lim.decide(key(f"CN=s{i}"), rate) for i in range(100)))
        assert all(d.allowed for d in batch)
    # Every key was decided exactly once per round: no call ran twice, none was lost.
    assert (await lim.peek(key("CN=s7"), rate)).calls_in_window == 5
    # One load per flush (shared by the hundred calls that met NOSCRIPT together), not 100.
    assert 5 <= lim.script_loads - loads <= 10
    client.close()


async def test_cancelled_callers_do_not_shift_replies(lim: RedisLimiter) -> None:
    rate = Rate(limit=100, per=60.0)
    await lim.decide(key("CN=warm"), rate)  # connected, so every call below is sent at once
    calls = [asyncio.ensure_future(lim.decide(key(f"CN=c{i % 10}"), rate)) for i in range(100)]
    await asyncio.sleep(0)  # queued, not yet answered
    for call in calls[::3]:
        call.cancel()
    await asyncio.gather(*calls, return_exceptions=True)
    # The next decision on each key sees every call the store received, cancelled ones included.
    after = [await lim.decide(key(f"CN=c{i}"), rate) for i in range(10)]
    assert [d.remaining for d in after] == [100 - 11] * 10


async def test_killed_redis_fails_every_waiting_call_then_reconnects(
    redis_server: RedisServer, redis_url: str
) -> None:
    lim = redis_store(redis_url)
    rate = Rate(limit=3, per=1.0)
    await lim.decide(key("CN=k"), rate)
    redis_server.pause()  # so that the calls are waiting when the server dies
    calls = [asyncio.ensure_future(lim.decide(key(f"CN=k{i}"), rate)) for i in range(100)]
    await asyncio.sleep(0.01)
    await asyncio.to_thread(redis_server.stop)
    elapsed = await timed_failures(calls)
    assert max(elapsed) < TIMEOUT + MARGIN
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):  # refused: fast, not the timeout
        await lim.decide(key("CN=k"), rate)
    assert time.monotonic() - started < TIMEOUT
    await asyncio.to_thread(redis_server.start)
    await lim.start()  # the scripts went with the server: load them back (or NOSCRIPT would)
    assert (await lim.decide(key("CN=k"), rate)).allowed
    await lim.close()


async def test_frozen_redis_fails_every_waiting_call_within_the_timeout(
    redis_server: RedisServer, redis_url: str
) -> None:
    lim = redis_store(redis_url)
    rate = Rate(limit=3, per=1.0)
    await lim.decide(key("CN=f"), rate)
    connects = pipeline(lim).connects
    redis_server.pause()
    try:
        calls = [asyncio.ensure_future(lim.decide(key(f"CN=f{i}"), rate)) for i in range(100)]
        elapsed = await timed_failures(calls)
        assert TIMEOUT * 0.8 < max(elapsed) < TIMEOUT + MARGIN
        # Later calls, on a new connection to the same frozen server, fail within the timeout too.
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await lim.decide(key("CN=f"), rate)
        assert time.monotonic() - started < TIMEOUT + MARGIN
    finally:
        redis_server.resume()
    decision = await lim.decide(key("CN=f"), rate)
    # (Commands the frozen server had already received may still have run: as with any timeout,
    # a failed call is not proof that the store did not count it.)
    assert decision.allowed
    assert pipeline(lim).connects == connects + 2
    await lim.close()


async def test_restart_reconnects_and_reloads_on_noscript(
    redis_server: RedisServer, redis_url: str
) -> None:
    """After a restart the next decision reconnects and reloads the script on NOSCRIPT."""
    lim = redis_store(redis_url)
    rate = Rate(limit=3, per=1.0)
    await lim.decide(key("CN=r"), rate)
    await asyncio.to_thread(redis_server.stop)
    await asyncio.to_thread(redis_server.start)
    await asyncio.sleep(0.01)  # the old connection's end is seen; the next call reconnects
    loads = lim.script_loads
    decisions = await asyncio.gather(*(lim.decide(key("CN=r"), rate) for _ in range(10)))
    assert sum(d.allowed for d in decisions) == 3
    assert lim.script_loads == loads + 1
    await lim.close()


def test_under_uvloop(redis_url: str) -> None:
    """The gateway runs on uvloop, whose transports are not asyncio's classes."""
    import uvloop  # a dependency of the gateway: never skipped

    async def decide() -> list[bool]:
        lim = redis_store(redis_url, timeout=1.0)
        try:
            rate = Rate(limit=3, per=60.0)
            decisions = await asyncio.gather(*(lim.decide(key("CN=uv"), rate) for _ in range(20)))
            return [d.allowed for d in decisions]
        finally:
            await lim.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert sum(runner.run(decide())) == 3
