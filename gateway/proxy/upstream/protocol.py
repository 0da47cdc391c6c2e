"""One connection to the upstream: the asyncio.Protocol, and the request bytes it writes.

Owns: the wire in both directions for one connection: request framing (the head with
Content-Length, or chunked for a body of unknown length; bodies written under the transport's
flow control), feeding the answer's bytes to the exchange it carries (at most one at a time),
pausing and resuming reading for that exchange, and what a close or stray bytes mean. When an
exchange ends it hands the connection back to its owner, the pool, which it knows only through
the small `Owner` protocol below.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Iterable
from typing import Final, Protocol, cast

from gateway.proxy.upstream.response import (
    ExchangeState,
    UpstreamFailed,
    UpstreamResponse,
    UpstreamTimeout,
)

# Requests with no body still say so for these methods: some servers answer 411 otherwise.
_BODY_METHODS: Final = frozenset(("POST", "PUT", "PATCH"))
# Bodies at least this large go out with writelines (no copy) instead of head + body.
_JOIN_LIMIT: Final = 16 * 1024
_DONE: Final = ExchangeState.DONE  # see response.py: a global is cheaper than the member
_FAILED: Final = ExchangeState.FAILED


def request_head(
    method: str,
    base_path: str,
    target: str,
    host: str,
    headers: Iterable[tuple[str, str]],
    body: bytes | AsyncIterable[bytes] | None,
    content_length: int | None,
) -> bytes:
    """The request line and headers, with Host and the framing header for `body`.

    The path is `base_path` (the pool's) then `target` (the client's raw path and query);
    `headers` must carry neither Host nor framing.
    """
    parts = [method, " ", base_path, target, " HTTP/1.1\r\nHost: ", host, "\r\n"]
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


class Owner(Protocol):
    """What a connection needs of its pool (pool.UpstreamPool)."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    def release(self, conn: Connection, exchange: UpstreamResponse) -> None: ...

    def forget(self, conn: Connection) -> None: ...

    def track(self, exchange: UpstreamResponse) -> None: ...

    def untrack(self, exchange: UpstreamResponse) -> None: ...


class Connection(asyncio.Protocol):
    """One connection to the upstream; carries at most one exchange at a time.

    `reused`, `counted` and `idle_since` are the pool's bookkeeping, kept here to save a map.
    """

    __slots__ = (
        "_drain",
        "_write_paused",
        "alive",
        "counted",
        "exchange",
        "idle_since",
        "loop",
        "pool",
        "reading_paused",
        "reused",
        "transport",
    )

    def __init__(self, pool: Owner) -> None:
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

    @property
    def usable(self) -> bool:
        """Connected, and neither closed nor closing: it can carry a request."""
        transport = self.transport
        return self.alive and transport is not None and not transport.is_closing()

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # bytes on an idle connection: it cannot be trusted any more
            self.abort()
            return
        state = exchange.feed(data, self.loop.time())
        if state is _DONE:
            self.exchange = None
            self.pool.release(self, exchange)
        elif state is _FAILED:
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
            exchange.connection_closed(exc, self.reused)
        self.wake_drain()
        self.pool.forget(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self.wake_drain()

    # --- sending a request --------------------------------------------------------------------

    def start(self, method: str) -> UpstreamResponse:
        """The exchange this connection carries next (call only when `usable`)."""
        exchange = self.exchange = UpstreamResponse(self, method == "HEAD")
        return exchange

    def send(self, head: bytes, body: bytes | None) -> None:
        """Write a request whose body (if any) is all in hand."""
        transport = cast(asyncio.Transport, self.transport)
        if body is None:
            transport.write(head)
        elif len(body) < _JOIN_LIMIT:
            transport.write(head + body)
        else:
            transport.writelines((head, body))

    async def send_stream(
        self,
        exchange: UpstreamResponse,
        head: bytes,
        body: AsyncIterable[bytes],
        chunked: bool,
        timeout: float,
    ) -> None:
        """Write a request whose body arrives as it is sent; stop early if answered or closed.

        `timeout` bounds each wait for the upstream to take more of the body.
        """
        transport = cast(asyncio.Transport, self.transport)
        transport.write(head)
        async for chunk in body:
            if not exchange.waiting_for_head or not self.alive:
                # Answered (or gone) before the body was all sent: the rest is not wanted, and
                # the connection, carrying half a request, cannot be reused.
                exchange.forbid_reuse()
                return
            if not chunk:
                continue
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            await self.drain(timeout)
        if chunked and self.alive and exchange.waiting_for_head:
            transport.write(b"0\r\n\r\n")

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
            self.pool.track(exchange)  # the clock restarts: time spent paused is not the upstream's

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
