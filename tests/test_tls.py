"""Real mutual-TLS handshakes against a tiny aiohttp server built with gateway.tls (on asyncio,
and the main paths again on uvloop); plus the demo certificates that gateway.certs writes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import re
import shutil
import socket
import ssl
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web
from cryptography import x509

from gateway.config.settings import TlsSettings
from gateway.demo.certs import DemoCerts, bundle_path, write_demo_certs
from gateway.edge.identity import identity_from_der
from gateway.edge.tls import (
    CLIENT_CLOSED,
    HANDSHAKE_TIMEOUT,
    HandshakeRefused,
    MissingCertificate,
    ReloadingContext,
    TlsSite,
    client_ssl_context,
    server_ssl_context,
)
from gateway.errors import ConfigError

JDOE = "CN=jdoex1234,OU=people,O=CAISO,C=US"


def tls_settings(c: DemoCerts, **changes: Any) -> TlsSettings:
    return replace(
        TlsSettings(cert=c.server, key=c.server_key, client_ca=c.ca, crl=c.crl), **changes
    )


def client(c: DemoCerts, name: str | None = "jdoex1234") -> ssl.SSLContext:
    """A client trusting the demo CA, presenting a participant (or bad) certificate."""
    if name is None:
        return client_ssl_context(c.ca)
    cert, key = c.clients[name] if name in c.clients else c.bad[name]
    return client_ssl_context(c.ca, cert, key)


async def whoami(request: web.Request) -> web.Response:
    assert request.transport is not None
    tls = request.transport.get_extra_info("ssl_object")
    subject = identity_from_der(tls.getpeercert(binary_form=True)).subject
    return web.Response(text=f"{subject} {tls.version()} {tls.cipher()[0]}")


async def echo(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    async for chunk in request.content.iter_chunked(65536):
        await response.write(chunk)
    return response


@dataclass
class Server:
    port: int
    reloading: ReloadingContext
    refused: list[HandshakeRefused] = field(default_factory=list)

    async def get(self, ctx: ssl.SSLContext) -> str | None:
        """GET / over a fresh connection: the body on 200, None if the connection failed."""
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port, ssl=ctx)
            writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            response = await asyncio.wait_for(reader.read(), 5)
            writer.close()
        except (OSError, EOFError):  # TLS 1.3 clients learn of a refusal on their first read
            return None
        head, _, body = response.partition(b"\r\n\r\n")
        return body.decode() if head.startswith(b"HTTP/1.1 200") else None

    async def refusal(self) -> HandshakeRefused:
        for _ in range(200):
            if self.refused:
                return self.refused.pop(0)
            await asyncio.sleep(0.01)
        raise AssertionError("the server did not refuse the handshake")


@contextlib.asynccontextmanager
async def serving(
    tls: TlsSettings,
    clock: Callable[[], float] | None = None,
    handshake_timeout: float = 5.0,
    per_connection: bool = False,
    missing_certificate: MissingCertificate = "alert",
) -> AsyncIterator[Server]:
    """TlsSite with the stable context (or, `per_connection`, one context per connection as
    the gateway has it)."""
    app = web.Application()
    app.router.add_get("/", whoami)
    app.router.add_post("/echo", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        reloading = ReloadingContext(
            tls, clock or time.monotonic, missing_certificate=missing_certificate
        )
        server = Server(0, reloading)
        site = TlsSite(
            runner,
            "127.0.0.1",
            0,
            reloading.handshake_context if per_connection else reloading.context,
            handshake_timeout=handshake_timeout,
            on_refused=server.refused.append,
        )
        await site.start()
        server.port = site.port
        assert runner.addresses == [("127.0.0.1", site.port)]  # as with aiohttp's TCPSite
        yield server
    finally:
        await runner.cleanup()


Serve = Callable[..., Awaitable[Server]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    async with contextlib.AsyncExitStack() as stack:

        async def start(tls: TlsSettings, **kwargs: Any) -> Server:
            return await stack.enter_async_context(serving(tls, **kwargs))

        yield start


# --- who gets in ---------------------------------------------------------------------------


async def test_participant_certificate_is_accepted(serve: Serve, certs: DemoCerts) -> None:
    server = await serve(tls_settings(certs))
    body = await server.get(client(certs))
    assert body is not None and body.startswith(f"{JDOE} TLSv1.3 ")
    assert server.refused == []


async def test_keep_alive_and_large_bodies_after_the_handshake(
    serve: Serve, certs: DemoCerts
) -> None:
    """The site hands the connection to aiohttp after the handshake: HTTP works as usual."""
    server = await serve(tls_settings(certs))
    payload = os.urandom(3 * 2**20)
    connector = aiohttp.TCPConnector(ssl=client(certs), limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(3):
            async with session.post(f"https://127.0.0.1:{server.port}/echo", data=payload) as r:
                assert r.status == 200
                assert await r.read() == payload
    assert server.refused == []


@pytest.mark.parametrize(
    ("presented", "reason", "detail"),
    [
        (None, "PEER_DID_NOT_RETURN_A_CERTIFICATE", "peer did not return a certificate"),
        ("selfsigned", "CERTIFICATE_VERIFY_FAILED", "self-signed certificate"),
        ("otherca", "CERTIFICATE_VERIFY_FAILED", "unable to get local issuer certificate"),
        ("expired", "CERTIFICATE_VERIFY_FAILED", "certificate has expired"),
        ("notyet", "CERTIFICATE_VERIFY_FAILED", "certificate is not yet valid"),
        ("revoked", "CERTIFICATE_VERIFY_FAILED", "certificate revoked"),
        ("serveronly", "CERTIFICATE_VERIFY_FAILED", "unsuitable certificate purpose"),
    ],
)
async def test_bad_client_certificates_are_refused(
    serve: Serve, certs: DemoCerts, presented: str | None, reason: str, detail: str
) -> None:
    server = await serve(tls_settings(certs))
    assert await server.get(client(certs, presented)) is None
    refusal = await server.refusal()
    assert (refusal.reason, refusal.detail) == (reason, detail)
    assert refusal.peer.startswith("127.0.0.1:")


def blocking_exchange(
    port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[bool, bytes | OSError, ssl.SSLSession | None]:
    """(session_reused, the answer or the error that ended it, the session), with Python's
    blocking ssl module (run it in a thread)."""
    reused, saved, answer = False, None, b""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
        ):
            reused, saved = tls.session_reused, tls.session
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            while chunk := tls.recv(65536):
                answer += chunk
    except OSError as exc:
        return reused, exc, saved
    return reused, answer, saved


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize(
    ("presented", "alert"),
    [
        ("expired", "SSLV3_ALERT_CERTIFICATE_EXPIRED"),
        ("notyet", "SSLV3_ALERT_BAD_CERTIFICATE"),
        ("otherca", "TLSV1_ALERT_UNKNOWN_CA"),
        ("selfsigned", "TLSV1_ALERT_UNKNOWN_CA"),
        ("revoked", "SSLV3_ALERT_CERTIFICATE_REVOKED"),
        ("serveronly", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE"),
        (None, "ALERT_CERTIFICATE_REQUIRED"),  # TLS 1.3; TLS 1.2 has no such alert
    ],
)
async def test_the_client_receives_the_alert_and_the_refusal_keeps_its_reason(
    serve: Serve,
    certs: DemoCerts,
    presented: str | None,
    alert: str,
    version: ssl.TLSVersion,
) -> None:
    server = await serve(tls_settings(certs))
    _, result, _ = await asyncio.to_thread(
        blocking_exchange, server.port, only(version, client(certs, presented))
    )
    if presented is None and version == ssl.TLSVersion.TLSv1_2:
        alert = "SSLV3_ALERT_HANDSHAKE_FAILURE"
    assert type(result) is ssl.SSLError and result.reason is not None, result
    assert result.reason.endswith(alert)
    assert (await server.refusal()).reason != CLIENT_CLOSED


def stay_after_refusal(port: int, ctx: ssl.SSLContext) -> tuple[BaseException | None, bytes]:
    """Handshake, then neither send nor close: (the error reading ends with, what follows)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        try:
            tls.recv(1024)
        except ssl.SSLError as exc:
            return exc, socket.socket.recv(tls, 1024)  # the bare socket: b"" is the server's FIN
        return None, b"?"


