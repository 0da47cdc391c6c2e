"""What a client whose certificate is refused sees, through the real gateway, with real clients
(`openssl s_client`, curl, Python's ssl) on TLS 1.2 and TLS 1.3; that a TLS session
resumed after a revocation or a CA change gets nothing; and that a TLS 1.3 client still
writing its request after the alert reads the alert, within bounds (TlsSite on asyncio and
uvloop).

Every refusal must name its reason (the TLS alert, or for a missing certificate an HTTP fault),
never look like an outage (an empty reply or a reset), and never reach the upstream, which
records everything it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.config.settings import TlsSettings
from gateway.demo.certs import DemoCerts, bundle_path, write_demo_certs
from gateway.edge.tls import LINGER_BYTES, HandshakeRefused, ReloadingContext, TlsSite
from tests.support import recording
from tests.support.recording import Seen, exchange
from tests.support.stack import Stack, StackFactory
from tests.support.tools import require

upstream, seen = recording.upstream, recording.seen

OMS_SUBMIT = "/sst/OMS/SubmitOutage_OMSv1_AP"
REQUEST = (
    f"POST {OMS_SUBMIT} HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/xml\r\n"
    "Content-Length: 0\r\n\r\n"
).encode()
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

# The bad demo certificates and the alert OpenSSL's server sends for each (RFC 8446 §6.2 names).
ALERTS = {
    "expired": "certificate expired",
    "notyet": "bad certificate",
    "otherca": "unknown ca",
    "selfsigned": "unknown ca",
    "revoked": "certificate revoked",
    "serveronly": "unsupported certificate",  # no clientAuth in its extended key usage
}


@pytest.fixture
def certs(tmp_path_factory: pytest.TempPathFactory) -> DemoCerts:
    """A set of this test's own: the revocation tests rewrite its CRL and CA files."""
    return write_demo_certs(tmp_path_factory.mktemp("certs"))


async def run(*args: str, stdin: bytes = b"", timeout: float = 20.0) -> tuple[int, str]:
    """Run a client program; (exit code, stdout and stderr together)."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{args[0]} did not finish within {timeout}s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def s_client(stack: Stack, version: str, kind: str | None) -> list[str]:
    """`openssl s_client` offering exactly `version`; -ign_eof: read until the server closes."""
    args = [require("openssl", package="openssl"), "s_client", "-connect"]
    args += [f"127.0.0.1:{stack.running.port}", "-servername", "localhost"]
    args += ["-CAfile", str(stack.certs.ca), f"-tls{version.replace('.', '_')}", "-ign_eof"]
    if kind is not None:
        cert, key = stack.certs.bad[kind]
        args += ["-cert", str(cert), "-key", str(key)]
    return args


def curl(stack: Stack, version: str, kind: str | None) -> list[str]:
    args = [require("curl", package="curl"), "-sS", "-v", "--max-time", "15"]
    args += ["--cacert", str(stack.certs.ca), f"--tlsv{version}", "--tls-max", version]
    args += ["-H", "Content-Type: text/xml", "--data-binary", "", f"{stack.url}{OMS_SUBMIT}"]
    if kind is not None:
        args += ["--cert", str(bundle_path(stack.certs.bad[kind][0]))]
    return args


def python_ssl(stack: Stack, version: str, kind: str | None) -> ssl.SSLContext:
    context = stack.ssl_for(kind)
    context.minimum_version = context.maximum_version = VERSIONS[version]
    return context


def python_exchange(port: int, context: ssl.SSLContext) -> bytes | OSError:
    """One request with Python's blocking ssl module: the answer, or the error that ended it."""
    answer = b""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            while chunk := tls.recv(65536):
                answer += chunk
    except OSError as exc:  # ssl.SSLError, ConnectionResetError, ...
        return exc
    return answer


def alert_reason(alert: str) -> str:
    """OpenSSL's reason code for a received alert: 'unknown ca' -> ..._ALERT_UNKNOWN_CA."""
    return "_ALERT_" + alert.upper().replace(" ", "_")


def refused(stack: Stack, reason: str) -> float:
    value = stack.running.metrics.registry.get_sample_value(
        "aup_tls_handshakes_refused_total", {"reason": reason}
    )
    return value or 0.0


