"""One client connection: the data plane's HTTP/1.1 server protocol and what a connection may cost.

`GuardedProtocol` is an asyncio protocol on httptools (llhttp), the way uvicorn's
`httptools_impl` works: the parser's callbacks build a `Request` (edge/http1.py) and feed its
body; requests are answered one at a time, in the order they came (pipelining), by one task per
busy connection. A body buffered past a high-water mark stops the socket being read until the
handler takes it (flow control both ways: the handler's writes wait while the client's side is
backed up). llhttp runs strict: Content-Length together with Transfer-Encoding, a duplicate or
invalid Content-Length, a Transfer-Encoding other than a final `chunked`, a bare LF and an
obs-folded header are all refused before any handler sees the request.

`GuardedServer` makes the protocols and adds, per connection:

- a head deadline: a request head must be complete within `read_timeout` of the connection
  opening or of its first byte; else 408 (when part of a head came) and the connection closes;
- a body deadline: while a request body is incomplete, more of it must arrive at least every
  `read_timeout`, unless the gateway itself stopped reading (an upstream slow to take it) or
  the client is waiting, as it should, for the `100 Continue` it asked for (`send_continue`);
- a send deadline: while the gateway's output to the client is backed up, the client must take
  some of it at least every `read_timeout`;
- an idle deadline between requests (`idle_timeout`);
- a cap on concurrent connections per identity, read from the verified certificate when the
  connection is made (after the handshake): an excess connection's first request is answered
  429 and the connection closes;
- a TLS connection without a client certificate (possible only when the TLS context asks for
  one without requiring it) has its first request answered 403 `AUP-NO-CERTIFICATE` in the
  caller's protocol, and closes; no request on it reaches the handler;
- malformed requests (request line too long, a header too large, too many headers, anything
  llhttp refuses) answered with a problem+json 414 / 431 / 400 and one log line, no traceback;
  request lines of HTTP/0.9 or HTTP/2.0 (which llhttp parses) answered 505, never forwarded.

Each connection has at most one timer, re-armed lazily: bytes arriving only move a float.

`Expect: 100-continue` (RFC 9110 §10.1.1) is answered here, but only when the handler says so
(`send_continue`): the gateway must decide first, so a refused call gets its fault before the
client sends its body.

Clients repeat themselves: a connection keeps the heads it parsed (a few, by their exact bytes).
A read that is exactly a known head and a body of its length is one whole request that llhttp
would parse the same way again, so it is made into a Request without the parser; and if that
request was refused, the rejection's Replay (proxy/replay.py) may answer it at once, without the
handler, while the limiter still refuses it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Literal, cast

import httptools
from aiohttp import web
from multidict import CIMultiDict

from gateway.config.settings import Limits
from gateway.edge.http1 import (
    EMPTY,
    Body,
    BodyBroken,
    BodyMalformed,
    Replay,
    Request,
    Response,
    StreamResponse,
    http_date,
)
from gateway.edge.identity import ClientIdentity, IdentityMode
from gateway.errors import ErrorCode
from gateway.proxy import faults

log = logging.getLogger("gateway.connection")

Identify = Callable[[bytes], ClientIdentity]
Handler = Callable[[Request], Awaitable[StreamResponse]]
_QUOTED = re.compile(r"b?'([^']*)'|b?\"([^\"]*)\"|`([^`]*)`")
_PLAIN_NAME = re.compile(r"^[A-Za-z-]{1,30}$")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0)}
_HEADS_KEPT = 8  # distinct request heads per connection known (parsed once, maybe replayed)
_KNOWN_MAX_BODY = 64 * 1024  # a known request comes whole in one read: a small one
# Headers that mean one thing only once (RFC 9110 §5.3): a second one is refused, never chosen.
_SINGLETONS = frozenset(
    (
        "authorization",
        "content-length",
        "content-location",
        "content-range",
        "content-type",
        "etag",
        "host",
        "max-forwards",
        "server",
        "transfer-encoding",
        "user-agent",
    )
)


@dataclass(slots=True)
class GuardStats:
    """Counters since start (for metrics and tests)."""

    head_timeouts: int = 0
    body_timeouts: int = 0
    send_timeouts: int = 0
    refused_connections: int = 0
    bad_requests: int = 0


class GuardedServer:
    """The protocol factory: connections share one per-identity count and the handler."""

    def __init__(
        self,
        handler: Handler,
        *,
        limits: Limits,
        identify: Identify | None = None,
        identity_mode: IdentityMode = "subject",
        server_name: str = "AUP-Gateway",
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.server_name = server_name  # the Server header of every answer made here
        self.stats = GuardStats()
        self.connections: set[GuardedProtocol] = set()
        self.closing = False
        self._identify = identify
        self._mode = identity_mode
        self._open: dict[str, int] = {}  # identity key -> open connections

    def __call__(self) -> GuardedProtocol:
        return GuardedProtocol(self)

    def open_connections(self, key: str) -> int:
        return self._open.get(key, 0)

    def admit(self, der: bytes) -> tuple[bool, str | None, ClientIdentity | None]:
        """(admitted, the key to release when it closes, the identity) for a new connection's
        certificate."""
        if self._identify is None:
            return True, None, None
        try:
            identity = self._identify(der)
        except ValueError:  # verified by TLS but unreadable here: the handler refuses it
            return True, None, None
        key = identity.key(self._mode)
        count = self._open.get(key, 0)
        if count >= self.limits.max_connections_per_identity:
            self.stats.refused_connections += 1
            log.warning(
                "connection refused: %s already has %d connections open (max %d)",
                identity.cn or identity.subject,
                count,
                self.limits.max_connections_per_identity,
            )
            return False, None, identity
        self._open[key] = count + 1
        return True, key, identity

    def release(self, key: str) -> None:
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)

    # --- graceful stop (GuardedRunner.cleanup) --------------------------------------------

    def pre_shutdown(self) -> None:
        """No new requests: idle connections close now, busy ones after their answer."""
        self.closing = True
        for connection in list(self.connections):
            connection.close_when_idle()

    async def shutdown(self, timeout: float | None) -> None:
        """Wait up to `timeout` for calls in flight, then cut what is left."""
        self.pre_shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else 60.0)
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.abort()


class GuardedRunner(web.BaseRunner):
    """Runs a GuardedServer behind an aiohttp site (edge/tls.py TlsSite): setup, addresses,
    and the graceful stop of `cleanup()` (pre_shutdown, then shutdown with the drain timeout)."""

    __slots__ = ("_guarded",)

    def __init__(self, server: GuardedServer, *, shutdown_timeout: float = 60.0) -> None:
        super().__init__(handle_signals=False, shutdown_timeout=shutdown_timeout)
        self._guarded = server

    async def shutdown(self) -> None:
        pass

    async def _make_server(self) -> GuardedServer:  # type: ignore[override]
        return self._guarded

    async def _cleanup_server(self) -> None:
        pass


class _Known:
    """A request head parsed before on a connection: what a Request is made of but its body,
    the body's length, and the Replay that answers it again while its call is refused."""

    __slots__ = (
        "body_exists",
        "content_length",
        "headers",
        "keep_alive",
        "length",
        "method",
        "raw_path",
        "replay",
        "version",
    )

    def __init__(self, request: Request, length: int) -> None:
        self.method = request.method
        self.raw_path = request.raw_path
        self.version = request.version
        self.headers = request.headers  # never changed by the handler: shared by every repeat
        self.content_length = request.content_length
        self.body_exists = request.body_exists
        self.keep_alive = request.keep_alive
        self.length = length
        self.replay: Replay | None = None