async def test_a_refused_client_that_stays_is_closed_and_reported_with_the_reason(
    serve: Serve, certs: DemoCerts
) -> None:
    """A TLS 1.3 client is done with its handshake before the server checks its certificate:
    one that then neither sends nor closes still gets the alert and the server's close, and
    the refusal is reported with its reason, not as a timeout."""
    server = await serve(tls_settings(certs), handshake_timeout=0.5)
    ctx = only(ssl.TLSVersion.TLSv1_3, client(certs, "expired"))

    error, after = await asyncio.to_thread(stay_after_refusal, server.port, ctx)
    assert isinstance(error, ssl.SSLError) and "alert certificate expired" in str(error)
    assert after == b""
    refusal = await server.refusal()
    assert (refusal.reason, refusal.detail) == (
        "CERTIFICATE_VERIFY_FAILED",
        "certificate has expired",
    )


async def test_missing_certificate_answer_mode_completes_the_handshake_and_counts_it(
    serve: Serve, certs: DemoCerts
) -> None:
    """The handshake completes (the app must refuse the request: GuardedServer does); a
    certificate that is presented is still verified and refused with its alert."""
    server = await serve(tls_settings(certs), missing_certificate="answer")
    _, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=client(certs, None))
    refusal = await server.refusal()
    assert refusal.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert refusal.detail.endswith("answered")
    writer.close()
    _, result, _ = await asyncio.to_thread(blocking_exchange, server.port, client(certs, "revoked"))
    assert isinstance(result, ssl.SSLError) and "alert certificate revoked" in str(result)
    assert (await server.refusal()).detail == "certificate revoked"
    body = await server.get(client(certs))
    assert body is not None and body.startswith(JDOE)


