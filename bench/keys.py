"""The cost of one limiter decision as the number of live keys grows: 1, 10,000, 1,000,000.

Measured in-process, through the limiter that `serve` builds (`limiter_from_url`, so the
fallback wrapper and, with Redis, its local cache of locked keys are included), with keys
precomputed by `limiter_key` from distinct subject DNs so that only the decision is timed. At
each size, in random order over the live keys, so a big table's cache misses are paid:

- `live`: a repeated call for a key that is already live and over its limit (1 call per 60 s):
  a rejection, as the gateway pays it (with Redis, the local lock cache answers repeats);
- `store`: the same rejection asked of the store itself (Redis only: one round trip each);
- `new`: a first call for a key not seen before: allowed, and inserts one more key.

The memory store is timed one decision after another (it never waits). The Redis store is
timed two ways: sequentially (one decision in flight: the round trip) and with 64 decisions in
flight (what one busy gateway process sees); Redis is filled with a Lua script that writes the
same state `decide.lua` writes, since deciding 1,000,000 keys one by one would take minutes.
Redis's own memory per key (INFO used_memory) is reported too.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass

from gateway.config.settings import StoreSettings
from gateway.limiter.base import Rate, limiter_key
from gateway.limiter.factory import limiter_from_url
from gateway.limiter.memory import MemoryLimiter

SIZES = (1, 10_000, 1_000_000)
SERVICE = "RetrieveCurrentOutages_OMSv1_AP"
RATE = Rate(1, 60.0)  # every live key stays live and over its limit for the whole measurement
_CONCURRENCY = 64
_FILL_CHUNK = 50_000
# Writes the state decide.lua keeps ("locked_until t1", integer microseconds) for a range of
# keys named like limiter_key(dn(i), ...), in one round trip per chunk.
_FILL_LUA = """
local first, last = tonumber(ARGV[1]), tonumber(ARGV[2])
local head, tail, state, ttl = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
for i = first, last do
  redis.call('SET', head .. string.format('%07d', i) .. tail, state, 'PX', ttl)
