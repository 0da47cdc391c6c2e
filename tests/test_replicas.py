"""Several real gateway processes sharing one real redis-server: exact decisions across replicas,
DRRS lockouts extended from either replica, the store's clock over the replicas' own, and a
Redis outage in the middle of traffic.

The three replicas' wall clocks disagree by hours (tests/support/skewed_gateway.py): one is
right, one runs 3 hours ahead and one 5 hours behind, so every test here also shows that the
replicas' clocks do not take part in a decision.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from tests.support.redis import RedisServer
from tests.support.replicas import Answer, Caller, ReplicaFactory, ReplicaSet

HOUR = 3600.0
OFFSETS = (0.0, 3 * HOUR, -5 * HOUR)
DRRS_TEXT = "CAISO DRRS Acceptable Use Policy Violation"

POLICIES = """\
policies:
  - name: oms-burst
    application: OMS
    services: ["RetrieveBurst*"]
    limit: 3
    per: 30s
  - name: oms-retrieve
    application: OMS
    services: ["Retrieve*"]
    limit: 1
    per: 1s
  - name: drrs-per-service
    application: DRRS
    services: ["*"]
    limit: 1
    per: 1s
    reset_on_early_retry: true
    message: >-
      CAISO DRRS Acceptable Use Policy Violation. Please retry your request again in {per}
      seconds from now. Note: Time resets each time you request before expiration.
