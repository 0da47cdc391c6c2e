"""Real gateway processes sharing one store: N replicas of `aup-gateway serve` behind free ports.

`ReplicaSet(certs, folder, store=..., policies=..., offsets=...)` writes one gateway.yaml per
replica (like tests/support/stack.py's CONFIG, with the access log off and the admin listener on
a known free port) and the policy files, starts the mock market services as one more process
(`aup-gateway mock-upstream`) and each replica as its own process through
tests/support/skewed_gateway.py, whose wall clock is moved by that replica's offset. `start()`
returns once every replica completes a mutual-TLS handshake; `stop()` ends each process by PID
(SIGTERM, then SIGKILL). Being processes, the set does not depend on a test's event loop, so a
module can share one.

`Caller` is one participant's HTTPS client for the whole set: `soap(replica, app, service)`
times the call and tells an AUP fault from a forwarded answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.demo.certs import DemoCerts
from tests.support.ports import free_port
from tests.support.stack import ENVELOPE, SOAP11

ROOT = Path(__file__).resolve().parents[2]

# Short store timeouts, as an operator tuning for a local Redis would set them; the outage
# tests hold the gateway to them.
STORE_OPTIONS = {"timeout": "50ms", "connect_timeout": "250ms", "breaker_cooldown": "200ms"}

CONFIG = """\
listen: {{host: 127.0.0.1, port: {port}}}
tls:
  cert: {certs.server}
  key: {certs.server_key}
  client_ca: {certs.ca}
  crl: {certs.crl}
store:
  url: "{store}"
{store_options}
on_store_error: local
admin: {{host: 127.0.0.1, port: {admin_port}}}
drain_timeout: 1s
policies: {policies}
access_log: false
applications:
  OMS:  {{upstream: "http://127.0.0.1:{soap}", protocol: soap}}
  DRRS: {{upstream: "http://127.0.0.1:{soap}", protocol: soap}}
  SIBR: {{upstream: "http://127.0.0.1:{soap}", protocol: soap}}
  CMRI: {{upstream: "http://127.0.0.1:{soap}", protocol: soap}}
"""


@dataclass
class Replica:
    """One gateway process."""

    index: int
    port: int
    admin_port: int
    clock_offset: float
    folder: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def log(self) -> Path:
        return self.folder / "gateway.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class ReplicaSet:
    certs: DemoCerts
    folder: Path
    store: str
    policies: str | dict[str, str]
    offsets: Sequence[float] = (0.0, 0.0)
    store_options: dict[str, str] = field(default_factory=lambda: dict(STORE_OPTIONS))
    replicas: list[Replica] = field(default_factory=list)
    _upstream: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> ReplicaSet:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        policies = self.folder / "policies"
        policies.mkdir(parents=True, exist_ok=True)
        files = {"main.yaml": self.policies} if isinstance(self.policies, str) else self.policies
        for name, text in files.items():
            (policies / name).write_text(textwrap.dedent(text))

        soap, rest = free_port(), free_port()
        self._upstream = _spawn(
            [sys.executable, "-m", "gateway", "mock-upstream", "--host", "127.0.0.1",
             "--soap-port", str(soap), "--rest-port", str(rest)],
            self.folder / "mock.log", {},
        )  # fmt: skip
        options = "\n".join(f"  {k}: {v}" for k, v in self.store_options.items())
        for index, offset in enumerate(self.offsets):
            folder = self.folder / f"replica-{index}"
            folder.mkdir(parents=True, exist_ok=True)
            replica = Replica(index, free_port(), free_port(), offset, folder)
            config = folder / "gateway.yaml"
            config.write_text(
                CONFIG.format(
                    port=replica.port,
                    admin_port=replica.admin_port,
                    certs=self.certs,
                    store=self.store,
                    store_options=options,
                    policies=policies,
                    soap=soap,
                )
            )
            replica.process = _spawn(
                [sys.executable, "-m", "tests.support.skewed_gateway", "serve",
                 "--config", str(config)],
                replica.log, {"AUP_TEST_CLOCK_OFFSET": repr(offset)},
            )  # fmt: skip
            self.replicas.append(replica)

        deadline = time.monotonic() + timeout
        _wait_for(
            lambda: _accepts(soap),
            deadline,
            "the mock upstream",
            self._upstream,
            self.folder / "mock.log",
        )
        for replica in self.replicas:
            assert replica.process is not None
            _wait_for(
                lambda r=replica: self._handshakes(r),
                deadline,
                f"replica {replica.index}",
                replica.process,
                replica.log,
            )

    def stop(self) -> None:
        """SIGTERM each process by PID, then SIGKILL whatever has not exited within 5 s."""
        processes = [r.process for r in self.replicas if r.process] + (
            [self._upstream] if self._upstream else []
        )
        for process in processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=5)

    def __iter__(self) -> Iterator[Replica]:
        return iter(self.replicas)

    def __len__(self) -> int:
        return len(self.replicas)

    def ssl_for(self, user: str = "jdoex1234") -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.certs.ca))
        cert, key = self.certs.clients[user]
        context.load_cert_chain(str(cert), str(key))
        return context

    def readyz(self, index: int) -> tuple[int, dict[str, Any]]:
        """A replica's /readyz: status code and JSON body (blocking; call it off the loop)."""
        url = f"{self.replicas[index].admin_url}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def assert_alive(self) -> None:
        for replica in self.replicas:
            assert replica.process is not None
            code = replica.process.poll()
            assert code is None, f"replica {replica.index} exited {code}:\n{replica.log_text()}"

    def _handshakes(self, replica: Replica) -> bool:
        try:
            with (
                socket.create_connection(("127.0.0.1", replica.port), timeout=1.0) as raw,
                self.ssl_for().wrap_socket(raw, server_hostname="localhost"),
            ):
                return True
        except (OSError, ssl.SSLError):
            return False


