"""A real stack on loopback: the mock market services and a gateway in front of them, with TLS.

`stack_factory(policies=..., config=...)` writes a gateway.yaml and policy files into a temp
folder, loads them with the real loaders and starts the gateway on free ports.
"""

from __future__ import annotations

import ssl
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.config.settings import load_settings
from gateway.demo.certs import DemoCerts
from gateway.demo.mock import create_rest_app, create_soap_app
from gateway.limiter.base import Limiter
from gateway.ops.server import Running, start

SOAP11 = "text/xml; charset=utf-8"
SOAP12 = "application/soap+xml; charset=utf-8"
ENVELOPE = (
    '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
    '<soapenv:Body><{op} xmlns="http://www.caiso.com/soa/{op}"/></soapenv:Body>'
    "</soapenv:Envelope>"
)

CONFIG = """\
listen: {{host: 127.0.0.1, port: 0}}
tls:
  cert: {certs.server}
  key: {certs.server_key}
  client_ca: {certs.ca}
  crl: {certs.crl}
store: {store}
admin: {{host: 127.0.0.1, port: 0}}
drain_timeout: 1s
policies: policies/
access_log: false
applications:
  OMS:  {{upstream: "http://127.0.0.1:{oms_port}", protocol: soap{oms_extra}}}
  DRRS: {{upstream: "http://127.0.0.1:{soap}", protocol: soap}}
  SIBR: {{upstream: "http://127.0.0.1:{soap}", protocol: soap}}
  CMRI: {{upstream: "http://127.0.0.1:{soap}", protocol: soap}}
  CRR:
    upstream: "http://127.0.0.1:{rest}"
    protocol: rest
    prefix: /crr
{crr}"""
# The CRR application's routes: a route table by default, or `openapi: <file>` (stack_factory's
# `crr=`), indented under the application.
CRR_ROUTES = """\
    routes:
      "GET /auction/v1.0/portfolio": getPortfolio
      "POST /auction/v1.0/portfolio": portfolioSubmission
      "GET /_mock/big": bulkDownload
"""

OMS = """\
policies:
  - name: oms-retrieve
    application: OMS
    services: ["Retrieve*"]
    limit: 1
    per: 5s
"""

DRRS = """\
policies:
  - name: drrs-per-service
    application: DRRS
    services: ["*"]
    limit: 1
    per: {per}
    reset_on_early_retry: true
    message: >-
      CAISO DRRS Acceptable Use Policy Violation. Please retry your request again in {{per}}
      seconds from now. Note: Time resets each time you request before expiration.
"""


@dataclass
class Upstream:
    soap_port: int
    rest_port: int


@dataclass
class Stack:
    running: Running
    certs: DemoCerts
    folder: Path
    sessions: list[aiohttp.ClientSession] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.running.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.running.admin_port}"

    def ssl_for(self, user: str | None = "jdoex1234") -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.certs.ca))
        if user is not None:
            cert, key = self.certs.clients.get(user) or self.certs.bad[user]
            context.load_cert_chain(str(cert), str(key))
        return context

    def client(self, user: str | None = "jdoex1234") -> aiohttp.ClientSession:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.ssl_for(user), limit=200)
        )
        self.sessions.append(session)
        return session

    async def soap(
        self,
        client: aiohttp.ClientSession,
        app: str,
        service: str,
        content_type: str = SOAP11,
        **kwargs: Any,
    ) -> aiohttp.ClientResponse:
        body = kwargs.pop("data", ENVELOPE.format(op=service.split("_")[0]))
        headers = {"Content-Type": content_type, **kwargs.pop("headers", {})}
        response = await client.post(
            f"{self.url}/sst/{app}/{service}", data=body, headers=headers, **kwargs
        )
        await response.read()
        return response


async def _start_app(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    soap_runner, soap_port = await _start_app(create_soap_app())
    rest_runner, rest_port = await _start_app(create_rest_app())
    yield Upstream(soap_port, rest_port)
    await soap_runner.cleanup()
    await rest_runner.cleanup()


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def stack_factory(
    certs: DemoCerts, upstream: Upstream, tmp_path: Path
) -> AsyncIterator[StackFactory]:
    stacks: list[Stack] = []

    async def make(
        policies: str | dict[str, str] = OMS,
        *,
        store: str = "memory://",
        extra: str = "",
        limiter: Limiter | None = None,
        folder: Path | None = None,
        oms_port: int | None = None,
        oms_extra: str = "",
        crr: str = CRR_ROUTES,
    ) -> Stack:
        folder = folder or tmp_path / f"stack{len(stacks)}"
        (folder / "policies").mkdir(parents=True, exist_ok=True)
        files = {"main.yaml": policies} if isinstance(policies, str) else policies
        for name, text in files.items():
            (folder / "policies" / name).write_text(textwrap.dedent(text))
        config = CONFIG.format(
            certs=certs,
            store=store,
            soap=upstream.soap_port,
            rest=upstream.rest_port,
            oms_port=oms_port or upstream.soap_port,
            oms_extra=oms_extra,
            crr=crr,
        ) + textwrap.dedent(extra)
        (folder / "gateway.yaml").write_text(config)
        running = await start(load_settings(folder / "gateway.yaml"), limiter=limiter)
        stack = Stack(running, certs, folder)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        for session in stack.sessions:
            await session.close()
        await stack.running.stop()
