"""One client connection: what it may cost before and around the requests it carries.

aiohttp's RequestHandler (the protocol behind `web.Server`) already bounds the request line,
each header's size and the header count, and closes idle keep-alive connections. It has no
deadline for a request head that arrives a byte at a time, a body that stalls, or a client that
stops reading its answer, and it keeps no count of connections per caller. `GuardedServer`
makes `GuardedHandler`s, which add, per connection:

- a head deadline: a request head must be complete within `read_timeout` of the connection
  opening or of its first byte; else 408 (when part of a head came) and the connection closes;
- a body deadline: while a request body is incomplete, more of it must arrive at least every
  `read_timeout`, unless the gateway itself stopped reading (an upstream slow to take it) or
  the client is waiting, as it should, for the `100 Continue` it asked for (`send_continue`);
- a send deadline: while the gateway's output to the client is backed up, the client must take
  some of it at least every `read_timeout`;
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
(`send_continue`): aiohttp's low-level server never answers it, and the gateway must decide
first, so a refused call gets its fault before the client sends its body.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from multidict import CIMultiDictProxy

from gateway.config.settings import Limits
from gateway.edge.identity import ClientIdentity, IdentityMode
from gateway.errors import ErrorCode
from gateway.proxy import faults

log = logging.getLogger("gateway.connection")

Identify = Callable[[bytes], ClientIdentity]
_HTTP1 = (HttpVersion11, HttpVersion10)
_QUOTED = re.compile(r"b?'([^']*)'|b?\"([^\"]*)\"")
_PLAIN_NAME = re.compile(r"^[A-Za-z-]{1,30}$")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CONTINUED = web.RequestKey("continued", bool)  # `100 Continue` was sent for this request


@dataclass(slots=True)
class GuardStats:
    """Counters since start (for metrics and tests)."""

    head_timeouts: int = 0
    body_timeouts: int = 0
    send_timeouts: int = 0
    refused_connections: int = 0
    bad_requests: int = 0


class GuardedServer(web.Server):
    """`web.Server` whose connections are GuardedHandlers sharing one per-identity count."""

    def __init__(
        self,
        handler: Any,
        *,
        limits: Limits,
        identify: Identify | None = None,
        identity_mode: IdentityMode = "subject",
        server_name: str = "AUP-Gateway",
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits
        self.server_name = server_name  # the Server header of every answer made here
        self.stats = GuardStats()
        self._identify = identify
        self._mode = identity_mode
        self._open: dict[str, int] = {}  # identity key -> open connections

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, **self._kwargs)

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


class GuardedHandler(RequestHandler):
    __slots__ = (
        "_body_deadline",
        "_guard",
        "_head_bytes",
        "_head_deadline",
        "_held",
        "_identity_key",
        "_payload",
        "_read_timeout",
        "_send_backlog",
        "_send_deadline",
        "_timer",
        "identity",
    )

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager
        self._read_timeout = manager.limits.read_timeout
        self._identity_key: str | None = None
        # The verified certificate's identity, read once per connection (renegotiation is off,
        # so it cannot change); the handler takes it from here instead of per request.
        self.identity: ClientIdentity | None = None
        self._head_deadline: float | None = None
        self._head_bytes = False  # part of a request head has arrived
        self._body_deadline: float | None = None
        self._payload: StreamReader | None = None  # the body of the newest request
        # The body of a request whose client waits for `100 Continue`: no body deadline
        # runs until the gateway has sent it (`continued`).
        self._held: StreamReader | None = None
        self._send_deadline: float | None = None
        self._send_backlog = 0
        self._timer: asyncio.TimerHandle | None = None

    # --- connection -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der:
            admitted, self._identity_key, self.identity = self._guard.admit(der)
            if not admitted:  # answer its first request with 429, then close
                self._request_handler = self._refuse_connection
        elif ssl_object is not None:
            # TLS without a client certificate (the context's verify mode is CERT_OPTIONAL so
            # that this can be said in HTTP): no request on it reaches the handler.
            self._request_handler = self._refuse_no_certificate
        super().connection_made(transport)
        self._head_deadline = self._loop.time() + self._read_timeout
        self._arm(self._head_deadline)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._identity_key is not None:
            self._guard.release(self._identity_key)
            self._identity_key = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        payload = self._payload
        in_body = payload is not None and not payload.is_eof()
        count = self._request_count
        super().data_received(data)
        if self.transport is None:
            return
        if self._request_count != count:  # a request head is complete
            self._head_deadline = None
            self._head_bytes = False
            self._refuse_other_versions(self._request_count - count)
            message, payload = self._messages[-1] if self._messages else (None, None)
            self._payload = payload
            if payload is not None and not payload.is_eof():
                if isinstance(message, RawRequestMessage) and _asks_continue(
                    message.version, message.headers
                ):
                    self._held = payload
                else:
                    self._body_deadline = self._loop.time() + self._read_timeout
                    self._arm(self._body_deadline)
        elif in_body:
            self._body_deadline = self._loop.time() + self._read_timeout  # progress
        elif data:
            self._head_bytes = True
            if self._head_deadline is None:
                self._head_deadline = self._loop.time() + self._read_timeout
                self._arm(self._head_deadline)

    def continued(self, payload: StreamReader) -> None:
        """`100 Continue` went out for `payload`: from now on its client owes the body."""
        if self._held is payload:
            self._held = None
            self._body_deadline = self._loop.time() + self._read_timeout
            self._arm(self._body_deadline)

    def _refuse_other_versions(self, new: int) -> None:
        """Swap HTTP/0.9 and HTTP/2.0 heads (llhttp parses both) for a 505 error entry."""
        messages = self._messages
        for index in range(max(len(messages) - new, 0), len(messages)):
            message = messages[index][0]
            if isinstance(message, RawRequestMessage) and message.version not in _HTTP1:
                error = HttpProcessingError(code=505, message="HTTP version not supported")
                messages[index] = (_ErrInfo(505, error, error.message), EMPTY_PAYLOAD)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.transport is not None:
            self._send_backlog = self.transport.get_write_buffer_size()
            self._send_deadline = self._loop.time() + self._read_timeout
            self._arm(self._send_deadline)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._send_deadline = None

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
        if self.transport is None or self._force_close:
            return
        now = self._loop.time()
        later = now + self._read_timeout
        if self._head_deadline is not None and now >= self._head_deadline:
            if self._current_request is not None or self._messages:
                self._head_deadline = later  # a pipelined head may wait for the answer ahead
            else:
                self._time_out("head", "the request head was not complete")
                return
        if self._body_deadline is not None and now >= self._body_deadline:
            payload = self._payload
            if payload is None or payload.is_eof():
                self._body_deadline = None
            elif self._reading_paused or self._buffer_paused or payload is self._held:
                self._body_deadline = later  # the gateway is not reading: not the client's fault
            else:
                self._time_out("body", "no request body bytes arrived")
                return
        if self._send_deadline is not None and now >= self._send_deadline:
            backlog = self.transport.get_write_buffer_size()
            if not self._paused:
                self._send_deadline = None
            elif backlog < self._send_backlog:  # the client took some: progress
                self._send_backlog = backlog
                self._send_deadline = later
            else:
                self._time_out("send", "the client did not read the answer")
                return
        pending = [
            d
            for d in (self._head_deadline, self._body_deadline, self._send_deadline)
            if d is not None
        ]
        if pending:
            self._arm(min(pending))

    def _time_out(self, phase: str, why: str) -> None:
        stats = self._guard.stats
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
        if phase == "head" and self._head_bytes and self.transport is not None:
            self.transport.write(
                _raw_response(
                    self._guard.server_name,
                    408,
                    ErrorCode.REQUEST_TIMEOUT,
                    f"The request head was not complete within {self._read_timeout:g} seconds.",
                )
            )
        self.force_close()

    # --- answers the handler never sees ---------------------------------------------------

    async def _refuse_connection(self, request: web.BaseRequest) -> web.StreamResponse:
        return _closing_fault(
            request,
            self._guard.server_name,
            429,
            ErrorCode.TOO_MANY_CONNECTIONS,
            f"Too many concurrent connections for this certificate (at most "
            f"{self._guard.limits.max_connections_per_identity}); reuse a connection "
            "or close one, and retry in 1 second.",
            retry_after=1,
        )

    async def _refuse_no_certificate(self, request: web.BaseRequest) -> web.StreamResponse:
        return _closing_fault(
            request,
            self._guard.server_name,
            403,
            ErrorCode.NO_CERTIFICATE,
            "A client certificate is required: this connection presented none. Connect with "
            "the certificate issued to you.",
        )

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):  # a bug, not the client: aiohttp logs it
            answer = super().handle_error(request, status, exc, message)
            answer.headers[hdrs.SERVER] = self._guard.server_name
            return answer
        status, code, text = _classify(
            exc, self.max_line_size, self.max_field_size, self.max_headers
        )
        self._guard.stats.bad_requests += 1
        first_line = (exc.message or type(exc).__name__).splitlines()[0][:160]
        log.info("bad request from %s: %d %s", request.remote, status, first_line)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already started; closing instead")
        fault = faults.error_fault(
            faults.shape_for(None, ""),  # the request was not read: no content type to go by
            status=status,
            code=code,
            message=text,
            application=None,
            service=None,
            request_id=str(uuid.uuid4()),
        )
        response = web.Response(status=status, headers=fault.headers, body=fault.body)
        response.headers[hdrs.SERVER] = self._guard.server_name
        response.force_close()
        return response


def expects_continue(request: web.BaseRequest) -> bool:
    """The client sent a body's head only and waits for `100 Continue` (or a final answer)."""
    return request.body_exists and _asks_continue(request.version, request.headers)