# --- refused certificates: the alert names the reason ----------------------------------------


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_openssl_s_client_names_the_alert(
    stack_factory: StackFactory, seen: list[Seen], version: str
) -> None:
    stack = await stack_factory()
    for kind, alert in ALERTS.items():
        code, out = await run(*s_client(stack, version, kind), stdin=REQUEST)
        assert code != 0, out
        assert f"alert {alert}" in out, (kind, out)
        assert f"Protocol  : TLSv{version}" in out or f"TLSv{version}" in out
    assert refused(stack, "CERTIFICATE_VERIFY_FAILED") == len(ALERTS)
    assert seen == []


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_curl_names_the_alert(
    stack_factory: StackFactory, seen: list[Seen], version: str
) -> None:
    stack = await stack_factory()
    for kind, alert in ALERTS.items():
        code, out = await run(*curl(stack, version, kind))
        # 35: the handshake failed (TLS 1.2); 56: the alert came with the first read (TLS 1.3,
        # where the client's handshake is over before the server has checked its certificate);
        # 60: curl files "certificate expired" under verification. Never 52 (empty reply).
        assert code in (35, 56, 60), (kind, code, out)
        assert f"alert, {alert} (" in out.lower(), (kind, out)  # -v: "TLS alert, unknown CA (560)"
        if code != 60:
            assert f"alert {alert}" in out.splitlines()[-1], (kind, out)  # the error line
        assert "reset by peer" not in out and "Empty reply" not in out
    assert seen == []


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_python_ssl_raises_the_alert(
    stack_factory: StackFactory, seen: list[Seen], version: str
) -> None:
    stack = await stack_factory()
    for kind, alert in ALERTS.items():
        result = await asyncio.to_thread(
            python_exchange, stack.running.port, python_ssl(stack, version, kind)
        )
        assert type(result) is ssl.SSLError, (kind, result)  # not ConnectionResetError, not EOF
        assert result.reason is not None and result.reason.endswith(alert_reason(alert))
        assert alert in str(result)
    assert seen == []


# --- no certificate at all: an answer in the caller's protocol -------------------------------


async def test_no_certificate_gets_a_fault_saying_so_from_every_client(
    stack_factory: StackFactory, seen: list[Seen]
) -> None:
    stack = await stack_factory()
    for version in VERSIONS:
        code, out = await run(*curl(stack, version, None))
        assert code == 0, out
        assert "< HTTP/1.1 500 Internal Server Error" in out and "< Connection: close" in out
        assert "A client certificate is required" in out and "AUP-NO-CERTIFICATE" in out

        code, out = await run(*s_client(stack, version, None), stdin=REQUEST)
        assert (
            "HTTP/1.1 500 Internal Server Error" in out
            and "A client certificate is required" in out
        )

        answer = await asyncio.to_thread(
            python_exchange, stack.running.port, python_ssl(stack, version, None)
        )
        assert isinstance(answer, bytes) and answer.startswith(b"HTTP/1.1 500 ")
        assert b"<code>AUP-NO-CERTIFICATE</code>" in answer or b"AUP-NO-CERTIFICATE" in answer
    assert refused(stack, "PEER_DID_NOT_RETURN_A_CERTIFICATE") == 6
    assert seen == []


async def test_no_certificate_answers_one_request_and_forwards_none(
    stack_factory: StackFactory, seen: list[Seen]
) -> None:
    """Pipelined requests on a connection without a certificate: one fault, then it closes."""
    stack = await stack_factory(extra="limits: {max_connections_per_identity: 1}\n")
    anonymous = stack.ssl_for(None)
    answer = await exchange(stack.running.port, anonymous, REQUEST * 5)
    assert answer.status == 500 and answer.headers["connection"] == "close"
    assert answer.ended == "eof" and answer.body.count(b"AUP-NO-CERTIFICATE") >= 1
    assert b"HTTP/1.1" not in answer.body  # exactly one answer for the five requests

    # Connections without a certificate count against no one's cap, and the cap's own refusal
    # is no way in: jdoe's one allowed connection is served while anonymous ones are open.
    held = [
        await asyncio.open_connection(
            "127.0.0.1", stack.running.port, ssl=anonymous, server_hostname="localhost"
        )
        for _ in range(3)
    ]
    assert (await exchange(stack.running.port, stack.ssl_for(), REQUEST)).status == 200
    for reader, writer in held:
        writer.write(REQUEST)
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 500 ")
        writer.close()
    assert [s.path for s in seen] == [OMS_SUBMIT]  # jdoe's, and only jdoe's


# --- revocation holds: no resumed session --------------------------------------------------


