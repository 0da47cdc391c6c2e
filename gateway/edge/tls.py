"""The TLS layer: the server's mutual-TLS context, its reload from disk, and the listener that
says why a handshake was refused.

Three pieces, each usable alone:

- `server_ssl_context(tls)`: TLS 1.2+ (or 1.3 only), CERT_REQUIRED against the client CA bundle,
  the CRL checked for the client certificate when configured, ECDHE+AEAD ciphers.
- `ReloadingContext(tls)`: a stable `.context` to give to any asyncio server. An SNI callback
  (OpenSSL calls it on every ClientHello, with or without SNI) moves each new connection onto the
  newest context built from the files, so new handshakes use new files without a restart.
  OpenSSL's SSL_set_SSL_CTX takes the certificate, key and trust store (CA bundle and CRL) from
  the new context, but the verify mode, verify flags, protocol versions and ciphers were already
  copied from the outer context when the connection was created; that is why the outer context is
  built by the same function from the same settings, and why only file contents reload.
  `handshake_context()` gives each connection an outer context of its own, so that OpenSSL's
  server session cache (kept in that outer context, and impossible to turn off from Python)
  never resumes a session: every connection is verified against the current CA and CRL.
- `TlsSite`: an aiohttp site that accepts TCP itself, awaits each handshake and logs every
  refused one with its reason. asyncio and uvloop report a failed server-side
  handshake only in debug mode (an `ssl.SSLError` is an `OSError`, which they do not pass to the
  exception handler), so an exception handler or logging filter would never see it. With
  `AlertingSSLObject` (the contexts' `sslobject_class`) the refused client receives the TLS
  alert that names the reason instead of a bare close; after the alert the connection lingers
  (what the client still sends is read and dropped, up to `LINGER_BYTES`, for at most
  `linger` seconds) so that a TLS 1.3 client still writing its request is not reset, which
  would make its kernel discard the unread alert.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from cryptography import x509

from gateway.config.settings import TlsSettings
from gateway.errors import ConfigError

log = logging.getLogger("gateway.tls")

# TLS 1.2 suites only (TLS 1.3 suites are all AEAD with ephemeral keys and stay OpenSSL's).
DEFAULT_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """The mutual-TLS server context; raises ConfigError naming the file that is wrong."""
    for path in (tls.cert, tls.key, tls.client_ca, *([tls.crl] if tls.crl else [])):
        _check_readable(path)
    ctx = _policy_context(tls)
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            [f"{tls.cert}, {tls.key}: not a PEM certificate and its private key ({_why(exc)})"]
        ) from exc
    try:
        ctx.load_verify_locations(cafile=tls.client_ca)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError([f"{tls.client_ca}: not a PEM CA bundle ({_why(exc)})"]) from exc
    if tls.crl is not None:
        _check_crl(tls.crl)
        try:
            ctx.load_verify_locations(cafile=tls.crl)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError([f"{tls.crl}: not a PEM CRL ({_why(exc)})"]) from exc
    return ctx


def _policy_context(tls: TlsSettings) -> ssl.SSLContext:
    """Versions, options, ciphers and verification settings, without any file."""
    ctx = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    # No session tickets: a resumed session skips certificate verification, so a certificate
    # revoked after its first handshake could otherwise come back for hours.
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    try:
        ctx.set_ciphers(tls.ciphers or DEFAULT_CIPHERS)
    except ssl.SSLError as exc:
        raise ConfigError([f"tls.ciphers: {tls.ciphers!r} selects no cipher ({exc})"]) from exc
    ctx.verify_mode = ssl.CERT_REQUIRED
    if tls.crl is not None:
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def client_ssl_context(
    ca: Path,
    cert: Path | None = None,
    key: Path | None = None,
) -> ssl.SSLContext:
    """A client context that trusts `ca` and presents `cert` (with `key`, or a bundle) if given."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def _check_readable(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror or exc})"]) from exc