def _asks_continue(version: HttpVersion, headers: CIMultiDictProxy[str]) -> bool:
    # HTTP/1.0 clients never get a 1xx (RFC 9110 §15.2); other expectations are ignored.
    return version >= HttpVersion11 and headers.get(hdrs.EXPECT, "").lower() == "100-continue"


async def send_continue(request: web.BaseRequest) -> None:
    """Tell a client that waits with its body to send it now: once, and only if it asked.

    Called by the handler when the call is allowed (or when the service must be read from the
    body); every answer given before then is final, and the client never sends its body.
    """
    if request.get(CONTINUED) or not expects_continue(request):
        return
    request[CONTINUED] = True
    protocol = request.protocol
    if isinstance(protocol, GuardedHandler):
        protocol.continued(request.content)
    await request.writer.write(_CONTINUE)


def _closing_fault(
    request: web.BaseRequest,
    server_name: str,
    status: int,
    code: ErrorCode,
    message: str,
    retry_after: float | None = None,
) -> web.Response:
    """A fault in the caller's protocol for a connection refused as a whole; then it closes."""
    request_id = str(uuid.uuid4())
    fault = faults.error_fault(
        faults.shape_for(None, request.headers.get(hdrs.CONTENT_TYPE, "")),
        status=status,
        code=code,
        message=message,
        application=None,
        service=None,
        request_id=request_id,
        retry_after=retry_after,
    )
    response = web.Response(status=fault.status, headers=fault.headers, body=fault.body)
    response.headers["X-Request-Id"] = request_id
    response.headers[hdrs.SERVER] = server_name
    response.force_close()
    return response


