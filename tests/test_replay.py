"""Rejections replayed on the same connection (proxy/replay.py): the same bytes as the handler's
answer (but for the request id and the times), every call still counted and recorded, a reset
policy's lockout still moved by each early retry, and the handler back in charge as soon as the
key is free, the policies change or the request is not the same whole request in one read.
"""

from __future__ import annotations

import asyncio
import re
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from gateway.limiter.base import Decision
from gateway.ops.ledger import Query
from gateway.proxy.app import Gateway
from gateway.proxy.faults import iso_time
from gateway.proxy.replay import Render, Templates
from tests.support.stack import DRRS, ENVELOPE, OMS, SOAP11, Stack, StackFactory

RETRIEVE = "/sst/oms/RetrieveCurrentOutages_OMSv1_AP"
VOLATILE = re.compile(
    rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"  # request ids
    rb"|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"  # SOAP creation times
    rb"|Date: [^\r]+"
)


def soap_call(path: str = RETRIEVE, extra: str = "") -> bytes:
    body = ENVELOPE.format(op=path.rsplit("/", 1)[1].split("_")[0]).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {SOAP11}\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Connection:
    """One keep-alive TLS connection: send bytes, read whole answers (Content-Length framed)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> tuple[int, dict[str, str], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if line)
        body = await self.reader.readexactly(int(headers["Content-Length"]))
        self.raw = head + body
        return int(lines[0].split()[1]), headers, body

    async def call(self, data: bytes) -> tuple[int, dict[str, str], bytes]:
        await self.send(data)
        return await self.answer()


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[Stack], Awaitable[Connection]]]:
    opened: list[asyncio.StreamWriter] = []

    async def open_one(stack: Stack) -> Connection:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", stack.running.port, ssl=stack.ssl_for(), server_hostname="localhost"
        )
        opened.append(writer)
        return Connection(reader, writer)

    yield open_one
    for writer in opened:
        writer.close()


async def refused_once(conn: Connection, call: bytes) -> Connection:
    """`conn` after `call` was allowed once, then refused by the handler (1 per 5 s)."""
    assert (await conn.call(call))[0] == 200
    assert (await conn.call(call))[0] == 500
    return conn


@pytest.fixture
def handled(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The request ids the handler (not a replay) answered."""
    seen: list[str] = []
    original = Gateway._handle

    async def counting(self: Gateway, request: Any, outcome: Any) -> Any:
        seen.append(outcome.request_id)
        return await original(self, request, outcome)

    monkeypatch.setattr(Gateway, "_handle", counting)
    return seen


def requests_counted(stack: Stack, decision: str) -> float:
    return (
        stack.running.metrics.registry.get_sample_value(
            "aup_requests_total",
            {
                "application": "OMS",
                "service": "RetrieveCurrentOutages_OMSv1_AP",
                "decision": decision,
            },
        )
        or 0.0
    )


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_replayed_rejection_is_the_handlers_answer_and_is_counted(
    stack_factory: StackFactory,
    connect: Callable[[Stack], Awaitable[Connection]],
    handled: list[str],
    store: str,
    request: pytest.FixtureRequest,
) -> None:
    url = request.getfixturevalue("redis_url") if store == "redis" else "memory://"
    stack = await stack_factory(OMS, store=url)
    conn = await connect(stack)
    status, _, _ = await conn.call(soap_call())
    assert status == 200
    status, first_headers, _ = await conn.call(soap_call())  # the handler's rejection
    first = conn.raw
    assert status == 500 and len(handled) == 2
    ids = {first_headers["X-Request-Id"]}
    for _ in range(10):
        status, headers, body = await conn.call(soap_call())
        assert status == 500
        # Byte for byte the handler's answer, but for the request id and the times ...
        assert VOLATILE.sub(b"*", conn.raw) == VOLATILE.sub(b"*", first)
        # ... and its own request id, in the header and twice in the detail.
        assert body.count(headers["X-Request-Id"].encode()) == 2
        ids.add(headers["X-Request-Id"])
    assert len(handled) == 2, "the repeated rejections were not replayed"
    assert len(ids) == 11
    assert requests_counted(stack, "rejected") == 11
    await stack.running.ledger.flush()
    entries = await stack.running.ledger.sink.read(Query())
    assert [e.count for e in entries] == [11]  # one episode, every rejection in it


async def test_a_reset_policys_replayed_retries_move_its_lockout(
    stack_factory: StackFactory,
    connect: Callable[[Stack], Awaitable[Connection]],
    handled: list[str],
) -> None:
    stack = await stack_factory(DRRS.format(per="2s"))
    conn = await connect(stack)
    call = soap_call("/sst/drrs/RetrieveDRLocations_DRRSv2_AP")
    assert (await conn.call(call))[0] == 200
    for _ in range(4):  # early retries for 1.5 s: each moves the lockout to 2 s after it
        status, headers, _ = await conn.call(call)
        assert status == 500 and headers["Retry-After"] == "2"
        await asyncio.sleep(0.5)
    assert len(handled) == 2  # the first call and the first rejection; the rest replayed
    # 2.1 s after the first rejection, but 0.9 s after the last retry: still locked
    status, headers, _ = await conn.call(call)
    assert status == 500 and headers["Retry-After"] == "2"
    await asyncio.sleep(2.3)
    status, _, _ = await conn.call(call)
    assert status == 200, "the replay must step aside once the key is free"
    assert len(handled) == 3


