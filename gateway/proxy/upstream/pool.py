"""The pool of keep-alive connections to one upstream, and the timeouts around an exchange.

Owns: connecting (within the connect timeout, which also bounds the wait for a free place in a
full pool), the pool itself (at most `size` connections; waiters queue; idle connections reused
newest first and closed after `idle_timeout`; a connection the upstream closed, or answered with
`Connection: close`, is dropped), the read timeout between bytes of an answer (one timer per
pool), and the one retry the keep-alive race allows. The bytes on the wire are protocol.py's;
the answer and its states are response.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterable, Iterable
from typing import Final
from urllib.parse import urlsplit

from gateway.proxy.upstream.protocol import Connection, request_head
from gateway.proxy.upstream.response import (
    StaleConnection,
    UpstreamFailed,
    UpstreamResponse,
    UpstreamTimeout,
)

IDLE_TIMEOUT: Final = 30.0
# A timer may fire a hair before its deadline: treat that as on time, rather than spinning.
_EARLY: Final = 0.001


class UpstreamPool:
    """Keep-alive connections to one upstream (`http://` or `https://` URL, optional base path).

    Make it inside the event loop that will use it; `close` it there.
    """

    def __init__(
        self,
        url: str,
        *,
        size: int,
        connect_timeout: float,
        read_timeout: float,
        idle_timeout: float = IDLE_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        secure = parts.scheme == "https"
        self.loop = asyncio.get_running_loop()
        self.host = parts.hostname
        self.port = parts.port or (443 if secure else 80)
        self.base_path = parts.path.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = self.port == (443 if secure else 80)
        self._host_header = host if default else f"{host}:{self.port}"
        self._ssl = (ssl_context or ssl.create_default_context()) if secure else None
        self._size = size
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle_timeout = idle_timeout
        self._idle: list[Connection] = []  # oldest first; reused from the end
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._active: set[UpstreamResponse] = set()  # exchanges under the read timeout
        self._read_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.connects = 0  # connections opened so far (tests and metrics read it)

    @property
    def open(self) -> int:
        """Connections open now, busy or idle."""
        return self._open

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None = None,
        *,
        content_length: int | None = None,
    ) -> UpstreamResponse:
        """Send one request; return once the answer's status and headers have arrived.

        `target` is the raw path and query (the pool's base path goes in front). `headers` must
        not carry Host or framing headers: they are the pool's. A body iterator is sent with
        `content_length` when that is known, else chunked.
        """
        head = request_head(
            method, self.base_path, target, self._host_header, headers, body, content_length
        )
        conn = self._idle_connection() or await self._acquire()
        try:
            return await self._exchange(conn, method, head, body, content_length)
        except StaleConnection:
            if not (body is None or isinstance(body, bytes)):
                raise  # a streamed body was consumed: it cannot be sent again
        # The classic keep-alive race: the upstream closed the idle connection as the request
        # went out, and not a byte came back. Once more, on a connection of its own.
        conn = await self._acquire(fresh=True)
        return await self._exchange(conn, method, head, body, content_length)

    async def close(self) -> None:
        """Close idle connections now and busy ones when their exchange ends; fail waiters."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(UpstreamFailed("the upstream pool is closed"))
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        for timer in (self._read_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._read_timer = self._idle_timer = None

    # --- the exchange ---------------------------------------------------------------------------

    async def _exchange(
        self,
        conn: Connection,
        method: str,
        head: bytes,
        body: bytes | AsyncIterable[bytes] | None,
        content_length: int | None,
    ) -> UpstreamResponse:
        if not conn.usable:
            self.forget(conn)
            if conn.reused:
                raise StaleConnection("the kept-alive connection was closed by the upstream")
            raise UpstreamFailed("the upstream closed the connection at once")
        exchange = conn.start(method)
        try:
            if body is None or isinstance(body, bytes):
                conn.send(head, body)
            else:
                await conn.send_stream(
                    exchange, head, body, content_length is None, self._read_timeout
                )
            if not exchange.finished:
                self.track(exchange)  # the read timeout runs from the end of the request
            await exchange.wait_for_head()
            return exchange
        except BaseException:
            exchange.close()
            raise

    # --- connections ----------------------------------------------------------------------------

    def _idle_connection(self) -> Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.usable:
                return conn
        return None

    async def _acquire(self, fresh: bool = False) -> Connection:
        """An idle connection (unless `fresh`), else a new one once the pool has room."""
        try:
            async with asyncio.timeout(self._connect_timeout):
                while self._open >= self._size:
                    await self._queue()
                    conn = None if fresh else self._idle_connection()
                    if conn is not None:
                        return conn
                return await self._connect()
        except TimeoutError:
            raise UpstreamTimeout(
                f"no connection to {self.host}:{self.port} within {self._connect_timeout:g} s"
            ) from None

    async def _queue(self) -> None:
        if self._closed:
            raise UpstreamFailed("the upstream pool is closed")
        waiter = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # our turn came as we gave up: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    async def _connect(self) -> Connection:
        if self._closed:
            raise UpstreamFailed("the upstream pool is closed")
        self._open += 1
        conn = Connection(self)
        try:
            await self.loop.create_connection(
                lambda: conn,
                self.host,
                self.port,
                ssl=self._ssl,
                server_hostname=self.host if self._ssl else None,
            )
        except OSError as exc:  # refused, unreachable, DNS, TLS (ssl.SSLError is an OSError)
            self.forget(conn)
            raise UpstreamFailed(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        except BaseException:
            self.forget(conn)
            raise
        self.connects += 1
        return conn

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def release(self, conn: Connection, exchange: UpstreamResponse) -> None:
        """The answer has fully arrived: the connection goes back to the pool or is closed."""
        self.untrack(exchange)
        conn.resume_reading()  # its body is in the response now; the next answer must flow
        if exchange.reusable and conn.alive and not self._closed:
            conn.reused = True
            conn.idle_since = self.loop.time()
            self._idle.append(conn)
            if self._idle_timer is None:
                self._idle_timer = self.loop.call_at(
                    conn.idle_since + self._idle_timeout, self._expire_idle
                )
            self._wake_one()
        else:
            conn.close()

    def forget(self, conn: Connection) -> None:
        """The connection is gone: it gives its place in the pool back."""
        conn.alive = False
        if conn.counted:
            conn.counted = False
            self._open -= 1
            if conn in self._idle:
                self._idle.remove(conn)
            self._wake_one()

    def _expire_idle(self) -> None:
        self._idle_timer = None
        idle = self._idle
        expired = self.loop.time() - self._idle_timeout + _EARLY
        while idle and idle[0].idle_since <= expired:
            idle.pop(0).close()
        if idle:
            self._idle_timer = self.loop.call_at(
                idle[0].idle_since + self._idle_timeout, self._expire_idle
            )

    # --- the read timeout -----------------------------------------------------------------------
    # One timer per pool rather than one per request: every exchange's deadline is its last
    # byte plus the same timeout, so the timer only ever needs to be at the earliest of them.

    def track(self, exchange: UpstreamResponse) -> None:
        """Start (or restart) the read clock of `exchange`: it must hear from the upstream within
        the read timeout of now."""
        now = exchange.last_read = self.loop.time()
        self._active.add(exchange)
        if self._read_timer is None:
            self._read_timer = self.loop.call_at(now + self._read_timeout, self._check_reads)

    def untrack(self, exchange: UpstreamResponse) -> None:
        self._active.discard(exchange)

    def _check_reads(self) -> None:
        self._read_timer = None
        now = self.loop.time()
        timeout = self._read_timeout
        earliest: float | None = None
        for exchange in list(self._active):
            if exchange.paused:  # the consumer is behind, not the upstream
                self._active.discard(exchange)  # tracked again when reading resumes
                continue
            deadline = exchange.last_read + timeout
            if deadline <= now + _EARLY:
                self._active.discard(exchange)
                exchange.give_up(
                    UpstreamTimeout(f"no answer from {self.host}:{self.port} within {timeout:g} s")
                )
            elif earliest is None or deadline < earliest:
                earliest = deadline
        if earliest is not None:
            self._read_timer = self.loop.call_at(earliest, self._check_reads)
