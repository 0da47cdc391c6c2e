"""The upstream HTTP/1.1 client (gateway/upstream/) against real servers on 127.0.0.1: the mock
market services for ordinary answers, and a bare asyncio server, scripted per test, for the odd
ones (stale keep-alive connections, 1xx, `Connection: close`, truncated or unparseable answers).

Each test runs on the standard asyncio loop and on uvloop, the gateway's loop in production: their
transports differ in flow control and in how writes go out.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
import uvloop

from gateway.demo.certs import DemoCerts
from gateway.demo.mock.echo import pattern_chunks
from gateway.demo.mock.server import MockUpstream, start_mock_upstream
from gateway.proxy.upstream import HIGH_WATER, UpstreamFailed, UpstreamPool, UpstreamTimeout
from tests.support.ports import free_port
from tests.support.stack import OMS, SOAP11, StackFactory

# --- a scripted raw upstream --------------------------------------------------------------------


@dataclass(frozen=True)
class RawRequest:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    chunked: bool


async def read_request(reader: asyncio.StreamReader) -> RawRequest | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"repeated {name}"
            headers[name.lower()] = value.strip()
    chunked = headers.get("transfer-encoding") == "chunked"
    if chunked:
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readexactly(2)
        body = b"".join(parts)
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return RawRequest(method, target, headers, body, chunked)


# (request, its index on its connection, writer) -> keep serving this connection?
Script = Callable[[RawRequest, int, asyncio.StreamWriter], Awaitable[bool]]


@dataclass
class RawUpstream:
    """Reads requests and lets the script answer; counts connections and what it saw."""

    script: Script
    port: int = 0
    accepted: int = 0
    open: int = 0
    most_open: int = 0
    eofs: int = 0  # connections the client closed
    requests: list[RawRequest] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            index = 0
            while (request := await read_request(reader)) is not None:
                self.requests.append(request)
                if not await self.script(request, index, writer):
                    return
                index += 1
            self.eofs += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()


def answer(body: bytes = b"ok", *extra: str, status: str = "200 OK") -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *extra, "", ""]
    return "\r\n".join(head).encode() + body


async def ok(request: RawRequest, index: int, writer: asyncio.StreamWriter) -> bool:
    writer.write(answer(f"{request.method} {request.target} #{index}".encode()))
    await writer.drain()
    return True


class Env:
    """What a scenario starts (raw upstreams, the mock services, pools), stopped after it."""

    def __init__(self) -> None:
        self._servers: list[asyncio.Server] = []
        self._mocks: list[MockUpstream] = []
        self._pools: list[UpstreamPool] = []

    async def raw(self, script: Script) -> RawUpstream:
        upstream = RawUpstream(script)
        server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
        self._servers.append(server)
        upstream.port = server.sockets[0].getsockname()[1]
        return upstream

    async def mock(self) -> MockUpstream:
        self._mocks.append(await start_mock_upstream("127.0.0.1", 0, 0))
        return self._mocks[-1]

    def pool(
        self,
        url: str,
        size: int = 10,
        connect_timeout: float = 2.0,
        read_timeout: float = 2.0,
        idle_timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> UpstreamPool:
        pool = UpstreamPool(
            url,
            size=size,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            idle_timeout=idle_timeout,
            ssl_context=ssl_context,
        )
        self._pools.append(pool)
        return pool

    async def close(self) -> None:
        for pool in self._pools:
            await pool.close()
        for mock in self._mocks:
            await mock.close()
        for server in self._servers:
            server.close()


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
Scenario = Callable[[Env], Awaitable[None]]


def on_both_loops(scenario: Scenario) -> Callable[[str], None]:
    """A test that runs `scenario` once on each loop, each run in a fresh Env."""

    async def within_env() -> None:
        env = Env()
        try:
            async with asyncio.timeout(30):
                await scenario(env)
        finally:
            await env.close()

    @pytest.mark.parametrize("loop", sorted(LOOPS))
    def test(loop: str) -> None:
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            runner.run(within_env())

    test.__name__ = test.__qualname__ = scenario.__name__
    test.__doc__ = scenario.__doc__
    return test


async def get(
    pool: UpstreamPool,
    target: str = "/",
    method: str = "GET",
    headers: tuple[tuple[str, str], ...] = (),
    body: bytes | AsyncIterator[bytes] | None = None,
    content_length: int | None = None,
) -> tuple[int, dict[str, str], bytes]:
    response = await pool.request(method, target, headers, body, content_length=content_length)
    data = await response.read_all()
    named = {name.decode().lower(): value.decode() for name, value in response.headers}
    return response.status, named, data


async def stream(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]
        await asyncio.sleep(0)


# --- keep-alive and the pool --------------------------------------------------------------------


@on_both_loops
async def test_sequential_requests_share_one_kept_alive_connection(env: Env) -> None:
    upstream = await env.raw(ok)
    pool = env.pool(upstream.url)
    for index in range(20):
        status, _, body = await get(pool, f"/a?i={index}")
        assert (status, body) == (200, f"GET /a?i={index} #{index}".encode())
    assert upstream.accepted == 1 and pool.connects == 1 and pool.open == pool.idle == 1
    # the request went out as given: the target raw, Host with the port, no framing without body
    first = upstream.requests[0]
    assert first.headers == {"host": f"127.0.0.1:{upstream.port}"}


@on_both_loops
async def test_requests_reach_the_mock_intact_with_bodies_buffered_and_streamed(env: Env) -> None:
    mock = await env.mock()
    pool = env.pool(mock.rest_url + "/")  # a trailing slash on the upstream is not doubled
    data = bytes(range(256)) * 8192  # 2 MiB
    digest = hashlib.sha256(data).hexdigest()
    cases: list[tuple[bytes | AsyncIterator[bytes], int | None, str]] = [
        (data[:1000], None, "1000"),
        (stream(data), None, "chunked"),
        (stream(data), len(data), str(len(data))),
    ]
    for body, length, framing in cases:
        status, headers, _ = await get(
            pool,
            "/_mock/echo?q=%2F&x=a%20b",
            "POST",
            (("X-Custom", "kept"), ("X-Custom", "twice")),
            body,
            length,
        )
        assert status == 200
        assert headers["x-echo-path"] == "/_mock/echo?q=%2F&x=a%20b"
        size = 1000 if framing == "1000" else len(data)
        assert headers["x-echo-body-length"] == str(size)
        assert headers["x-echo-body-sha256"] == (
            digest if size == len(data) else hashlib.sha256(data[:1000]).hexdigest()
        )
        echoed = headers["x-echo-headers"]
        assert '"X-Custom":"kept, twice"' in echoed
        assert ('"Transfer-Encoding":"chunked"' in echoed) == (framing == "chunked")
        assert (f'"Content-Length":"{framing}"' in echoed) == (framing != "chunked")
    # a POST without a body still says so
    status, headers, _ = await get(pool, "/_mock/echo", "POST")
    assert status == 200 and '"Content-Length":"0"' in headers["x-echo-headers"]
    assert pool.connects == 1


@on_both_loops
async def test_the_pool_never_opens_more_than_its_size_and_queues_the_rest(env: Env) -> None:
    async def slow(request: RawRequest, index: int, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.05)
        return await ok(request, index, writer)

    upstream = await env.raw(slow)
    pool = env.pool(upstream.url, size=3)
    results = await asyncio.gather(*(get(pool, f"/{n}") for n in range(15)))
    assert [status for status, _, _ in results] == [200] * 15
    assert upstream.most_open == 3 and upstream.accepted == 3 and pool.open == 3


@on_both_loops
async def test_waiting_for_a_free_connection_is_bounded_by_the_connect_timeout(env: Env) -> None:
    async def never(request: RawRequest, index: int, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(5)
        return False

    upstream = await env.raw(never)
    pool = env.pool(upstream.url, size=1, connect_timeout=0.2, read_timeout=5.0)
    busy = asyncio.create_task(pool.request("GET", "/", ()))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await pool.request("GET", "/", ())
    assert 0.15 < time.monotonic() - started < 1.0
    busy.cancel()
    with pytest.raises(asyncio.CancelledError):
        await busy
    assert pool.open == 0 or (pool.open == 1 and pool.idle == 0)  # the cancelled one is dropped


@on_both_loops
async def test_idle_connections_are_closed_after_the_idle_timeout(env: Env) -> None:
    upstream = await env.raw(ok)
    pool = env.pool(upstream.url, idle_timeout=0.2)
    await asyncio.gather(get(pool), get(pool))
    assert pool.idle == 2
    await asyncio.sleep(0.4)
    assert pool.idle == pool.open == 0 and upstream.eofs == 2
    assert (await get(pool))[0] == 200


# --- the upstream closing connections -----------------------------------------------------------


@on_both_loops
async def test_a_kept_alive_connection_closed_before_answering_is_retried_once_on_a_fresh_one(
    env: Env,
) -> None:
    # The keep-alive race: the upstream drops the idle connection just as the request arrives.
    async def second_dropped(request: RawRequest, index: int, writer: asyncio.StreamWriter) -> bool:
        if index == 1:
            return False  # closed without a byte of answer
        return await ok(request, index, writer)

    upstream = await env.raw(second_dropped)
    pool = env.pool(upstream.url)
    assert (await get(pool, "/one"))[0] == 200
    status, _, body = await get(pool, "/two", "POST", body=b"<x/>")  # buffered: replayable
    assert (status, body) == (200, b"POST /two #0")
    assert upstream.accepted == 2 and [r.target for r in upstream.requests] == [
        "/one",
        "/two",
        "/two",
    ]
    # a streamed body is gone once sent: no second attempt, the failure is reported
    with pytest.raises(UpstreamFailed):
        await get(pool, "/three", "POST", body=stream(b"abc"))
    assert upstream.accepted == 2
    # nor is a connection that was fresh retried
    fresh = await env.raw(lambda request, index, writer: asyncio.sleep(0, False))
    with pytest.raises(UpstreamFailed):
        await get(env.pool(fresh.url), "/x")
    assert fresh.accepted == 1


@on_both_loops
async def test_an_idle_connection_the_upstream_closes_leaves_the_pool(env: Env) -> None:
    async def answer_then_close(
        request: RawRequest, index: int, writer: asyncio.StreamWriter
    ) -> bool:
        await ok(request, index, writer)
        await asyncio.sleep(0.05)
        return False  # a keep-alive answer, then the close (an upstream's own idle timeout)

    upstream = await env.raw(answer_then_close)
    pool = env.pool(upstream.url)
    assert (await get(pool))[0] == 200
    await asyncio.sleep(0.2)
    assert pool.open == pool.idle == 0
    assert (await get(pool))[0] == 200 and upstream.accepted == 2


@on_both_loops
async def test_connection_close_is_honoured_even_if_the_upstream_keeps_the_socket_open(
    env: Env,
) -> None:
    async def says_close(request: RawRequest, index: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer(b"bye", "Connection: close"))
        await writer.drain()
        return True  # and goes on reading: the client must be the one to close

    upstream = await env.raw(says_close)
    pool = env.pool(upstream.url)
    for _ in range(3):
        assert (await get(pool))[2] == b"bye"
    await asyncio.sleep(0.05)
    assert upstream.accepted == 3 and upstream.eofs == 3 and pool.open == 0


@on_both_loops
async def test_an_answer_without_length_ends_with_the_close(env: Env) -> None:
    async def http10(request: RawRequest, index: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 100_000)
        await writer.drain()
        return False

    upstream = await env.raw(http10)
    pool = env.pool(upstream.url)
    response = await pool.request("GET", "/", ())
    assert response.content_length is None
    assert await response.read_all() == b"x" * 100_000
    assert pool.open == 0


# --- answers ------------------------------------------------------------------------------------


@on_both_loops
async def test_a_chunked_answer_is_dechunked_and_the_connection_reused(env: Env) -> None:
    async def chunked(request: RawRequest, index: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"hello ", b"chunked ", b"world"):
            writer.write(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\nX-Trailer: t\r\n\r\n")
        return True

    upstream = await env.raw(chunked)
    pool = env.pool(upstream.url)
    for _ in range(2):
        response = await pool.request("GET", "/", ())
        assert response.content_length is None
        received = []
        while chunk := await response.read():
            received.append(chunk)
        assert b"".join(received) == b"hello chunked world" and len(received) > 1
    assert upstream.accepted == 1


@on_both_loops
async def test_informational_answers_are_skipped(env: Env) -> None:
    async def hints(request: RawRequest, index: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
            + answer(b"final", "X-Final: 1", status="201 Created")
        )
        return True

    upstream = await env.raw(hints)
    pool = env.pool(upstream.url)
    for _ in range(2):
        response = await pool.request("POST", "/", (("Expect", "100-continue"),), b"body")
        assert (response.status, response.reason) == (201, "Created")
        assert [name for name, _ in response.headers] == [b"Content-Length", b"X-Final"]
        assert await response.read_all() == b"final"
    assert upstream.accepted == 1


@on_both_loops
async def test_head_answers_end_with_their_headers(env: Env) -> None:
    mock = await env.mock()
    pool = env.pool(mock.rest_url)
    for _ in range(3):
        response = await pool.request("HEAD", "/_mock/echo", ())
        assert response.status == 200 and response.complete
        length = response.content_length  # of the answer a GET would have had
        assert length is not None and length > 100 and await response.read_all() == b""
    assert (await get(pool, "/_mock/big?bytes=10"))[2] == bytes(range(10))
    assert pool.connects == 1

    # An upstream that sends a body after a HEAD answer anyway: that connection is not reused.
    async def rude(request: RawRequest, index: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer(b"body-that-should-not-be"))
        return True

    upstream = await env.raw(rude)
    pool = env.pool(upstream.url)
    assert (await pool.request("HEAD", "/", ())).status == 200
    await asyncio.sleep(0.05)
    assert (await pool.request("HEAD", "/", ())).status == 200
    assert upstream.accepted == 2


@on_both_loops
async def test_no_body_answers_204_and_304(env: Env) -> None:
    async def empty(request: RawRequest, index: int, writer: asyncio.StreamWriter) -> bool:
        status = "204 No Content" if index % 2 == 0 else "304 Not Modified"
        writer.write(f"HTTP/1.1 {status}\r\nETag: x\r\n\r\n".encode())
        return True

    upstream = await env.raw(empty)
    pool = env.pool(upstream.url)
    assert [(await get(pool))[0] for _ in range(4)] == [204, 304, 204, 304]
    assert upstream.accepted == 1


@on_both_loops
async def test_a_large_answer_streams_with_bounded_buffering_for_a_slow_reader(env: Env) -> None:
    total = 64 * 2**20
    sent = 0

    async def huge(request: RawRequest, index: int, writer: asyncio.StreamWriter) -> bool:
        nonlocal sent
        if request.target == "/small":
            return await ok(request, index, writer)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n".encode())
        for piece in pattern_chunks(total, 256 * 1024):
            writer.write(piece)
            await writer.drain()  # blocks once the client stops reading
            sent += len(piece)
        return True

    upstream = await env.raw(huge)
    pool = env.pool(upstream.url, read_timeout=0.3)
    response = await pool.request("GET", "/", ())
    assert response.content_length == total
    digest = hashlib.sha256(await response.read())
    await asyncio.sleep(0.5)  # a reader that stalls for longer than the read timeout
    # the client holds at most one read beyond the high-water mark; the rest waits in the
    # kernel's socket buffers and the upstream is held back
    assert response.buffered <= HIGH_WATER + 512 * 1024
    assert sent < total // 2
    while chunk := await response.read():
        digest.update(chunk)
    expected = hashlib.sha256(b"".join(pattern_chunks(total, 256 * 1024)))
    assert digest.hexdigest() == expected.hexdigest() and sent == total
    # a complete answer gives the connection back
    assert (await get(pool, "/small"))[0] == 200 and upstream.accepted == 1


@on_both_loops
async def test_a_streamed_request_body_respects_flow_control(env: Env) -> None:
    async def slow_reader(request: RawRequest, index: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer(hashlib.sha256(request.body).hexdigest().encode()))
        return True

    upstream = await env.raw(slow_reader)
    pool = env.pool(upstream.url)
    data = bytes(range(256)) * 32768  # 8 MiB, far more than any transport buffer
    status, _, body = await get(pool, "/up", "PUT", body=stream(data, 256 * 1024))
    assert (status, body) == (200, hashlib.sha256(data).hexdigest().encode())
    assert upstream.requests[0].chunked


# --- failures -----------------------------------------------------------------------------------


@on_both_loops
async def test_a_refused_connection_fails_fast_and_frees_its_place(env: Env) -> None:
    port = free_port()
    pool = env.pool(f"http://127.0.0.1:{port}", size=1)
    for _ in range(3):  # the failed attempt does not keep the pool's only place
        with pytest.raises(UpstreamFailed) as failed:
            await pool.request("GET", "/", ())
        assert not isinstance(failed.value, UpstreamTimeout)
    assert pool.open == 0


@on_both_loops
async def test_the_read_timeout_runs_between_bytes(env: Env) -> None:
    mock = await env.mock()
    pool = env.pool(mock.rest_url, read_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await pool.request("GET", "/_mock/slow?seconds=2", ())
    assert 0.25 < time.monotonic() - started < 1.0
    # slow but steady: 6 pieces 100 ms apart take longer than the timeout, and that is fine
    response = await pool.request("GET", f"/_mock/big?bytes={6 * 65536}&interval=0.1", ())
    started = time.monotonic()
    assert len(await response.read_all()) == 6 * 65536
    assert time.monotonic() - started > 0.4

    # stalled in the middle of the body: the reader gets the timeout
    async def stalls(request: RawRequest, index: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        await asyncio.sleep(3)
        return False

    upstream = await env.raw(stalls)
    pool = env.pool(upstream.url, read_timeout=0.3)
    response = await pool.request("GET", "/", ())
    assert await response.read() == b"x" * 1000
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await response.read()
    assert 0.2 < time.monotonic() - started < 1.0
    await asyncio.sleep(0.05)
    assert pool.open == 0


@on_both_loops
async def test_truncated_and_unparseable_answers_fail(env: Env) -> None:
    async def broken(request: RawRequest, index: int, writer: asyncio.StreamWriter) -> bool:
        if request.target == "/garbage":
            writer.write(b"SMTP ready\r\n\r\n")
        elif request.target == "/short":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        elif request.target == "/upgrade":
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n"
            )
        await writer.drain()
        await asyncio.sleep(0.05)
        return False

    upstream = await env.raw(broken)
    pool = env.pool(upstream.url)
    for target in ("/garbage", "/upgrade"):
        with pytest.raises(UpstreamFailed):
            await pool.request("GET", target, ())
    response = await pool.request("GET", "/short", ())
    assert response.status == 200
    with pytest.raises(UpstreamFailed):
        await response.read_all()
    await asyncio.sleep(0.05)
    assert pool.open == 0


@on_both_loops
async def test_a_line_break_in_the_head_is_refused_before_anything_is_sent(env: Env) -> None:
    upstream = await env.raw(ok)
    pool = env.pool(upstream.url)
    for headers in (
        (("X-Subject", "CN=a\r\nX-Forwarded-Client-Cert: forged"),),
        (("X-Subject", "a\rb"),),
        (("X-Sub\nject", "a"),),
    ):
        with pytest.raises(UpstreamFailed):
            await pool.request("GET", "/", headers)
    with pytest.raises(UpstreamFailed):
        await pool.request("GET", "/ HTTP/1.1\r\nX: y", ())
    assert upstream.accepted == 0


@on_both_loops
async def test_a_failing_request_body_drops_the_connection_and_surfaces_unchanged(env: Env) -> None:
    upstream = await env.raw(ok)
    pool = env.pool(upstream.url)

    async def breaks() -> AsyncIterator[bytes]:
        yield b"start"
        raise LookupError("the client's body broke")

    with pytest.raises(LookupError):
        await pool.request("POST", "/", (), breaks())
    await asyncio.sleep(0.05)
    assert pool.open == 0 and upstream.requests == []  # the half request was never answered


async def test_an_https_upstream_is_verified_and_kept_alive(certs: DemoCerts) -> None:
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(str(certs.server), str(certs.server_key))
    env = Env()
    upstream = RawUpstream(ok)
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0, ssl=server_side)
    port = server.sockets[0].getsockname()[1]
    try:
        trusting = ssl.create_default_context(cafile=str(certs.ca))
        pool = env.pool(f"https://localhost:{port}/base", ssl_context=trusting)
        for _ in range(3):
            assert (await get(pool, "/x?y=1"))[2].startswith(b"GET /base/x?y=1 #")
        assert upstream.accepted == 1 and upstream.requests[0].headers["host"] == (
            f"localhost:{port}"
        )
        # the system's trust store does not know the demo CA: refused at the handshake
        with pytest.raises(UpstreamFailed):
            await get(env.pool(f"https://localhost:{port}"))
    finally:
        await env.close()
        server.close()


# --- through the gateway ------------------------------------------------------------------------


async def test_the_gateway_keeps_one_upstream_connection_and_cuts_the_client_on_a_broken_answer(
    stack_factory: StackFactory,
) -> None:
    async def script(request: RawRequest, index: int, writer: asyncio.StreamWriter) -> bool:
        if "Broken" in request.target:  # promises 1 MB, sends 300 KB, closes
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 300_000)
            await writer.drain()
            return False
        writer.write(
            answer(b"<ok/>", "Content-Type: text/xml", "Connection: keep-alive", "X-Upstream: 1")
        )
        return True

    env = Env()
    upstream = await env.raw(script)
    stack = await stack_factory(OMS, oms_port=upstream.port)
    client = stack.client()
    for _ in range(5):
        response = await stack.soap(client, "oms", "SubmitOutage_OMSv1_AP")
        assert response.status == 200 and await response.read() == b"<ok/>"
        assert response.headers["X-Upstream"] == "1" and "X-Request-Id" in response.headers
        assert "Keep-Alive" not in response.headers
    assert upstream.accepted == 1
    seen = upstream.requests[0]
    assert seen.headers["host"] == f"127.0.0.1:{upstream.port}"
    assert seen.headers["content-type"] == SOAP11 and "x-forwarded-client-cert" in seen.headers

    with pytest.raises(
        (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, ssl.SSLError, ConnectionError)
    ):
        broken = await stack.soap(client, "oms", "SubmitBroken_OMSv1_AP")
        await broken.read()
    # and the gateway carries on
    assert (await stack.soap(stack.client(), "oms", "SubmitOutage_OMSv1_AP")).status == 200
    await env.close()