def _spawn(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    environment = {**os.environ, **env, "LOG_LEVEL": "INFO"}
    environment["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    with log.open("wb") as out:
        return subprocess.Popen(
            command, cwd=ROOT, env=environment, stdout=out, stderr=subprocess.STDOUT
        )


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_for(
    ready: Any, deadline: float, what: str, process: subprocess.Popen[bytes], log: Path
) -> None:
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(
                f"{what} exited with {process.returncode}:\n"
                f"{log.read_text(errors='replace')[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{what} did not come up:\n{log.read_text(errors='replace')[-3000:]}"
            )
        time.sleep(0.05)


@dataclass(frozen=True)
class Answer:
    """One call as the participant saw it."""

    replica: int
    status: int
    retry_after: str | None
    body: str
    elapsed: float

    @property
    def allowed(self) -> bool:
        return self.status == 200

    @property
    def aup_fault(self) -> bool:
        """The gateway's own AUP violation fault (SOAP 1.1: HTTP 500, a Retry-After)."""
        return self.status == 500 and self.retry_after is not None and "faultstring" in self.body


class Caller:
    """One participant's HTTPS client for the whole set, keep-alive connections per replica."""

    def __init__(self, replicas: ReplicaSet, user: str = "jdoex1234", limit: int = 200) -> None:
        self.replicas = replicas
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=replicas.ssl_for(user), limit=limit),
            timeout=aiohttp.ClientTimeout(total=10),
        )

    async def soap(self, replica: int, app: str, service: str) -> Answer:
        target = self.replicas.replicas[replica % len(self.replicas)]
        body = ENVELOPE.format(op=service.split("_")[0])
        started = time.perf_counter()
        async with self.session.post(
            f"{target.url}/sst/{app}/{service}", data=body, headers={"Content-Type": SOAP11}
        ) as response:
            text = await response.text()
        return Answer(
            target.index,
            response.status,
            response.headers.get("Retry-After"),
            text,
            time.perf_counter() - started,
        )

    async def burst(self, app: str, service: str, calls: int) -> list[Answer]:
        """`calls` concurrent calls for one key, dealt round-robin over the replicas."""
        return list(await asyncio.gather(*(self.soap(i, app, service) for i in range(calls))))

    async def close(self) -> None:
        await self.session.close()

    async def __aenter__(self) -> Caller:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


ReplicaFactory = Callable[..., ReplicaSet]


@pytest.fixture(scope="module")
def replica_factory(
    certs: DemoCerts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ReplicaFactory]:
    """`replica_factory(store=url, policies=..., offsets=(0, 3600))`: a started ReplicaSet,
    stopped when the module's tests are done (a set costs a few seconds to start)."""
    sets: list[ReplicaSet] = []

    def make(**kwargs: Any) -> ReplicaSet:
        replicas = ReplicaSet(certs, tmp_path_factory.mktemp("replicas"), **kwargs)
        sets.append(replicas)
        return replicas.start()

    yield make
    for replicas in sets:
        replicas.stop()
