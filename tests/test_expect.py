"""`Expect: 100-continue` (RFC 9110 §10.1.1): the gateway decides before the body is sent.

An allowed call gets `100 Continue` at once and its body streams upstream (without `Expect`);
a refused one gets its final answer while the client still holds its body, and the connection
closes. Bodies are 2 MB SIBR bid sets, the size at which curl adds `Expect` by itself (curl,
Java's HttpClient and httpx with `Expect` are in test_clients.py).
"""

from __future__ import annotations

import asyncio
import json
import ssl

from gateway.edge.connection import GuardedServer
from gateway.errors import ErrorCode
from gateway.limiter.base import Decision, KeyState, Rate
from gateway.limiter.memory import MemoryLimiter
from tests.support.clients import (
    SIBR_PATH,
    SIBR_POLICY,
    SIBR_SUBMIT,
    TWO_MB,
    bid_set,
    policies,
    sha256,
)
from tests.support.recording import Answer, parse_answer
from tests.support.stack import Stack, StackFactory

HANG_GUARD = 20.0  # a missing answer fails the test instead of hanging it; never a measurement


def head(path: str, length: int, *extra: str, expect: bool = True) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: localhost",
        'Content-Type: text/xml; charset="utf-8"',
        f'SOAPAction: "http://www.caiso.com/soa/{SIBR_SUBMIT}"',
        f"Content-Length: {length}",
        *(["Expect: 100-continue"] if expect else []),
        *extra,
        "",
        "",
    ]
    return "\r\n".join(lines).encode("latin-1")


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANG_GUARD)


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One final response (with a Content-Length) off the connection."""
    raw = await read_head(reader)
    answer = parse_answer(raw, 0.0, "eof")
    length = int(answer.headers.get("content-length", "0"))
    answer.body = await asyncio.wait_for(reader.readexactly(length), HANG_GUARD)
    return answer


async def open_tls(stack: Stack) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", stack.running.port, ssl=stack.ssl_for(), server_hostname="localhost"
    )


def upstream_headers(answer: Answer) -> dict[str, str]:
    return {k.lower(): v for k, v in json.loads(answer.headers["x-echo-headers"]).items()}


async def test_an_allowed_call_gets_100_continue_before_it_sends_its_body(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory(policies(SIBR_POLICY))
    body = bid_set()
    reader, writer = await open_tls(stack)
    try:
        writer.write(head(SIBR_PATH, len(body)))
        await writer.drain()
        interim = await read_head(reader)  # nothing of the body has been sent yet
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        await writer.drain()
        answer = await read_answer(reader)
    finally:
        writer.close()
    assert answer.status == 200, answer.body[:500]
    assert answer.headers["x-echo-body-length"] == str(TWO_MB)
    assert answer.headers["x-echo-body-sha256"] == sha256(body)
    assert "expect" not in upstream_headers(answer)  # answered here, never passed on
    assert f"sha256 {sha256(body)}".encode() in answer.body


async def test_a_call_over_its_limit_gets_its_fault_while_the_client_holds_its_body(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory(policies(SIBR_POLICY))
    body = bid_set()
    reader, writer = await open_tls(stack)
    try:
        # The minute's one call, without Expect, on the same connection.
        writer.write(head(SIBR_PATH, len(body), expect=False) + body)
        first = await read_answer(reader)
        assert first.status == 200
        writer.write(head(SIBR_PATH, len(body)))  # the second: head only, body held back
        await writer.drain()
        fault = await read_answer(reader)  # the first thing back is final, not a 100
        assert fault.status == 500
        assert fault.headers["connection"] == "close"
        assert "retry-after" in fault.headers
        assert b"<faultstring>" in fault.body
        # A client that sends its body anyway is drained, not reset, and then let go.
        writer.write(body)
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), HANG_GUARD)
        assert rest == b""
    finally:
        writer.close()


async def test_every_refusal_before_forwarding_is_final_without_100_continue(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory(policies(SIBR_POLICY))
    for path, code in (
        ("/sst/NOPE/SubmitRawBidSet_SIBRv5_AP", ErrorCode.UNKNOWN_APPLICATION),
        ("/sst/sibr/SubmitRawBidSet_SIBRv5_AP/extra", ErrorCode.UNKNOWN_SERVICE),
    ):
        reader, writer = await open_tls(stack)
        try:
            writer.write(head(path, TWO_MB))
            await writer.drain()
            answer = await read_answer(reader)
        finally:
            writer.close()
        # A final answer (SOAP 1.1 faults travel on 500 or on the error's own status).
        assert answer.status is not None and answer.status >= 400, (path, answer.raw[:300])
        assert code.encode() in answer.body
        assert answer.headers["connection"] == "close"
        assert b"faultstring" in answer.body


async def test_a_body_over_max_body_is_refused_before_100_continue(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory(policies(SIBR_POLICY), extra="limits: {max_body: 1MiB}\n")
    reader, writer = await open_tls(stack)
    try:
        writer.write(head(SIBR_PATH, TWO_MB))
        await writer.drain()
        answer = await read_answer(reader)
    finally:
        writer.close()
    assert answer.status is not None and answer.status >= 400
    assert ErrorCode.BODY_TOO_LARGE.encode() in answer.body
    assert answer.headers["connection"] == "close"


async def test_a_service_read_from_the_body_gets_100_continue_first(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory(policies(SIBR_POLICY))
    body = bid_set()
    raw_head = head("/sst/sibr", len(body)).replace(
        f'SOAPAction: "http://www.caiso.com/soa/{SIBR_SUBMIT}"\r\n'.encode(), b""
    )
    reader, writer = await open_tls(stack)
    try:
        writer.write(raw_head)
        await writer.drain()
        assert await read_head(reader) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        await writer.drain()
        answer = await read_answer(reader)
    finally:
        writer.close()
    # Routed by the body's first element (the mock itself cannot tell the service without a
    # SOAPAction, so it answers its own fault; what matters is what reached it).
    assert answer.forwarded
    assert answer.headers["x-echo-body-sha256"] == sha256(body)
    assert "expect" not in upstream_headers(answer)


class SlowLimiter(MemoryLimiter):
    """A store that takes `delay` seconds per decision (a loaded Redis, a far replica)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def decide(self, key: str, rate: Rate, now: float | None = None) -> Decision:
        await asyncio.sleep(self.delay)
        return await super().decide(key, rate, now)

    async def peek(self, key: str, rate: Rate, now: float | None = None) -> KeyState:
        return await super().peek(key, rate, now)