def _check_crl(path: Path) -> None:
    """OpenSSL would accept any PEM here and then refuse every client; say what is wrong now."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{path}: not a PEM CRL ({exc})"]) from exc
    expiry = crl.next_update_utc
    if expiry is not None and expiry < dt.datetime.now(dt.UTC):
        raise ConfigError(
            [
                f"{path}: the CRL expired at {expiry:%Y-%m-%d %H:%M:%S}Z (nextUpdate);"
                " every client certificate would be refused until it is renewed"
            ]
        )


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


FileStamp = tuple[tuple[int, int, int], ...]
# What a connection that presents no certificate gets: the TLS alert "certificate required", or
# a completed handshake and an HTTP answer that says so (only behind a GuardedServer).
MissingCertificate = Literal["alert", "answer"]


class ReloadingContext:
    """A stable server context whose new connections use the newest certificate, key, CA and CRL.

    The files are looked at, at most every `tls.reload_interval` seconds, when a handshake
    starts; `reload()` rebuilds at once (e.g. on SIGHUP). A reload that fails keeps the context
    that was working and logs why.
    """

    def __init__(
        self,
        tls: TlsSettings,
        clock: Callable[[], float] = time.monotonic,
        *,
        missing_certificate: MissingCertificate = "alert",
    ) -> None:
        self._tls = tls
        self._clock = clock
        self._missing = missing_certificate
        self._stamp = self._files_stamp()
        self._current = server_ssl_context(tls)
        self._checked = clock()
        self.context = self._outer(server_ssl_context(tls))

    def handshake_context(self) -> ssl.SSLContext:
        """A new outer context for one connection (what TlsSite asks for on each accept).

        OpenSSL keeps its server session cache in the context a connection was created with,
        and the SNI swap does not move it; Python has no way to turn that cache off. A context
        of its own per connection means no session is ever found, so every connection does a
        full handshake against the current CA and CRL: no resumed TLS 1.2 session outlives a
        revocation or a reload (tickets, and so TLS 1.3 resumption, are off already). It holds
        no files (the SNI callback brings them), so it is cheap: about 0.1 ms and 13 KB.
        """
        return self._outer(_policy_context(self._tls))

    def _outer(self, ctx: ssl.SSLContext) -> ssl.SSLContext:
        ctx.sni_callback = self._on_client_hello
        ctx.sslobject_class = AlertingSSLObject
        if self._missing == "answer":
            # A connection without a certificate completes its handshake, to be answered in
            # HTTP (connection.GuardedProtocol); a certificate that is presented is still
            # verified, and one that fails verification still ends the handshake with its alert.
            ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    @property
    def current(self) -> ssl.SSLContext:
        """The context built from the files as they were at the last successful (re)load."""
        return self._current

    def reload(self) -> bool:
        """Rebuild from the files now; True if new handshakes now use them."""
        self._stamp = self._files_stamp()
        try:
            self._current = server_ssl_context(self._tls)
        except Exception as exc:  # runs inside a handshake: whatever it is, keep serving
            log.error("tls reload failed, keeping the previous certificates: %s", exc)
            return False
        log.info(
            "tls reloaded: cert=%s client_ca=%s crl=%s",
            self._tls.cert,
            self._tls.client_ca,
            self._tls.crl,
        )
        return True

    def reload_if_changed(self) -> bool:
        """Rebuild if any file changed since the last look; True if the context was replaced."""
        self._checked = self._clock()
        return self._files_stamp() != self._stamp and self.reload()

    def _on_client_hello(
        self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, outer: ssl.SSLContext
    ) -> None:
        if self._clock() - self._checked >= self._tls.reload_interval:
            self.reload_if_changed()
        conn.context = self._current

    def _files_stamp(self) -> FileStamp:
        files = [self._tls.cert, self._tls.key, self._tls.client_ca]
        if self._tls.crl is not None:
            files.append(self._tls.crl)
        stamps = []
        for path in files:
            try:
                st = os.stat(path)
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamps.append((-1, -1, -1))  # missing counts as a change; the reload says why
        return tuple(stamps)


HANDSHAKE_TIMEOUT = "HANDSHAKE_TIMEOUT"
CLIENT_CLOSED = "CLIENT_CLOSED"  # the client hung up before finishing the handshake
NO_CERTIFICATE = "PEER_DID_NOT_RETURN_A_CERTIFICATE"  # OpenSSL's reason, also when answered
_OPENSSL_TEXT = re.compile(r"\] (.*?)(?: \(_ssl\.c:\d+\))?$")


@dataclass(frozen=True, slots=True)
class HandshakeRefused:
    peer: str  # host:port
    reason: str  # OpenSSL's reason code, e.g. CERTIFICATE_VERIFY_FAILED, or the error's name
    detail: str  # e.g. "certificate has expired"; never key material

    def __str__(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"tls handshake refused: peer={self.peer} reason={self.reason}{detail}"


def handshake_refusal(peer: str, exc: BaseException) -> HandshakeRefused:
    """Describe why a server-side handshake failed, from the exception that ended it."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return HandshakeRefused(
            peer, exc.reason or "CERTIFICATE_VERIFY_FAILED", exc.verify_message or ""
        )
    if isinstance(exc, ssl.SSLError):
        # strerror reads "[SSL: UNSUPPORTED_PROTOCOL] unsupported protocol (_ssl.c:992)"
        text = _OPENSSL_TEXT.search(exc.strerror or "")
        return HandshakeRefused(peer, exc.reason or type(exc).__name__, text[1] if text else "")
    # asyncio says ConnectionAbortedError("SSL handshake is taking longer than ..."); uvloop too
    if isinstance(exc, TimeoutError) or "taking longer" in str(exc):
        return HandshakeRefused(peer, HANDSHAKE_TIMEOUT, str(exc))
    if isinstance(exc, ConnectionError):
        return HandshakeRefused(peer, CLIENT_CLOSED, str(exc))
    return HandshakeRefused(peer, type(exc).__name__, str(exc))