class _Refused(Exception):
    """A parser callback found a limit passed: (status, code, message) for the answer."""

    def __init__(self, status: int, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class GuardedProtocol(asyncio.Protocol):
    """One client connection (see the module docstring)."""

    def __init__(self, server: GuardedServer) -> None:
        self._server = server
        limits = server.limits
        self._limits = limits
        self._read_timeout = limits.read_timeout
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        # The verified certificate's identity, read once per connection (renegotiation is off,
        # so it cannot change); the handler takes it from here instead of per request.
        self.identity: ClientIdentity | None = None
        self._identity_key: str | None = None
        self._refusal: Literal["busy", "no-certificate"] | None = None
        # Parsing the newest request
        self._url: list[bytes] = []
        self._url_size = 0
        self._headers: list[tuple[str, str]] = []
        self._refused: _Refused | None = None
        self._body: Body | None = None  # the body still arriving
        self._held: Body | None = None  # a body whose client waits for `100 Continue`
        self._dead = False  # the parser failed or the connection upgraded: read no more
        self._between = True  # the parser is between messages (none begun)
        self._head: bytes | None = None  # the exact head of the request being parsed, if known
        # Heads parsed before on this connection, by their exact bytes (see `_repeat`)
        self._known: dict[bytes, _Known] | None = None
        # Answering, in order
        self._queue: deque[Request | bytes] = deque()  # bytes: a prepared error, then close
        self._current: Request | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False  # close after the current answer
        # Flow control
        self._body_paused = False  # reading stopped: a body's buffer is full
        self._queue_paused = False  # reading stopped: pipelined requests wait for answers
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        # Deadlines
        self._head_deadline: float | None = None
        self._head_bytes = False  # part of a request head has arrived
        self._body_deadline: float | None = None
        self._send_deadline: float | None = None
        self._send_backlog = 0
        self._idle_deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    # --- connection -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self._server.connections.add(self)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der:
            admitted, self._identity_key, self.identity = self._server.admit(der)
            if not admitted:  # answer its first request with 429, then close
                self._refusal = "busy"
        elif ssl_object is not None:
            # TLS without a client certificate (the context's verify mode is CERT_OPTIONAL so
            # that this can be said in HTTP): no request on it reaches the handler.
            self._refusal = "no-certificate"
        self._head_deadline = self._loop.time() + self._read_timeout
        self._arm(self._head_deadline)
        if self._server.closing:
            self._closing = True

    def connection_lost(self, exc: BaseException | None) -> None:
        self._server.connections.discard(self)
        if self._identity_key is not None:
            self._server.release(self._identity_key)
            self._identity_key = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.transport = None
        self._dead = True
        broken = BodyBroken("the client connection closed")
        for body in (self._body, self._current.content if self._current else None):
            if body is not None:
                body.set_exception(broken)
        for item in self._queue:
            if isinstance(item, Request):
                item.content.set_exception(broken)
        self._queue.clear()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(broken)
            self._drain.exception()  # retrieved: nobody may be waiting
        # A handler in flight is not cancelled (a limiter or store call cut in the middle could
        # leave a shared connection in an unknown state): it finishes, its reads and writes
        # fail or go nowhere, and its outcome is still observed.

    @property
    def busy(self) -> bool:
        """A request is being answered on this connection."""
        return self._current is not None

    def close_when_idle(self) -> None:
        self._closing = True
        if self._current is None and not self._queue and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._dead:
            return
        if self._between:
            # A request starts here: its exact head is kept (`_know`), and a request seen before
            # on this connection, whole in this read, needs no parsing (`_repeat`).
            # It starts with its method: llhttp also skips empty lines before a request, and
            # those would make the first blank line the wrong end of the head.
            end = data.find(b"\r\n\r\n") + 4
            self._head = data[:end] if end > 3 and data[:1].isupper() else None
            if self._known is not None and self._head is not None and self._repeat(data, end):
                return
        if self._body is None:
            self._head_bytes = True
            self._idle_deadline = None
            if self._head_deadline is None:
                self._head_deadline = self._loop.time() + self._read_timeout
                self._arm(self._head_deadline)
        else:
            self._body_deadline = self._loop.time() + self._read_timeout  # progress
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # CONNECT, or `Upgrade:`: answered as a plain request; nothing after it is read.
            self._dead = True
            self._closing = True
        except httptools.HttpParserError as exc:
            self._bad_request(exc)

    # --- parser callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._between = False
        self._url.clear()
        self._url_size = 0
        self._headers = []
        self._head_bytes = True
        if self._head_deadline is None:
            self._head_deadline = self._loop.time() + self._read_timeout
            self._arm(self._head_deadline)

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._url_size += len(url)
        if self._url_size > self._limits.max_line_size:
            raise self._refuse(
                414,
                ErrorCode.URI_TOO_LONG,
                f"The request line is longer than {self._limits.max_line_size} bytes.",
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self._limits
        if len(name) > limits.max_header_size or len(value) > limits.max_header_size:
            raise self._refuse(
                431,
                ErrorCode.HEADER_TOO_LARGE,
                f"A request header is longer than {limits.max_header_size} bytes.",
            )
        if len(self._headers) >= limits.max_headers:
            raise self._refuse(
                431,
                ErrorCode.TOO_MANY_HEADERS,
                f"The request has more than {limits.max_headers} headers.",
            )
        self._headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:  # llhttp parses HTTP/0.9 and 2.0 request lines: never served here
            raise self._refuse(
                505, ErrorCode.HTTP_VERSION, "Only HTTP/1.1 and HTTP/1.0 are served here."
            )
        headers: CIMultiDict[str] = CIMultiDict(self._headers)
        coding = headers.get("Transfer-Encoding")
        if coding is not None and coding.strip().lower() != "chunked":
            # llhttp would refuse other codings only after the head was handed on; chunked is
            # the one framing of a body without a length that the gateway forwards.
            raise self._refuse(
                400,
                ErrorCode.BAD_REQUEST,
                "The request is not valid HTTP/1.1 (Transfer-Encoding other than chunked).",
            )
        names = [name.lower() for name, _ in self._headers]
        if version == (1, 1) and "host" not in names:  # RFC 9112 §3.2: exactly one Host
            raise self._refuse(
                400, ErrorCode.BAD_REQUEST, "The request is not valid HTTP/1.1 (no Host header)."
            )
        if len(names) != len(set(names)):
            repeated = {name for name in names if names.count(name) > 1} & _SINGLETONS
            if repeated:
                raise self._refuse(
                    400,
                    ErrorCode.BAD_REQUEST,
                    f"The request is not valid HTTP/1.1 (more than one {min(repeated)} header).",
                )
        self._head_deadline = None
        self._head_bytes = False
        length_text = headers.get("Content-Length")
        length = int(length_text) if length_text is not None else None  # llhttp checked it
        body_exists = "Transfer-Encoding" in headers or bool(length)
        body = Body(self) if body_exists else EMPTY
        request = Request(
            parser.get_method().decode("latin-1"),
            b"".join(self._url).decode("utf-8", "surrogateescape"),
            version,
            headers,
            body,
            length,
            body_exists,
            parser.should_keep_alive(),
            self,
            self.transport,
            self._head,
        )
        if self._head is not None:
            self._know(self._head, request)
        self._head = None  # a pipelined request after it in the same read has its own head
        if body_exists:
            self._body = body
            if _asks_continue(version, headers):
                self._held = body  # no body deadline until `100 Continue` went out
            else:
                self._body_deadline = self._loop.time() + self._read_timeout
                self._arm(self._body_deadline)
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        self._queue.append(request)
        if self._task is None:
            self._task = self._loop.create_task(self._serve())
        elif len(self._queue) > 1 and not self._queue_paused and self.transport is not None:
            self._queue_paused = True  # pipelined: read on once the answers caught up
            self.transport.pause_reading()

    def on_body(self, body: bytes) -> None:
        if self._body is not None:
            self._body.feed(body)

    def on_message_complete(self) -> None:
        self._between = True
        body = self._body
        if body is not None:
            body.feed_eof()
            self._body = None
            self._body_deadline = None
            if self._held is body:
                self._held = None

    def _know(self, head: bytes, request: Request) -> None:
        """Keep a parsed head by its exact bytes, when a repeat of it can come whole in one
        read: a body of a known, small length (not chunked), and no `Expect` (its client
        waits for `100 Continue` before it sends the body)."""
        length = request.content_length or 0
        if length > _KNOWN_MAX_BODY or (request.body_exists and request.content_length is None):
            return
        if "Expect" in request.headers:
            return
        if self._known is None or len(self._known) >= _HEADS_KEPT:
            self._known = {}
        self._known[head] = _Known(request, length)

    def _repeat(self, data: bytes, end: int) -> bool:
        """`data` is one whole request whose head (`data[:end]`) was parsed before on this
        connection: the same bytes mean the same to llhttp, so the parser is skipped (it stays
        between messages, as after parsing it) and the request is made from the known head. If
        it was refused then and its Replay still refuses (proxy/replay.py), that is the answer;
        else the handler answers it, in order, as any other."""
        assert self._known is not None and self._head is not None
        head = self._head
        known = self._known.get(head)
        if known is None or len(data) - end != known.length or self._closing:
            return False
        self._head = None
        if known.replay is not None and self._current is None and not self._queue:
            answer = known.replay()
            if answer is not None:
                self.write(answer)
                self._idle_deadline = self._loop.time() + self._limits.idle_timeout
                self._arm(self._idle_deadline)
                return True
            known.replay = None  # not refused at once any more (or policies reloaded)
        body = EMPTY
        if known.body_exists:
            body = Body(self, eof=True)
            body.feed(data[end:])
        self._idle_deadline = None
        self._enqueue(
            Request(
                known.method,
                known.raw_path,
                known.version,
                known.headers,
                body,
                known.content_length,
                known.body_exists,
                known.keep_alive,
                self,
                self.transport,
                head,
            )
        )
        return True

    def _refuse(self, status: int, code: ErrorCode, message: str) -> _Refused:
        self._refused = _Refused(status, code, message)
        return self._refused

    def _bad_request(self, exc: Exception) -> None:
        """The parser stopped: answer in order (unless a body was under way), then close."""
        self._dead = True
        refused = self._refused
        if refused is not None:
            status, code, text = refused.status, refused.code, refused.message
            first_line = text
        else:
            status, code, text = 400, ErrorCode.BAD_REQUEST, _reason_text(str(exc))
            first_line = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        self._server.stats.bad_requests += 1
        log.info("bad request from %s: %d %s", _peer(self.transport), status, first_line)
        self._head_deadline = None
        body = self._body
        if body is not None:
            self._body = None
            self._body_deadline = None
            waiting = [r for r in self._queue if isinstance(r, Request) and r.content is body]
            if waiting:  # its handler has not started: the 400 answers it, nothing is forwarded
                self._queue.remove(waiting[0])
            else:  # its handler reads it now: the read fails, and the connection closes after
                body.set_exception(BodyMalformed(f"malformed request body: {first_line}"))
                self._closing = True
                return
        self._queue.append(_raw_response(self._server.server_name, status, code, text))
        if self._task is None:
            self._task = self._loop.create_task(self._serve())

    # --- answering ------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            while self._queue and self.transport is not None:
                item = self._queue.popleft()
                if isinstance(item, bytes):
                    self.transport.write(item)
                    self.transport.close()
                    return
                self._current = item
                close = await self._answer(item)
                self._current = None
                if self.transport is None:
                    return
                if close or self._closing:
                    self.transport.close()
                    return
                if self._queue_paused and len(self._queue) <= 1:
                    self._queue_paused = False
                    if not self._body_paused:
                        self.transport.resume_reading()
            if self.transport is not None and self._body is None and not self._head_bytes:
                self._idle_deadline = self._loop.time() + self._limits.idle_timeout
                self._arm(self._idle_deadline)
        finally:
            self._task = None
            self._current = None

    async def _answer(self, request: Request) -> bool:
        """Answer one request; whether the connection must close after it."""
        if self._refusal is not None:
            self.write(self._refusal_answer(request))
            return True
        try:
            response = await self._server.handler(request)
        except (BodyBroken, ConnectionError) as exc:
            log.debug("request from %s ended: %s", _peer(self.transport), exc)
            return True
        except Exception:
            log.exception("error handling %s %s", request.method, request.path[:200])
            if self.transport is not None and not self.transport.is_closing():
                self.write(_internal_error(self._server.server_name))
            return True
        if self._closing or not request.content.received():
            response.close = True  # the rest of the body never came: the connection is done
        if isinstance(response, Response):
            self.write(response.serialize(request))
            if response.replay is not None and not response.close:
                self._keep_replay(request, response.replay)
        return response.close or not request.content.received()

    def _keep_replay(self, request: Request, replay: Replay) -> None:
        """Keep a rejection's Replay with its request's known head (see `_repeat`)."""
        known = self._known.get(request.head) if self._known and request.head else None
        if known is not None and request.content.received():
            known.replay = replay

    def _refusal_answer(self, request: Request) -> bytes:
        content_type = request.headers.get("Content-Type", "")
        if self._refusal == "busy":
            return _raw_response(
                self._server.server_name,
                429,
                ErrorCode.TOO_MANY_CONNECTIONS,
                f"Too many concurrent connections for this certificate (at most "
                f"{self._limits.max_connections_per_identity}); reuse a connection "
                "or close one, and retry in 1 second.",
                content_type,
                retry_after=1,
            )
        return _raw_response(
            self._server.server_name,
            403,
            ErrorCode.NO_CERTIFICATE,
            "A client certificate is required: this connection presented none. Connect with "
            "the certificate issued to you.",
            content_type,
        )

    # --- writing and flow control ---------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        if self.transport is None:
            raise BodyBroken("the client connection closed")
        if self._write_paused:
            if self._drain is None or self._drain.done():
                self._drain = self._loop.create_future()
            await self._drain

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.transport is not None:
            self._send_backlog = self.transport.get_write_buffer_size()
            self._send_deadline = self._loop.time() + self._read_timeout
            self._arm(self._send_deadline)

    def resume_writing(self) -> None:
        self._write_paused = False
        self._send_deadline = None
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def body_full(self) -> None:
        if not self._body_paused and self.transport is not None:
            self._body_paused = True
            self.transport.pause_reading()

    def body_drained(self) -> None:
        if self._body_paused and self.transport is not None:
            self._body_paused = False
            if not self._queue_paused:
                self.transport.resume_reading()

    def continued(self, body: Body) -> None:
        """`100 Continue` went out for `body`: from now on its client owes it."""
        self.write(_CONTINUE)
        if self._held is body:
            self._held = None
            self._body_deadline = self._loop.time() + self._read_timeout
            self._arm(self._body_deadline)

    # --- deadlines ------------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return  # it fires first and re-arms for whatever is due then
            timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        now = self._loop.time()
        later = now + self._read_timeout
        if self._head_deadline is not None and now >= self._head_deadline:
            if self._current is not None or self._queue:
                self._head_deadline = later  # a pipelined head may wait for the answer ahead
            else:
                self._time_out("head", "the request head was not complete")
                return
        if self._body_deadline is not None and now >= self._body_deadline:
            body = self._body
            if body is None:
                self._body_deadline = None
            elif self._body_paused or self._queue_paused or body is self._held:
                self._body_deadline = later  # the gateway is not reading: not the client's fault
            else:
                self._time_out("body", "no request body bytes arrived")
                return
        if self._send_deadline is not None and now >= self._send_deadline:
            backlog = transport.get_write_buffer_size()
            if not self._write_paused:
                self._send_deadline = None
            elif backlog < self._send_backlog:  # the client took some: progress
                self._send_backlog = backlog
                self._send_deadline = later
            else:
                self._time_out("send", "the client did not read the answer")
                return
        if self._idle_deadline is not None and now >= self._idle_deadline:
            self._idle_deadline = None
            if self._current is None and not self._queue and not self._head_bytes:
                transport.close()  # idle keep-alive connection: closed without a word
                return
        pending = [
            d
            for d in (
                self._head_deadline,
                self._body_deadline,
                self._send_deadline,
                self._idle_deadline,
            )
            if d is not None
        ]
        if pending:
            self._arm(min(pending))

    def _time_out(self, phase: Literal["head", "body", "send"], why: str) -> None:
        stats = self._server.stats
        if phase == "head":
            stats.head_timeouts += 1
        elif phase == "body":
            stats.body_timeouts += 1
        else:
            stats.send_timeouts += 1
        log.info(
            "closing connection from %s: %s within %gs",
            _peer(self.transport),
            why,
            self._read_timeout,
        )
        transport = self.transport
        if transport is None:
            return
        self._dead = True
        if phase == "head" and self._head_bytes:
            transport.write(
                _raw_response(
                    self._server.server_name,
                    408,
                    ErrorCode.REQUEST_TIMEOUT,
                    f"The request head was not complete within {self._read_timeout:g} seconds.",
                )
            )
            transport.close()
        else:
            transport.abort()  # a stalled body or a client that does not read: nothing to flush


def expects_continue(request: Request) -> bool:
    """The client sent a body's head only and waits for `100 Continue` (or a final answer)."""
    return request.body_exists and _asks_continue(request.version, request.headers)


def _asks_continue(version: tuple[int, int], headers: CIMultiDict[str]) -> bool:
    # HTTP/1.0 clients never get a 1xx (RFC 9110 §15.2); other expectations are ignored.
    return version >= (1, 1) and headers.get("Expect", "").lower() == "100-continue"


async def send_continue(request: Request) -> None:
    """Tell a client that waits with its body to send it now: once, and only if it asked.

    Called by the handler when the call is allowed (or when the service must be read from the
    body); every answer given before then is final, and the client never sends its body.
    """
    if request.continued or not expects_continue(request):
        return
    request.continued = True
    if request.protocol is not None:
        request.protocol.continued(request.content)


def _reason_text(message: str) -> str:
    """llhttp's reason, without echoing the client's bytes."""
    reason = (message or "malformed request").splitlines()[0].rstrip(":")
    # Keep the client's bytes out of the answer: quoted parts only when plainly a name.
    reason = _QUOTED.sub(
        lambda m: m[0] if _PLAIN_NAME.match(m[1] or m[2] or m[3] or "") else "'...'", reason
    )
    if len(reason) > 80:
        reason = "malformed request"
    return f"The request is not valid HTTP/1.1 ({reason})."


def _raw_response(
    server_name: str,
    status: int,
    code: ErrorCode,
    message: str,
    content_type: str = "",
    retry_after: float | None = None,
) -> bytes:
    """A complete closing answer written straight to the transport."""
    request_id = str(uuid.uuid4())
    fault = faults.error_fault(
        faults.shape_for(None, content_type),
        status=status,
        code=code,
        message=message,
        application=None,
        service=None,
        request_id=request_id,
        retry_after=retry_after,
    )
    head = [f"HTTP/1.1 {fault.status} {HTTPStatus(fault.status).phrase}"]
    head += [f"{name}: {value}" for name, value in fault.headers.items()]
    head += [
        f"X-Request-Id: {request_id}",
        f"Server: {server_name}",
        f"Content-Length: {len(fault.body)}",
        "Connection: close",
        f"Date: {http_date().decode()}",
        "",
        "",
    ]
    return "\r\n".join(head).encode("latin-1") + fault.body


def _internal_error(server_name: str) -> bytes:
    """A bug, not the client: a plain 500 that names nothing, then the connection closes."""
    body = b"500 Internal Server Error"
    return (
        b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Server: %b\r\nContent-Length: %d\r\nConnection: close\r\nDate: %b\r\n\r\n%b"
        % (server_name.encode("latin-1"), len(body), http_date(), body)
    )


def _peer(transport: asyncio.BaseTransport | None) -> str:
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)