async def test_no_tls_session_is_resumed_with_a_context_per_connection(
    serve: Serve, certs: DemoCerts
) -> None:
    """The stable context resumes a saved TLS 1.2 session (OpenSSL's session-id cache): the
    client does ask for it. With one context per connection there is no cache to find it in."""
    tls12 = only(ssl.TLSVersion.TLSv1_2, client(certs))
    for per_connection, resumed in [(False, True), (True, False)]:
        server = await serve(tls_settings(certs), per_connection=per_connection)
        _, answer, session = await asyncio.to_thread(blocking_exchange, server.port, tls12)
        assert isinstance(answer, bytes) and answer.startswith(b"HTTP/1.1 200")
        reused, answer, _ = await asyncio.to_thread(blocking_exchange, server.port, tls12, session)
        assert reused is resumed
        assert isinstance(answer, bytes) and answer.startswith(b"HTTP/1.1 200")


async def test_revoked_certificate_gets_in_without_the_crl(serve: Serve, certs: DemoCerts) -> None:
    """The CRL, not something else about the certificate, is what refuses it above."""
    server = await serve(tls_settings(certs, crl=None))
    body = await server.get(client(certs, "revoked"))
    assert body is not None and body.startswith(JDOE)


async def test_refusal_is_logged_with_peer_and_reason(
    serve: Serve, certs: DemoCerts, caplog: pytest.LogCaptureFixture
) -> None:
    server = await serve(tls_settings(certs))
    with caplog.at_level(logging.WARNING, logger="gateway.tls"):
        assert await server.get(client(certs, "expired")) is None
        await server.refusal()
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.tls"]
    assert len(lines) == 1
    assert re.fullmatch(
        r"tls handshake refused: peer=127\.0\.0\.1:\d+ "
        r"reason=CERTIFICATE_VERIFY_FAILED \(certificate has expired\)",
        lines[0],
    )


async def test_refused_handshakes_leak_no_file_descriptors(serve: Serve, certs: DemoCerts) -> None:
    server = await serve(tls_settings(certs))
    await server.get(client(certs, "expired"))  # warm up: lazily opened files
    await server.refusal()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        assert await server.get(client(certs, "otherca")) is None
        await server.refusal()
    await asyncio.sleep(0.05)  # closes are scheduled with call_soon
    assert len(os.listdir("/proc/self/fd")) <= before


# --- protocol versions and ciphers ---------------------------------------------------------