OnRefused = Callable[[HandshakeRefused], None]


# A refused client may send this much after the alert (a TLS 1.3 client's request, written
# before it reads) before the connection is cut; it is read and dropped, never kept.
LINGER_BYTES = 256 * 1024


class _Refusing:
    """One handshake's refusal, shared between TlsSite._handshake, the context that wraps the
    connection's memory BIOs and the SSLObject."""

    __slots__ = ("discarded", "error", "incoming", "on_refused")

    def __init__(self, on_refused: Callable[[], object]) -> None:
        self.error: ssl.SSLError | None = None
        self.on_refused = on_refused
        self.incoming: ssl.MemoryBIO | None = None  # set by _ServerContext.wrap_bio
        self.discarded = 0

    def discard_incoming(self) -> bool:
        """Drop what the client sent since the refusal; False once it is more than LINGER_BYTES
        (or when the incoming BIO is unknown: then nothing is kept waiting either)."""
        if self.incoming is None:
            return False
        self.discarded += len(self.incoming.read())
        return self.discarded <= LINGER_BYTES


# Set by TlsSite._handshake for the handshake it awaits. asyncio and uvloop run a transport's
# protocol callbacks in a copy of the context the transport was made in, so the SSLObject sees
# its own connection's slot (a mutable object: the copies share it).
_refusing: contextvars.ContextVar[_Refusing] = contextvars.ContextVar("gateway_tls_refusing")


class AlertingSSLObject(ssl.SSLObject):
    """An SSLObject whose refused server handshake gets its TLS alert out to the client.

    When do_handshake fails, OpenSSL has already written the alert (certificate required,
    certificate expired, unknown CA, ...) to the outgoing memory BIO; asyncio's SSLProtocol and
    uvloop's copy of it then abort the transport without sending it, so the client sees only
    an empty reply or a reset. Inside a TlsSite handshake, the first failure is kept and
    reported as "want read" instead: the protocol flushes the outgoing BIO (the alert) to the
    socket and TlsSite half-closes it. Then the connection lingers: each later call drops what
    the client sent (read from the incoming BIO, never processed) and wants more, until the
    client closes (EOF), TlsSite's linger deadline or the handshake timeout passes, or more
    than LINGER_BYTES came: then the kept error is raised and the transport aborted. TlsSite
    reports the kept error however it ended. Outside a TlsSite handshake it behaves as a plain
    SSLObject.
    """

    def do_handshake(self) -> None:
        refusing = _refusing.get(None)
        if refusing is None:
            super().do_handshake()
            return
        if refusing.error is not None:
            if refusing.discard_incoming():
                raise ssl.SSLWantReadError("handshake refused; lingering after the alert")
            raise refusing.error
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            refusing.error = exc
            refusing.discard_incoming()  # e.g. a TLS 1.3 client's first request, already here
            refusing.on_refused()
            raise ssl.SSLWantReadError("handshake refused; the alert is being sent") from exc


class _ServerContext(ssl.SSLContext):
    """A server context that hands each connection's incoming memory BIO to the TlsSite
    handshake it belongs to, so that a refused connection can drop what the client sends after
    the alert instead of letting it pile up in the BIO. asyncio's and uvloop's SSLProtocol both
    make their SSLObject with this public method."""

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        refusing = _refusing.get(None)
        if refusing is not None:
            refusing.incoming = incoming
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


