"""Limits on input, each answered with the right status or a closed connection, never with
unbounded memory: request line, header size and count, body size per application (declared and
streamed), slow heads, stalled bodies, clients that stop reading, idle keep-alive connections,
and concurrent connections per identity.

Timeouts are configured short (read 500 ms, idle 1 s), so every deadline is measured, not slept
across: each test asserts when the connection ended, against the configured limit.
"""

from __future__ import annotations

import asyncio
import ssl
import time

from gateway.edge.connection import GuardedServer
from tests.support import recording
from tests.support.recording import Seen
from tests.support.stack import OMS, SOAP11, Stack, StackFactory
from tests.test_security import request_bytes, send, soap_body, vmrss_kib

READ_TIMEOUT = 0.5
IDLE_TIMEOUT = 1.0
LIMITS = f"""\
limits:
  max_line_size: 1KiB
  max_header_size: 2KiB
  max_headers: 20
  max_body: 64KiB
  read_timeout: {int(READ_TIMEOUT * 1000)}ms
  idle_timeout: {int(IDLE_TIMEOUT * 1000)}ms
  max_connections_per_identity: 2
"""
SIBR = "/sst/sibr/SubmitRawBidSet_SIBRv5_AP"
# A timer fires on the loop after its deadline; allow for that and a loaded test machine.
SLACK = 0.4

# This module's upstream records every request it receives (see tests/support/recording.py).
upstream, seen = recording.upstream, recording.seen


async def limited(stack_factory: StackFactory) -> Stack:
    return await stack_factory(OMS, extra=LIMITS, oms_extra=", max_body: 1KiB")


def guard(stack: Stack) -> GuardedServer:
    server = stack.running._runners[0].server
    assert isinstance(server, GuardedServer)
    return server


async def open_tls(
    stack: Stack,
    user: str = "jdoex1234",
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", stack.running.port, ssl=stack.ssl_for(user), server_hostname="localhost"
    )


async def read_one_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response with a Content-Length from a keep-alive connection: (status, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")
    )
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    return int(lines[0].split()[1]), body


async def until_closed(reader: asyncio.StreamReader, limit: float = 5.0) -> tuple[bytes, float]:
    """Everything the server still sends, and the monotonic time its side closed."""
    received = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), limit):
            received += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    return received, time.monotonic()


def keepalive_request(target: str = "/sst/oms/SubmitOutage_OMSv1_AP") -> bytes:
    return (
        f"POST {target} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {SOAP11}\r\n"
        "Content-Length: 4\r\n\r\n<x/>"
    ).encode()


# --- sizes --------------------------------------------------------------------------------------


async def test_request_line_header_size_and_count_have_their_own_statuses(
    stack_factory: StackFactory, seen: list[Seen]
) -> None:
    stack = await limited(stack_factory)
    long_line = await send(stack, request_bytes("POST", "/sst/oms/" + "A" * 1100))
    assert long_line.status == 414
    big_header = await send(
        stack, request_bytes("POST", "/sst/oms/SubmitOutage_OMSv1_AP", "X-Big: " + "a" * 2100)
    )
    assert big_header.status == 431 and b"HEADER-TOO-LARGE" in big_header.body
    many = await send(
        stack,
        request_bytes("POST", "/sst/oms/SubmitOutage_OMSv1_AP", *(f"X-{i}: a" for i in range(25))),
    )
    assert many.status == 431 and b"TOO-MANY-HEADERS" in many.body
    for answer in (long_line, big_header, many):
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert answer.ended == "eof"  # and the connection is closed
    assert seen == []
    # just under every limit passes
    ok = await send(
        stack,
        request_bytes(
            "POST",
            "/sst/oms/SubmitOutage_OMSv1_AP",
            "X-Big: " + "a" * 1900,
            *(f"X-{i}: a" for i in range(15)),
            body=b"<x/>",
        ),
    )
    assert ok.status == 200 and len(seen) == 1
    assert guard(stack).stats.bad_requests == 3