async def test_a_policy_reload_ends_the_replay(
    stack_factory: StackFactory,
    connect: Callable[[Stack], Awaitable[Connection]],
    handled: list[str],
) -> None:
    stack = await stack_factory(OMS)
    conn = await refused_once(await connect(stack), soap_call())
    assert (await conn.call(soap_call()))[0] == 500  # replayed
    assert len(handled) == 2
    (stack.folder / "policies" / "main.yaml").write_text(
        textwrap.dedent(OMS).replace("limit: 1", "limit: 100")
    )
    assert (await stack.running.reload()).ok
    assert (await conn.call(soap_call()))[0] == 200
    assert len(handled) == 3


async def test_only_the_same_whole_request_in_one_read_is_replayed(
    stack_factory: StackFactory,
    connect: Callable[[Stack], Awaitable[Connection]],
    handled: list[str],
) -> None:
    stack = await stack_factory(OMS)
    call = soap_call()
    conn = await refused_once(await connect(stack), call)
    assert len(handled) == 2
    # The body in a second read: the handler answers (at once, and then closes: the body was
    # not in when it answered).
    head = call[: call.index(b"\r\n\r\n") + 4]
    await conn.send(head)
    status, headers, _ = await conn.answer()
    assert status == 500 and headers["Connection"] == "close" and len(handled) == 3
    conn = await connect(stack)
    assert (await conn.call(call))[0] == 500
    assert (await conn.call(call))[0] == 500  # replayed
    assert len(handled) == 4
    # Two in one read (pipelined): both answered in order, by the handler.
    await conn.send(call + call)
    answers = [await conn.answer(), await conn.answer()]
    assert [a[0] for a in answers] == [500, 500] and len(handled) == 6
    # Another header: another request, for the handler (and then replayed in its turn).
    other = soap_call(extra='SOAPAction: ""\r\n')
    assert (await conn.call(other))[0] == 500
    assert (await conn.call(other))[0] == 500
    assert len(handled) == 7
    # A service not refused, on the same connection: forwarded.
    assert (await conn.call(soap_call("/sst/oms/SubmitOutage_OMSv1_AP")))[0] == 200


def test_a_template_is_used_only_when_two_renderings_agree() -> None:
    def render(extra: Callable[[str], bytes]) -> Render:
        def answer(decision: Decision, request_id: str) -> bytes:
            return (
                b"HTTP/1.1 500 Internal Server Error\r\nX-Request-Id: "
                + request_id.encode()
                + b"\r\nDate: Sat, 05 Dec 2026 15:00:00 GMT\r\n\r\n<id>%b</id><t>%b</t>%b"
                % (request_id.encode(), iso_time(decision.now).encode(), extra(request_id))
            )

        return answer

    templates = Templates()
    agreed = templates.get(("same", 5), render(lambda _: b"<wait>5</wait>"))
    assert agreed is not None
    filled = agreed % {b"i": b"ID", b"t": b"T", b"d": b"D"}
    assert filled == (
        b"HTTP/1.1 500 Internal Server Error\r\nX-Request-Id: ID\r\nDate: D\r\n\r\n"
        b"<id>ID</id><t>T</t><wait>5</wait>"
    )
    # Text that changes with something other than the id and the time (here, a marker-like
    # string that is not the id): never replayed.
    assert templates.get(("odd", 5), render(lambda rid: rid[-1:].encode())) is None


async def test_a_repeated_head_is_not_parsed_again_but_carries_its_own_body(
    stack_factory: StackFactory, connect: Callable[[Stack], Awaitable[Connection]]
) -> None:
    """The same head again, whole in one read, skips the parser (edge/connection.py `_repeat`):
    each call still reaches the upstream with its own body and gets its own answer."""

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read(), content_type="text/xml")

    app = web.Application()
    app.router.add_post("/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        stack = await stack_factory("policies: []\n", oms_port=runner.addresses[0][1])
        conn = await connect(stack)
        head = (
            f"POST {RETRIEVE} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {SOAP11}\r\n"
            "Content-Length: 8\r\n\r\n"
        ).encode()
        for body in (b"<a>1</a>", b"<b>2</b>", b"<c>3</c>", b"<a>1</a>"):
            status, _, answer = await conn.call(head + body)
            assert (status, answer) == (200, body)
        # A body that does not match the known length: parsed as usual, and framed by its head.
        await conn.send(head + b"<d>4</d><e>5</e>")
        status, _, answer = await conn.answer()
        assert (status, answer) == (200, b"<d>4</d>")
    finally:
        await runner.cleanup()


async def test_empty_lines_before_a_request_never_make_a_known_head(
    stack_factory: StackFactory, connect: Callable[[Stack], Awaitable[Connection]]
) -> None:
    """llhttp skips empty lines before a request line; a head taken from the first blank line
    would be just those, and a later read of them plus eight bytes would be made into the
    request seen before. The same bytes must mean to the gateway what they mean to llhttp."""
    stack = await stack_factory("policies: []\n")
    conn = await connect(stack)
    body = ENVELOPE.format(op="RetrieveCurrentOutages").encode()
    call = soap_call()
    assert (await conn.call(b"\r\n\r\n" + call))[0] == 200
    # The same blank lines and a body of the first call's length: no request for llhttp.
    await conn.send(b"\r\n\r\n" + b"X" * len(body))
    status, _, _ = await conn.answer()
    assert status == 400
