"""What a client whose certificate is refused sees, through the real gateway, with real clients
(`openssl s_client`, curl, Python's ssl) on TLS 1.2 and TLS 1.3; and that a TLS session
resumed after a revocation or a CA change gets nothing.

Every refusal must name its reason (the TLS alert, or for a missing certificate an HTTP fault),
never look like an outage (an empty reply or a reset), and never reach the upstream, which
records everything it receives.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.demo.certs import DemoCerts, bundle_path, write_demo_certs
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
