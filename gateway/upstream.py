"""The upstream HTTP/1.1 client: one keep-alive pool per upstream, requests written straight to
the transport, answers parsed by httptools (llhttp, the parser uvicorn uses).

Owns: connecting (within the connect timeout, which also bounds the wait for a free place in a
full pool), the pool itself (at most `size` connections; waiters queue; idle connections reused
newest first and closed after `idle_timeout`; a connection the upstream closed, or answered with
`Connection: close`, is dropped), request framing (Content-Length, or chunked for a body of
unknown length, written under the transport's flow control), the read timeout between bytes of
an answer, bounded buffering of answer bodies (the upstream's transport is paused while the
consumer lags) and the one retry the keep-alive race allows.

It knows nothing of the gateway's statuses: failures are UpstreamFailed and UpstreamTimeout, which
forward.py turns into 502 and 504. Exceptions raised by a request body iterator pass through
unchanged.

Why not aiohttp's client: on the gateway's hot path it was the largest single cost (session
bookkeeping, auto headers, payload objects, a stream reader per response), none of which a
proxy that already holds validated headers and a raw target needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterable, Iterable
from typing import Final, cast
from urllib.parse import urlsplit

import httptools

# Body bytes held for a consumer before the upstream's transport is paused (and resumed as soon
# as the consumer takes them: `read` always takes everything queued).
HIGH_WATER: Final = 256 * 1024
IDLE_TIMEOUT: Final = 30.0
# Requests with no body still say so for these methods: some servers answer 411 otherwise.
_BODY_METHODS: Final = frozenset(("POST", "PUT", "PATCH"))
# Bodies at least this large go out with writelines (no copy) instead of head + body.
_JOIN_LIMIT: Final = 16 * 1024
# A timer may fire a hair before its deadline: treat that as on time, rather than spinning.
_EARLY: Final = 0.001

_HEAD, _BODY, _DONE, _FAILED = 0, 1, 2, 3


class UpstreamFailed(Exception):
    """The exchange failed: refused, reset, closed early, unparseable, or the pool was closed."""


class UpstreamTimeout(UpstreamFailed):
    """Connecting, waiting for a pooled connection, or reading the answer took too long."""


class _Stale(UpstreamFailed):
    """A reused keep-alive connection was closed before any byte of the answer arrived."""


class UpstreamResponse:
    """One exchange's answer: status, reason and raw headers, then the body as it arrives.

    It is also the target of the httptools callbacks, so parser events land here directly.
    Read the body with `read` (chunks, b"" at the end) or `read_all`; `close` gives up on the
    rest (the connection is then dropped, not reused).
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_error",
        "_head_only",
        "_interim",
        "_keep_alive",
        "_last_read",
        "_parser",
        "_reason",
        "_received",
        "_state",
        "_tainted",
        "_until_eof",
        "_waiter",
        "_whole",
        "content_length",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, conn: _Connection, head_only: bool) -> None:
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self._conn = conn
        self._parser = httptools.HttpResponseParser(self)
        self._state = _HEAD
        self._head_only = head_only
        self._interim = False
        self._reason = b""
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamFailed | None = None
        self._received = False
        self._last_read = 0.0
        self._keep_alive = False
        self._until_eof = False
        # Bytes beyond this answer, or a request body cut short: the connection is not reused.
        self._tainted = False
        self._whole = False  # read_all is collecting the body: no pausing

    @property
    def complete(self) -> bool:
        """The whole answer has arrived (its body may still be waiting to be read)."""
        return self._state == _DONE

    @property
    def buffered(self) -> int:
        """Body bytes received and not yet read."""
        return self._buffered

    async def read(self) -> bytes:
        """The body bytes received so far (waiting for some), b"" once the body has ended."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                self._conn.resume_reading_for(self)
                return data
            if self._state == _DONE:
                return b""
            if self._state == _FAILED:
                raise cast(UpstreamFailed, self._error)
            await self._wait()

    async def read_all(self) -> bytes:
        """The whole body, unbounded: only for bodies known to be small."""
        self._whole = True
        self._conn.resume_reading_for(self)
        while self._state < _DONE:
            await self._wait()
        if self._state == _FAILED:
            raise cast(UpstreamFailed, self._error)
        chunks = self._chunks
        data = b"" if not chunks else chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        return data

    def close(self) -> None:
        """Stop reading: a connection whose answer was not read to its end is dropped."""
        if self._state < _DONE:
            self._fail(UpstreamFailed("the answer was abandoned"))
            self._conn.abandon(self)

    async def _wait(self) -> None:
        waiter = self._waiter = self._conn.loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamFailed) -> None:
        if self._state < _DONE:
            self._state = _FAILED
            self._error = error
            self._wake()

    def _finish(self) -> None:
        self._keep_alive = self._parser.should_keep_alive()
        self._state = _DONE
        self._wake()

    # --- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._state != _HEAD:  # a second answer to one request: nobody asked for it
            self._tainted = True
            return
        self.headers = []
        self._reason = b""

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._state != _HEAD:
            return
        status = self._parser.get_status_code()
        if status < 200:
            if status == 101:  # the gateway never asks to upgrade
                self._fail(UpstreamFailed("the upstream switched protocols unasked"))
            self._interim = True  # 1xx: informational, the real answer follows
            return
        self.status = status
        self.reason = self._reason.decode("latin-1")
        length: int | None = None
        encoded = False
        for name, value in self.headers:
            size = len(name)
            if size == 14 and name.lower() == b"content-length":
                length = int(value)  # llhttp has checked it is digits, and not contradicted
            elif size == 17 and name.lower() == b"transfer-encoding":
                encoded = True
        self._conn.wake_drain()  # an early answer ends the upload of the request body
        if self._head_only:
            # llhttp cannot be told the request was HEAD: the answer ends with its headers,
            # and this exchange's parser is dropped; any byte after that taints the connection.
            self.content_length = length
            self._finish()
            return
        if encoded:
            length = None  # a Transfer-Encoding overrides any Content-Length (RFC 9112 6.3)
        self.content_length = length
        self._until_eof = length is None and not encoded and status not in (204, 304)
        self._state = _BODY
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._state != _BODY:
            self._tainted = True
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._whole:
            self._conn.pause_reading_for(self)
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._state == _BODY:
            self._finish()


class _Connection(asyncio.Protocol):
    """One connection to the upstream; carries at most one exchange at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.exchange: UpstreamResponse | None = None
        self.reused = False
        self.alive = True
        self.counted = True  # holds one of the pool's places until forgotten
        self.idle_since = 0.0
        self.reading_paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # bytes on an idle connection: it cannot be trusted any more
            self.abort()
            return
        exchange._received = True
        exchange._last_read = self.loop.time()
        try:
            exchange._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            exchange._fail(UpstreamFailed(f"unparseable answer: {exc}"))
        if exchange._state == _DONE:
            self.exchange = None
            self.pool.finished(self, exchange)
        elif exchange._state == _FAILED:
            self.exchange = None
            self.pool.untrack(exchange)
            self.abort()

    def eof_received(self) -> bool:
        return False  # a half-closed upstream is a closed one

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        exchange = self.exchange
        self.exchange = None
        if exchange is not None:
            self.pool.untrack(exchange)
            if exchange._state == _BODY and exchange._until_eof:
                exchange._state = _DONE  # the close is what ends this body
                exchange._wake()
            elif exchange._state == _HEAD and not exchange._received and self.reused:
                exchange._fail(_Stale("the kept-alive connection was closed by the upstream"))
            else:
                cause = f": {exc}" if exc else ""
                exchange._fail(UpstreamFailed(f"the upstream closed the connection{cause}"))
        self.wake_drain()
        self.pool.forget(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self.wake_drain()

    # --- used by the pool and the response ----------------------------------------------------

    def wake_drain(self) -> None:
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    async def drain(self, timeout: float) -> None:
        """Wait while the transport's buffer is full (or until an answer or the close)."""
        if not self._write_paused or not self.alive:
            return
        drain = self._drain = self.loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await drain
        except TimeoutError:
            raise UpstreamTimeout("the upstream stopped reading the request body") from None
        finally:
            self._drain = None

    def pause_reading_for(self, exchange: UpstreamResponse) -> None:
        if not self.reading_paused and self.exchange is exchange and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading_for(self, exchange: UpstreamResponse) -> None:
        if self.reading_paused and self.exchange is exchange:
            self.resume_reading()
            exchange._last_read = self.loop.time()  # time spent paused is not the upstream's
            self.pool.track(exchange, restart=False)

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def abandon(self, exchange: UpstreamResponse) -> None:
        if self.exchange is exchange:
            self.exchange = None
            self.pool.untrack(exchange)
            self.abort()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self.alive = False
        if self.transport is not None:
            self.transport.abort()


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
        self._idle: list[_Connection] = []  # oldest first; reused from the end
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
        head = self._head(method, target, headers, body, content_length)
        conn = self._idle_connection() or await self._acquire()
        try:
            return await self._exchange(conn, method, head, body, content_length)
        except _Stale:
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

    def _head(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None,
        content_length: int | None,
    ) -> bytes:
        parts = [
            method,
            " ",
            self.base_path,
            target,
            " HTTP/1.1\r\nHost: ",
            self._host_header,
            "\r\n",
        ]
        lines = 2  # the request line and Host
        for name, value in headers:
            parts += (name, ": ", value, "\r\n")
            lines += 1
        if body is None:
            if method in _BODY_METHODS:
                parts.append("Content-Length: 0\r\n")
                lines += 1
        elif isinstance(body, bytes):
            if body or method in _BODY_METHODS:
                parts.append(f"Content-Length: {len(body)}\r\n")
                lines += 1
        else:
            parts.append(
                f"Content-Length: {content_length}\r\n"
                if content_length is not None
                else "Transfer-Encoding: chunked\r\n"
            )
            lines += 1
        parts.append("\r\n")
        text = "".join(parts)
        # One count each instead of a scan per value: any CR or LF inside a name, value or the
        # target (a certificate subject could carry one) would split the head.
        if text.count("\n") != lines + 1 or text.count("\r") != lines + 1:
            raise UpstreamFailed("a line break inside the request head")
        # The inverse of how aiohttp's parser decoded the client's bytes: they go out unchanged.
        return text.encode("utf-8", "surrogateescape")

    async def _exchange(
        self,
        conn: _Connection,
        method: str,
        head: bytes,
        body: bytes | AsyncIterable[bytes] | None,
        content_length: int | None,
    ) -> UpstreamResponse:
        transport = conn.transport
        if transport is None or not conn.alive or transport.is_closing():
            self.forget(conn)
            if conn.reused:
                raise _Stale("the kept-alive connection was closed by the upstream")
            raise UpstreamFailed("the upstream closed the connection at once")
        exchange = UpstreamResponse(conn, method == "HEAD")
        conn.exchange = exchange
        try:
            if body is None:
                transport.write(head)
            elif isinstance(body, bytes):
                if len(body) < _JOIN_LIMIT:
                    transport.write(head + body)
                else:
                    transport.writelines((head, body))
            else:
                await self._send_stream(conn, exchange, head, body, content_length)
            if exchange._state < _DONE:
                self.track(exchange)  # the read timeout runs from the end of the request
            while exchange._state == _HEAD:
                await exchange._wait()
            if exchange._state == _FAILED:
                raise cast(UpstreamFailed, exchange._error)
            return exchange
        except BaseException:
            exchange.close()
            raise

    async def _send_stream(
        self,
        conn: _Connection,
        exchange: UpstreamResponse,
        head: bytes,
        body: AsyncIterable[bytes],
        content_length: int | None,
    ) -> None:
        transport = cast(asyncio.Transport, conn.transport)
        chunked = content_length is None
        transport.write(head)
        async for chunk in body:
            if exchange._state != _HEAD or not conn.alive:
                # Answered (or gone) before the body was all sent: the rest is not wanted, and
                # the connection, carrying half a request, cannot be reused.
                exchange._tainted = True
                return
            if not chunk:
                continue
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            await conn.drain(self._read_timeout)
        if chunked and conn.alive and exchange._state == _HEAD:
            transport.write(b"0\r\n\r\n")

    # --- connections ----------------------------------------------------------------------------

    def _idle_connection(self) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.alive and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def _acquire(self, fresh: bool = False) -> _Connection:
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

    async def _connect(self) -> _Connection:
        if self._closed:
            raise UpstreamFailed("the upstream pool is closed")
        self._open += 1
        conn = _Connection(self)
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

    def finished(self, conn: _Connection, exchange: UpstreamResponse) -> None:
        """The answer has fully arrived: the connection goes back to the pool or is closed."""
        self.untrack(exchange)
        conn.resume_reading()  # its body is in the response now; the next answer must flow
        if exchange._keep_alive and not exchange._tainted and conn.alive and not self._closed:
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

    def forget(self, conn: _Connection) -> None:
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

    def track(self, exchange: UpstreamResponse, restart: bool = True) -> None:
        if restart:
            exchange._last_read = self.loop.time()
        self._active.add(exchange)
        if self._read_timer is None:
            self._read_timer = self.loop.call_at(
                exchange._last_read + self._read_timeout, self._check_reads
            )

    def untrack(self, exchange: UpstreamResponse) -> None:
        self._active.discard(exchange)

    def _check_reads(self) -> None:
        self._read_timer = None
        now = self.loop.time()
        timeout = self._read_timeout
        earliest: float | None = None
        for exchange in list(self._active):
            conn = exchange._conn
            if conn.reading_paused:  # the consumer is behind, not the upstream
                self._active.discard(exchange)  # tracked again when reading resumes
                continue
            deadline = exchange._last_read + timeout
            if deadline <= now + _EARLY:
                self._active.discard(exchange)
                exchange._fail(
                    UpstreamTimeout(f"no answer from {self.host}:{self.port} within {timeout:g} s")
                )
                conn.abandon(exchange)
            elif earliest is None or deadline < earliest:
                earliest = deadline
        if earliest is not None:
            self._read_timer = self.loop.call_at(earliest, self._check_reads)
