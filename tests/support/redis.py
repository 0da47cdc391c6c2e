"""A real redis-server for the tests: started on a free port, stoppable and restartable.

`redis_server` (session-scoped) is one server per test session, in its own temporary folder, with
persistence off. `stop()` kills it like a crash and `start()` brings it back on the same port, for
outage tests; `pause()` / `resume()` freeze it (SIGSTOP / SIGCONT), for a Redis that hangs rather
than refuses. `redis_url` (function-scoped) hands each test an empty, running server.
`RedisServer(..., tls=RedisTls(...))` is a TLS-only server requiring client certificates.

Without redis-server on PATH the tests that need it fail when CI is set, and skip otherwise.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.support.ports import free_port
from tests.support.tools import require


@dataclass(frozen=True)
class RedisTls:
    """Files for a TLS-only redis-server that also requires client certificates."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx


def redis_executable() -> str:
    return require("redis-server", package="redis-server")


class RedisServer:
    """One redis-server process on 127.0.0.1; the port survives restarts."""

    def __init__(self, executable: str, folder: Path, tls: RedisTls | None = None) -> None:
        self.executable = executable
        self.folder = folder
        self.tls = tls
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tls is None:
            return f"redis://127.0.0.1:{self.port}/0"
        return (
            f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.ca}"
            f"&ssl_certfile={self.tls.client_cert}&ssl_keyfile={self.tls.client_key}"
        )

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        log = self.folder / "redis.log"
        if self.tls is None:
            listen = ["--port", str(self.port)]
        else:
            listen = [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert),
                "--tls-key-file", str(self.tls.key),
                "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "yes",
            ]  # fmt: skip
        self._process = subprocess.Popen(
            [
                self.executable,
                *listen,
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.folder),
                "--logfile", str(log),
                "--daemonize", "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {log.read_text(errors='replace')}")
            if self._pong():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING within {timeout}s")

    def stop(self) -> None:
        """Kill the server as a crash would (SIGKILL, by PID) and wait for it to go."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        # SIGKILL first: it ends a stopped (paused) process too, whereas a SIGCONT first would
        # let a paused server answer the commands queued while it was frozen before it dies.
        process.kill()
        process.wait(timeout=10)

    def pause(self) -> None:
        """Freeze the server: connections stay open and nothing answers (a hung Redis)."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGCONT)

    def client(self) -> redis.Redis:
        """A plain synchronous client, for the tests' own inspection of the server."""
        if self.tls is None:
            return redis.Redis(port=self.port, socket_timeout=5)
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
                sock = raw
                if self.tls is not None:
                    sock = self.tls.context().wrap_socket(raw, server_hostname="127.0.0.1")
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(redis_executable(), tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of a running, empty redis-server (restarted if a previous test stopped it)."""
    if not redis_server.running:
        redis_server.start()
    else:
        redis_server.resume()
    with redis_server.client() as client:
        client.flushall()
        client.script_flush()
    return redis_server.url
