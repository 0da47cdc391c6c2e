"""Property-based fuzzing of a running gateway over raw TLS sockets.

Hypothesis writes request bytes by hand: methods, request targets full of dot segments, encoded
separators and foreign applications, header blocks with forged identity headers, CR/LF injections,
oversized and duplicated framing headers, and bodies from random bytes to entity bombs. Each is
sent on its own TLS connection (blocking `ssl` sockets, from a worker thread, while the gateway
serves on the test's event loop). For every case:

- the answer is a well-formed HTTP/1.x response, or the connection closes without a byte;
- whatever reached an upstream is a call that jdoex1234 is provisioned for (OMS, SIBR, CRR),
  inside the application's prefix, on a known route, carrying exactly the gateway's identity
  headers and no client-sent variant of them;

and afterwards the gateway still serves a normal call and its RSS grew within bounds.
A summary (cases tried, answers by status) is printed (`pytest -s` shows it).
"""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
from collections import Counter
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.edge.identity import identity_from_der
from gateway.proxy.forward import HOP_BY_HOP, OWNED
from tests.support import recording
from tests.support.recording import Answer, Seen, exchange_sync
from tests.support.stack import StackFactory
from tests.test_security import (
    ACCESS,
    BILLION_LAUGHS,
    DRRS_RETRIEVE,
    OMS_RETRIEVE,
    QUADRATIC,
    XXE,
    soap_body,
    vmrss_kib,
)

# This module's upstream records every request it receives (see tests/support/recording.py).
upstream, seen = recording.upstream, recording.seen

EXAMPLES = 300
LIMITS = """\
limits:
  max_line_size: 4KiB
  max_header_size: 4KiB
  max_headers: 40
  max_body: 64KiB
  read_timeout: 300ms
  idle_timeout: 300ms
  max_connections_per_identity: 1000
"""
OWNED_FORWARDED = {
    "x-forwarded-client-cert": 1,
    "x-forwarded-for": 1,
    "x-forwarded-proto": 1,
    "x-request-id": 1,
}
SOAP_PATH = re.compile(r"^/sst/(oms|sibr)(/[A-Za-z0-9_.-]+)?/?$", re.IGNORECASE)
REST_PATHS = {"/auction/v1.0/portfolio", "/auction/v1.0/portfolio/", "/_mock/big"}
UPSTREAM_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}

# --- what hypothesis draws from -------------------------------------------------------------------

METHODS = st.one_of(
    st.sampled_from(
        [
            "GET",
            "POST",
            "POST",
            "POST",
            "PUT",
            "DELETE",
            "HEAD",
            "OPTIONS",
            "PATCH",
            "TRACE",
            "CONNECT",
            "PROPFIND",
            "PURGE",
            "get",
            "FOO",
            "G ET",
            "POST\x00",
            "A" * 300,
        ]
    ),
    st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ-_!"), min_size=1, max_size=12),
)
SEGMENTS = st.one_of(
    st.sampled_from(
        [
            "sst",
            "SST",
            "oms",
            "OMS",
            "sibr",
            "drrs",
            "DRRS",
            "cmri",
            "crr",
            "auction",
            "v1.0",
            "portfolio",
            "_mock",
            OMS_RETRIEVE,
            "SubmitOutage_OMSv1_AP",
            DRRS_RETRIEVE,
            "..",
            ".",
            "%2e%2e",
            "%2E",
            ".%2e",
            "%2f",
            "%5c",
            "..;",
            ";x=1",
            "%252e%252e",
            "%c0%ae%c0%ae",
            "%00",
            "%0d%0a",
            "",
            "evil",
            "~",
            "%",
            "%zz",
            "*",
            "\\..",
            "%2fsst%2fdrrs",
            "a b",
            "\u00e9",
            "#frag",
            "?",
            "&",
        ]
    ),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=10),
)
PREFIXES = st.sampled_from(
    [
        "/",
        "/",
        "/sst/",
        "/sst/",
        "/crr/",
        "//",
        "",
        "*",
        "http://evil.example/",
        "https://localhost/",
        "/sst/oms/../",
    ]
)
QUERIES = st.one_of(
    st.sampled_from(
        [
            "",
            "",
            "",
            "?",
            "?a=b",
            "?x=%0d%0aX-Injected:%20y",
            "?#frag",
            "?../../sst/drrs",
            "?a=%2f..%2f",
        ]
    ),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20).map(
        lambda q: "?" + q.replace("bytes", "b")
    ),  # no multi-gigabyte /_mock/big downloads
)
VERSIONS = st.sampled_from(
    [" HTTP/1.1"] * 8 + [" HTTP/1.0", " HTTP/2.0", "", " HTTP/1.1 x", " HTTP/1.1\r\n"]
)