class TlsSite(web.BaseSite):
    """Like aiohttp's TCPSite with an ssl_context, but it accepts connections itself and awaits
    each handshake (`loop.connect_accepted_socket`), so a refused handshake is logged as one
    warning line and reported to `on_refused` (e.g. a metrics counter). A refused connection
    lingers after its alert for at most `linger` seconds (never beyond `handshake_timeout`)."""

    __slots__ = (
        "_contexts",
        "_handshake_timeout",
        "_host",
        "_linger",
        "_on_refused",
        "_port",
        "_reuse_port",
    )

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext],
        *,
        handshake_timeout: float = 10.0,
        linger: float = 1.0,
        on_refused: OnRefused | None = None,
        backlog: int = 128,
        reuse_port: bool = False,
    ) -> None:
        if isinstance(ssl_context, ssl.SSLContext):
            super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
            self._contexts: Callable[[], ssl.SSLContext] = lambda: ssl_context
        else:  # e.g. ReloadingContext.handshake_context: one per connection
            super().__init__(runner, backlog=backlog)
            self._contexts = ssl_context
        self._host = host
        self._port = port
        self._handshake_timeout = handshake_timeout
        self._linger = linger
        self._on_refused = on_refused
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port once started (useful with port 0), else the configured one."""
        return self._server.port if isinstance(self._server, _Listener) else self._port

    async def start(self) -> None:
        await super().start()
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.create_server(
            (self._host, self._port),
            family=family,
            backlog=self._backlog,
            reuse_port=self._reuse_port,
        )
        sock.setblocking(False)
        # BaseSite.stop() closes self._server, and runner.addresses lists its sockets.
        self._server = _Listener(sock, self._handshake)

    async def _handshake(self, conn: socket.socket, addr: Any) -> None:
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        lingering = asyncio.timeout(None)  # set when the alert is out
        refusing = _Refusing(lambda: self._after_alert(conn, lingering))
        _refusing.set(refusing)  # this task's context, copied into the transport's callbacks
        try:
            async with lingering:
                # The app's protocol is made, and sees the connection, only after the handshake.
                transport, _ = await loop.connect_accepted_socket(
                    server,
                    conn,
                    ssl=self._contexts(),
                    ssl_handshake_timeout=self._handshake_timeout,
                )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            # The kept error says why, not how the connection ended after the alert.
            self._refused(handshake_refusal(_peer(addr), refusing.error or exc))
            return
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and not ssl_object.getpeercert(binary_form=True):
            # verify_mode CERT_OPTIONAL: the connection is answered in HTTP, and counted here.
            self._refused(
                HandshakeRefused(
                    _peer(addr), NO_CERTIFICATE, "peer did not return a certificate; answered"
                )
            )

    def _after_alert(self, conn: socket.socket, lingering: asyncio.Timeout) -> None:
        """Send FIN once the alert is flushed, and stop lingering `linger` seconds from now.

        Closing at once would reset a TLS 1.3 client still writing its request (its handshake
        was over before the server saw its certificate): a reset makes the client's kernel
        drop what it had not read yet, the alert included, and the client then reports a
        failed write instead of the reason. Cancelling the handshake aborts the transport.
        """
        loop = asyncio.get_running_loop()
        loop.call_soon(_half_close, conn)
        lingering.reschedule(loop.time() + self._linger)

    def _refused(self, refusal: HandshakeRefused) -> None:
        # A TCP health check or port scan closes without a word: not worth a warning.
        level = logging.DEBUG if refusal.reason == CLIENT_CLOSED else logging.WARNING
        log.log(level, "%s", refusal)
        if self._on_refused is not None:
            self._on_refused(refusal)


def _half_close(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the transport: nothing to do
        conn.shutdown(socket.SHUT_WR)


class _Listener(asyncio.AbstractServer):
    """A listening socket, its accept loop, and the handshakes in progress."""

    def __init__(
        self,
        sock: socket.socket,
        handshake: Callable[[socket.socket, Any], Coroutine[Any, Any, None]],
    ) -> None:
        self._sock = sock
        self._handshake = handshake
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()  # strong refs: the loop holds tasks weakly
        self._accepting = self._loop.create_task(self._accept_forever())

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._sock.fileno() < 0 else (self._sock,)

    async def _accept_forever(self) -> None:
        while True:
            try:
                conn, addr = await self._loop.sock_accept(self._sock)
            except OSError as exc:  # e.g. out of file descriptors: back off as asyncio does
                log.error("accept failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            task = self._loop.create_task(self._handshake(conn, addr))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """Stop accepting and drop unfinished handshakes; established connections stay."""
        for task in (self._accepting, *self._tasks):
            task.cancel()
        self._sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(self._accepting, *self._tasks, return_exceptions=True)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return not self._accepting.done()

    async def start_serving(self) -> None:
        pass  # serves from construction

    async def serve_forever(self) -> None:
        await self._accepting


def _peer(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = f"[{addr[0]}]" if ":" in str(addr[0]) else str(addr[0])
        return f"{host}:{addr[1]}"
    return str(addr)
