"""Exactness across a store outage (docs/outage.md), with two real gateway processes on one real
redis-server: the switch back is exact (once every replica has had the stated switch-back time,
no call is decided locally: a burst over both replicas to a fresh key admits exactly one, 20 runs
of 20), and what a replica's local fallback allowed during the outage is merged into the store
(a call through the other replica in the same window is rejected; calls beyond the policy across
replicas are counted in the metrics and written to the ledger)."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest

from gateway.ops.ledger import LedgerEntry
from tests.support.ops import samples, value, wait_for
from tests.support.redis import RedisServer
from tests.support.replicas import STORE_OPTIONS, Caller, ReplicaFactory, ReplicaSet

POLICIES = """\
policies:
  - name: oms-retrieve
    application: OMS
    services: ["Retrieve*"]
    limit: 1
    per: 30s
"""


def _seconds(text: str) -> float:
    return float(text.removesuffix("ms")) / 1000 if text.endswith("ms") else float(text[:-1])


# The stated bound (docs/outage.md): a replica decides on the store again at most
# breaker_cooldown + timeout + connect_timeout after the store answers (0.5 s here).
SWITCH_BACK = sum(
    _seconds(STORE_OPTIONS[k]) for k in ("breaker_cooldown", "timeout", "connect_timeout")
)
SLACK = 0.5  # this 2-CPU machine runs two gateways, the mock, Redis and this client at once
JDOE = "CN=jdoex1234,OU=people,O=CAISO,C=US"


@pytest.fixture(scope="module")
def pair(replica_factory: ReplicaFactory, redis_server: RedisServer) -> ReplicaSet:
    if not redis_server.running:
        redis_server.start()
    return replica_factory(store=redis_server.url, policies=POLICIES, offsets=(0.0, 0.0))


async def _restart_and_wait(redis_server: RedisServer) -> None:
    await asyncio.to_thread(redis_server.start)
    await asyncio.sleep(SWITCH_BACK + SLACK)  # nobody probes for the replicas: they notice


async def test_after_the_switch_back_time_a_burst_over_two_replicas_admits_exactly_one(
    pair: ReplicaSet, redis_server: RedisServer
) -> None:
    admitted: list[int] = []
    async with Caller(pair) as caller:
        for run in range(20):
            await asyncio.to_thread(redis_server.stop)  # SIGKILL
            # served on each replica's local fallback: exact per replica, so one each
            outage = [
                await caller.soap(i, "OMS", f"RetrieveOutage{run}_OMSv1_AP") for i in range(4)
            ]
            assert all(a.allowed or a.aup_fault for a in outage)
            assert sum(a.allowed for a in outage) == 2
            await _restart_and_wait(redis_server)
            burst = await caller.burst("OMS", f"RetrieveFresh{run}_OMSv1_AP", 40)
            assert all(a.allowed or a.aup_fault for a in burst)
            admitted.append(sum(a.allowed for a in burst))
    print(f"\nswitch back: admitted per burst of 40 over 2 replicas, 20 runs: {admitted}")
    assert admitted == [1] * 20
    pair.assert_alive()


async def test_a_call_allowed_locally_during_the_outage_counts_on_the_store_after(
    pair: ReplicaSet, redis_server: RedisServer
) -> None:
    async with Caller(pair) as caller:
        await asyncio.to_thread(redis_server.stop)
        allowed = await caller.soap(0, "OMS", "RetrieveReconciled_OMSv1_AP")  # replica A
        assert allowed.allowed
        await _restart_and_wait(redis_server)
        # replica B, the same key, the same 30 s window: A's call was merged into the store
        rejected = await caller.soap(1, "OMS", "RetrieveReconciled_OMSv1_AP")
        assert rejected.aup_fault and rejected.retry_after is not None
        assert 20 <= int(rejected.retry_after) <= 30  # counted from A's call, on Redis's clock
    pair.assert_alive()


def _metrics(pair: ReplicaSet, index: int) -> str:
    with urllib.request.urlopen(f"{pair.replicas[index].admin_url}/metrics", timeout=5) as answer:
        text: str = answer.read().decode()
        return text


async def test_calls_beyond_the_policy_across_replicas_are_counted_and_ledgered(
    pair: ReplicaSet, redis_server: RedisServer
) -> None:
    def excess_total() -> float:
        return sum(
            value(samples(_metrics(pair, i)), "aup_store_excess_calls_total", store="redis")
            for i in (0, 1)
        )

    before = await asyncio.to_thread(excess_total)
    service = "RetrieveTwice_OMSv1_AP"
    async with Caller(pair) as caller:
        await asyncio.to_thread(redis_server.stop)
        # each replica's local fallback allows the key once: two calls where the policy says one
        assert (await caller.soap(0, "OMS", service)).allowed
        assert (await caller.soap(1, "OMS", service)).allowed
        await _restart_and_wait(redis_server)
        assert (await caller.soap(0, "OMS", service)).aup_fault
        assert (await caller.soap(1, "OMS", service)).aup_fault
    # the replica that merged second found one call beyond the policy
    assert await asyncio.to_thread(excess_total) == before + 1

    def excess_entries() -> list[LedgerEntry]:
        with redis_server.client() as client:
            raw = client.xrange(f"aup:{{ledger}}:i:{JDOE}")
        entries = [LedgerEntry.from_json(fields[b"e"]) for _, fields in raw]
        return [e for e in entries if e is not None and e.decision == "excess"]

    await wait_for(
        lambda: any(e.service == service for e in excess_entries()),
        timeout=10,
        what="the excess entry in the ledger",
    )
    (entry,) = [e for e in excess_entries() if e.service == service]
    assert (entry.count, entry.application, entry.identity, entry.fallback, entry.final) == (
        1,
        "OMS",
        JDOE,
        True,
        True,
    )
    ready = json.loads(urllib.request.urlopen(f"{pair.replicas[0].admin_url}/readyz").read())
    assert ready["store"]["switch_back_within"] == pytest.approx(SWITCH_BACK)