def _name_variants() -> list[str]:
    names = []
    for name in sorted(OWNED):
        names += [name, name.upper(), name.replace("-", "_"), name.title().replace("-", "_")]
    return names


HEADER_NAMES = st.one_of(
    st.sampled_from(_name_variants()),
    st.sampled_from(
        [
            "Host",
            "Content-Type",
            "SOAPAction",
            "Transfer-Encoding",
            "Content-Length",
            "Connection",
            "Expect",
            "Upgrade",
            "TE",
            "Trailer",
            "Keep-Alive",
            "Proxy-Connection",
            "X-Custom",
            "Cookie",
            "Bad Name",
            "X-A\r\nX-Forwarded-Client-Cert",
            "",
            ":",
            "X-\u00e9",
        ]
    ),
    st.text(
        st.sampled_from("abcdefghijklmnopqrstuvwxyzABCXYZ-_0123456789"), min_size=1, max_size=20
    ),
)
FORGED = 'Hash=00;Subject="CN=victimx0001,OU=people,O=CAISO,C=US"'
HEADER_VALUES = st.one_of(
    st.sampled_from(
        [
            "",
            "evil",
            FORGED,
            "chunked",
            "gzip, chunked",
            "close",
            "keep-alive, X-Forwarded-For",
            "text/xml; charset=utf-8",
            "application/soap+xml",
            "multipart/related; boundary=b",
            "100-continue",
            "h2c",
            "0",
            "-1",
            "99999999999",
            "1e3",
            f'"urn:{OMS_RETRIEVE}"',
            f"http://www.caiso.com/soa/{DRRS_RETRIEVE}",
            "drrs.internal",
        ]
    ),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
    st.builds(
        lambda a, b: f"{a}\r\n{b}",
        st.sampled_from(["x", "1"]),
        st.sampled_from(
            [
                f"X-Forwarded-Client-Cert: {FORGED}",
                "Content-Length: 5",
                "",
                "Transfer-Encoding: chunked",
            ]
        ),
    ),
    st.integers(0, 6000).map(lambda n: "a" * n),
)
BODIES = st.one_of(
    st.just(b""),
    st.binary(max_size=2048),
    st.sampled_from(
        [
            BILLION_LAUGHS,
            QUADRATIC,
            XXE.format(port=9),
            soap_body("RetrieveX"),
            soap_body("SubmitOutage", "http://www.w3.org/2003/05/soap-envelope"),
            soap_body(DRRS_RETRIEVE),
            "<x/>",
            '{"a": 1}',
        ]
    ).map(str.encode),
    st.integers(60, 80).map(lambda k: soap_body("SubmitBig").encode() + b" " * k * 1024),
)
# Plausible pieces, drawn more often than the wild ones, so that many cases get past the
# parser into routing, the access list and forwarding, where the interesting checks are.
PLAUSIBLE_METHODS = st.sampled_from(["POST", "POST", "GET"])
PLAUSIBLE_TARGETS = st.sampled_from(
    [
        f"/sst/oms/{OMS_RETRIEVE}",
        "/sst/oms/SubmitOutage_OMSv1_AP",
        "/sst/OMS/RetrieveX_OMSv1_AP",
        "/sst/sibr/SubmitRawBidSet_SIBRv5_AP",
        f"/sst/drrs/{DRRS_RETRIEVE}",
        "/sst/cmri/RetrieveX",
        "/sst/oms",
        "/sst/oms/",
        "/sst/sibr",
        "/sst/drrs",
        "/crr/auction/v1.0/portfolio",
        "/crr/auction/v1.0/portfolio/",
        "/crr/auction/v1.0/other",
        "/crr",
        "/sst/nosuch/X",
        "/sst/oms/X/Y",
        "/healthz",
        "/",
    ]
)
SAFE_HEADERS = st.tuples(
    st.sampled_from(
        [
            "Content-Type",
            "SOAPAction",
            "X-Custom",
            "Accept",
            "User-Agent",
            "caiso-request-id",
            "Accept-Encoding",
            "Cookie",
        ]
    ),
    st.sampled_from(
        [
            "text/xml; charset=utf-8",
            "application/soap+xml; charset=utf-8",
            'multipart/related; type="text/xml"; boundary="b"',
            "application/json",
            f'"{OMS_RETRIEVE}"',
            f'"http://www.caiso.com/soa/{DRRS_RETRIEVE}"',
            '""',
            "*/*",
            "gzip",
            "x=1",
            "1234",
        ]
    ),
)
FORGED_HEADERS = st.tuples(
    st.sampled_from(_name_variants()), st.sampled_from([FORGED, "10.0.0.1", "forged", "https"])
)
HEADERS = st.integers(0, 7).flatmap(
    lambda n: (
        SAFE_HEADERS
        if n < 4
        else FORGED_HEADERS
        if n < 7
        else st.tuples(HEADER_NAMES, HEADER_VALUES)
    )
)
FRAMINGS = st.sampled_from(
    ["length"] * 8 + ["chunked"] * 3 + ["none"] * 2 + ["short", "bad-chunk", "long"]
)