async def test_a_declared_body_over_the_applications_limit_is_413_before_it_is_read(
    stack_factory: StackFactory, seen: list[Seen]
) -> None:
    stack = await limited(stack_factory)
    # OMS allows 1 KiB, SIBR the default 64 KiB: the limit is per application
    small = soap_body("SubmitOutage").encode() + b" " * 1200
    assert (
        await send(stack, request_bytes("POST", SIBR, f"Content-Type: {SOAP11}", body=small))
    ).status == 200
    answer = await send(
        stack,
        request_bytes(
            "POST", "/sst/oms/SubmitOutage_OMSv1_AP", f"Content-Type: {SOAP11}", body=small
        ),
    )
    # SOAP 1.1 faults travel on 500 (the binding); the code names the error
    assert answer.status == 500 and b"1024 bytes" in answer.body
    assert b"<result>AUP-BODY-TOO-LARGE</result>" in answer.body

    # 10 GB declared, 3 bytes sent: answered at once, without reading; the connection is then
    # held only while the client keeps sending (a lingering close, so that the client reads the
    # 413 before the close), here until the read timeout, as the client went quiet
    started = time.monotonic()
    reader, writer = await open_tls(stack)
    writer.write(
        f"POST {SIBR} HTTP/1.1\r\nHost: x\r\nContent-Type: {SOAP11}\r\n"
        "Content-Length: 10000000000\r\n\r\nabc".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert time.monotonic() - started < READ_TIMEOUT
    assert head.startswith(b"HTTP/1.1 500 ") and b"Connection: close" in head
    _, closed = await until_closed(reader)
    writer.close()
    assert closed - started < READ_TIMEOUT + SLACK
    assert len(seen) == 1  # only the first, small call


async def test_a_chunked_body_is_counted_while_it_streams(
    stack_factory: StackFactory, seen: list[Seen]
) -> None:
    stack = await limited(stack_factory)
    before = vmrss_kib()
    statuses = []
    for _ in range(10):  # 10 x 5 MB offered against a 64 KiB limit
        chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"x" * 64 * 1024)
        data = (
            [
                f"POST {SIBR} HTTP/1.1\r\nHost: x\r\nContent-Type: {SOAP11}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n".encode()
            ]
            + [chunk] * 80
            + [b"0\r\n\r\n"]
        )
        answer = await send(stack, data)
        statuses.append(answer.status if answer.status else answer.ended)
        assert answer.status == 500 or answer.closed_cleanly, answer
        assert answer.status is None or b"AUP-BODY-TOO-LARGE" in answer.body
    assert statuses.count(500) >= 1, statuses
    assert vmrss_kib() - before < 30_000
    # whatever reached the upstream was cut short: no complete 5 MB body was ever forwarded
    assert all(request.path == SIBR for request in seen)


# --- slow clients -------------------------------------------------------------------------------


async def test_a_slowloris_head_is_cut_off_within_the_read_timeout(
    stack_factory: StackFactory,
) -> None:
    stack = await limited(stack_factory)
    reader, writer = await open_tls(stack)
    opened = time.monotonic()
    head = keepalive_request()

    async def trickle() -> None:
        for byte in head:  # one byte every 100 ms: the head would take ~9 s
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.1)

    sender = asyncio.create_task(trickle())
    received, closed = await until_closed(reader)
    sender.cancel()
    writer.close()
    assert READ_TIMEOUT - 0.05 <= closed - opened <= READ_TIMEOUT + SLACK, closed - opened
    assert received.startswith(b"HTTP/1.1 408 ")
    assert guard(stack).stats.head_timeouts == 1
    # everyone else is still served
    assert (
        await send(stack, request_bytes("POST", "/sst/oms/SubmitOutage_OMSv1_AP", body=b"<x/>"))
    ).status == 200


async def test_a_connection_that_never_sends_is_closed_after_the_read_timeout(
    stack_factory: StackFactory,
) -> None:
    stack = await limited(stack_factory)
    reader, writer = await open_tls(stack)
    opened = time.monotonic()
    received, closed = await until_closed(reader)
    writer.close()
    assert received == b""  # nothing was asked, nothing is answered
    assert READ_TIMEOUT - 0.05 <= closed - opened <= READ_TIMEOUT + SLACK


