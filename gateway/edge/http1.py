"""The data plane's HTTP/1.1 messages: the request the handler reads and the answers it gives.

The smallest interface the handler (proxy/app.py, proxy/forward.py, proxy/status.py) needs, in
place of aiohttp's web.BaseRequest / web.Response: a `Request` (method, raw path, headers, a
body stream), a whole `Response`, and a `StreamResponse` for answers relayed as they arrive.
The protocol that parses and writes them is edge/connection.py.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from multidict import CIMultiDict, MultiDict

if TYPE_CHECKING:
    from gateway.edge.connection import GuardedProtocol

# A body buffered past HIGH stops the socket being read until the handler takes it below LOW.
HIGH = 256 * 1024
LOW = 64 * 1024

Headers = Mapping[str, str] | Iterable[tuple[str, str]]
# Gives the same answer to the same head again without the handler, or None (proxy/replay.py).
Replay = Callable[[], bytes | None]


class BodyBroken(ConnectionError):
    """The client went away (or was cut off) before its body was complete."""


class BodyMalformed(BodyBroken):
    """The body broke the HTTP/1.1 framing (a chunk size that is not one): the client's fault."""


class Body:
    """A request body as it arrives: bounded buffering, pausing the socket when full."""

    __slots__ = ("_chunks", "_eof", "_exc", "_protocol", "_size", "_waiter")

    def __init__(self, protocol: GuardedProtocol | None, eof: bool = False) -> None:
        self._protocol = protocol
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = eof
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    # --- the protocol's side ------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self._wake()
        if self._size > HIGH and self._protocol is not None:
            self._protocol.body_full()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        if not self._eof:
            self._exc = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # --- the handler's side -------------------------------------------------------------------

    def received(self) -> bool:
        """All of it has arrived (read or not): the connection can carry the next request."""
        return self._eof and self._exc is None

    def is_eof(self) -> bool:
        return self._eof and not self._chunks

    def at_eof(self) -> bool:
        return self.is_eof()

    async def _wait(self) -> None:
        while not self._chunks and not self._eof:
            if self._exc is not None:
                raise self._exc
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def _taken(self, n: int) -> None:
        self._size -= n
        if self._size < LOW and self._protocol is not None:
            self._protocol.body_drained()

    async def readany(self) -> bytes:
        await self._wait()
        if not self._chunks:
            return b""
        chunk = self._chunks.popleft()
        self._taken(len(chunk))
        return chunk

    async def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (all of it when n < 0); b"" at the end."""
        if n < 0:
            parts = []
            while chunk := await self.readany():
                parts.append(chunk)
            return b"".join(parts)
        await self._wait()
        if not self._chunks:
            return b""
        chunk = self._chunks.popleft()
        if len(chunk) > n:
            self._chunks.appendleft(chunk[n:])
            chunk = chunk[:n]
        self._taken(len(chunk))
        return chunk

    async def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        while chunk := await self.read(n):
            yield chunk


EMPTY = Body(None, eof=True)


class Request:
    """One parsed request head and its body stream."""

    __slots__ = (
        "_query",
        "body_exists",
        "content",
        "content_length",
        "continued",
        "head",
        "headers",
        "keep_alive",
        "method",
        "protocol",
        "raw_path",
        "transport",
        "version",
    )

    def __init__(
        self,
        method: str,
        raw_path: str,
        version: tuple[int, int],
        headers: CIMultiDict[str],
        content: Body,
        content_length: int | None,
        body_exists: bool,
        keep_alive: bool,
        protocol: GuardedProtocol | None = None,
        transport: asyncio.Transport | None = None,
        head: bytes | None = None,
    ) -> None:
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.headers = headers
        self.content = content
        self.content_length = content_length
        self.body_exists = body_exists
        self.keep_alive = keep_alive
        self.protocol = protocol
        self.transport = transport
        self.continued = False  # `100 Continue` was sent for this request
        self.head = head  # its exact bytes up to the body, when the connection knows them
        self._query: MultiDict[str] | None = None

    @property
    def path(self) -> str:
        return self.raw_path.partition("?")[0]

    @property
    def query_string(self) -> str:
        return self.raw_path.partition("?")[2]

    @property
    def query(self) -> MultiDict[str]:
        if self._query is None:
            self._query = MultiDict(parse_qsl(self.query_string, keep_blank_values=True))
        return self._query

    @property
    def remote(self) -> str | None:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else None

    async def read(self) -> bytes:
        return await self.content.read()


def _reason(status: int, reason: str | None) -> str:
    if reason:
        return reason
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


_date: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The Date header's value, made once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, usegmt=True).encode("latin-1"))
    return _date[1]


def _has_body(status: int) -> bool:
    return not (100 <= status < 200 or status in (204, 304))


class StreamResponse:
    """An answer whose body is written as it comes: chunked unless its length is set."""

    __slots__ = (
        "_chunked",
        "_head",
        "_protocol",
        "_request",
        "close",
        "content_length",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self, status: int = 200, reason: str | None = None, headers: Headers | None = None
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers: CIMultiDict[str] = CIMultiDict(headers or ())
        self.content_length: int | None = None
        self.close = False
        self._protocol: GuardedProtocol | None = None
        self._request: Request | None = None
        self._chunked = False
        self._head = False

    def force_close(self) -> None:
        """Answer with `Connection: close` and close after it."""
        self.close = True

    async def prepare(self, request: Request) -> None:
        protocol = request.protocol
        assert protocol is not None
        self._protocol = protocol
        self._request = request
        self._head = request.method == "HEAD"
        length = self.content_length
        body = _has_body(self.status)
        if body and length is None and request.version >= (1, 1):
            self._chunked = True
        elif body and length is None:
            self.close = True  # HTTP/1.0 without a length: the end of the body is the close
        protocol.write(head_bytes(self, request, length, self._chunked))

    async def write(self, data: bytes) -> None:
        protocol = self._protocol
        assert protocol is not None
        if not data or self._head:
            return
        if self._chunked:
            protocol.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            protocol.write(data)
        await protocol.drain()

    async def write_eof(self) -> None:
        protocol = self._protocol
        assert protocol is not None
        if self._chunked and not self._head:
            protocol.write(b"0\r\n\r\n")
        await protocol.drain()


class Response(StreamResponse):
    """A whole answer: status, headers and body written at once."""

    __slots__ = ("body", "replay")

    def __init__(
        self,
        status: int = 200,
        reason: str | None = None,
        headers: Headers | None = None,
        body: bytes = b"",
    ) -> None:
        super().__init__(status, reason, headers)
        self.body = body
        # Set by the handler when the connection may give this answer again (proxy/replay.py).
        self.replay: Replay | None = None

    def serialize(self, request: Request | None) -> bytes:
        body = self.body if _has_body(self.status) else b""
        head = head_bytes(self, request, len(body) if _has_body(self.status) else None, False)
        if request is not None and request.method == "HEAD":
            return head
        return head + body


def head_bytes(
    response: StreamResponse, request: Request | None, length: int | None, chunked: bool
) -> bytes:
    """The status line and headers, framing and connection handling added here."""
    version = request.version if request is not None else (1, 1)
    close = response.close or request is None or not request.keep_alive
    response.close = close
    lines = [
        f"HTTP/{'1.0' if version == (1, 0) else '1.1'} {response.status} "
        f"{_reason(response.status, response.reason)}"
    ]
    framing = ("content-length", "transfer-encoding", "connection", "date")
    lines += [
        f"{name}: {value}"
        for name, value in response.headers.items()
        if name.lower() not in framing
    ]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    elif chunked:
        lines.append("Transfer-Encoding: chunked")
    if close:
        lines.append("Connection: close")
    elif version == (1, 0):
        lines.append("Connection: keep-alive")
    head = "\r\n".join(lines).encode("utf-8", "surrogateescape")
    return head + b"\r\nDate: " + http_date() + b"\r\n\r\n"