@dataclass(frozen=True)
class Case:
    data: bytes
    label: str


@st.composite
def cases(draw: st.DrawFn) -> Case:
    # Each part is wild about one time in five, else plausible: a bad method or a missing Host
    # hides everything else in a request. (Hypothesis favours small integers: 0 is plausible.)
    def pick(plausible: st.SearchStrategy[str], wild: st.SearchStrategy[str]) -> str:
        return draw(wild if draw(st.integers(0, 9)) >= 8 else plausible)

    method = pick(PLAUSIBLE_METHODS, METHODS)
    target = pick(
        PLAUSIBLE_TARGETS,
        st.builds(
            lambda prefix, segments, query: prefix + "/".join(segments) + query,
            PREFIXES,
            st.lists(SEGMENTS, max_size=6),
            QUERIES,
        ),
    )
    lines = [f"{method} {target}{pick(st.just(' HTTP/1.1'), VERSIONS)}"]
    headers = draw(st.lists(HEADERS, max_size=8, unique_by=lambda header: header[0].lower()))
    if draw(st.integers(0, 9)) < 9:  # HTTP/1.1 requires it: mostly sent
        lines.append("Host: localhost")
    lines += [f"{name}: {value}" for name, value in headers]
    body = draw(BODIES)
    framing = draw(FRAMINGS)
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
    elif framing == "short":  # declares less than is sent: the rest is a bogus next request
        lines.append(f"Content-Length: {len(body) // 2}")
    elif framing == "long":  # declares more than is sent: only the read timeout ends it
        lines.append(f"Content-Length: {len(body) + 1}")
    elif framing in ("chunked", "bad-chunk"):
        lines.append("Transfer-Encoding: chunked")
        size = (
            f"{len(body):x}"
            if framing == "chunked"
            else draw(
                st.sampled_from(
                    ["-1", "zz", "fffffffffffffffffff", f"{len(body) + 7:x}", "1;ext=\x01"]
                )
            )
        )
        body = f"{size}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    lines += ["Connection: close", "", ""]
    data = "\r\n".join(lines).encode("utf-8", "surrogateescape") + body
    return Case(data, f"{method[:10]} {target[:60]} [{framing}]")


