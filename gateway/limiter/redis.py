"""The Redis store: every decision is one EVALSHA of decide.lua, on the store's clock.

This module owns the Python side of the scripts: loading them (at start, and again whenever Redis
answers NOSCRIPT after a restart, a failover or SCRIPT FLUSH), converting the limiter's seconds to
the integer microseconds the scripts work in, and turning every way Redis can fail (refused,
reset, timed out, loading, read-only replica, ...) into one `StoreUnavailable`, so the fallback
wrapper sees a single error type. It knows nothing of URLs (factory.py) or outages (fallback.py).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import TypeVar

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from gateway.errors import StoreUnavailable
from gateway.limiter.base import Decision, KeyState, Rate

_US = 1_000_000
_Arg = int | str
_T = TypeVar("_T")


def _script(name: str) -> tuple[str, str]:
    """A script's source and the SHA1 that Redis will know it by."""
    source = files("gateway.limiter").joinpath(name).read_text(encoding="utf-8")
    return source, hashlib.sha1(source.encode("utf-8")).hexdigest()


def _now_arg(now: float | None) -> _Arg:
    # An empty argument tells the script to read the store's own clock (TIME).
    return "" if now is None else round(now * _US)


class RedisLimiter:
    """The reference model kept in Redis: one key, one round trip and one atomic script per call.

    `deadline` bounds a whole call (pool wait, connect, script), so a dead or hung Redis costs a
    caller at most that long; the socket timeouts set on the client usually fire first.
    `key_prefix` other than the default "aup" namespaces the keys further ("<prefix>:aup:{...}"),
    leaving the hash tag, and so the Cluster slot, unchanged.

    `client` is a Redis (one server, or a Sentinel-managed master) or a RedisCluster: the scripts
    touch one hash-tagged key, so the cluster client routes each EVALSHA to that key's master.
    `max_in_flight` bounds the calls waiting on the client at once, inside the deadline. The
    cluster client and the Sentinel pool do not queue for a free connection as a
    BlockingConnectionPool does: past their `max_connections` they fail at once, which would send
    a burst of calls to the fallback while Redis is perfectly healthy.
    """

    name = "redis"

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        deadline: float = 0.3,
        key_prefix: str = "aup",
        owns_client: bool = True,
        max_in_flight: int | None = None,
    ) -> None:
        self._client = client
        self._slots = asyncio.Semaphore(max_in_flight) if max_in_flight else None
        self._deadline = deadline
        self._prefix = "" if key_prefix == "aup" else f"{key_prefix}:"
        self._owns_client = owns_client
        self._decide_src, self._decide_sha = _script("decide.lua")
        self._peek_src, self._peek_sha = _script("peek.lua")
        self.script_loads = 0

    @property
    def client(self) -> Redis | RedisCluster:
        """The client the store URL built (one server, a Sentinel master or a cluster), for
        other writers to the same store, such as the violation ledger's stream."""
        return self._client

    async def start(self) -> None:
        """Load the scripts now, so the first decision is already a single EVALSHA."""
        await self._call(self._load)

    async def ping(self) -> None:
        await self._call(self._client.ping)

    async def decide(self, key: str, rate: Rate, now: float | None = None) -> Decision:
        args: tuple[_Arg, ...] = (
            rate.limit,
            round(rate.per * _US),
            1 if rate.reset_on_early_retry else 0,
            _now_arg(now),
        )
        allowed, retry_us, remaining, reset_us, now_us = await self._evalsha(
            self._decide_sha, key, args
        )
        return Decision(allowed == 1, retry_us / _US, remaining, reset_us / _US, now_us / _US)

    async def peek(self, key: str, rate: Rate, now: float | None = None) -> KeyState:
        args: tuple[_Arg, ...] = (rate.limit, round(rate.per * _US), _now_arg(now))
        calls, locked_us, retry_us, now_us = await self._evalsha(self._peek_sha, key, args)
        return KeyState(calls, locked_us / _US, retry_us / _US, now_us / _US)

    async def clear(self, key: str) -> bool:
        async def delete() -> int:
            return int(await self._client.delete(self._prefix + key))

        return await self._call(delete) > 0

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def _evalsha(self, sha: str, key: str, args: tuple[_Arg, ...]) -> list[int]:
        redis_key = self._prefix + key

        async def run() -> list[int]:
            try:
                reply = await self._client.evalsha(sha, 1, redis_key, *args)
            except NoScriptError:
                # Redis restarted, failed over or flushed its script cache: load and retry once,
                # inside the same deadline.
                await self._load()
                reply = await self._client.evalsha(sha, 1, redis_key, *args)
            return [int(v) for v in reply]

        return await self._call(run)

    async def _load(self) -> None:
        for source, sha in ((self._decide_src, self._decide_sha), (self._peek_src, self._peek_sha)):
            loaded = await self._client.script_load(source)
            if loaded != sha:
                raise StoreUnavailable(f"redis: SCRIPT LOAD returned {loaded!r}, expected {sha}")
        self.script_loads += 1

    async def _call(self, op: Callable[[], Awaitable[_T]]) -> _T:
        try:
            async with asyncio.timeout(self._deadline):
                if self._slots is None:
                    return await op()
                async with self._slots:
                    return await op()
        except StoreUnavailable:
            raise
        except (RedisError, RedisClusterException, OSError) as exc:
            # OSError covers refused and reset connections and TimeoutError (the deadline's too).
            # RedisClusterException is not a RedisError: the cluster client raises it when no
            # startup node answers, or when the slots it learnt do not cover a key.
            raise StoreUnavailable(f"redis: {exc or type(exc).__name__}") from exc
        except Exception as exc:
            # The client's own failures under concurrency: redis-py's cluster client disconnects
            # every node's connections on CLUSTERDOWN or a failed topology refresh, and a call
            # that was writing on one of them meets `None` (AttributeError). Still the store
            # failing, never a reason to fail the request.
            raise StoreUnavailable(f"redis client: {type(exc).__name__}: {exc}") from exc