end
return last - first + 1
"""


def dn(i: int) -> str:
    return f"CN=user{i:07d},OU=people,O=CAISO,C=US"


def key(i: int) -> str:
    return limiter_key(dn(i), "OMS", SERVICE)


@dataclass(frozen=True)
class Cost:
    store: str
    live_keys: int
    live_us: float  # µs per decision for a live key (a rejection), as the gateway pays it
    new_us: float  # µs per decision for a new key (allowed, inserts)
    mode: str  # "sequential" or "64 in flight"
    store_us: float | None = None  # Redis: a live key's rejection asked of the store itself
    bytes_per_key: float | None = None  # the store's own memory per key (Redis)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


async def memory_costs(sizes: tuple[int, ...] = SIZES, samples: int = 200_000) -> list[Cost]:
    results = []
    for size in sizes:
        limiter = limiter_from_url(StoreSettings("memory://"))
        primary = limiter.primary
        assert isinstance(primary, MemoryLimiter)
        t0 = time.time()
        for i in range(size):
            primary.decide_now(key(i), RATE, t0)
        t = t0 + 1.0
        rng = random.Random(size)
        live = [key(rng.randrange(size)) for _ in range(samples)]
        fresh = [key(size + i) for i in range(samples)]
        live_us = await _timed_sequential(limiter.decide, live, t)
        new_us = await _timed_sequential(limiter.decide, fresh, t)
        assert len(primary) == size + samples
        results.append(Cost("memory", size, live_us, new_us, "sequential"))
        await limiter.close()
    return results


async def _timed_sequential(decide: object, keys: list[str], now: float) -> float:
    call = decide  # a bound method: one attribute look-up less inside the timed loop
    started = time.perf_counter()
    for k in keys:
        await call(k, RATE, now)  # type: ignore[operator]
    return (time.perf_counter() - started) / len(keys) * 1e6


async def redis_costs(
    url: str,
    sizes: tuple[int, ...] = SIZES,
    samples: int = 20_000,
) -> list[Cost]:
    from redis.asyncio import Redis

    admin = Redis.from_url(url)
    results = []
    try:
        for size in sizes:
            await admin.flushall()
            base_memory = int((await admin.info("memory"))["used_memory"])
            await _fill(admin, size)
            filled = int(await admin.dbsize())
            assert filled == size, (filled, size)
            per_key = (int((await admin.info("memory"))["used_memory"]) - base_memory) / size
            limiter = limiter_from_url(StoreSettings(url))
            await limiter.start()
            try:
                rng = random.Random(size)
                live = [key(rng.randrange(size)) for _ in range(samples)]
                fresh = [key(size + i) for i in range(2 * samples)]
                # now=None: the store's clock, as in production.
                store = limiter.primary.decide
                await _timed_sequential_store(limiter.decide, live[:1000])  # connect, warm up
                seq_store = await _timed_sequential_store(store, live)
                await _timed_parallel(limiter.decide, live)  # each sampled key seen once
                seq_live = await _timed_sequential_store(limiter.decide, live)
                seq_new = await _timed_sequential_store(limiter.decide, fresh[:samples])
                par_store = await _timed_parallel(store, live)
                par_live = await _timed_parallel(limiter.decide, live)
                par_new = await _timed_parallel(limiter.decide, fresh[samples:])
                assert limiter.store_errors == 0, limiter.status()
            finally:
                await limiter.close()
            # Redis's memory per key is only meaningful over many keys.
            bytes_per_key = round(per_key, 1) if size >= 1000 else None
            results.append(
                Cost("redis", size, seq_live, seq_new, "sequential", seq_store, bytes_per_key)
            )
            results.append(
                Cost(
                    "redis",
                    size,
                    par_live,
                    par_new,
                    f"{_CONCURRENCY} in flight",
                    par_store,
                    bytes_per_key,
                )
            )
        await admin.flushall()
    finally:
        await admin.aclose()
    return results


async def _fill(admin: object, size: int) -> None:
    seconds, micros = await admin.time()  # type: ignore[attr-defined]
    now_us = seconds * 1_000_000 + micros
    head = key(0)[: key(0).index("0000000")]
    tail = key(0)[len(head) + 7 :]
    state = f"0 {now_us}"
    ttl_ms = 600_000
    for first in range(0, size, _FILL_CHUNK):
        last = min(first + _FILL_CHUNK, size) - 1
        await admin.eval(_FILL_LUA, 0, first, last, head, tail, state, ttl_ms)  # type: ignore[attr-defined]


async def _timed_sequential_store(decide: object, keys: list[str]) -> float:
    call = decide
    started = time.perf_counter()
    for k in keys:
        await call(k, RATE)  # type: ignore[operator]
    return (time.perf_counter() - started) / len(keys) * 1e6


async def _timed_parallel(decide: object, keys: list[str]) -> float:
    call = decide
    lanes = [keys[i::_CONCURRENCY] for i in range(_CONCURRENCY)]

    async def lane(batch: list[str]) -> None:
        for k in batch:
            await call(k, RATE)  # type: ignore[operator]

    started = time.perf_counter()
    await asyncio.gather(*(lane(b) for b in lanes))
    return (time.perf_counter() - started) / len(keys) * 1e6


def run_costs(
    redis_url: str | None,
    sizes: tuple[int, ...] = SIZES,
) -> tuple[list[Cost], str | None]:
    """Memory-store costs, then Redis's; a failure is returned with what was measured before."""

    async def both() -> tuple[list[Cost], str | None]:
        costs = await memory_costs(sizes)
        if redis_url:
            try:
                costs += await redis_costs(redis_url, sizes)
            except Exception as exc:  # a broken store must not lose the rest of the run
                return costs, f"Redis store: {type(exc).__name__}: {exc}"
        return costs, None

    try:
        import uvloop
    except ImportError:
        return asyncio.run(both())
    return uvloop.run(both())
