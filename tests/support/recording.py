"""Hostile-input tests: an upstream that records what reached it, and a raw TLS client.

`recording_upstream` replaces the stack's `upstream` fixture in a test module that asks for it
(`from tests.support.recording import upstream, seen  # noqa: F401`): the same mock SOAP and REST
services, each with a first middleware that records every request the gateway forwarded.

`exchange()` / `exchange_sync()` send hand-written bytes over a real TLS connection (the gateway
must see them as written: aiohttp's and Python's clients normalise paths and refuse bad headers)
and parse whatever comes back into an `Answer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from gateway.demo.mock import create_rest_app, create_soap_app
from gateway.demo.mock.echo import Handler
from tests.support.stack import Upstream


@dataclass(frozen=True)
class Seen:
    """One request as the upstream received it."""

    service: str  # "soap" or "rest": which mock received it
    method: str
    path: str  # raw path and query
    headers: tuple[tuple[str, str], ...]  # names as received, in order

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@pytest.fixture
def seen() -> list[Seen]:
    return []


def _recorder(kind: str, out: list[Seen]) -> object:
    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        out.append(
            Seen(
                kind,
                request.method,
                request.raw_path,
                tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers),
            )
        )
        return await handler(request)

    return record


@pytest.fixture
async def upstream(seen: list[Seen]) -> AsyncIterator[Upstream]:
    runners = []
    ports = []
    for kind, app in (("soap", create_soap_app()), ("rest", create_rest_app())):
        app.middlewares.insert(0, _recorder(kind, seen))  # type: ignore[arg-type]
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        ports.append(runner.addresses[0][1])
    yield Upstream(ports[0], ports[1])
    for runner in runners:
        await runner.cleanup()


@dataclass
class Answer:
    """What came back on one connection: a parsed response, or how it ended without one."""

    raw: bytes
    elapsed: float
    status: int | None = None  # None: no (parsable) response
    reason: str = ""
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased names
    body: bytes = b""
    ended: str = "eof"  # eof | reset | timeout

    @property
    def forwarded(self) -> bool:
        """The answer came from the upstream (the mocks echo what they received)."""
        return "x-echo-path" in self.headers

    @property
    def closed_cleanly(self) -> bool:
        return self.status is None and not self.raw and self.ended in ("eof", "reset")


def parse_answer(raw: bytes, elapsed: float, ended: str) -> Answer:
    answer = Answer(raw, elapsed, ended=ended)
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return answer
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if (
        len(parts) < 2
        or not parts[0].startswith("HTTP/1.")
        or not parts[1].isdigit()
        or len(parts[1]) != 3
    ):
        return answer
    answer.status = int(parts[1])
    answer.reason = parts[2] if len(parts) > 2 else ""
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or name != name.strip():
            answer.status = None  # a malformed header line: not a well-formed response
            return answer
        answer.headers[name.lower()] = value.strip()
    answer.body = body
    return answer


async def exchange(
    port: int,
    context: ssl.SSLContext,
    data: bytes | list[bytes],
    *,
    timeout: float = 5.0,
    pause: float = 0.0,
) -> Answer:
    """Send `data` (pieces `pause` seconds apart), read until the server closes or `timeout`."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    raw = b""
    ended = "eof"
    try:
        for piece in data if isinstance(data, list) else [data]:
            writer.write(piece)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        deadline = started + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                ended = "timeout"
                break
            chunk = await asyncio.wait_for(reader.read(65536), left)
            if not chunk:
                break
            raw += chunk
    except TimeoutError:
        ended = "timeout"
    except (ConnectionError, ssl.SSLError):
        ended = "reset"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
    return parse_answer(raw, time.monotonic() - started, ended)


def exchange_sync(
    port: int, context: ssl.SSLContext, data: bytes, *, timeout: float = 5.0
) -> Answer:
    """Blocking twin of `exchange` (ssl.SSLContext.wrap_socket), for use from a thread."""
    started = time.monotonic()
    raw = b""
    ended = "eof"
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as plain,
        context.wrap_socket(plain, server_hostname="localhost") as tls,
    ):
        try:
            tls.sendall(data)
            while True:
                if time.monotonic() - started > timeout:
                    ended = "timeout"
                    break
                chunk = tls.recv(65536)
                if not chunk:
                    break
                raw += chunk
        except TimeoutError:
            ended = "timeout"
        except (ConnectionError, ssl.SSLError):
            ended = "reset"
    return parse_answer(raw, time.monotonic() - started, ended)
