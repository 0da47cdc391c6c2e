"""The store on a real 3-master Redis Cluster (`redis+cluster://`): keys spread over every master,
NOSCRIPT reloaded per node, one master down mid-traffic, two gateway processes exact on it, and
the cluster and sentinel store URLs.

The limiter contract suite runs on the cluster too: tests/test_limiter_contract.py's `limiter`
fixture has a "cluster" (and a "sentinel") backend.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis, RedisCluster

from gateway.config.settings import StoreSettings
from gateway.errors import ConfigError
from gateway.limiter import (
    Rate,
    RedisLimiter,
    ResilientLimiter,
    Source,
    limiter_from_url,
    limiter_key,
)
from tests.support.redis_cluster import RedisClusterSet
from tests.support.replicas import Caller, ReplicaFactory

OMS = Rate(limit=1, per=5.0)
T0 = 1_700_000_000.0


def key(identity: str, service: str = "RetrieveOutages_OMSv1_AP") -> str:
    return limiter_key(identity, "OMS", service)


def primary(lim: ResilientLimiter) -> RedisLimiter:
    assert isinstance(lim.primary, RedisLimiter)
    return lim.primary


@pytest.fixture
async def limiter(redis_cluster_url: str) -> AsyncIterator[ResilientLimiter]:
    lim = limiter_from_url(
        StoreSettings(url=redis_cluster_url, timeout=1.0, connect_timeout=1.0, pool_size=32)
    )
    await lim.start()
    yield lim
    await lim.close()


async def test_keys_spread_over_every_master(
    redis_cluster: RedisClusterSet, limiter: ResilientLimiter
) -> None:
    identities = 3000
    keys = [key(f"CN=user{i:05d},OU=people,O=CAISO,C=US") for i in range(identities)]

    async def worker(share: list[str]) -> int:
        return sum([(await limiter.decide(k, OMS)).allowed for k in share])

    started = time.perf_counter()
    allowed = await asyncio.gather(*(worker(keys[i::32]) for i in range(32)))
    elapsed = time.perf_counter() - started
    assert sum(allowed) == identities and limiter.store_errors == 0

    per_master = {}
    for node in redis_cluster.nodes:
        with node.client() as client:
            per_master[node.port] = client.dbsize()
    print(
        f"\n{identities} identities on the cluster in {elapsed * 1000:.0f} ms "
        f"({identities / elapsed:,.0f} decisions/s, one process): keys per master {per_master}"
    )
    assert sum(per_master.values()) == identities
    # The slots are split in three near-equal ranges; the hash tag spreads (identity, service)
    # pairs evenly over them (binomial: a standard deviation of about 26 keys here).
    assert all(abs(n - identities / 3) < 150 for n in per_master.values()), per_master
    for k in keys[:50]:  # and each key is where the cluster says its slot lives
        with redis_cluster.owner(k).client() as client:
            assert client.exists(k) == 1


async def test_noscript_on_one_master_is_reloaded(
    redis_cluster: RedisClusterSet, limiter: ResilientLimiter
) -> None:
    keys = [key(f"CN=noscript{i}") for i in range(30)]
    for k in keys:
        assert (await limiter.decide(k, OMS, now=T0)).allowed
    loads = primary(limiter).script_loads
    flushed = redis_cluster.owner(keys[0])
    with flushed.client() as client:
        client.script_flush()  # as a restarted or newly promoted master would be
    on_flushed = [k for k in keys if redis_cluster.owner(k) is flushed]
    elsewhere = [k for k in keys if redis_cluster.owner(k) is not flushed]
    assert on_flushed and elsewhere

    for k in elsewhere:  # the other masters still have the script: no reload
        assert not (await limiter.decide(k, OMS, now=T0 + 1)).allowed
    assert primary(limiter).script_loads == loads
    for k in on_flushed:  # the first NOSCRIPT reloads, the rest find it loaded
        assert not (await limiter.decide(k, OMS, now=T0 + 1)).allowed
    assert primary(limiter).script_loads == loads + 1
    assert limiter.store_errors == 0 and limiter.state == "ok"
    with flushed.client() as client:
        assert all(client.script_exists(primary(limiter)._decide_sha))


async def test_one_master_down_mid_traffic(
    redis_cluster: RedisClusterSet, redis_cluster_url: str
) -> None:
    """A master is killed for 0.8 s while decisions flow, then restarted (it rejoins with its
    nodes.conf): every decision still comes within the deadline, falling back meanwhile, and the
    store takes over again by itself, exact.

    What falls back is the whole store, not only the dead master's slots: the breaker is one per
    store, and redis-py's cluster client itself spreads a node's failure (it drops every node's
    connections on CLUSTERDOWN and on a failed topology refresh), so keys on live masters fail
    too. The print shows how many live-master decisions still reached the cluster.
    """
    # 100 ms rather than the default 50: several processes share two CPUs here, and a live
    # master that answers late would blur what this test looks at.
    settings = StoreSettings(
        url=redis_cluster_url, timeout=0.1, connect_timeout=0.25, breaker_cooldown=0.2
    )
    lim = limiter_from_url(settings)
    await lim.start()
    keys = [key(f"CN=flow{i}") for i in range(24)]
    victim = redis_cluster.owner(keys[0])
    calls: list[tuple[float, float, str, Source]] = []  # (when, elapsed, key, source)
    stop = asyncio.Event()

    async def worker(k: str) -> None:
        rate = Rate(limit=1, per=0.05)
        while not stop.is_set():
            started = time.perf_counter()
            _, source = await lim.decide_with_source(k, rate)
            calls.append((time.monotonic(), time.perf_counter() - started, k, source))
            await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(worker(k)) for k in keys]
    try:
        await asyncio.sleep(0.3)
        assert lim.state == "ok"
        killed = time.monotonic()
        await asyncio.to_thread(victim.stop)
        await asyncio.sleep(0.8)
        await asyncio.to_thread(redis_cluster.restart, victim)
        restarted = time.monotonic()
        while lim.state != "ok" or calls[-1][3] != "store":
            assert time.monotonic() - restarted < 3.0, lim.status()
            await asyncio.sleep(0.02)
        back = time.monotonic() - restarted
        # The first moments after a rejoin can still see a CLUSTERDOWN or two (and redis-py
        # then drops every connection); judge the steady state after half a second.
        await asyncio.sleep(max(0.0, restarted + 1.0 - time.monotonic()))
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        if not victim.running:
            await asyncio.to_thread(redis_cluster.restart, victim)

    outage = [c for c in calls if killed <= c[0] <= restarted]
    on_victim = {k for k in keys if redis_cluster.owner(k) is victim}
    by_source = Counter(source for _, _, _, source in outage)
    live_store = sum(1 for _, _, k, s in outage if k not in on_victim and s == "store")
    live_total = sum(1 for _, _, k, _ in outage if k not in on_victim)
    slowest = max(elapsed for _, elapsed, _, _ in calls)
    print(
        f"\none master of 3 down for {restarted - killed:.2f}s: {len(outage)} decisions "
        f"{dict(by_source)}; keys on live masters decided by the store {live_store}/{live_total}"
        f"; slowest {slowest * 1000:.0f} ms; back on the store {back * 1000:.0f} ms after the "
        f"cluster was ok again"
    )
    assert by_source["local"] > 0 and lim.store_errors > 0
    assert slowest < settings.timeout + settings.connect_timeout + 0.25  # deadline + scheduling
    after = Counter(source for when, _, _, source in calls if when > restarted + 0.5)
    # decided by the store again: by a round trip, or by a lock the store gave (the lock cache)
    assert after["store"] + after["cache"] >= 0.9 * sum(after.values()), after
    assert after["store"] > 0
    # Back on the cluster, exact again.
    fresh = key("CN=after-outage")
    decisions = await asyncio.gather(*(lim.decide(fresh, Rate(3, 30.0)) for _ in range(60)))
    assert sum(d.allowed for d in decisions) == 3
    await lim.close()


async def test_two_gateway_processes_on_the_cluster_allow_exactly_the_limit(
    replica_factory: ReplicaFactory, redis_cluster: RedisClusterSet, redis_cluster_url: str
) -> None:
    policies = """\
    policies:
      - {name: oms-burst, application: OMS, services: ["Retrieve*"], limit: 3, per: 30s}
      - name: drrs
        application: DRRS
        services: ["*"]
        limit: 1
        per: 30s
        reset_on_early_retry: true
    """
    replicas = replica_factory(store=redis_cluster_url, policies=policies, offsets=(0.0, 7200.0))
    async with Caller(replicas) as caller:
        burst = await caller.burst("OMS", "RetrieveBurst_OMSv1_AP", 100)
        drrs = await caller.burst("DRRS", "RetrieveDRLocations_DRRSv2_AP", 100)
    for answers, limit in ((burst, 3), (drrs, 1)):
        assert sum(a.allowed for a in answers) == limit, Counter(a.status for a in answers)
        assert all(a.aup_fault for a in answers if not a.allowed)
        assert {a.replica for a in answers} == {0, 1}
    assert {a.retry_after for a in drrs if not a.allowed} == {"30"}

    for replica in replicas:
        code, body = await asyncio.to_thread(replicas.readyz, replica.index)
        store: Any = body["store"]
        assert code == 200 and store["state"] == "ok" and store["fallback_decisions"] == 0
        assert store["target"] == redis_cluster_url
    stored = 0
    for node in redis_cluster.nodes:
        with node.client() as client:
            for k in client.scan_iter(match="aup:{*"):
                if k.startswith(b"aup:{ledger}"):  # the ledger's keys, not the limiter's
                    continue
                assert redis_cluster.owner(k.decode()) is node
                stored += 1
    assert stored == 2  # one key per (identity, service), on the master of its slot
    replicas.assert_alive()


async def test_a_cluster_nobody_answers_for_falls_back_from_the_start(
    redis_cluster: RedisClusterSet,
) -> None:
    """No startup node answers: redis-py raises RedisClusterException, which is not a
    RedisError; the limiter still starts, falls back and reports it."""
    nowhere = "redis+cluster://127.0.0.1:1,127.0.0.1:2"
    lim = limiter_from_url(StoreSettings(url=nowhere))
    await lim.start()  # never fails
    assert lim.state == "fallback"
    assert "cannot be connected" in str(lim.status()["last_error"])
    decision, source = await lim.decide_with_source(key("CN=nowhere"), OMS)
    assert decision.allowed and source == "local"
    await lim.close()


async def test_client_failures_of_any_kind_are_store_failures() -> None:
    """redis-py's cluster client can fail with a plain AttributeError when another task
    disconnects the connection it is writing on (seen in test_one_master_down_mid_traffic):
    the limiter reports the store unavailable, so the call falls back instead of failing."""

    class Racing:
        async def evalsha(self, *args: object) -> list[int]:
            raise AttributeError("'NoneType' object has no attribute 'writelines'")

    lim = ResilientLimiter(RedisLimiter(Racing()))  # type: ignore[arg-type]
    decision, source = await lim.decide_with_source(key("CN=race"), OMS)
    assert decision.allowed and source == "local"
    assert "AttributeError" in str(lim.status()["last_error"])


# -- URLs --------------------------------------------------------------------------------------


async def test_cluster_and_sentinel_urls() -> None:
    cluster = limiter_from_url(
        StoreSettings(
            url="rediss+cluster://gw:s3cr%40t@node-a:7000,node-b,[::1]:7002/?client_name=aup"
            "&ssl_ca_certs=/ca.pem&ssl_check_hostname=false",
            pool_size=8,
        )
    )
    assert cluster.label == "rediss+cluster://node-a:7000,node-b:6379,[::1]:7002"
    client: Any = primary(cluster)._client
    assert isinstance(client, RedisCluster)
    kwargs = client.connection_kwargs
    assert (kwargs["password"], kwargs["username"], kwargs["client_name"]) == (
        "s3cr@t",
        "gw",
        "aup",
    )
    assert kwargs["ssl_ca_certs"] == "/ca.pem" and kwargs["ssl_check_hostname"] is False
    assert kwargs["socket_timeout"] == 0.05 and kwargs["max_connections"] == 8 + 4
    await cluster.close()

    sentinel = limiter_from_url(
        StoreSettings(
            url="redis+sentinel://:data-pw@s1,s2:26380/mymaster/2?sentinel_password=sent-pw"
            "&client_name=aup"
        )
    )
    assert sentinel.label == "redis+sentinel://s1:26379,s2:26380/mymaster/2"
    master = primary(sentinel)._client
    assert isinstance(master, Redis)
    pool: Any = master.connection_pool
    assert pool.service_name == "mymaster" and pool.max_connections == 64
    assert pool.connection_kwargs["db"] == 2
    assert pool.connection_kwargs["password"] == "data-pw"
    assert pool.connection_kwargs["client_name"] == "aup"
    assert pool.sentinel_manager.sentinel_kwargs["password"] == "sent-pw"
    assert "sent-pw" not in sentinel.label and "data-pw" not in sentinel.label
    await sentinel.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://", "needs at least one host:port"),
        ("redis+cluster://a:7000,b:x", "invalid port in redis+cluster:// node 'b:x'"),
        ("redis+cluster://a:7000/3", "Redis Cluster has db 0 only"),
        ("redis+cluster://a:7000?db=1", "has database 0 only"),
        ("redis+cluster://a:7000?bogus=1", "unknown URL option 'bogus'"),
        ("redis+cluster://a:7000?ssl_ca_certs=/ca.pem", "needs rediss://"),
        ("rediss+cluster://a:7000?ssl_password=x", "'ssl_password' is not supported"),
        ("redis+sentinel://s1:26379", "needs the master's service name"),
        ("redis+sentinel://s1:26379/mymaster/x", "database must be a number"),
        ("redis+sentinel:///mymaster", "needs at least one host:port"),
        ("redis+sentinel://s1/mymaster?nope=1", "unknown URL option 'nope'"),
    ],
)
def test_bad_cluster_and_sentinel_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        limiter_from_url(StoreSettings(url=url))
    assert message in str(caught.value)