def only(version: ssl.TLSVersion, ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Let the client offer exactly `version`, even one that OpenSSL would not offer itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1 and TLSv1_1 are deprecated
        if version < ssl.TLSVersion.TLSv1_2:
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # the client's own policy refuses them
        ctx.minimum_version = version
        ctx.maximum_version = version
    return ctx


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
async def test_tls_below_1_2_is_refused_by_the_server(
    serve: Serve, certs: DemoCerts, version: ssl.TLSVersion
) -> None:
    server = await serve(tls_settings(certs))
    assert await server.get(only(version, client(certs))) is None
    # The reason comes from the server's side of the handshake: the client did offer it.
    assert (await server.refusal()).reason == "UNSUPPORTED_PROTOCOL"


async def test_openssl_s_client_with_tls_1_1_is_refused(serve: Serve, certs: DemoCerts) -> None:
    openssl = shutil.which("openssl")
    assert openssl, "the openssl command is needed for this test"
    server = await serve(tls_settings(certs))
    cert, key = certs.clients["jdoex1234"]
    proc = await asyncio.create_subprocess_exec(
        openssl,
        "s_client",
        "-connect",
        f"127.0.0.1:{server.port}",
        "-tls1_1",
        "-cipher",
        "DEFAULT:@SECLEVEL=0",
        "-cert",
        str(cert),
        "-key",
        str(key),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode != 0
    assert b"Protocol  : TLSv1.1" in out and b"Cipher is (NONE)" in out
    assert (await server.refusal()).reason == "UNSUPPORTED_PROTOCOL"


async def test_tls_1_2_client_gets_ecdhe_with_aead(serve: Serve, certs: DemoCerts) -> None:
    server = await serve(tls_settings(certs))
    body = await server.get(only(ssl.TLSVersion.TLSv1_2, client(certs)))
    assert body is not None
    _, version, cipher = body.rsplit(" ", 2)
    assert version == "TLSv1.2"
    assert cipher.startswith("ECDHE-ECDSA-") and ("GCM" in cipher or "CHACHA20" in cipher)


async def test_tls_1_2_client_with_only_cbc_ciphers_is_refused(
    serve: Serve, certs: DemoCerts
) -> None:
    server = await serve(tls_settings(certs))
    ctx = only(ssl.TLSVersion.TLSv1_2, client(certs))
    ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384")
    assert await server.get(ctx) is None
    assert (await server.refusal()).reason == "NO_SHARED_CIPHER"


async def test_min_version_1_3_refuses_a_1_2_client(serve: Serve, certs: DemoCerts) -> None:
    server = await serve(tls_settings(certs, min_version="1.3"))
    assert await server.get(only(ssl.TLSVersion.TLSv1_2, client(certs))) is None
    assert (await server.refusal()).reason == "UNSUPPORTED_PROTOCOL"
    body = await server.get(client(certs))
    assert body is not None and " TLSv1.3 " in body


# --- slow and confused clients -------------------------------------------------------------


async def test_silent_client_times_out_and_others_are_served(
    serve: Serve, certs: DemoCerts
) -> None:
    server = await serve(tls_settings(certs), handshake_timeout=0.3)
    _, silent = await asyncio.open_connection("127.0.0.1", server.port)
    assert await server.get(client(certs)) is not None  # served while the other one stalls
    refusal = await server.refusal()
    assert refusal.reason == HANDSHAKE_TIMEOUT
    silent.close()


async def test_plain_http_on_the_tls_port_is_refused(serve: Serve, certs: DemoCerts) -> None:
    server = await serve(tls_settings(certs))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert (await server.refusal()).reason == "HTTP_REQUEST"


async def test_client_hanging_up_is_reported_quietly(
    serve: Serve, certs: DemoCerts, caplog: pytest.LogCaptureFixture
) -> None:
    server = await serve(tls_settings(certs))
    with caplog.at_level(logging.WARNING, logger="gateway.tls"):
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.close()
        assert (await server.refusal()).reason == CLIENT_CLOSED
    assert [r for r in caplog.records if r.name == "gateway.tls"] == []


# --- reload --------------------------------------------------------------------------------


def install(source: DemoCerts, into: Path) -> DemoCerts:
    """Copy a set's server-side files (CA, server cert and key, CRL) into `into`."""
    into.mkdir(exist_ok=True)
    for path in (source.ca, source.server, source.server_key, source.crl):
        tmp = into / f".{path.name}.new"
        shutil.copyfile(path, tmp)
        os.replace(tmp, into / path.name)  # as a careful operator (or cert-manager) would
    return replace(
        source,
        ca=into / "ca.pem",
        server=into / "server.pem",
        server_key=into / "server-key.pem",
        crl=into / "crl.pem",
    )


@pytest.fixture(scope="module")
def second_certs(tmp_path_factory: pytest.TempPathFactory) -> DemoCerts:
    """A second, unrelated demo CA with its own server and participants."""
    return write_demo_certs(tmp_path_factory.mktemp("second-ca"))


async def test_reload_uses_new_files_for_new_handshakes(
    serve: Serve, certs: DemoCerts, second_certs: DemoCerts, tmp_path: Path
) -> None:
    live = install(certs, tmp_path / "live")
    now = [0.0]
    server = await serve(tls_settings(live, reload_interval=30.0), clock=lambda: now[0])
    assert await server.get(client(certs)) is not None

    install(second_certs, tmp_path / "live")
    now[0] = 29.0  # files are looked at no more often than reload_interval
    assert await server.get(client(certs)) is not None

    now[0] = 30.0
    second = client(second_certs)
    body = await server.get(second)  # second verifies the server by the new CA: new server cert
    assert body is not None and body.startswith(JDOE)
    old_user = client_ssl_context(second_certs.ca, *certs.clients["jdoex1234"])
    assert await server.get(old_user) is None
    assert (await server.refusal()).detail == "unable to get local issuer certificate"
    # the new CRL is enforced too (the verify flags live on the stable outer context)
    assert await server.get(client(second_certs, "revoked")) is None
    assert (await server.refusal()).detail == "certificate revoked"


async def test_broken_file_on_reload_keeps_the_old_context(
    serve: Serve, certs: DemoCerts, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    live = install(certs, tmp_path / "live")
    server = await serve(tls_settings(live, reload_interval=0.0))
    (tmp_path / "live" / "server.pem").write_text("-----BEGIN CERTIFICATE-----\nnonsense\n")
    with caplog.at_level(logging.ERROR, logger="gateway.tls"):
        assert await server.get(client(certs)) is not None  # this handshake saw the change
    assert any(
        "tls reload failed" in r.getMessage() and "server.pem" in r.getMessage()
        for r in caplog.records
    )
    assert server.reloading.reload() is False

    install(certs, tmp_path / "live")
    assert server.reloading.reload_if_changed() is True
    assert await server.get(client(certs)) is not None


async def test_plain_tcp_site_with_the_reloading_context(
    certs: DemoCerts, second_certs: DemoCerts, tmp_path: Path
) -> None:
    """The stable context also works on aiohttp's own TCPSite (without refusal logging)."""
    live = install(certs, tmp_path / "live")
    reloading = ReloadingContext(tls_settings(live))
    app = web.Application()
    app.router.add_get("/", whoami)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=reloading.context)
    await site.start()
    try:
        server = Server(site.port, reloading)
        assert await server.get(client(certs)) is not None
        install(second_certs, tmp_path / "live")
        assert reloading.reload() is True
        assert await server.get(client(certs)) is None
        assert await server.get(client(second_certs)) is not None
    finally:
        await runner.cleanup()


def test_main_paths_on_uvloop(certs: DemoCerts, second_certs: DemoCerts, tmp_path: Path) -> None:
    """The gateway may run on uvloop, whose TLS transport is its own: the same checks there."""

    async def scenario() -> None:
        live = install(certs, tmp_path / "live")
        async with serving(
            tls_settings(live, reload_interval=0.0), handshake_timeout=0.3, per_connection=True
        ) as server:
            assert (await server.get(client(certs)) or "").startswith(JDOE)
            # the alert reaches the client, and the refusal is reported with its reason
            for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
                ctx = only(version, client(certs, "expired"))
                _, result, _ = await asyncio.to_thread(blocking_exchange, server.port, ctx)
                assert isinstance(result, ssl.SSLError), result
                assert result.reason == "SSLV3_ALERT_CERTIFICATE_EXPIRED"
                assert (await server.refusal()).detail == "certificate has expired"
            _, result, _ = await asyncio.to_thread(
                blocking_exchange, server.port, client(certs, None)
            )
            assert isinstance(result, ssl.SSLError), result
            assert result.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
            assert (await server.refusal()).reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
            error, after = await asyncio.to_thread(
                stay_after_refusal,
                server.port,
                only(ssl.TLSVersion.TLSv1_3, client(certs, "revoked")),
            )
            assert isinstance(error, ssl.SSLError) and "alert certificate revoked" in str(error)
            assert after == b""
            assert (await server.refusal()).detail == "certificate revoked"
            # no saved TLS 1.2 session is resumed
            tls12 = only(ssl.TLSVersion.TLSv1_2, client(certs))
            _, _, session = await asyncio.to_thread(blocking_exchange, server.port, tls12)
            reused, answer, _ = await asyncio.to_thread(
                blocking_exchange, server.port, tls12, session
            )
            assert reused is False and isinstance(answer, bytes) and b" 200 " in answer
            for presented, detail in [
                ("expired", "certificate has expired"),
                ("revoked", "certificate revoked"),
            ]:
                assert await server.get(client(certs, presented)) is None
                assert (await server.refusal()).detail == detail
            assert await server.get(client(certs, None)) is None
            assert (await server.refusal()).reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
            assert await server.get(only(ssl.TLSVersion.TLSv1_1, client(certs))) is None
            assert (await server.refusal()).reason == "UNSUPPORTED_PROTOCOL"
            _, silent = await asyncio.open_connection("127.0.0.1", server.port)
            assert (await server.refusal()).reason == HANDSHAKE_TIMEOUT
            silent.close()
            install(second_certs, tmp_path / "live")
            assert await server.get(client(second_certs)) is not None
            assert (
                await server.get(client_ssl_context(second_certs.ca, *certs.clients["jdoex1234"]))
                is None
            )
            assert (await server.refusal()).detail == "unable to get local issuer certificate"

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)
        runner.run(scenario())


# --- configuration errors ------------------------------------------------------------------


def problems(tls: TlsSettings) -> str:
    with pytest.raises(ConfigError) as info:
        server_ssl_context(tls)
    return "\n".join(info.value.problems)


def test_missing_file_is_named(certs: DemoCerts, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    for key in ("cert", "key", "client_ca", "crl"):
        assert problems(tls_settings(certs, **{key: missing})) == (
            f"{missing}: cannot read (No such file or directory)"
        )


def test_wrong_contents_are_explained(certs: DemoCerts, tmp_path: Path) -> None:
    assert "KEY_VALUES_MISMATCH" in problems(tls_settings(certs, key=certs.ca_key))
    assert problems(tls_settings(certs, client_ca=certs.server_key)).startswith(
        f"{certs.server_key}: not a PEM CA bundle"
    )
    assert problems(tls_settings(certs, crl=certs.ca)).startswith(f"{certs.ca}: not a PEM CRL")
    assert problems(tls_settings(certs, ciphers="NOPE")).startswith("tls.ciphers: 'NOPE'")


def test_expired_crl_is_a_config_error(tmp_path: Path) -> None:
    old = write_demo_certs(tmp_path, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=31))
    assert "the CRL expired at" in problems(tls_settings(old))


# --- the demo certificates -----------------------------------------------------------------


def test_demo_certs_are_reused_while_usable(tmp_path: Path) -> None:
    first = write_demo_certs(tmp_path)
    ca = first.ca.read_bytes()
    assert write_demo_certs(tmp_path).ca.read_bytes() == ca
    # a CRL that would expire within a day, or a missing file, means a fresh set
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=29, hours=12)
    assert write_demo_certs(tmp_path, now=soon).ca.read_bytes() != ca
    ca = first.ca.read_bytes()
    first.bad["revoked"][1].unlink()
    assert write_demo_certs(tmp_path).ca.read_bytes() != ca
    assert first.bad["revoked"][1].is_file()


def test_demo_cert_files(certs: DemoCerts) -> None:
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    assert ca.subject.rfc4514_string() == "CN=AUP Gateway Demo CA,O=AUP Demo Market,C=US"
    for name, (cert_path, key_path) in certs.clients.items():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        assert cert.subject.rfc4514_string() == f"CN={name},OU=people,O=CAISO,C=US"
        assert bundle_path(cert_path).read_bytes() == (
            cert_path.read_bytes() + key_path.read_bytes()
        )
    keys = [
        certs.ca_key,
        certs.server_key,
        *(k for _, k in certs.clients.values()),
        *(bundle_path(c) for c, _ in certs.bad.values()),
    ]
    assert {oct(p.stat().st_mode & 0o777) for p in keys} == {"0o600"}
    crl = x509.load_pem_x509_crl(certs.crl.read_bytes())
    revoked = x509.load_pem_x509_certificate(certs.bad["revoked"][0].read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(revoked.serial_number) is not None
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
