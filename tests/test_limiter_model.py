"""Property: both stores decide exactly as the reference model in PRODUCT.md, on random schedules.

The model below is PRODUCT.md's pseudo-code transcribed, on integer ticks so it is exact. A tick is
1/64 s: a dyadic fraction, so every time, window and difference is exact in a float, and a whole
number of microseconds (15,625) in Redis. Boundaries such as "exactly W later" are then the same
instant in all three, and any disagreement is a real one.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config.settings import StoreSettings
from gateway.limiter import KeyState, MemoryLimiter, Rate, RedisLimiter, limiter_from_url
from tests.support.redis import RedisServer

TICK = 1 / 64
BASE = 1_700_000_000.0


@dataclass
class ModelKey:
    allowed: list[int] = field(default_factory=list)  # times of allowed calls, in ticks
    locked_until: int | None = None


def model_allow(key: ModelKey, t: int, limit: int, per: int, reset: bool) -> tuple[bool, int]:
    """PRODUCT.md's allow(t), word for word: (allowed, retry_after) in ticks."""
    in_window = [c for c in key.allowed if t - per < c <= t]
    if key.locked_until is not None and t < key.locked_until:
        allowed, retry_after = False, key.locked_until - t
    elif len(in_window) < limit:
        allowed, retry_after = True, 0
        key.allowed.append(t)
    else:
        allowed, retry_after = False, min(in_window) + per - t
    if not allowed and reset:
        key.locked_until = t + per
        retry_after = per
    return allowed, retry_after


@dataclass(frozen=True)
class Policy:
    limit: int
    per: int  # ticks
    reset: bool

    @property
    def rate(self) -> Rate:
        return Rate(self.limit, self.per * TICK, self.reset)


policies = st.builds(
    Policy,
    limit=st.integers(1, 5),
    per=st.integers(1, 64 * 10),
    reset=st.booleans(),
)


@st.composite
def schedules(draw: st.DrawFn) -> tuple[list[Policy], list[tuple[int, int]]]:
    """A few keys with a policy each, and monotonic (time in ticks, key) calls, often bunched."""
    keys = draw(st.lists(policies, min_size=1, max_size=3))
    longest = max(p.per for p in keys)
    steps = draw(
        st.lists(
            st.tuples(
                st.one_of(st.just(0), st.integers(0, 8), st.integers(0, 2 * longest)),
                st.integers(0, len(keys) - 1),
            ),
            min_size=1,
            max_size=40,
        )
    )
    t, calls = 0, []
    for dt, k in steps:
        t += dt
        calls.append((t, k))
    return keys, calls


@pytest.fixture(scope="module")
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as r:
        yield r


@pytest.fixture(scope="module")
def redis_limiter(redis_server: RedisServer, runner: asyncio.Runner) -> Iterator[RedisLimiter]:
    redis_server.start()
    store = StoreSettings(url=redis_server.url, timeout=2.0, connect_timeout=2.0)
    wrapped = limiter_from_url(store)
    primary = wrapped.primary
    assert isinstance(primary, RedisLimiter)
    runner.run(primary.start())
    yield primary
    runner.run(primary.close())


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schedule=schedules())
def test_stores_match_the_reference_model(
    schedule: tuple[list[Policy], list[tuple[int, int]]],
    redis_limiter: RedisLimiter,
    runner: asyncio.Runner,
    example_ids: Iterator[int],
) -> None:
    keys, calls = schedule
    example = next(example_ids)
    names = [f"aup:{{model-{example}|APP|svc{k}}}" for k in range(len(keys))]
    model = [ModelKey() for _ in keys]
    memory = MemoryLimiter(clock=lambda: pytest.fail("the tests pass `now` explicitly"))

    async def run() -> None:
        for step, (tick, k) in enumerate(calls):
            policy, name, now = keys[k], names[k], BASE + tick * TICK
            allowed, retry_ticks = model_allow(
                model[k], tick, policy.limit, policy.per, policy.reset
            )
            mem = await memory.decide(name, policy.rate, now=now)
            red = await redis_limiter.decide(name, policy.rate, now=now)
            where = f"step {step}: t={tick} key={k} {policy}"
            assert mem.allowed == allowed, where
            assert red.allowed == allowed, where
            assert mem.retry_after == pytest.approx(retry_ticks * TICK, abs=1e-6), where
            assert red.retry_after == pytest.approx(retry_ticks * TICK, abs=1e-6), where
            # Beyond the model's two outputs, the two stores agree on everything they report.
            assert red.remaining == mem.remaining, where
            assert red.reset_after == pytest.approx(mem.reset_after, abs=1e-6), where
            assert red.now == pytest.approx(now, abs=1e-6), where
            assert_same_state(
                await memory.peek(name, policy.rate, now=now),
                await redis_limiter.peek(name, policy.rate, now=now),
                where,
            )

    runner.run(run())


@settings(max_examples=300, deadline=None)
@given(schedule=schedules())
def test_refusing_first_as_a_replay_does_matches_the_model(
    schedule: tuple[list[Policy], list[tuple[int, int]]],
) -> None:
    """A replayed request asks `refuse_now` first and the handler decides only when it says None
    (proxy/replay.py): together they must decide every call as the model does, and `refuse_now`
    must never record anything when it steps aside."""
    keys, calls = schedule
    model = [ModelKey() for _ in keys]
    memory = MemoryLimiter(clock=lambda: pytest.fail("the tests pass `now` explicitly"))
    for step, (tick, k) in enumerate(calls):
        policy, name, now = keys[k], f"aup:{{replay|APP|svc{k}}}", BASE + tick * TICK
        allowed, retry_ticks = model_allow(model[k], tick, policy.limit, policy.per, policy.reset)
        refused = memory.refuse_now(name, policy.rate, now)
        decision = refused if refused is not None else memory.decide_now(name, policy.rate, now)
        where = f"step {step}: t={tick} key={k} {policy}"
        assert refused is None or not refused.allowed, where
        assert decision.allowed == allowed, where
        assert decision.retry_after == pytest.approx(retry_ticks * TICK, abs=1e-6), where


@pytest.fixture(scope="module")
def example_ids() -> Iterator[int]:
    return itertools.count()


def assert_same_state(mem: KeyState, red: KeyState, where: str) -> None:
    assert red.calls_in_window == mem.calls_in_window, where
    assert red.locked_until == pytest.approx(mem.locked_until, abs=1e-6), where
    assert red.retry_after == pytest.approx(mem.retry_after, abs=1e-6), where


def test_the_model_itself() -> None:
    """The transcription of the model, checked on the DRRS example from PRODUCT.md."""
    key = ModelKey()
    assert model_allow(key, 0, 1, 30, True) == (True, 0)
    assert model_allow(key, 10, 1, 30, True) == (False, 30)
    assert model_allow(key, 39, 1, 30, True) == (False, 30)
    assert model_allow(key, 68, 1, 30, True) == (False, 30)
    assert model_allow(key, 98, 1, 30, True) == (True, 0)
    oms = ModelKey()
    assert model_allow(oms, 0, 1, 5, False) == (True, 0)
    assert model_allow(oms, 3, 1, 5, False) == (False, 2)
    assert model_allow(oms, 5, 1, 5, False) == (True, 0)