# --- what must hold -----------------------------------------------------------------------------


def upstream_problems(request: Seen, xfcc: str) -> list[str]:
    """Why a request that reached an upstream should not have (empty when it is fine)."""
    problems = []
    path = request.path.partition("?")[0]
    if request.method not in UPSTREAM_METHODS:
        problems.append(f"method {request.method!r}")
    if request.service == "soap" and not SOAP_PATH.match(path):
        problems.append(f"soap path {request.path!r}")
    if request.service == "rest" and path not in REST_PATHS:
        problems.append(f"rest path {request.path!r}")
    counts = Counter(name.lower().replace("_", "-") for name, _ in request.headers)
    for name in OWNED:
        if counts[name] != OWNED_FORWARDED.get(name, 0):
            problems.append(f"{counts[name]} x {name}")
    for name in HOP_BY_HOP - {"host", "content-length", "transfer-encoding"}:
        if counts[name]:
            problems.append(f"hop-by-hop {name}")
    if request.header("X-Forwarded-Client-Cert") != [xfcc]:
        problems.append(f"xfcc {request.header('X-Forwarded-Client-Cert')}")
    if request.header("X-Forwarded-For") != ["127.0.0.1"]:
        problems.append(f"xff {request.header('X-Forwarded-For')}")
    if any(not host.startswith("127.0.0.1:") for host in request.header("Host")):
        problems.append(f"host {request.header('Host')}")
    return problems


def outcome(answer: Answer) -> str:
    if answer.status is not None:
        return str(answer.status)
    if answer.closed_cleanly:
        return f"closed ({answer.ended})"
    return f"MALFORMED ({answer.ended}, {answer.raw[:40]!r})"


async def test_hostile_requests_get_well_formed_answers_and_reach_nothing_they_should_not(
    stack_factory: StackFactory, seen: list[Seen]
) -> None:
    stack = await stack_factory({"access.yaml": ACCESS}, extra=LIMITS)
    port, context = stack.running.port, stack.ssl_for("jdoex1234")
    xfcc = identity_from_der(
        ssl.PEM_cert_to_DER_cert(stack.certs.clients["jdoex1234"][0].read_text())
    ).xfcc
    answers: Counter[str] = Counter()
    failures: list[str] = []
    checked = 0
    lock = threading.Lock()
    rss_before = vmrss_kib()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(cases())
    def fuzz(case: Case) -> None:
        nonlocal checked
        answer = exchange_sync(port, context, case.data, timeout=5.0)
        with lock:
            result = outcome(answer)
            answers[result] += 1
            if result.startswith("MALFORMED") or answer.ended == "timeout":
                failures.append(f"{case.label}: {result}")
            for request in seen[checked:]:
                checked += 1
                problems = upstream_problems(request, xfcc)
                if problems:
                    failures.append(f"{case.label}: reached upstream: {problems}")

    await asyncio.to_thread(fuzz)
    tried = sum(answers.values())
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(answers.items()))
    rss_growth = vmrss_kib() - rss_before
    print(
        f"\nfuzz: {tried} hostile requests; answers: {summary}; "
        f"{len(seen)} reached an upstream; RSS growth {rss_growth} KiB"
    )

    assert not failures, failures[:20]
    assert tried >= EXAMPLES
    assert all(not upstream_problems(request, xfcc) for request in seen)
    # still serving, and memory did not run away (the gateway runs in this process)
    normal = (
        f"POST /sst/oms/{OMS_RETRIEVE} HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\n"
        "Content-Length: 4\r\nConnection: close\r\n\r\n<x/>"
    ).encode()
    after = await asyncio.to_thread(exchange_sync, port, context, normal)
    assert after.status == 200 and after.forwarded
    assert rss_growth < 150_000, rss_growth
