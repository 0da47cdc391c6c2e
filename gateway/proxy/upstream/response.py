"""One exchange's answer, and how an exchange fails.

Owns: the answer's state (waiting for the head, reading the body, complete, failed), the
httptools parser callbacks that advance it, the body buffer (bounded: past HIGH_WATER the
connection is asked to pause reading until the consumer catches up), the consumer's API
(`read`, `read_all`, `close`) and the few questions the connection and the pool ask of an
exchange (`feed`, `waiting_for_head`, `finished`, `reusable`, ...). It knows the connection only
through the small `Carrier` protocol below, so imports run one way: response <- protocol <- pool.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from typing import Final, Protocol, cast

import httptools

# Body bytes held for a consumer before the upstream's transport is paused (and resumed as soon
# as the consumer takes them: `read` always takes everything queued).
HIGH_WATER: Final = 256 * 1024


class UpstreamFailed(Exception):
    """The exchange failed: refused, reset, closed early, unparseable, or the pool was closed."""


class UpstreamTimeout(UpstreamFailed):
    """Connecting, waiting for a pooled connection, or reading the answer took too long."""


class StaleConnection(UpstreamFailed):
    """A reused keep-alive connection was closed before any byte of the answer arrived."""


class ExchangeState(enum.Enum):
    HEAD = "waiting for the status and headers"
    BODY = "reading the body"
    DONE = "the whole answer has arrived"
    FAILED = "failed; the error is kept for the reader"


# Module names for the members: on Python 3.11 `ExchangeState.HEAD` is a descriptor lookup,
# about six times the cost of a global, and the state is tested several times per request.
_HEAD: Final = ExchangeState.HEAD
_BODY: Final = ExchangeState.BODY
_DONE: Final = ExchangeState.DONE
_FAILED: Final = ExchangeState.FAILED


class Carrier(Protocol):
    """What an exchange needs of the connection carrying it (protocol.Connection)."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def reading_paused(self) -> bool: ...

    def pause_reading_for(self, exchange: UpstreamResponse) -> None: ...

    def resume_reading_for(self, exchange: UpstreamResponse) -> None: ...

    def wake_drain(self) -> None: ...

    def abandon(self, exchange: UpstreamResponse) -> None: ...


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
        "last_read",
        "reason",
        "status",
    )

    def __init__(self, conn: Carrier, head_only: bool) -> None:
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        # Loop time of the last byte from the upstream, or of when the pool began waiting for
        # one: the pool's read timeout runs from it.
        self.last_read = 0.0
        self._conn = conn
        self._parser = httptools.HttpResponseParser(self)
        self._state: ExchangeState = _HEAD
        self._head_only = head_only
        self._interim = False
        self._reason = b""
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamFailed | None = None
        self._received = False
        self._keep_alive = False
        self._until_eof = False
        # Bytes beyond this answer, or a request body cut short: the connection is not reused.
        self._tainted = False
        self._whole = False  # read_all is collecting the body: no pausing

    # --- for the consumer -------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """The whole answer has arrived (its body may still be waiting to be read)."""
        return self._state is _DONE

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
            if self._state is _DONE:
                return b""
            if self._state is _FAILED:
                raise cast(UpstreamFailed, self._error)
            await self._wait()

    async def read_all(self) -> bytes:
        """The whole body, unbounded: only for bodies known to be small."""
        self._whole = True
        self._conn.resume_reading_for(self)
        while (state := self._state) is _HEAD or state is _BODY:
            await self._wait()
        if self._state is _FAILED:
            raise cast(UpstreamFailed, self._error)
        chunks = self._chunks
        data = b"" if not chunks else chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        return data

    def close(self) -> None:
        """Stop reading: a connection whose answer was not read to its end is dropped."""
        if (state := self._state) is _HEAD or state is _BODY:
            self.give_up(UpstreamFailed("the answer was abandoned"))

    # --- for the connection and the pool ------------------------------------------------------

    @property
    def waiting_for_head(self) -> bool:
        """The status and headers have not arrived yet (nor has the exchange failed)."""
        return self._state is _HEAD

    @property
    def finished(self) -> bool:
        """Nothing more will arrive: the answer is complete, or the exchange failed."""
        state = self._state
        return state is _DONE or state is _FAILED

    @property
    def reusable(self) -> bool:
        """The connection may carry another exchange after this one: the upstream agreed to
        keep it alive, no stray bytes arrived and the request went out whole."""
        return self._keep_alive and not self._tainted

    @property
    def paused(self) -> bool:
        """The connection is not reading because the consumer lags (not the upstream's fault)."""
        return self._conn.reading_paused

    def feed(self, data: bytes, now: float) -> ExchangeState:
        """Parse bytes from the upstream that arrived at loop time `now`; the state after them."""
        self._received = True
        self.last_read = now
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(UpstreamFailed(f"unparseable answer: {exc}"))
        return self._state

    async def wait_for_head(self) -> None:
        """Return once the status and headers have arrived; raise if the exchange failed first."""
        while self._state is _HEAD:
            # `_wait` inlined: this runs once per request, and a nested coroutine is an object.
            waiter = self._waiter = self._conn.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        if self._state is _FAILED:
            raise cast(UpstreamFailed, self._error)

    def forbid_reuse(self) -> None:
        """The request was not sent whole: the connection must not carry another exchange."""
        self._tainted = True

    def give_up(self, error: UpstreamFailed) -> None:
        """Fail with `error` (unless already finished) and drop the connection."""
        self._fail(error)
        self._conn.abandon(self)

    def connection_closed(self, exc: Exception | None, reused: bool) -> None:
        """The connection closed under this exchange (`reused`: it had carried one before)."""
        state = self._state
        if state is _BODY and self._until_eof:
            self._state = _DONE  # the close is what ends this body
            self._wake()
        elif state is _HEAD and not self._received and reused:
            self._fail(StaleConnection("the kept-alive connection was closed by the upstream"))
        else:
            cause = f": {exc}" if exc else ""
            self._fail(UpstreamFailed(f"the upstream closed the connection{cause}"))

    # --- inside -----------------------------------------------------------------------------

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
        if (state := self._state) is _HEAD or state is _BODY:
            self._state = _FAILED
            self._error = error
            self._wake()

    def _finish(self) -> None:
        self._keep_alive = self._parser.should_keep_alive()
        self._state = _DONE
        self._wake()

    # --- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._state is not _HEAD:  # a second answer to one request: nobody asked for it
            self._tainted = True
            return
        self.headers = []
        self._reason = b""

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._state is not _HEAD:
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
        if self._state is not _BODY:
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
        if self._state is _BODY:
            self._finish()
