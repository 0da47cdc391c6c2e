"""The store behind Redis Sentinel (`redis+sentinel://`): a master, a replica and three sentinels
(quorum 2, down-after 500 ms). The master is killed while calls flow through two gateway
processes and an in-process limiter: every call is answered within the store's deadline (falling
back meanwhile), the sentinels promote the replica, and decisions go back, by themselves, to being
exact on the new master.

The limiter contract suite also runs on a Sentinel-managed master: tests/test_limiter_contract.py's
`limiter` fixture has a "sentinel" backend.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.config.settings import StoreSettings
from gateway.limiter import Rate, limiter_from_url, limiter_key
from tests.support.redis_cluster import SentinelSet
from tests.support.replicas import Answer, Caller, ReplicaFactory

TIMEOUT, CONNECT_TIMEOUT, COOLDOWN = 0.05, 0.25, 0.2  # tests/support/replicas.py STORE_OPTIONS
MARGIN = 0.25  # scheduling on a loaded 2-CPU machine

POLICIES = """\
policies:
  - {name: oms-burst, application: OMS, services: ["RetrieveBurst*"], limit: 3, per: 30s}
  - {name: oms-retrieve, application: OMS, services: ["Retrieve*"], limit: 1, per: 200ms}
"""


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    group = SentinelSet(
        tmp_path_factory.mktemp("sentinel-failover"), down_after_ms=500, failover_timeout_ms=2000
    )
    try:
        group.start()
        yield group
    finally:
        group.stop()


async def test_master_killed_during_calls_fails_over_and_stays_exact(
    sentinels: SentinelSet, replica_factory: ReplicaFactory
) -> None:
    replicas = replica_factory(store=sentinels.url, policies=POLICIES, offsets=(0.0, 0.0))
    direct = limiter_from_url(
        StoreSettings(
            url=sentinels.url,
            timeout=TIMEOUT,
            connect_timeout=CONNECT_TIMEOUT,
            breaker_cooldown=COOLDOWN,
        )
    )
    await direct.start()
    old_master = sentinels.master_port()
    stop = asyncio.Event()
    gateway_calls: list[tuple[float, Answer]] = []
    limiter_calls: list[tuple[float, float, str]] = []  # (when, elapsed, source)
    failures: list[BaseException] = []

    async def through_gateway(caller: Caller, i: int) -> None:
        n = i
        while not stop.is_set():
            try:
                answer = await caller.soap(n, "OMS", f"RetrieveFlow{i}_OMSv1_AP")
                gateway_calls.append((time.monotonic(), answer))
            except Exception as exc:
                failures.append(exc)
            n += 1
            await asyncio.sleep(0.005)

    async def through_limiter(i: int) -> None:
        k = limiter_key(f"CN=direct{i}", "OMS", "RetrieveFlow_OMSv1_AP")
        while not stop.is_set():
            started = time.perf_counter()
            _, source = await direct.decide_with_source(k, Rate(1, 0.2))
            limiter_calls.append((time.monotonic(), time.perf_counter() - started, source))
            await asyncio.sleep(0.005)

    async def readyz_states() -> list[str]:
        answers = await asyncio.gather(
            *(asyncio.to_thread(replicas.readyz, r.index) for r in replicas)
        )
        states = []
        for code, body in answers:
            assert code == 200
            store: Any = body["store"]
            states.append(store["state"])
        return states

    async with Caller(replicas) as caller:
        tasks = [asyncio.create_task(through_gateway(caller, i)) for i in range(6)]
        tasks += [asyncio.create_task(through_limiter(i)) for i in range(4)]
        await asyncio.sleep(0.4)
        assert await readyz_states() == ["ok", "ok"] and direct.state == "ok"

        killed = time.monotonic()
        await asyncio.to_thread(sentinels.node(old_master).stop)  # SIGKILL the master
        saw_fallback = False
        while not await asyncio.to_thread(sentinels.promoted, old_master):
            saw_fallback = saw_fallback or await readyz_states() == ["fallback", "fallback"]
            assert time.monotonic() - killed < 20, "no failover"
            await asyncio.sleep(0.05)
        promoted = time.monotonic()
        new_master = sentinels.master_port()
        while await readyz_states() != ["ok", "ok"] or direct.state != "ok":
            assert time.monotonic() - promoted < 5, (await readyz_states(), direct.status())
            await asyncio.sleep(0.05)
        back = time.monotonic()
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*tasks)

        # Exact on the new master: 100 concurrent calls over both replicas, 3 allowed.
        burst = await caller.burst("OMS", "RetrieveBurst_OMSv1_AP", 100)

    assert failures == []
    assert saw_fallback
    answers = [a for _, a in gateway_calls]
    assert all(a.allowed or a.aup_fault for a in answers), Counter(a.status for a in answers)
    during = [a for t, a in gateway_calls if killed <= t <= back]
    direct_during = Counter(s for t, _, s in limiter_calls if killed <= t <= back)
    slowest = max(a.elapsed for a in answers)
    slowest_direct = max(e for _, e, _ in limiter_calls)
    print(
        f"\nsentinel failover: promoted {promoted - killed:.2f}s after the kill; gateways and "
        f"limiter back on the store {(back - promoted) * 1000:.0f} ms after promotion; "
        f"{len(during)} gateway calls meanwhile, slowest {slowest * 1000:.0f} ms; in-process "
        f"limiter {dict(direct_during)}, slowest {slowest_direct * 1000:.0f} ms"
    )
    assert len(during) > 50 and direct_during["local"] > 0
    assert slowest < TIMEOUT + CONNECT_TIMEOUT + MARGIN
    assert slowest_direct < TIMEOUT + CONNECT_TIMEOUT + MARGIN
    after = Counter(s for t, _, s in limiter_calls if t > back)
    # decided by the store again: by a round trip, or by a lock the store gave (the lock cache)
    assert after["store"] + after["cache"] >= 0.9 * sum(after.values()), after
    assert after["store"] > 0

    assert new_master != old_master
    assert sum(a.allowed for a in burst) == 3, Counter(a.status for a in burst)
    assert all(a.aup_fault for a in burst if not a.allowed)
    with sentinels.node(new_master).client() as client:
        keys = {k.decode() for k in client.scan_iter(match="aup:*")}
    assert any("RetrieveBurst_OMSv1_AP" in k for k in keys)  # the decisions live there now
    await direct.close()
    replicas.assert_alive()