def tls12_client(certs: DemoCerts, user: str = "jdoex1234") -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.load_cert_chain(*certs.clients[user])
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def connect(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[bool, bytes | OSError, ssl.SSLSession | None]:
    """(session_reused, the answer or the error, the session) for one request."""
    reused = False
    saved = None
    answer = b""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
        ):
            reused, saved = tls.session_reused, tls.session
            tls.sendall(REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            while chunk := tls.recv(65536):
                answer += chunk
    except OSError as exc:
        return reused, exc, saved
    return reused, answer, saved


def revoke(certs: DemoCerts, user: str) -> None:
    """Replace the CRL with one that also revokes `user`'s certificate (as the CA would)."""
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    old = x509.load_pem_x509_crl(certs.crl.read_bytes())
    cert = x509.load_pem_x509_certificate(certs.clients[user][0].read_bytes())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=7))
    )
    for entry in [
        *old,
        x509.RevokedCertificateBuilder()
        .serial_number(cert.serial_number)
        .revocation_date(now - dt.timedelta(minutes=1))
        .build(),
    ]:
        builder = builder.add_revoked_certificate(entry)
    replace_file(
        certs.crl, builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    )


def replace_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def test_a_saved_tls_1_2_session_is_never_resumed(
    stack_factory: StackFactory, seen: list[Seen]
) -> None:
    stack = await stack_factory()
    port, client = stack.running.port, tls12_client(stack.certs)
    reused, answer, session = await asyncio.to_thread(connect, port, client)
    assert not reused and isinstance(answer, bytes) and answer.startswith(b"HTTP/1.1 200 ")
    assert session is not None and session.has_ticket is False  # tickets are off
    reused, answer, _ = await asyncio.to_thread(connect, port, client, session)
    assert reused is False  # a full handshake: the certificate was verified again
    assert isinstance(answer, bytes) and answer.startswith(b"HTTP/1.1 200 ")
    assert len(seen) == 2


@pytest.mark.parametrize("change", ["crl", "ca"])
async def test_a_revoked_certificate_cannot_come_back_through_its_saved_session(
    stack_factory: StackFactory, seen: list[Seen], tmp_path: Path, change: str
) -> None:
    stack = await stack_factory()
    port, client = stack.running.port, tls12_client(stack.certs)
    _, answer, session = await asyncio.to_thread(connect, port, client)
    assert isinstance(answer, bytes) and answer.startswith(b"HTTP/1.1 200 ")
    if change == "crl":
        revoke(stack.certs, "jdoex1234")
        alert = "certificate revoked"
    else:  # the operator now trusts another CA only
        other = write_demo_certs(tmp_path / "other")
        replace_file(stack.certs.ca, other.ca.read_bytes())
        alert = "unknown ca"
    await stack.running.reload()  # what SIGHUP does
    reused, result, _ = await asyncio.to_thread(connect, port, client, session)
    assert reused is False
    assert type(result) is ssl.SSLError and alert in str(result), result
    assert len(seen) == 1  # the first call only


# --- a TLS 1.3 client that writes before it reads: the alert, within bounds -------------------
#
# Its handshake is over before the server has checked its certificate, so it writes its
# request while the alert is on its way. Were the connection closed on those bytes, its next
# writes would meet a reset, and a reset makes its kernel drop the unread alert: it would see
# "connection reset" or "broken pipe" (JAX-WS: "Error writing to server") and not the reason.

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@dataclass
class Refusing:
    """A TlsSite as the gateway runs it (a context per connection), behind an app that records
    every request that reaches it."""

    port: int = 0
    refused: list[HandshakeRefused] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    async def refusal(self) -> HandshakeRefused:
        for _ in range(2000):
            if self.refused:
                return self.refused.pop(0)
            await asyncio.sleep(0.01)
        raise AssertionError("the server did not report the refusal")


@contextlib.asynccontextmanager
async def refusing_site(
    certs: DemoCerts, *, linger: float, handshake_timeout: float
) -> AsyncIterator[Refusing]:
    site_state = Refusing()

    async def record(request: web.Request) -> web.Response:
        site_state.requests.append(request.path)
        return web.Response(text="answered")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        tls = TlsSettings(
            cert=certs.server, key=certs.server_key, client_ca=certs.ca, crl=certs.crl
        )
        site = TlsSite(
            runner,
            "127.0.0.1",
            0,
            ReloadingContext(tls).handshake_context,
            handshake_timeout=handshake_timeout,
            linger=linger,
            on_refused=site_state.refused.append,
        )
        await site.start()
        site_state.port = site.port
        yield site_state
    finally:
        await runner.cleanup()


