"""The upstream side: one keep-alive pool per application, headers cleaned, bodies streamed.

The HTTP client itself is gateway/upstream/; this module decides what goes upstream (which
headers, the body whole or streamed and counted against the application's limit) and how the
answer comes back. Small bodies (with a Content-Length up to BUFFER_LIMIT) are read whole: one
write instead of a stream of chunks is the cheaper path for the typical SOAP call. Larger or
chunked bodies stream both ways with bounded buffers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from multidict import CIMultiDict

from gateway.config.settings import Application, Settings
from gateway.edge.connection import send_continue
from gateway.edge.http1 import BodyMalformed, Request, Response, StreamResponse
from gateway.edge.identity import ClientIdentity
from gateway.errors import UpstreamError
from gateway.proxy.upstream import UpstreamFailed, UpstreamPool, UpstreamResponse, UpstreamTimeout

log = logging.getLogger("gateway")

BUFFER_LIMIT = 256 * 1024
CHUNK = 64 * 1024
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
        # Answered by the gateway itself (connection.send_continue), never passed on.
        "Expect",
    )
)
# Headers only the gateway may set: whatever a client sends under these names is dropped.
OWNED = frozenset(
    h.lower()
    for h in (
        "X-Forwarded-Client-Cert",
        "X-Forwarded-For",
        "X-Forwarded-Proto",
        "X-Forwarded-Host",
        "X-Forwarded-Port",
        "Forwarded",
        "X-Real-IP",
        "X-Request-Id",
        "X-Client-Cert",
        "X-SSL-Client-Cert",
        "X-SSL-Client-DN",
        "X-Client-DN",
        "X-AUP-Identity",
    )
)
_DROP_REQUEST = HOP_BY_HOP | OWNED
# The upstream client hands over raw header names: compared as bytes, without decoding first.
_DROP_RESPONSE = frozenset(h.encode() for h in HOP_BY_HOP)


class BodyTooLarge(Exception):
    """The request body passed the application's max_body while streaming."""


class RequestBodyFailed(Exception):
    """Reading the client's body failed while it streamed upstream (the client went away)."""


class Upstreams:
    """One keep-alive pool per application, opened and closed with the app."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pools: dict[str, UpstreamPool] = {}

    async def start(self) -> None:
        for app in self._settings.applications.values():
            self._pools[app.name] = UpstreamPool(
                app.upstream,
                size=app.pool_size,
                connect_timeout=app.connect_timeout,
                read_timeout=app.timeout,
            )

    async def close(self) -> None:
        await asyncio.gather(*(pool.close() for pool in self._pools.values()))
        self._pools.clear()

    async def forward(
        self,
        request: Request,
        app: Application,
        upstream_path: str,
        identity: ClientIdentity,
        request_id: str,
        max_body: int,
        prefix: bytes = b"",
        extra_headers: dict[str, str] | None = None,
    ) -> StreamResponse:
        """Send the request upstream and relay the answer; UpstreamError when that fails.

        `prefix` is the start of the body that routing already read (routing.route_by_body).
        `extra_headers` (the decision's rate-limit headers) are added to the answer.
        """
        headers = upstream_headers(request, identity, request_id)
        length = request.content_length
        body: bytes | AsyncIterator[bytes] | None
        if length is not None and length > max_body:
            raise BodyTooLarge  # before `100 Continue`: the client never sends the body
        await send_continue(request)
        if length is not None and length <= BUFFER_LIMIT:
            try:
                body = prefix + await request.read() if length else None
            except ConnectionError as exc:  # the client went away mid-body: nothing to forward
                raise UpstreamError(400, "the request body broke off") from exc
        elif request.body_exists:
            body = _counted(request, max_body, prefix)
        else:
            body = None
        try:
            upstream = await self._pools[app.name].request(
                request.method, upstream_path, headers.items(), body, content_length=length
            )
            return await _relay(
                request, upstream, request_id, self._settings.server_name, extra_headers or {}
            )
        # The reason reaches the client in the fault: it names no address; the log does.
        except UpstreamTimeout as exc:
            log.debug("%s upstream: %s", app.name, exc)
            raise UpstreamError(504, f"{app.name} upstream did not answer in time") from exc
        except UpstreamFailed as exc:
            log.debug("%s upstream: %s", app.name, exc)
            raise UpstreamError(502, f"{app.name} upstream unavailable") from exc
        except RequestBodyFailed as exc:
            if isinstance(exc.__cause__, BodyMalformed):
                raise UpstreamError(400, "the request body is not valid HTTP/1.1") from exc
            raise UpstreamError(
                502, f"{app.name} request body broke off: {type(exc.__cause__).__name__}"
            ) from exc


def upstream_headers(
    request: Request, identity: ClientIdentity, request_id: str
) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop and gateway-owned ones, plus the gateway's own."""
    connection = request.headers.get("Connection", "")
    named = (
        {h.strip().lower().replace("_", "-") for h in connection.split(",")}
        if connection
        else set()
    )
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        # `X_Forwarded_Client_Cert` is the same header to CGI/WSGI-style upstreams: compare
        # names with '_' read as '-' so no variant of a gateway-owned name gets through.
        lower = name.lower().replace("_", "-")
        if lower not in _DROP_REQUEST and lower not in named:
            headers.add(name, value)
    peer = request.transport.get_extra_info("peername") if request.transport else None
    headers["X-Forwarded-Client-Cert"] = identity.xfcc
    headers["X-Forwarded-For"] = peer[0] if peer else "unknown"
    headers["X-Forwarded-Proto"] = "https"
    headers["X-Request-Id"] = request_id
    return headers


async def _counted(
    request: Request,
    max_body: int,
    prefix: bytes = b"",
) -> AsyncIterator[bytes]:
    seen = len(prefix)
    if prefix:
        yield prefix
    chunks = request.content.iter_chunked(CHUNK)
    while True:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except Exception as exc:  # whatever the client's side raised: not the upstream's fault
            raise RequestBodyFailed from exc
        seen += len(chunk)
        if seen > max_body:
            raise BodyTooLarge
        yield chunk


async def _relay(
    request: Request,
    upstream: UpstreamResponse,
    request_id: str,
    server_name: str,
    extra_headers: dict[str, str],
) -> StreamResponse:
    headers = [
        (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        for name, value in upstream.headers
        if name.lower() not in _DROP_RESPONSE
    ]
    if not any(name.lower() == b"server" for name, _ in upstream.headers):
        headers.append(("Server", server_name))  # else aiohttp would name itself and Python
    # Added lines, not replacements: an upstream's own RateLimit fields (Structured Field
    # Lists) combine with the gateway's.
    headers.extend(extra_headers.items())
    headers.append(("X-Request-Id", request_id))
    length = upstream.content_length
    reason = upstream.reason or None
    if upstream.complete or (length is not None and length <= BUFFER_LIMIT):
        # Whole already (small chunked answers, HEAD, 204, 304) or small: one write to the client.
        body = await upstream.read_all()
        return Response(status=upstream.status, reason=reason, headers=headers, body=body)
    response = StreamResponse(status=upstream.status, reason=reason, headers=headers)
    if length is not None:
        response.content_length = length
    try:
        await response.prepare(request)
        while chunk := await upstream.read():
            await response.write(chunk)
    except UpstreamFailed as exc:
        # The status line is gone already: a cut connection is the only honest signal left
        # (the client sees a short body or an unterminated chunked one, never a clean end).
        log.warning("upstream failed mid-answer (%s); closing the client connection", exc)
        if request.transport is not None:
            request.transport.abort()
        return response
    finally:
        upstream.close()
    await response.write_eof()
    return response
