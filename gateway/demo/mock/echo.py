"""What both mock services share: reading and hashing the request body, the echo headers that
let tests see exactly what the gateway forwarded, and the `/_mock/*` test hooks.

Echo headers (on every response, set just before the headers are sent):
`X-Echo-Method`, `X-Echo-Path` (path and query as received), `X-Echo-Body-Length`,
`X-Echo-Body-Sha256`, `X-Echo-Headers` (JSON object of the request headers, names as received,
repeated headers joined with ", ").

Hooks: header `X-Mock-Delay: <seconds>` delays any answer (for upstream timeouts), header
`X-Mock-Status: <code>` replaces any answer's status; `GET /_mock/slow?seconds=N`,
`GET /_mock/big?bytes=N[&interval=S][&sha256=1]` streams N bytes of a fixed pattern,
`GET /_mock/status?code=N`, `* /_mock/echo` answers the echo as a JSON body, and
`GET /_mock/reset` drops the connection without an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from aiohttp import web

CHUNK = 64 * 1024
MAX_DELAY = 600.0
# Bodies are hashed as they stream in; only this much is kept, for handlers that parse it.
KEEP_LIMIT = 1024 * 1024

_PATTERN = bytes(range(256)) * (CHUNK // 256)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class BodyDigest:
    """The request body as seen: its length, SHA-256 and (when small enough) its bytes."""

    length: int
    sha256: str
    kept: bytes | None  # None when the body was larger than KEEP_LIMIT


BODY = web.RequestKey("body", BodyDigest)
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


async def read_body(request: web.Request) -> BodyDigest:
    """Hash the body chunk by chunk; keep the bytes only while they stay under KEEP_LIMIT."""
    digest = hashlib.sha256()
    length = 0
    kept: list[bytes] | None = []
    async for chunk in request.content.iter_chunked(CHUNK):
        digest.update(chunk)
        length += len(chunk)
        if kept is not None:
            if length <= KEEP_LIMIT:
                kept.append(chunk)
            else:
                kept = None
    return BodyDigest(length, digest.hexdigest(), None if kept is None else b"".join(kept))


def received_headers(request: web.Request) -> dict[str, str]:
    """Request headers with the names as received; repeats joined with ", " in arrival order."""
    names: dict[str, str] = {}
    values: dict[str, list[str]] = {}
    for raw_name, raw_value in request.raw_headers:
        name = raw_name.decode("latin-1")
        lower = name.lower()
        names.setdefault(lower, name)
        values.setdefault(lower, []).append(raw_value.decode("latin-1"))
    return {names[lower]: ", ".join(items) for lower, items in values.items()}


def echo_headers(request: web.Request) -> dict[str, str]:
    body = request.get(BODY)
    return {
        "X-Echo-Method": request.method,
        "X-Echo-Path": request.raw_path,
        "X-Echo-Body-Length": str(body.length if body else 0),
        "X-Echo-Body-Sha256": body.sha256 if body else EMPTY_SHA256,
        # ensure_ascii keeps the header value Latin-1-safe and free of CR/LF.
        "X-Echo-Headers": json.dumps(received_headers(request), separators=(",", ":")),
    }


def _float_arg(text: str | None, default: float) -> float:
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise web.HTTPBadRequest(text=f"not a number: {text!r}") from None
    if not 0 <= value <= MAX_DELAY * 1e6:  # rejects nan and negatives
        raise web.HTTPBadRequest(text=f"out of range: {text!r}")
    return value


@web.middleware
async def echo_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Read the body first (so every handler sees its digest), then apply the hooks."""
    request[BODY] = await read_body(request)
    delay = _float_arg(request.headers.get("X-Mock-Delay"), 0.0)
    if delay:
        await asyncio.sleep(min(delay, MAX_DELAY))
    response = await handler(request)
    forced = request.headers.get("X-Mock-Status")
    if forced is not None and not response.prepared:
        with contextlib.suppress(ValueError):
            response.set_status(int(forced))
    return response


async def _add_echo_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(echo_headers(request))


def pattern_chunks(size: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """The bytes `/_mock/big?bytes=size` sends, in order (tests compute the expected hash)."""
    pattern = _PATTERN if chunk == CHUNK else (bytes(range(256)) * (chunk // 256 + 1))[:chunk]
    sent = 0
    while sent < size:
        piece = pattern[: min(chunk, size - sent)]
        sent += len(piece)
        yield piece


async def slow(request: web.Request) -> web.Response:
    seconds = min(_float_arg(request.query.get("seconds"), 1.0), MAX_DELAY)
    await asyncio.sleep(seconds)
    return web.json_response({"slept": seconds})


async def big(request: web.Request) -> web.StreamResponse:
    size = int(_float_arg(request.query.get("bytes"), float(CHUNK)))
    interval = min(_float_arg(request.query.get("interval"), 0.0), MAX_DELAY)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    if request.query.get("sha256") == "1":
        digest = hashlib.sha256()
        for piece in pattern_chunks(size):
            digest.update(piece)
        response.headers["X-Mock-Body-Sha256"] = digest.hexdigest()
    await response.prepare(request)
    for piece in pattern_chunks(size):
        await response.write(piece)
        if interval:
            await asyncio.sleep(interval)
    await response.write_eof()
    return response


async def status(request: web.Request) -> web.Response:
    code = int(_float_arg(request.query.get("code"), 200))
    if not 200 <= code <= 599:
        raise web.HTTPBadRequest(text="code must be 200-599")
    return web.json_response({"status": code}, status=code)


async def echo(request: web.Request) -> web.Response:
    headers = echo_headers(request)
    return web.json_response(
        {
            "method": headers["X-Echo-Method"],
            "path": headers["X-Echo-Path"],
            "body_length": int(headers["X-Echo-Body-Length"]),
            "body_sha256": headers["X-Echo-Body-Sha256"],
            "headers": received_headers(request),
        }
    )


async def reset(request: web.Request) -> web.StreamResponse:
    # An upstream that dies mid-request: the gateway must answer 502, not hang.
    if request.transport is not None:
        request.transport.close()
    raise asyncio.CancelledError


def add_mock_hooks(app: web.Application) -> None:
    """Install the echo middleware, the echo headers and the `/_mock/*` routes on `app`."""
    app.middlewares.append(echo_middleware)
    app.on_response_prepare.append(_add_echo_headers)
    app.router.add_get("/_mock/slow", slow)
    app.router.add_get("/_mock/big", big)
    app.router.add_get("/_mock/status", status)
    app.router.add_get("/_mock/reset", reset)
    app.router.add_route("*", "/_mock/echo", echo)
