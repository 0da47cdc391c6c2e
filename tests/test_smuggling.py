"""Request smuggling and answer mix-ups against the data plane's own HTTP/1.1 layer
(edge/connection.py): every ambiguous framing is refused with 400 before routing, nothing
written after it on the connection reaches an upstream, pipelined requests are answered in the
order they came, and over the shared upstream pool no identity ever receives an answer made
for another identity's call.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from tests.support import recording
from tests.support.recording import Seen, exchange
from tests.support.stack import OMS, SOAP11, Stack, StackFactory

# This module's upstream records every request it receives (see tests/support/recording.py).
upstream, seen = recording.upstream, recording.seen

SUBMIT = "/sst/oms/SubmitOutage_OMSv1_AP"  # no policy: forwarded whenever it is well-formed
# The request a smuggler hides behind the first one's framing: it must never reach an upstream.
SMUGGLED = b"GET /sst/oms/SMUGGLED HTTP/1.1\r\nHost: localhost\r\n\r\n"


def framed(headers: bytes, body: bytes) -> bytes:
    return (
        f"POST {SUBMIT} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {SOAP11}\r\n".encode()
        + headers
        + b"\r\n"
        + body
    )


@pytest.mark.parametrize(
    "headers, body",
    [
        # CL.TE and TE.CL: both framings at once
        (b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        (b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n", b"0\r\n\r\n" + SMUGGLED),
        # duplicate or invalid Content-Length
        (b"Content-Length: 4\r\nContent-Length: 4\r\n", b"<x/>" + SMUGGLED),
        (b"Content-Length: 4\r\nContent-Length: 60\r\n", b"<x/>" + SMUGGLED),
        (b"Content-Length: 4, 4\r\n", b"<x/>" + SMUGGLED),
        (b"Content-Length: +4\r\n", b"<x/>" + SMUGGLED),
        (b"Content-Length: -1\r\n", b"<x/>" + SMUGGLED),
        (b"Content-Length: 0x4\r\n", b"<x/>" + SMUGGLED),
        (b"Content-Length: 4 4\r\n", b"<x/>" + SMUGGLED),
        (b"Content-Length: 99999999999999999999999\r\n", b"<x/>" + SMUGGLED),
        # odd Transfer-Encoding spellings
        (b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        (b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n" + SMUGGLED),
        (b"Transfer-Encoding: identity\r\n", b"0\r\n\r\n" + SMUGGLED),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", b"0\r\n\r\n" + SMUGGLED),
        (b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        (b"Transfer-Encoding:\x0bchunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        (b"Transfer-Encoding\r\n : chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        # bare LF, bare CR and obs-fold in the head
        (b"Content-Length: 4\nX-A: b\r\n", b"<x/>" + SMUGGLED),
        (b"X-A: b\rContent-Length: 4\r\n", b"<x/>" + SMUGGLED),
        (b"X-A: b\r\n Content-Length: 60\r\nContent-Length: 4\r\n", b"<x/>" + SMUGGLED),
        (b"X-A: b\r\n\tTransfer-Encoding: chunked\r\nContent-Length: 4\r\n", b"<x/>" + SMUGGLED),
        # a chunk size that is not one
        (b"Transfer-Encoding: chunked\r\n", b"4;\x00\r\n<x/>\r\n0\r\n\r\n" + SMUGGLED),
        (b"Transfer-Encoding: chunked\r\n", b"-4\r\n<x/>\r\n0\r\n\r\n" + SMUGGLED),
    ],
)
async def test_ambiguous_framing_is_refused_and_nothing_behind_it_is_forwarded(
    stack_factory: StackFactory, seen: list[Seen], headers: bytes, body: bytes
) -> None:
    stack = await stack_factory(OMS)
    answer = await exchange(stack.running.port, stack.ssl_for(), framed(headers, body))
    assert answer.status == 400, answer.raw[:200]
    assert not answer.forwarded
    assert answer.headers.get("connection") == "close"
    # One answer: the smuggled request got none.
    assert len(re.findall(rb"HTTP/1\.\d \d{3} ", answer.raw)) == 1
    assert not seen, seen


async def test_a_bare_lf_request_line_is_refused(
    stack_factory: StackFactory, seen: list[Seen]
) -> None:
    stack = await stack_factory(OMS)
    answer = await exchange(
        stack.running.port,
        stack.ssl_for(),
        f"POST {SUBMIT} HTTP/1.1\nHost: localhost\nContent-Length: 0\n\n".encode(),
    )
    assert answer.status == 400 and not seen


async def test_pipelined_requests_are_answered_in_order_and_each_once(
    stack_factory: StackFactory, seen: list[Seen]
) -> None:
    stack = await stack_factory(OMS)
    paths = [f"{SUBMIT}?n={n}" for n in range(6)]
    data = b"".join(
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {SOAP11}\r\n"
        f"X-Mock-Delay: {0.05 * (5 - n):.2f}\r\nContent-Length: 4\r\n\r\n<x/>".encode()
        for n, path in enumerate(paths)
    )
    data += f"GET {SUBMIT}?n=last HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
    answer = await exchange(stack.running.port, stack.ssl_for(), data)
    echoed = [
        line.split(b":", 1)[1].strip().decode()
        for line in answer.raw.split(b"\r\n")
        if line.lower().startswith(b"x-echo-path:")
    ]
    assert echoed == [*paths, f"{SUBMIT}?n=last"]
    assert [request.path for request in seen] == echoed


async def test_no_identity_ever_receives_an_answer_made_for_another(
    stack_factory: StackFactory,
) -> None:
    """Two identities on many keep-alive connections share each application's upstream pool
    (a handful of upstream connections): every answer echoes the certificate of the call it
    answers, under random upstream delays that reorder the calls."""
    stack = await stack_factory(OMS, oms_extra=", pool_size: 2")
    users = ("jdoex1234", other_user(stack))

    async def calls(user: str, worker: int) -> list[tuple[str, str]]:
        mismatches = []
        client = stack.client(user)
        for n in range(15):
            tag = f"{user}-{worker}-{n}"
            async with client.post(
                f"{stack.url}{SUBMIT}?tag={tag}",
                data=b"<x/>",
                headers={
                    "Content-Type": SOAP11,
                    "X-Mock-Delay": f"{(worker * 7 + n) % 4 * 0.01:.2f}",
                },
            ) as response:
                await response.read()
                echoed = json.loads(response.headers["X-Echo-Headers"])
                xfcc = echoed.get("X-Forwarded-Client-Cert", "")
                if response.headers["X-Echo-Path"] != f"{SUBMIT}?tag={tag}" or user not in xfcc:
                    mismatches.append((tag, f"{response.headers['X-Echo-Path']} {xfcc[:80]}"))
        return mismatches

    results = await asyncio.gather(*(calls(user, w) for user in users for w in range(4)))
    assert not [m for result in results for m in result]


def other_user(stack: Stack) -> str:
    return next(name for name in stack.certs.clients if name != "jdoex1234")
