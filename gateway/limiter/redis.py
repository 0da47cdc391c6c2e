"""The Redis store: every decision is one EVALSHA of decide.lua, on the store's clock.

This module owns the Python side of the scripts: loading them (at start, and again whenever Redis
answers NOSCRIPT after a restart, a failover or SCRIPT FLUSH), converting the limiter's seconds to
the integer microseconds the scripts work in, and turning every way Redis can fail (refused,
reset, timed out, loading, read-only replica, ...) into one `StoreUnavailable`, so the fallback
wrapper sees a single error type. It knows nothing of URLs (factory.py) or outages (fallback.py).

For one server (redis://, rediss://) decisions can skip redis-py: `Pipeline` sends the EVALSHAs
issued in one event-loop iteration as one write on one dedicated connection and hands the replies
back in order. Each decision is still its own atomic EVALSHA; only the round trip is shared.
redis-py costs ~50 µs of CPU per call (pool checkout, packing, parsing); this path a few.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, TypeVar, cast

import hiredis
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from gateway.errors import StoreUnavailable
from gateway.limiter.base import Decision, KeyState, Rate

_US = 1_000_000
_GLOB_SPECIAL = re.compile(r"[*?\[\]\\]")  # escaped in a SCAN MATCH pattern
_SCAN_PAGE = 1000
_Arg = int | str
_T = TypeVar("_T")


def lua_source(name: str) -> str:
    """The source of a Lua script in gateway/limiter/lua/, where every script the gateway runs
    in Redis lives (the limiter's, and the ledger's writes)."""
    return files("gateway.limiter").joinpath("lua", name).read_text(encoding="utf-8")


def _script(name: str) -> tuple[str, str]:
    """A script's source and the SHA1 that Redis will know it by."""
    source = lua_source(name)
    return source, hashlib.sha1(source.encode("utf-8")).hexdigest()


def _pack(*parts: str | int | bytes) -> bytes:
    """One command in RESP, packed by hiredis."""
    # hiredis's stub types its argument as a 1-tuple; it takes any number of parts.
    packed: bytes = hiredis.pack_command(parts)  # type: ignore[arg-type]
    return packed


def _now_arg(now: float | None) -> _Arg:
    # An empty argument tells the script to read the store's own clock (TIME).
    return "" if now is None else round(now * _US)


@dataclass(frozen=True)
class Target:
    """Where a Pipeline connects and how it introduces itself: what a redis:// URL says."""

    host: str
    port: int
    timeout: float  # per call, from the moment it is issued to its reply
    connect_timeout: float
    ssl_context: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = None
    db: int = 0
    client_name: str | None = None


class _Connection(asyncio.Protocol):
    """One connection of a Pipeline: commands queued in one loop iteration go out as one write;
    replies come back in order and resolve the oldest pending future.

    A watchdog (one timer, not one per call) fails the whole connection once its oldest
    unanswered command is older than the timeout: a frozen Redis answers nothing after it either,
    so every waiting call fails fast and the next call reconnects.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._reader = hiredis.Reader()
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._buffer: list[bytes] = []
        self._flush_soon = False
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self.closed = False
        self.writes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self._transport = cast(asyncio.Transport, transport)

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """Queue one packed command; the future gets its reply (a ReplyError is a reply)."""
        if self.closed:
            raise StoreUnavailable("redis: connection closed")
        future: asyncio.Future[Any] = self._loop.create_future()
        deadline = self._loop.time() + self._timeout
        self._pending.append((future, deadline))
        self._buffer.append(command)
        if not self._flush_soon:
            self._flush_soon = True
            self._loop.call_soon(self._flush)
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._watch)
        return future

    def _flush(self) -> None:
        self._flush_soon = False
        if self.closed or self._transport is None:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._transport.write(data)
        self.writes += 1

    def data_received(self, data: bytes) -> None:
        reader, pending = self._reader, self._pending
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                if not pending:
                    raise StoreUnavailable("redis: a reply nobody asked for")
                future, _ = pending.popleft()
                if not future.done():  # its caller may have been cancelled
                    future.set_result(reply)
        except (hiredis.ProtocolError, StoreUnavailable) as exc:
            self.fail(StoreUnavailable(f"redis: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(StoreUnavailable(f"redis: connection lost: {exc or 'closed by the server'}"))

    def _watch(self) -> None:
        self._timer = None
        if self.closed or not self._pending:
            return
        deadline = self._pending[0][1]
        if deadline <= self._loop.time():
            self.fail(StoreUnavailable(f"redis: no reply within {self._timeout}s"))
        else:
            self._timer = self._loop.call_at(deadline, self._watch)

    def fail(self, exc: StoreUnavailable) -> None:
        """Close the connection and fail every call still waiting on it."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.abort()
        self._buffer.clear()
        pending, self._pending = self._pending, deque()
        for future, _ in pending:
            if not future.done():
                future.set_exception(exc)


