"""The Redis store against a real redis-server: TTLs and memory, the store's clock, exactness
under concurrency, outages (crashed and hung Redis) with the fallback and the breaker, NOSCRIPT,
authentication, TLS, and the store URLs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import pytest
from redis.crc import key_slot

from gateway.config.settings import StoreSettings
from gateway.demo.certs import DemoCerts
from gateway.errors import ConfigError, StoreUnavailable
from gateway.limiter import (
    Decision,
    Rate,
    RedisLimiter,
    ResilientLimiter,
    Source,
    limiter_from_url,
    limiter_key,
)
from gateway.limiter.factory import redis_connection_kwargs
from tests.support.redis import RedisServer, RedisTls, redis_executable

OMS = Rate(limit=1, per=5.0)
T0 = 1_700_000_000.0


def key(identity: str, service: str = "RetrieveOutages_OMSv1_AP") -> str:
    return limiter_key(identity, "OMS", service)


def store(url: str, **overrides: Any) -> StoreSettings:
    # Generous timeouts where a test is about correctness, not about outages.
    return replace(StoreSettings(url=url, timeout=1.0, connect_timeout=1.0), **overrides)


@pytest.fixture
async def limiter(redis_url: str) -> AsyncIterator[ResilientLimiter]:
    lim = limiter_from_url(store(redis_url))
    await lim.start()
    yield lim
    await lim.close()


def primary(lim: ResilientLimiter) -> RedisLimiter:
    assert isinstance(lim.primary, RedisLimiter)
    return lim.primary


# -- memory: keys vanish once they no longer affect a decision ---------------------------------


async def test_ten_thousand_identities_leave_no_keys(
    redis_server: RedisServer, redis_url: str
) -> None:
    lim = limiter_from_url(store(redis_url, pool_size=32))
    await lim.start()
    client = redis_server.client()
    base_memory = client.info("memory")["used_memory"]
    rate = Rate(limit=3, per=1.0)
    keys = [key(f"CN=user{i:05d},OU=people,O=CAISO,C=US") for i in range(10_000)]

    async def replica_worker(share: list[str]) -> int:
        return sum([(await lim.decide(k, rate)).allowed for k in share])

    started = time.perf_counter()
    allowed = await asyncio.gather(*(replica_worker(keys[i::32]) for i in range(32)))
    elapsed = time.perf_counter() - started
    finished = time.monotonic()
    assert sum(allowed) == 10_000
    assert lim.store_errors == 0

    # Whatever is still live (all of it, unless the machine took more than a window) expires
    # within the window; nothing is kept longer.
    live = [k.decode() for k in client.scan_iter(match="aup:*", count=1000)]
    assert live
    pipe = client.pipeline(transaction=False)
    for k in live:
        pipe.pttl(k)
    ttls = [t for t in pipe.execute() if t != -2]  # -2: expired since the scan
    assert all(0 <= ttl <= 1000 for ttl in ttls)  # -1 would be a key without a TTL
    sample = live[:: max(len(live) // 100, 1)]
    per_key = sum(client.memory_usage(k) or 0 for k in sample) / len(sample)
    grown = (client.info("memory")["used_memory"] - base_memory) / len(live)
    print(
        f"\n10,000 identities in {elapsed * 1000:.0f} ms ({len(keys) / elapsed:,.0f} decisions/s, "
        f"32 workers, one process); {len(live)} keys live after; MEMORY USAGE "
        f"{per_key:.0f} bytes per key (one call recorded); used_memory +{grown:.0f} bytes per key"
    )

    await asyncio.sleep(max(0.0, finished + rate.per + 0.01 - time.monotonic()))
    assert list(client.scan_iter(match="aup:*", count=1000)) == []
    # Expired keys are reclaimed, not just hidden: Redis's active expiry removes them.
    deadline = time.monotonic() + 5
    while client.dbsize() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert client.dbsize() == 0
    await lim.close()
    client.close()


async def test_ttl_is_the_time_the_key_still_matters(
    redis_server: RedisServer, limiter: ResilientLimiter
) -> None:
    client = redis_server.client()
    k = key("CN=ttl")
    await limiter.decide(k, Rate(3, 10.0), now=T0)
    await limiter.decide(k, Rate(3, 10.0), now=T0 + 2)
    assert 9_900 < client.pttl(k) <= 10_000  # until the newest call leaves the window
    await limiter.decide(k, Rate(3, 10.0), now=T0 + 4)
    await limiter.decide(k, Rate(3, 10.0), now=T0 + 5)  # rejected: writes nothing
    assert 9_000 < client.pttl(k) <= 10_000
    # The layout (docs/capacity.md): one sorted set, each allowed call scored by its time in µs.
    calls = [round((T0 + dt) * 1e6) for dt in (0, 2, 4)]
    assert client.zrange(k, 0, -1, withscores=True) == [(str(c).encode(), c) for c in calls]

    drrs = key("CN=ttl", "RetrieveDRLocations_DRRSv2_AP")
    reset = Rate(1, 30.0, reset_on_early_retry=True)
    await limiter.decide(drrs, reset, now=T0)
    await limiter.decide(drrs, reset, now=T0 + 20)  # locked until T0 + 50
    assert 29_000 < client.pttl(drrs) <= 30_000
    assert client.zscore(drrs, "L") == round((T0 + 50) * 1e6)  # the lockout's member
    print(
        f"\nMEMORY USAGE: {client.memory_usage(k)} bytes with 3 calls recorded, "
        f"{client.memory_usage(drrs)} bytes for a locked DRRS key"
    )
    client.close()


# -- the store's clock rules -------------------------------------------------------------------


async def test_replicas_with_wrong_clocks_decide_by_the_store_clock(redis_url: str) -> None:
    """Two replicas, one clock in 1970 and one in 2096: Redis TIME decides for both."""
    early = limiter_from_url(store(redis_url), clock=lambda: 1000.0)
    late = limiter_from_url(store(redis_url), clock=lambda: 4_000_000_000.0)
    k = key("CN=skew")
    before = time.time()
    first = await early.decide(k, OMS)
    second = await late.decide(k, OMS)
    after = time.time()
    assert first.allowed and not second.allowed
    for d in (first, second):
        assert before - 0.05 <= d.now <= after + 0.05
    assert 4.9 < second.retry_after <= 5.0
    third = await early.decide(k, OMS)
    assert not third.allowed and third.retry_after <= second.retry_after
    assert early.store_errors == late.store_errors == 0
    # The same clock does rule the in-memory store: a contrast, so the check above means something.
    memory = limiter_from_url(StoreSettings(url="memory://"), clock=lambda: 1000.0)
    assert (await memory.decide(k, OMS)).now == 1000.0
    for lim in (early, late, memory):
        await lim.close()


# -- exactness under concurrency ---------------------------------------------------------------


async def test_two_hundred_concurrent_calls_allow_exactly_the_limit(redis_url: str) -> None:
    replicas = [limiter_from_url(store(redis_url, pool_size=16)) for _ in range(2)]
    k = key("CN=burst")
    rate = Rate(limit=3, per=60.0)
    decisions = await asyncio.gather(*(replicas[i % 2].decide(k, rate) for i in range(200)))
    assert sum(d.allowed for d in decisions) == 3
    assert all(r.store_errors == 0 for r in replicas)
    rejected = [d for d in decisions if not d.allowed]
    assert all(0 < d.retry_after <= 60 for d in rejected)

    drrs = key("CN=burst", "RetrieveDRLocations_DRRSv2_AP")
    reset = Rate(limit=1, per=60.0, reset_on_early_retry=True)
    decisions = await asyncio.gather(*(replicas[i % 2].decide(drrs, reset) for i in range(200)))
    assert sum(d.allowed for d in decisions) == 1
    assert all(d.retry_after == 60.0 for d in decisions if not d.allowed)
    last = max(d.now for d in decisions)
    state = await replicas[0].peek(drrs, reset)
    assert state.locked_until == pytest.approx(last + 60.0, abs=1e-6)
    for r in replicas:
        await r.close()


# -- NOSCRIPT ----------------------------------------------------------------------------------


async def test_script_flush_is_survived(
    redis_server: RedisServer, limiter: ResilientLimiter
) -> None:
    k = key("CN=noscript")
    assert (await limiter.decide(k, OMS, now=T0)).allowed
    loads = primary(limiter).script_loads
    client = redis_server.client()
    client.script_flush()
    assert not (await limiter.decide(k, OMS, now=T0 + 1)).allowed
    client.script_flush()
    assert (await limiter.peek(k, OMS, now=T0 + 2)).calls_in_window == 1
    assert primary(limiter).script_loads == loads + 2
    assert limiter.store_errors == 0 and limiter.state == "ok"
    client.close()


# -- outages -----------------------------------------------------------------------------------


OUTAGE = {"timeout": 0.05, "connect_timeout": 0.25, "breaker_cooldown": 0.2}


class Traffic:
    """Workers deciding in a loop, each call timed, until stopped."""

    def __init__(self, lim: ResilientLimiter, workers: int = 8) -> None:
        self.lim = lim
        self.calls: list[tuple[float, Source, Decision]] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(workers)]

    async def _worker(self, i: int) -> None:
        rate = Rate(limit=1, per=0.02)
        while not self._stop.is_set():
            started = time.perf_counter()
            decision, source = await self.lim.decide_with_source(key(f"CN=w{i}"), rate)
            self.calls.append((time.perf_counter() - started, source, decision))
            await asyncio.sleep(0.002)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def slowest(self, since: int = 0) -> float:
        return max(elapsed for elapsed, _, _ in self.calls[since:])


async def wait_for_state(lim: ResilientLimiter, state: str, within: float) -> float:
    started = time.monotonic()
    while lim.state != state:
        assert time.monotonic() - started < within, f"still {lim.state} after {within}s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def transitions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        "down" if "unreachable" in r.getMessage() else "up"
        for r in caplog.records
        if r.name == "gateway.store"
    ]


async def test_crashed_redis_falls_back_fast_and_recovers_by_itself(
    redis_server: RedisServer, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.store")
    settings = store(redis_url, **OUTAGE)
    lim = limiter_from_url(settings)
    await lim.start()
    traffic = Traffic(lim)
    await asyncio.sleep(0.2)
    assert lim.state == "ok" and lim.store_errors == 0

    await asyncio.to_thread(redis_server.stop)  # SIGKILL, mid-traffic
    killed_at, attempts_before, calls_before = time.monotonic(), lim.store_calls, len(traffic.calls)
    await wait_for_state(lim, "fallback", within=0.5)
    status = lim.status()
    assert status["state"] == "fallback" and status["mode"] == "local"
    await asyncio.sleep(0.8)
    attempts = lim.store_calls - attempts_before
    during = traffic.calls[calls_before:]
    outage = time.monotonic() - killed_at

    await asyncio.to_thread(redis_server.start)
    recovered_in = await wait_for_state(lim, "ok", within=settings.breaker_cooldown + 1.0)
    await asyncio.sleep(0.1)
    await traffic.stop()

    local = sum(1 for _, source, _ in during if source == "local")
    slowest = traffic.slowest()
    print(
        f"\ncrash: {len(during)} decisions in {outage:.2f}s of outage, {local} local, "
        f"{attempts} reached Redis; slowest call {slowest * 1000:.1f} ms; "
        f"back to ok {recovered_in * 1000:.0f} ms after restart"
    )
    assert local > 100
    # The breaker: the in-flight calls at the crash, then one probe per cooldown.
    assert attempts <= 8 + outage / settings.breaker_cooldown + 2
    assert slowest < settings.timeout + settings.connect_timeout + 0.05
    assert traffic.calls[-1][1] in ("store", "cache")  # the store, or its lock held locally
    assert transitions(caplog) == ["down", "up"]
    assert lim.status()["errors"] == lim.store_errors >= 1
    await lim.close()


async def test_hung_redis_costs_at_most_the_timeout(
    redis_server: RedisServer, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.store")
    settings = store(redis_url, **OUTAGE)
    lim = limiter_from_url(settings)
    await lim.start()
    traffic = Traffic(lim)
    await asyncio.sleep(0.2)

    redis_server.pause()  # SIGSTOP: connections stay open, nothing answers
    paused_at, attempts_before, calls_before = time.monotonic(), lim.store_calls, len(traffic.calls)
    await asyncio.sleep(1.0)
    attempts = lim.store_calls - attempts_before
    during = traffic.calls[calls_before:]
    slow = sum(1 for elapsed, _, _ in during if elapsed > settings.timeout * 0.8)
    outage = time.monotonic() - paused_at
    redis_server.resume()
    recovered_in = await wait_for_state(lim, "ok", within=settings.breaker_cooldown + 1.0)
    await traffic.stop()

    slowest = max(elapsed for elapsed, _, _ in during)
    print(
        f"\nhang: {len(during)} decisions in {outage:.2f}s, {slow} paid the "
        f"{settings.timeout * 1000:.0f} ms timeout, {attempts} reached Redis; slowest "
        f"{slowest * 1000:.1f} ms; back to ok {recovered_in * 1000:.0f} ms after SIGCONT"
    )
    assert slowest < settings.timeout + 0.05  # the pooled connections' socket timeout
    assert len(during) > 100
    # The breaker: the calls in flight at the pause, then one probe per cooldown, reach Redis;
    # the calls that arrive while a probe is in flight wait for it (never longer than it takes)
    # rather than decide locally, so each probe can hold up each of the 8 workers once.
    probes = outage / settings.breaker_cooldown + 2
    assert attempts <= 8 + probes
    assert slow <= 8 + 8 * probes
    assert transitions(caplog) == ["down", "up"]
    await lim.close()


async def test_a_cancelled_probe_does_not_wedge_the_breaker(
    redis_server: RedisServer, redis_url: str
) -> None:
    now = [0.0]
    redis_limiter = primary(limiter_from_url(store(redis_url, timeout=0.05)))
    lim = ResilientLimiter(redis_limiter, cooldown=1.0, monotonic=lambda: now[0])
    redis_server.pause()
    try:
        assert (await lim.decide_with_source(key("CN=probe"), OMS))[1] == "local"
        now[0] = 1.5
        probe = asyncio.create_task(lim.decide(key("CN=probe"), OMS))
        await asyncio.sleep(0.01)
        probe.cancel()  # the client went away while the probe waited on the hung store
        with pytest.raises(asyncio.CancelledError):
            await probe
    finally:
        redis_server.resume()
    calls = lim.store_calls
    _, source = await lim.decide_with_source(key("CN=probe"), OMS)
    # the probe (a PING, then the local calls merged in), then the decision itself
    assert (source, lim.state, lim.store_calls) == ("store", "ok", calls + 2)
    await lim.close()


async def test_calls_that_arrive_during_a_probe_wait_for_it_and_go_to_the_store(
    redis_server: RedisServer, redis_url: str
) -> None:
    """The half-open breaker: forty concurrent calls for a fresh key (limit 1) right after the
    cooldown: one is the probe, the other 39 wait for it, and every one is decided by Redis:
    exactly one allowed (deciding the 39 locally would have allowed a second)."""
    now = [0.0]
    redis_limiter = primary(limiter_from_url(store(redis_url, timeout=0.25)))
    lim = ResilientLimiter(redis_limiter, cooldown=1.0, monotonic=lambda: now[0], probe_wait=5.0)
    await asyncio.to_thread(redis_server.stop)
    assert (await lim.decide_with_source(key("CN=probe"), OMS))[1] == "local"
    await asyncio.to_thread(redis_server.start)
    now[0] = 1.5  # the cooldown is over: the next call is the probe
    answers = await asyncio.gather(
        *(lim.decide_with_source(key("CN=fresh"), OMS) for _ in range(40))
    )
    assert {source for _, source in answers} == {"store"}
    assert sum(d.allowed for d, _ in answers) == 1
    assert lim.state == "ok"
    await lim.close()


async def test_on_store_error_modes_and_the_breaker(redis_server: RedisServer) -> None:
    """With Redis down: local, allow and deny, per call; the breaker with a hand-driven clock."""
    await asyncio.to_thread(redis_server.stop)
    mono, wall = [0.0], [T0]
    redis_limiter = primary(limiter_from_url(store(redis_server.url, timeout=0.05)))
    lim = ResilientLimiter(
        redis_limiter, mode="local", cooldown=1.0, clock=lambda: wall[0], monotonic=lambda: mono[0]
    )
    k = key("CN=modes")
    first, source = await lim.decide_with_source(k, OMS)
    assert (first.allowed, source, first.now) == (True, "local", T0)
    wall[0] = T0 + 1
    second, source = await lim.decide_with_source(k, OMS)
    assert (second.allowed, second.retry_after, source) == (False, 4.0, "local")
    allowed, source = await lim.decide_with_source(k, OMS, on_error="allow")
    assert (allowed.allowed, source) == (True, "allow")
    denied, source = await lim.decide_with_source(key("CN=other"), OMS, on_error="deny")
    assert (denied.allowed, denied.retry_after, source) == (False, 1.0, "deny")
    assert lim.store_calls == 1  # only the first call paid for the store; the breaker held the rest
    assert (await lim.peek(k, OMS)).calls_in_window == 1  # the local view while the store is away
    with pytest.raises(StoreUnavailable):
        await lim.clear(k)
    assert lim.store_calls == 1

    mono[0] = 1.0  # cooldown over: exactly one probe, which fails and re-arms the breaker
    await lim.decide(k, OMS)
    await lim.decide(k, OMS)
    assert (lim.store_calls, lim.store_errors, lim.state) == (2, 2, "fallback")
    status = lim.status()
    assert status["since"] == T0 and status["fallback_decisions"] == 6
    assert "refused" in str(status["last_error"]).lower() or "connect" in str(status["last_error"])

    await asyncio.to_thread(redis_server.start)
    mono[0] = 2.5
    wall[0] = T0 + 10
    back, source = await lim.decide_with_source(k, OMS)
    assert (back.allowed, source, lim.state) == (True, "store", "ok")
    assert lim.status()["since"] == T0 + 10
    await lim.close()


async def test_start_never_fails_when_redis_is_down(redis_server: RedisServer) -> None:
    await asyncio.to_thread(redis_server.stop)
    lim = limiter_from_url(store(redis_server.url, timeout=0.05, connect_timeout=0.05))
    started = time.perf_counter()
    await lim.start()
    assert time.perf_counter() - started < 0.2
    assert lim.state == "fallback"
    assert (await lim.decide(key("CN=cold"), OMS)).allowed
    await lim.close()
    await asyncio.to_thread(redis_server.start)


# -- connections: auth, db, TLS ----------------------------------------------------------------


async def test_username_password_and_db_from_the_url(
    redis_server: RedisServer, redis_url: str
) -> None:
    client = redis_server.client()
    client.acl_setuser(
        "gateway", enabled=True, passwords=["+s3cr:et"], keys=["aup:*"], commands=["+@all"]
    )
    try:
        url = f"redis://gateway:s3cr%3Aet@127.0.0.1:{redis_server.port}/3"
        lim = limiter_from_url(store(url))
        assert (await lim.decide(key("CN=auth"), OMS, now=T0)).allowed
        assert lim.store_errors == 0
        client.select(3)
        assert client.exists(key("CN=auth")) == 1
        await lim.close()

        wrong = limiter_from_url(store(f"redis://gateway:nope@127.0.0.1:{redis_server.port}/3"))
        _, source = await wrong.decide_with_source(key("CN=auth"), OMS, now=T0)
        assert source == "local" and wrong.state == "fallback"
        assert "password" in str(wrong.status()["last_error"]).lower()
        await wrong.close()
    finally:
        client.acl_deluser("gateway")
        client.close()


@pytest.fixture(scope="module")
def redis_tls(certs: DemoCerts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    cert, client_key = certs.clients["monitorx0001"]
    tls = RedisTls(certs.ca, certs.server, certs.server_key, cert, client_key)
    server = RedisServer(redis_executable(), tmp_path_factory.mktemp("redis-tls"), tls=tls)
    server.start()
    yield server
    server.stop()


async def test_rediss_with_client_certificate(redis_tls: RedisServer) -> None:
    lim = limiter_from_url(store(redis_tls.url))
    assert (await lim.decide(key("CN=tls"), OMS, now=T0)).allowed
    assert not (await lim.decide(key("CN=tls"), OMS, now=T0 + 1)).allowed
    assert lim.store_errors == 0
    assert lim.status()["target"] == f"rediss://127.0.0.1:{redis_tls.port}/0"
    await lim.close()

    assert redis_tls.tls is not None
    no_cert = f"rediss://127.0.0.1:{redis_tls.port}/0?ssl_ca_certs={redis_tls.tls.ca}"
    refused = limiter_from_url(store(no_cert))
    assert (await refused.decide_with_source(key("CN=tls"), OMS))[1] == "local"
    await refused.close()

    untrusted = f"rediss://127.0.0.1:{redis_tls.port}/0"  # the system CAs don't know the demo CA
    refused = limiter_from_url(store(untrusted))
    assert (await refused.decide_with_source(key("CN=tls"), OMS))[1] == "local"
    assert "certificate" in str(refused.status()["last_error"]).lower()
    await refused.close()


# -- store URLs --------------------------------------------------------------------------------


def test_redis_url_options() -> None:
    url = (
        "rediss://user:p%40ss@redis.example:6380/2?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required"
        "&ssl_check_hostname=false&client_name=aup&health_check_interval=5"
    )
    kwargs, label = redis_connection_kwargs(StoreSettings(url=url), urlsplit(url))
    assert label == "rediss://redis.example:6380/2"
    assert "p@ss" not in label
    assert kwargs["username"] == "user" and kwargs["password"] == "p@ss"
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("redis.example", 6380, 2)
    assert kwargs["ssl_ca_certs"] == "/ca.pem" and kwargs["ssl_check_hostname"] is False
    assert kwargs["health_check_interval"] == 5.0
    assert kwargs["connection_class"].__name__ == "SSLConnection"

    plain, label = redis_connection_kwargs(StoreSettings(), urlsplit("redis://"))
    assert (plain["host"], plain["port"], label) == ("127.0.0.1", 6379, "redis://127.0.0.1:6379/0")
    assert plain["connection_class"].__name__ == "Connection"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://h/0?bogus=1", "unknown URL option 'bogus'"),
        ("redis://h/0?ssl_ca_certs=/ca.pem", "needs rediss://"),
        ("redis://h/zero", "database must be a number"),
        ("redis://h:notaport/0", "invalid port"),
        ("rediss://h/0?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of"),
        ("rediss://h/0?ssl_check_hostname=perhaps", "must be true or false"),
        ("redis+cluster://a:7000,b:7001/2", "Redis Cluster has db 0 only"),
        ("redis+sentinel://a:26379,b:26379", "needs the master's service name"),
        ("memcached://h", "unsupported URL scheme 'memcached'"),
        ("memory://somewhere", "memory:// takes no host"),
    ],
)
def test_bad_store_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        limiter_from_url(StoreSettings(url=url))
    assert message in str(caught.value)


async def test_memory_store_has_the_same_face() -> None:
    lim = limiter_from_url(StoreSettings(url="memory://"), clock=lambda: T0)
    await lim.start()
    assert lim.status()["store"] == "memory" and lim.state == "ok"
    assert (await lim.decide(key("CN=mem"), OMS, on_error="deny")).allowed
    assert (await lim.decide_with_source(key("CN=mem"), OMS))[1] == "store"
    await lim.close()


async def test_key_prefix_namespaces_without_moving_the_hash_tag(
    redis_server: RedisServer, redis_url: str
) -> None:
    lim = limiter_from_url(store(redis_url, key_prefix="stage"))
    k = key("CN=prefixed")
    assert (await lim.decide(k, OMS, now=T0)).allowed
    client = redis_server.client()
    assert client.keys("*") == [f"stage:{k}".encode()]
    assert key_slot(f"stage:{k}".encode()) == key_slot(k.encode())  # the same Cluster slot
    assert await lim.clear(k)
    assert client.dbsize() == 0
    await lim.close()
    client.close()


async def test_an_idle_gateway_notices_the_store_is_back_by_itself(
    redis_server: RedisServer,
) -> None:
    """The background prober (started by start()): with no call arriving and nobody asking
    /readyz, the state goes back to ok within the cooldown plus one store round trip."""
    settings = store(redis_server.url, timeout=0.05, connect_timeout=0.05, breaker_cooldown=0.1)
    lim = limiter_from_url(settings)
    await lim.start()
    try:
        redis_server.stop()
        await lim.decide(key("CN=idlex0001"), OMS)  # fails over: the breaker opens
        assert lim.state == "fallback"
        calls = lim.store_calls
        await lim.probe()  # within the cooldown: not even tried
        assert lim.state == "fallback" and lim.store_calls == calls
        await asyncio.sleep(0.35)  # three cooldowns: the prober tried (and failed) by itself
        assert lim.state == "fallback" and lim.store_calls > calls
        redis_server.start()
        await wait_for_state(lim, "ok", within=5.0)  # no call made, no probe() asked
        calls = lim.store_calls
        await lim.probe()  # closed: probe() does nothing
        assert lim.store_calls == calls
    finally:
        if not redis_server.running:
            redis_server.start()
        await lim.close()


# -- reconciliation: what the fallback allowed, merged into the store ---------------------------


async def test_reconcile_merges_local_calls_on_the_store_clock(
    limiter: ResilientLimiter,
) -> None:
    """Local calls are sent as ages and placed on the store's clock; every call in the window is
    replayed as the store would have decided it (the excess), and only the newest N are kept."""
    redis = primary(limiter)
    k, rate = key("CN=mergex0001"), Rate(limit=2, per=10.0)
    assert (await redis.decide(k, rate)).allowed  # the store's own call, now
    # two local calls 2 s and 1 s ago, one 20 s ago (outside the window: ignored)
    excess, merged, _ = await redis.reconcile(k, rate, [2.0, 1.0, 20.0], 0.0)
    assert (merged, excess) == (2, 1)  # three calls in 10 s where the policy allows two
    state = await redis.peek(k, rate)
    assert state.calls_in_window == 2  # the newest two
    refused = await redis.decide(k, rate)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(9.0, abs=0.5)  # the call 1 s ago + 10 s


async def test_a_local_lockout_is_merged_too(limiter: ResilientLimiter) -> None:
    redis = primary(limiter)
    k, rate = key("CN=mergex0002"), Rate(limit=1, per=30.0, reset_on_early_retry=True)
    excess, merged, _ = await redis.reconcile(k, rate, [], 25.0)  # locked locally for 25 s more
    assert (excess, merged) == (0, 0)
    refused = await redis.decide(k, rate)
    assert not refused.allowed and refused.retry_after == 30.0  # the early retry resets it


async def test_the_fallbacks_keys_are_merged_before_the_breaker_closes(
    redis_server: RedisServer, redis_url: str
) -> None:
    now = [0.0]
    lim = ResilientLimiter(
        primary(limiter_from_url(store(redis_url, timeout=0.25))),
        cooldown=1.0,
        monotonic=lambda: now[0],
    )
    await asyncio.to_thread(redis_server.stop)
    decision, source = await lim.decide_with_source(key("CN=mergex0003"), OMS)
    assert decision.allowed and source == "local"
    await asyncio.to_thread(redis_server.start)
    now[0] = 1.5
    await lim.probe()
    assert lim.state == "ok" and (lim.reconciled_keys, lim.reconciled_calls) == (1, 1)
    assert len(lim.fallback) == 0  # handed over
    refused, source = await lim.decide_with_source(key("CN=mergex0003"), OMS)
    assert not refused.allowed and source == "store"
    await lim.close()
