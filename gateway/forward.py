"""The upstream side: one pooled client session per application, headers cleaned, bodies streamed.

Small bodies (with a Content-Length up to BUFFER_LIMIT) are read whole: one write instead of a
stream of chunks is the cheaper path for the typical SOAP call. Larger or chunked bodies stream
both ways with bounded buffers, and the request body is counted against the application's limit
while it streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict
from yarl import URL

from gateway.errors import UpstreamError
from gateway.identity import ClientIdentity
from gateway.settings import Application, Settings

BUFFER_LIMIT = 256 * 1024
CHUNK = 64 * 1024
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Connection",
        "TE", "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
    )
)
# Headers only the gateway may set: whatever a client sends under these names is dropped.
OWNED = frozenset(
    h.lower()
    for h in (
        "X-Forwarded-Client-Cert", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host",
        "X-Forwarded-Port", "Forwarded", "X-Real-IP", "X-Request-Id", "X-Client-Cert",
        "X-SSL-Client-Cert", "X-SSL-Client-DN", "X-Client-DN", "X-AUP-Identity",
    )
)
_DROP_REQUEST = HOP_BY_HOP | OWNED
_DROP_RESPONSE = HOP_BY_HOP


class BodyTooLarge(Exception):
    """The request body passed the application's max_body while streaming."""


class Upstreams:
    """One keep-alive client session per application, opened and closed with the app."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._bases: dict[str, str] = {}

    async def start(self) -> None:
        for app in self._settings.applications.values():
            connector = aiohttp.TCPConnector(limit=app.pool_size, keepalive_timeout=30,
                                             ttl_dns_cache=300)
            self._sessions[app.name] = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                timeout=aiohttp.ClientTimeout(total=None, connect=app.connect_timeout,
                                              sock_read=app.timeout),
            )
            self._bases[app.name] = app.upstream

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self._sessions.values()))
        self._sessions.clear()

    async def forward(self, request: web.BaseRequest, app: Application, upstream_path: str,
                      identity: ClientIdentity, request_id: str, max_body: int,
                      prefix: bytes = b"") -> web.StreamResponse:
        """Send the request upstream and relay the answer; UpstreamError when that fails.

        `prefix` is the start of the body that routing already read (routing.route_by_body).
        """
        headers = upstream_headers(request, identity, request_id)
        length = request.content_length
        data: bytes | AsyncIterator[bytes] | None
        if length is not None and length > max_body:
            raise BodyTooLarge
        if length is not None and length <= BUFFER_LIMIT:
            data = prefix + await request.read() if length else None
            if length:
                headers[hdrs.CONTENT_LENGTH] = str(length)
        elif request.body_exists:
            data = _counted(request, max_body, prefix)
            if length is not None:
                headers[hdrs.CONTENT_LENGTH] = str(length)
        else:
            data = None
        url = URL(self._bases[app.name] + upstream_path, encoded=True)
        session = self._sessions[app.name]
        try:
            async with session.request(request.method, url, headers=headers, data=data,
                                       allow_redirects=False) as upstream:
                return await _relay(request, upstream, request_id)
        except BodyTooLarge:
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamError(504, f"{app.name} upstream did not answer in time") from exc
        except aiohttp.ClientError as exc:
            if isinstance(exc.__cause__, BodyTooLarge):  # raised in _counted, wrapped by aiohttp
                raise BodyTooLarge from exc
            raise UpstreamError(502, f"{app.name} upstream unavailable: "
                                     f"{type(exc).__name__}") from exc


def upstream_headers(request: web.BaseRequest, identity: ClientIdentity,
                     request_id: str) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop and gateway-owned ones, plus the gateway's own."""
    connection = request.headers.get(hdrs.CONNECTION, "")
    named = ({h.strip().lower().replace("_", "-") for h in connection.split(",")}
             if connection else set())
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


async def _counted(request: web.BaseRequest, max_body: int, prefix: bytes = b"",
                   ) -> AsyncIterator[bytes]:
    seen = len(prefix)
    if prefix:
        yield prefix
    async for chunk in request.content.iter_chunked(CHUNK):
        seen += len(chunk)
        if seen > max_body:
            raise BodyTooLarge
        yield chunk


async def _relay(request: web.BaseRequest, upstream: aiohttp.ClientResponse, request_id: str,
                 ) -> web.StreamResponse:
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.headers.items():
        if name.lower() not in _DROP_RESPONSE:
            headers.add(name, value)
    headers["X-Request-Id"] = request_id
    length = upstream.content_length
    if length is not None and length <= BUFFER_LIMIT:
        body = await upstream.read()
        return web.Response(status=upstream.status, reason=upstream.reason, headers=headers,
                            body=body)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    if length is not None:
        response.content_length = length
    await response.prepare(request)
    async for chunk in upstream.content.iter_chunked(CHUNK):
        await response.write(chunk)
    await response.write_eof()
    return response