def on_loop(loop: str, scenario: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(asyncio.wait_for(scenario, 60))


PAUSED_WRITES = 16  # the first writes only: the cut-off test sends 64 MiB


def tls13_expired(certs: DemoCerts) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.load_cert_chain(*certs.bad["expired"])
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_3
    return context


def write_then_read(port: int, context: ssl.SSLContext, body: int) -> tuple[int, bytes | OSError]:
    """Handshake, wait until the alert is on its way back, POST a `body`-byte request in 16 KiB
    writes, then read: (body bytes written, what the read returned or the error that ended
    the exchange). Each write lets the server see the one before (a short pause, so that the
    writes go on after the server has dealt with the first: what a client on a real network
    does); that is what a connection closed on the first bytes after the alert would reset."""
    written = 0
    chunk = b"x" * 16384
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=20) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            readable, _, _ = select.select([tls], [], [], 20)
            assert readable, "no alert within 20 s"
            tls.sendall(
                f"POST {OMS_SUBMIT} HTTP/1.1\r\nHost: localhost\r\n"
                f"Content-Length: {body}\r\n\r\n".encode()
            )
            while written < body:
                tls.sendall(chunk[: body - written])
                written += min(len(chunk), body - written)
                if written < PAUSED_WRITES * len(chunk):
                    time.sleep(0.005)
            return written, tls.recv(65536)
    except OSError as exc:  # ssl.SSLError, ConnectionResetError, BrokenPipeError, ...
        return written, exc


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_client_writing_its_request_after_the_alert_reads_the_alert(
    certs: DemoCerts, loop: str
) -> None:
    """200 KiB of request after the handshake, then a read: the alert, not a reset; nothing of
    it reaches the app, and the refusal keeps its reason."""

    async def scenario() -> None:
        # linger well above what 200 KiB over loopback takes, even on a loaded machine
        async with refusing_site(certs, linger=10.0, handshake_timeout=30.0) as site:
            written, result = await asyncio.to_thread(
                write_then_read, site.port, tls13_expired(certs), 200 * 1024
            )
            assert written == 200 * 1024, result
            assert type(result) is ssl.SSLError, result  # not ConnectionResetError, not EOF
            assert result.reason == "SSLV3_ALERT_CERTIFICATE_EXPIRED", result
            assert "certificate expired" in str(result)
            refusal = await site.refusal()
            assert (refusal.reason, refusal.detail) == (
                "CERTIFICATE_VERIFY_FAILED",
                "certificate has expired",
            )
            assert site.requests == []

    on_loop(loop, scenario())


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_client_that_keeps_writing_after_the_alert_is_cut_off(
    certs: DemoCerts, loop: str
) -> None:
    """Past LINGER_BYTES the connection is cut, long before the linger time or the handshake
    timeout (both a minute here): the gateway neither keeps nor reads without end what a
    refused client sends."""
    body = 64 * 1024 * 1024  # far more than LINGER_BYTES plus both kernels' socket buffers
    assert body // 64 > LINGER_BYTES

    async def scenario() -> None:
        async with refusing_site(certs, linger=60.0, handshake_timeout=60.0) as site:
            written, result = await asyncio.to_thread(
                write_then_read, site.port, tls13_expired(certs), body
            )
            assert written < body and isinstance(result, OSError), (written, result)
            refusal = await site.refusal()
            assert (refusal.reason, refusal.detail) == (
                "CERTIFICATE_VERIFY_FAILED",
                "certificate has expired",
            )
            assert site.requests == []

    on_loop(loop, scenario())


def stay_silent(port: int, context: ssl.SSLContext, until: threading.Event) -> bytes | OSError:
    """Handshake, then neither write nor close until `until` is set: what reading then gives."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=20) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            until.wait(30)
            return tls.recv(1024)
    except OSError as exc:
        return exc


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_silent_refused_client_is_let_go_after_the_linger_time(
    certs: DemoCerts, loop: str
) -> None:
    """A client that neither writes nor closes is closed and reported once `linger` passes,
    not only at the handshake timeout (a minute here), and still reads the alert."""

    async def scenario() -> None:
        async with refusing_site(certs, linger=0.2, handshake_timeout=60.0) as site:
            release = threading.Event()
            reading = asyncio.create_task(
                asyncio.to_thread(stay_silent, site.port, tls13_expired(certs), release)
            )
            try:
                refusal = await site.refusal()  # while the client still holds its connection
                assert not reading.done()
                assert (refusal.reason, refusal.detail) == (
                    "CERTIFICATE_VERIFY_FAILED",
                    "certificate has expired",
                )
            finally:
                release.set()
            result = await reading
            assert type(result) is ssl.SSLError and "certificate expired" in str(result), result

    on_loop(loop, scenario())