class Pipeline:
    """Auto-pipelined commands on one dedicated connection to one Redis server.

    Connects on first use and again on the first call after a failure (no retries: the breaker
    in fallback.py does those). A call costs at most `connect_timeout` waiting for a connection
    plus `timeout` waiting for its reply; every failure is a StoreUnavailable.
    """

    def __init__(self, target: Target) -> None:
        self._target = target
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self.connects = 0
        self._writes = 0

    @property
    def writes(self) -> int:
        """Writes made so far (each carries every command queued in one loop iteration)."""
        return self._writes + (self._conn.writes if self._conn else 0)

    async def call(self, command: bytes) -> Any:
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connected()
        return await conn.send(command)

    async def _connected(self) -> _Connection:
        if self._connecting is None:
            if self._conn is not None:
                self._writes += self._conn.writes
                self._conn = None
            self._connecting = asyncio.ensure_future(self._connect())
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _Connection:
        target = self._target
        loop = asyncio.get_running_loop()
        try:
            try:
                async with asyncio.timeout(target.connect_timeout):
                    _, conn = await loop.create_connection(
                        lambda: _Connection(loop, target.timeout),
                        target.host,
                        target.port,
                        ssl=target.ssl_context,
                    )
            except (OSError, ssl.SSLError) as exc:  # TimeoutError is an OSError
                raise StoreUnavailable(f"redis: connect: {exc or type(exc).__name__}") from exc
            self.connects += 1
            await self._handshake(conn)
            self._conn = conn
            return conn
        finally:
            self._connecting = None

    async def _handshake(self, conn: _Connection) -> None:
        # What redis-py's Connection.on_connect sends for a RESP2 connection, pipelined.
        target = self._target
        commands: list[tuple[str | int, ...]] = []
        if target.password is not None:
            if target.username is not None:
                commands.append(("AUTH", target.username, target.password))
            else:
                commands.append(("AUTH", target.password))
        if target.client_name:
            commands.append(("CLIENT", "SETNAME", target.client_name))
        if target.db:
            commands.append(("SELECT", target.db))
        if not commands:
            return
        replies = await asyncio.gather(
            *(conn.send(_pack(*c)) for c in commands), return_exceptions=True
        )
        for reply in replies:
            if isinstance(reply, BaseException):
                conn.fail(StoreUnavailable(f"redis: {reply}"))
                raise StoreUnavailable(f"redis: connect: {reply}")

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._conn is not None:
            self._conn.fail(StoreUnavailable("redis: closed"))


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

    `pipeline`, for one server, carries the decisions (peek, clear and the rest stay on `client`).
    """

    name = "redis"
    shared = True

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        deadline: float = 0.3,
        key_prefix: str = "aup",
        owns_client: bool = True,
        max_in_flight: int | None = None,
        pipeline: Pipeline | None = None,
    ) -> None:
        self._client = client
        self._pipeline = pipeline
        self._reloading: asyncio.Future[None] | None = None
        self._slots = asyncio.Semaphore(max_in_flight) if max_in_flight else None
        self._deadline = deadline
        self._prefix = "" if key_prefix == "aup" else f"{key_prefix}:"
        self._owns_client = owns_client
        self._decide_src, self._decide_sha = _script("decide.lua")
        self._peek_src, self._peek_sha = _script("peek.lua")
        self._reconcile_src, self._reconcile_sha = _script("reconcile.lua")
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
        """One round trip, down the connection decisions use (the breaker's probe: it also
        reconnects that connection before any decision needs it)."""
        pipeline = self._pipeline
        if pipeline is None:
            await self._call(self._client.ping)
            return

        async def pong() -> None:
            reply = await pipeline.call(_pack("PING"))
            if isinstance(reply, hiredis.ReplyError):  # LOADING, ...
                raise StoreUnavailable(f"redis: {reply}")

        await self._call(pong)

    async def decide(self, key: str, rate: Rate, now: float | None = None) -> Decision:
        args: tuple[_Arg, ...] = (
            rate.limit,
            round(rate.per * _US),
            1 if rate.reset_on_early_retry else 0,
            _now_arg(now),
        )
        if self._pipeline is not None:
            reply = await self._pipelined(self._pipeline, key, args)
        else:
            reply = await self._evalsha(self._decide_sha, key, args)
        allowed, retry_us, remaining, reset_us, now_us = reply
        return Decision(allowed == 1, retry_us / _US, remaining, reset_us / _US, now_us / _US)

    async def peek(self, key: str, rate: Rate, now: float | None = None) -> KeyState:
        args: tuple[_Arg, ...] = (rate.limit, round(rate.per * _US), _now_arg(now))
        calls, locked_us, retry_us, now_us = await self._evalsha(self._peek_sha, key, args)
        return KeyState(calls, locked_us / _US, retry_us / _US, now_us / _US)

    async def reconcile(
        self, key: str, rate: Rate, ages: list[float], lock_left: float
    ) -> tuple[int, int, float]:
        """Merge calls a local fallback allowed (`ages`: seconds before now) and its lockout
        (`lock_left` seconds) into the key, on the store's clock (reconcile.lua).
        Returns (calls beyond the policy, calls merged, the store's time)."""
        args: tuple[_Arg, ...] = (
            rate.limit,
            round(rate.per * _US),
            round(max(lock_left, 0.0) * _US),
            *(round(max(age, 0.0) * _US) for age in ages),
        )
        excess, merged, now_us = await self._evalsha(self._reconcile_sha, key, args)
        return excess, merged, now_us / _US

    async def clear(self, key: str) -> bool:
        async def delete() -> int:
            return int(await self._client.delete(self._prefix + key))

        return await self._call(delete) > 0

    async def keys(self, prefix: str, limit: int) -> list[str]:
        """Keys starting with `prefix`, by SCAN MATCH (every master's with a cluster client).

        SCAN walks the whole keyspace, a page at a time, without blocking the server; this is
        for the status endpoint, guarded per identity, never for decisions.
        """
        pattern = _GLOB_SPECIAL.sub(r"\\\g<0>", self._prefix + prefix) + "*"
        strip = len(self._prefix)

        async def scan() -> list[str]:
            found: list[str] = []
            async for raw in self._client.scan_iter(match=pattern, count=_SCAN_PAGE):
                key = raw.decode() if isinstance(raw, bytes) else str(raw)
                found.append(key[strip:])
                if len(found) >= limit:
                    break
            return found

        return await self._call(scan)

    def status(self) -> dict[str, object]:
        """This backend alone does not watch the store: ResilientLimiter's status does."""
        return {"store": self.name, "state": "ok"}

    async def close(self) -> None:
        if self._pipeline is not None:
            await self._pipeline.close()
        if self._owns_client:
            await self._client.aclose()

    async def _pipelined(self, pipeline: Pipeline, key: str, args: tuple[_Arg, ...]) -> list[int]:
        command = _pack("EVALSHA", self._decide_sha, 1, self._prefix + key, *args)
        reply = await pipeline.call(command)
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            # As in _evalsha: load (once for every call that met NOSCRIPT together) and retry.
            # The load goes down the same connection, so the retry runs after it.
            if self._reloading is None:
                self._reloading = asyncio.ensure_future(self._pipeline_load(pipeline))
            await asyncio.shield(self._reloading)
            reply = await pipeline.call(command)
        if isinstance(reply, hiredis.ReplyError):  # LOADING, READONLY, OOM, ...
            raise StoreUnavailable(f"redis: {reply}")
        try:
            return [int(v) for v in reply]
        except (TypeError, ValueError) as exc:
            raise StoreUnavailable(f"redis: unexpected reply {reply!r}") from exc

    async def _pipeline_load(self, pipeline: Pipeline) -> None:
        try:
            loaded = await pipeline.call(_pack("SCRIPT", "LOAD", self._decide_src))
            if loaded != self._decide_sha.encode():
                raise StoreUnavailable(f"redis: SCRIPT LOAD returned {loaded!r}")
            self.script_loads += 1
        finally:
            self._reloading = None

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
        for source, sha in (
            (self._decide_src, self._decide_sha),
            (self._peek_src, self._peek_sha),
            (self._reconcile_src, self._reconcile_sha),
        ):
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