async def test_the_body_deadline_waits_while_the_client_waits_for_100_continue(
    stack_factory: StackFactory,
) -> None:
    # The decision takes three read timeouts; a client that waits for 100 as it should must
    # not be cut off as a slow sender meanwhile.
    stack = await stack_factory(
        policies(SIBR_POLICY),
        extra="limits: {read_timeout: 500ms}\n",
        limiter=SlowLimiter(1.5),
    )
    body = bid_set(64 * 1024)
    reader, writer = await open_tls(stack)
    try:
        writer.write(head(SIBR_PATH, len(body)))
        await writer.drain()
        assert await read_head(reader) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        await writer.drain()
        answer = await read_answer(reader)
    finally:
        writer.close()
    assert answer.status == 200
    assert answer.headers["x-echo-body-sha256"] == sha256(body)
    server = stack.running._runners[0].server
    assert isinstance(server, GuardedServer)
    assert server.stats.body_timeouts == 0


async def test_the_body_deadline_runs_once_100_continue_is_sent(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory(policies(SIBR_POLICY), extra="limits: {read_timeout: 500ms}\n")
    reader, writer = await open_tls(stack)
    try:
        writer.write(head(SIBR_PATH, TWO_MB))
        await writer.drain()
        assert await read_head(reader) == b"HTTP/1.1 100 Continue\r\n\r\n"
        # ... and then never sends the body it announced.
        rest = await asyncio.wait_for(reader.read(), HANG_GUARD)
    except (ConnectionError, ssl.SSLError):
        rest = b""
    finally:
        writer.close()
    assert b"200 OK" not in rest
    server = stack.running._runners[0].server
    assert isinstance(server, GuardedServer)
    assert server.stats.body_timeouts == 1


async def test_an_http10_request_never_gets_100_continue(stack_factory: StackFactory) -> None:
    # RFC 9110 §15.2: no 1xx to an HTTP/1.0 client, whatever it put in Expect.
    stack = await stack_factory(policies(SIBR_POLICY))
    body = bid_set(64 * 1024)
    reader, writer = await open_tls(stack)
    try:
        writer.write(head(SIBR_PATH, len(body)).replace(b"HTTP/1.1\r\n", b"HTTP/1.0\r\n", 1) + body)
        await writer.drain()
        answer = await read_answer(reader)
    finally:
        writer.close()
    assert answer.raw.startswith(b"HTTP/1.0 200") or answer.raw.startswith(b"HTTP/1.1 200")
    assert answer.headers["x-echo-body-sha256"] == sha256(body)