def _classify(
    exc: HttpProcessingError, max_line: int, max_field: int, max_headers: int
) -> tuple[int, ErrorCode, str]:
    """A parser error -> (status, code, message) without echoing the client's bytes."""
    if isinstance(exc, LineTooLong):
        line = exc.args[0] if exc.args else b""
        limit = exc.args[1] if len(exc.args) > 1 else None
        is_target = isinstance(line, bytes | bytearray) and (line[:1] == b"/" or b"://" in line)
        if limit == max_line and (limit != max_field or is_target):
            return 414, ErrorCode.URI_TOO_LONG, f"The request line is longer than {max_line} bytes."
        return (
            431,
            ErrorCode.HEADER_TOO_LARGE,
            f"A request header is longer than {max_field} bytes.",
        )
    if exc.code == 505:
        return 505, ErrorCode.HTTP_VERSION, "Only HTTP/1.1 and HTTP/1.0 are served here."
    if "Too many headers" in (exc.message or ""):
        return 431, ErrorCode.TOO_MANY_HEADERS, f"The request has more than {max_headers} headers."
    reason = (exc.message or "malformed request").splitlines()[0].rstrip(":")
    # Keep the client's bytes out of the answer: quoted parts only when plainly a name.
    reason = _QUOTED.sub(
        lambda m: m[0] if _PLAIN_NAME.match(m[1] or m[2] or "") else "'...'", reason
    )
    if len(reason) > 80:
        reason = "malformed request"
    return 400, ErrorCode.BAD_REQUEST, f"The request is not valid HTTP/1.1 ({reason})."


def _raw_response(server_name: str, status: int, code: ErrorCode, message: str) -> bytes:
    """A complete response written straight to the transport (no request object exists)."""
    fault = faults.error_fault(
        faults.shape_for(None, ""),  # no request was read: no content type to go by
        status=status,
        code=code,
        message=message,
        application=None,
        service=None,
        request_id=str(uuid.uuid4()),
    )
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    head += [f"{name}: {value}" for name, value in fault.headers.items()]
    head.append(f"Server: {server_name}")
    head += [f"Content-Length: {len(fault.body)}", "Connection: close", "", ""]
    return "\r\n".join(head).encode("latin-1") + fault.body


def _peer(transport: asyncio.BaseTransport | None) -> str:
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)