async def test_a_stalled_body_is_cut_off_and_a_trickling_one_is_not(
    stack_factory: StackFactory, seen: list[Seen]
) -> None:
    stack = await limited(stack_factory)
    reader, writer = await open_tls(stack)
    writer.write(
        f"POST {SIBR} HTTP/1.1\r\nHost: x\r\nContent-Type: {SOAP11}\r\n"
        "Content-Length: 1000\r\n\r\n0123456789".encode()
    )
    await writer.drain()
    stalled = time.monotonic()
    _, closed = await until_closed(reader)
    writer.close()
    assert READ_TIMEOUT - 0.05 <= closed - stalled <= READ_TIMEOUT + SLACK
    assert guard(stack).stats.body_timeouts == 1
    assert seen == []  # a small body is read whole before forwarding: nothing went upstream

    # 100 bytes every 200 ms for 2 s: slow, but never silent for a whole read timeout
    body = b"x" * 1000
    pieces = [
        f"POST {SIBR} HTTP/1.1\r\nHost: x\r\nContent-Type: {SOAP11}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
    ]
    pieces += [body[i : i + 100] for i in range(0, len(body), 100)]
    answer = await send(stack, pieces, pause=0.2)
    assert answer.status == 200 and answer.headers["x-echo-body-length"] == "1000"


async def test_a_client_that_stops_reading_is_cut_off(stack_factory: StackFactory) -> None:
    stack = await limited(stack_factory)
    size = 512 * 2**20
    reader, writer = await open_tls(stack)
    writer.write(f"GET /crr/_mock/big?bytes={size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    sent = time.monotonic()
    while guard(stack).stats.send_timeouts == 0 and time.monotonic() - sent < 5:
        await asyncio.sleep(0.05)  # read nothing: the socket buffers fill, sending stalls
    # the buffers fill within moments; from then on one read timeout without progress
    assert guard(stack).stats.send_timeouts == 1 and time.monotonic() - sent < 3
    received, _ = await until_closed(reader, limit=2.0)
    writer.close()
    assert len(received) < 64 * 2**20  # what the buffers held, not the 512 MB answer
    assert (await send(stack, request_bytes("GET", "/crr/auction/v1.0/portfolio"))).status == 200


async def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(
    stack_factory: StackFactory,
) -> None:
    stack = await limited(stack_factory)
    reader, writer = await open_tls(stack)
    for _ in range(2):  # the connection is reused while it is busy
        writer.write(keepalive_request())
        status, _ = await read_one_response(reader)
        assert status == 200
    answered = time.monotonic()
    received, closed = await until_closed(reader)
    writer.close()
    assert received == b""
    assert IDLE_TIMEOUT - 0.05 <= closed - answered <= IDLE_TIMEOUT + 1.0 + SLACK


# --- connections per identity -------------------------------------------------------------------


async def test_concurrent_connections_per_identity_are_capped(stack_factory: StackFactory) -> None:
    stack = await limited(stack_factory)
    held = []
    for _ in range(2):  # the cap: two connections, both in use
        reader, writer = await open_tls(stack)
        writer.write(keepalive_request())
        assert (await read_one_response(reader))[0] == 200
        held.append((reader, writer))

    reader, writer = await open_tls(stack)  # the third is answered 429 and closed
    writer.write(keepalive_request())
    status, body = await read_one_response(reader)
    assert status == 500 and b"TOO-MANY-CONNECTIONS" in body  # a SOAP 1.1 fault: 500
    assert (await until_closed(reader))[0] == b""
    writer.close()
    assert guard(stack).stats.refused_connections == 1

    # another identity is not affected
    assert (
        await send(
            stack,
            request_bytes("POST", "/sst/oms/SubmitOutage_OMSv1_AP", body=b"<x/>"),
            user="asmithx5678",
        )
    ).status == 200
    # closing one frees a place (well before the idle timeout could have closed it)
    held[0][1].close()
    jdoe = "CN=jdoex1234,OU=people,O=CAISO,C=US"
    for _ in range(25):
        if guard(stack).open_connections(jdoe) < 2:
            break
        await asyncio.sleep(0.02)
    assert guard(stack).open_connections(jdoe) == 1
    assert (
        await send(stack, request_bytes("POST", "/sst/oms/SubmitOutage_OMSv1_AP", body=b"<x/>"))
    ).status == 200
    for _, writer in held[1:]:
        writer.close()