"""


@pytest.fixture(scope="module")
def replicas(replica_factory: ReplicaFactory, redis_server: RedisServer) -> ReplicaSet:
    if not redis_server.running:
        redis_server.start()
    return replica_factory(store=redis_server.url, policies=POLICIES, offsets=OFFSETS)


async def readyz_all(replicas: ReplicaSet) -> list[tuple[int, dict[str, object]]]:
    return list(
        await asyncio.gather(*(asyncio.to_thread(replicas.readyz, r.index) for r in replicas))
    )


def store_of(body: dict[str, object]) -> dict[str, object]:
    store = body["store"]
    assert isinstance(store, dict)
    return store


async def wait_for(predicate: Callable[[], Awaitable[bool]], within: float, what: str) -> float:
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < within, f"{what}: not within {within}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def at(t0: float, offset: float) -> None:
    """Sleep until `offset` seconds after `t0` (monotonic)."""
    await asyncio.sleep(max(0.0, t0 + offset - time.monotonic()))


def assert_exact(answers: list[Answer], limit: int) -> None:
    allowed = [a for a in answers if a.allowed]
    assert len(allowed) == limit, Counter((a.replica, a.status) for a in answers)
    assert all(a.aup_fault for a in answers if not a.allowed)
    assert {a.replica for a in answers} == {0, 1, 2}  # spread over every replica


# -- exactness ---------------------------------------------------------------------------------


async def test_hundred_concurrent_calls_over_three_replicas_allow_exactly_the_limit(
    replicas: ReplicaSet, redis_url: str
) -> None:
    before = [store_of(body)["fallback_decisions"] for _, body in await readyz_all(replicas)]
    async with Caller(replicas) as caller:
        burst = await caller.burst("OMS", "RetrieveBurst_OMSv1_AP", 100)
        drrs = await caller.burst("DRRS", "RetrieveDRLocations_DRRSv2_AP", 100)

    assert_exact(burst, 3)
    assert all(1 <= int(str(a.retry_after)) <= 30 for a in burst if not a.allowed)
    assert_exact(drrs, 1)
    # Every rejection reset the lockout to the full window: Retry-After is the window, always.
    assert {a.retry_after for a in drrs if not a.allowed} == {"1"}
    assert all(DRRS_TEXT in a.body for a in drrs if not a.allowed)

    after = await readyz_all(replicas)
    for (code, body), fallback_before in zip(after, before, strict=True):
        assert code == 200 and store_of(body)["state"] == "ok"
        assert store_of(body)["fallback_decisions"] == fallback_before  # all of it on Redis
    print(
        f"\n100 calls over 3 replicas: allowed per replica "
        f"{dict(Counter(a.replica for a in burst if a.allowed))}, slowest "
        f"{max(a.elapsed for a in burst + drrs) * 1000:.0f} ms"
    )
    replicas.assert_alive()


async def test_early_retries_from_either_replica_extend_the_drrs_lockout(
    replicas: ReplicaSet, redis_url: str
) -> None:
    """DRRS, 1 per 1 s with reset: each early retry, whichever replica takes it, restarts the
    full window; a service that nobody retried early frees up on time (the control)."""
    retried, control = "RetrieveDRLocations_DRRSv2_AP", "RetrieveDRRegistrations_DRRSv2_AP"
    # The replicas keep the locks the store gave them (the lock cache) until those end; FLUSHALL
    # does not reach them, so let the previous test's DRRS locks (1 s window) run out first.
    await asyncio.sleep(1.1)
    async with Caller(replicas) as caller:
        t0 = time.monotonic()
        assert (await caller.soap(0, "DRRS", retried)).allowed
        assert (await caller.soap(0, "DRRS", control)).allowed

        await at(t0, 0.75)
        from_b = await caller.soap(1, "DRRS", retried)  # early: the lockout now ends at 1.75
        assert from_b.aup_fault and from_b.retry_after == "1"

        await at(t0, 1.25)
        # The first call's window ended at 1.0, so without B's retry this would pass.
        from_a = await caller.soap(0, "DRRS", retried)
        assert from_a.aup_fault and from_a.retry_after == "1"
        assert DRRS_TEXT in from_a.body
        assert (await caller.soap(0, "DRRS", control)).allowed  # on time, no early retry

        await at(t0, 1.6)
        from_c = await caller.soap(2, "DRRS", retried)  # a third replica extends it again
        assert from_c.aup_fault

        await at(t0, 2.75)  # a full quiet window after the last early retry (1.6 + 1.0)
        assert (await caller.soap(1, "DRRS", retried)).allowed
        assert (await caller.soap(0, "DRRS", retried)).aup_fault
    replicas.assert_alive()


# -- the store's clock rules -------------------------------------------------------------------


async def test_replicas_hours_apart_decide_by_the_store_clock(
    replicas: ReplicaSet, redis_url: str
) -> None:
    # The replicas' clocks really disagree: each stamped its store status with its own clock.
    since = [float(str(store_of(body)["since"])) for _, body in await readyz_all(replicas)]
    for replica, stamped in zip(replicas, since, strict=True):
        assert stamped - since[0] == pytest.approx(replica.clock_offset, abs=120)

    service = "RetrieveCurrentOutages_OMSv1_AP"  # 1 call per 1 s
    async with Caller(replicas) as caller:
        first = await caller.soap(1, "OMS", service)  # the replica 3 hours ahead
        started = time.monotonic()
        assert first.allowed
        # By their own clocks the others are 3 and 8 hours before that call: a replica that
        # trusted its clock would allow (the call "has not happened yet") or lock out for 8 hours.
        for index in (2, 0):
            late = await caller.soap(index, "OMS", service)
            assert late.aup_fault and late.retry_after == "1", late
        await at(started, 1.05)  # one second of the store's time, whatever the replicas think
        behind = await caller.soap(2, "OMS", service)  # 5 hours behind
        assert behind.allowed
        ahead = await caller.soap(1, "OMS", service)
        assert ahead.aup_fault and ahead.retry_after == "1"


# -- outage ------------------------------------------------------------------------------------


class Traffic:
    """Workers calling in a loop, each its own service (so its own key), over every replica."""

    def __init__(self, caller: Caller, workers: int = 9) -> None:
        self.caller = caller
        self.answers: list[tuple[float, Answer]] = []
        self.failures: list[BaseException] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(workers)]

    async def _worker(self, i: int) -> None:
        n = i
        while not self._stop.is_set():
            try:
                answer = await self.caller.soap(n, "OMS", f"RetrieveFlow{i}_OMSv1_AP")
                self.answers.append((time.monotonic(), answer))
            except Exception as exc:  # a hang, a reset, a refused connection: all failures
                self.failures.append(exc)
            n += 1
            await asyncio.sleep(0.005)

    def between(self, start: float, end: float) -> list[Answer]:
        return [a for t, a in self.answers if start <= t <= end]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def test_redis_outage_while_calls_flow(
    replicas: ReplicaSet, redis_server: RedisServer, redis_url: str
) -> None:
    """Kill redis-server (a crash), then freeze it (a hang), while calls flow through every
    replica: every call is answered within the store's deadline plus a margin, /readyz says
    "fallback" on every replica, and each goes back to Redis by itself once it returns."""
    timeout, connect_timeout = 0.05, 0.25  # STORE_OPTIONS in tests/support/replicas.py
    deadline = timeout + connect_timeout
    margin = 0.25  # a loaded 2-CPU machine runs 3 gateways, the mock, Redis and this client

    async def all_in(state: str) -> bool:
        return all(
            code == 200 and store_of(body)["state"] == state
            for code, body in await readyz_all(replicas)
        )

    async with Caller(replicas) as caller:
        traffic = Traffic(caller)
        await asyncio.sleep(0.4)
        # A loaded machine may trip the 50 ms timeout now and then; start from a calm store.
        await wait_for(lambda: all_in("ok"), 2.0, "readyz ok before the outage")

        crash = time.monotonic()
        await asyncio.to_thread(redis_server.stop)  # SIGKILL
        seen_down = await wait_for(lambda: all_in("fallback"), 2.0, "readyz fallback")
        statuses = {body["status"] for _, body in await readyz_all(replicas)}
        await asyncio.sleep(0.5)
        await asyncio.to_thread(redis_server.start)
        restarted = time.monotonic()
        back_after_crash = await wait_for(lambda: all_in("ok"), 3.0, "readyz ok after restart")

        await asyncio.sleep(0.3)
        hang = time.monotonic()
        redis_server.pause()  # SIGSTOP: connections stay open, nothing answers
        await wait_for(lambda: all_in("fallback"), 2.0, "readyz fallback while hung")
        await asyncio.sleep(0.5)
        redis_server.resume()
        resumed = time.monotonic()
        back_after_hang = await wait_for(lambda: all_in("ok"), 3.0, "readyz ok after resume")
        await asyncio.sleep(0.2)
        await traffic.stop()

        # Back on the shared store: exact again (the local fallback would allow 3 per replica).
        assert_exact(await caller.burst("OMS", "RetrieveBurstAfter_OMSv1_AP", 60), 3)

    assert traffic.failures == []
    answers = [a for _, a in traffic.answers]
    assert all(a.allowed or a.aup_fault for a in answers), Counter(a.status for a in answers)
    during_crash = traffic.between(crash, restarted)
    during_hang = traffic.between(hang, resumed)
    assert len(during_crash) > 50 and len(during_hang) > 50
    slowest = max(a.elapsed for a in answers)
    slowest_hang = max(a.elapsed for a in during_hang)
    print(
        f"\noutage: {len(answers)} calls; crash: {len(during_crash)} calls, slowest "
        f"{max(a.elapsed for a in during_crash) * 1000:.0f} ms, readyz fallback after "
        f"{seen_down * 1000:.0f} ms, ok {back_after_crash * 1000:.0f} ms after restart; hang: "
        f"{len(during_hang)} calls, slowest {slowest_hang * 1000:.0f} ms, ok "
        f"{back_after_hang * 1000:.0f} ms after SIGCONT; slowest overall {slowest * 1000:.0f} ms"
    )
    assert slowest < deadline + margin
    assert slowest_hang < timeout + margin  # a hung Redis costs the socket timeout, not more
    assert statuses == {"ready (store fallback)"}
    for replica in replicas:
        log = replica.log_text()
        assert log.count("unreachable") >= 2 and log.count("answers again") >= 2, log[-2000:]
    replicas.assert_alive()
