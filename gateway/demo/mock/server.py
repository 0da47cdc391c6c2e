"""Running the mock SOAP and REST services on real sockets, for the demo and for tests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from gateway.demo.mock.rest import create_rest_app
from gateway.demo.mock.soap import create_soap_app

log = logging.getLogger("gateway.mock")


@dataclass(frozen=True, slots=True)
class MockUpstream:
    """Both services, started; ports are the bound ones (useful when asked for port 0)."""

    host: str
    soap_port: int
    rest_port: int
    runners: tuple[web.AppRunner, ...]

    @property
    def soap_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.soap_port}"

    @property
    def rest_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.rest_port}"

    async def close(self) -> None:
        for runner in self.runners:
            await runner.cleanup()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    # No access log: the mock is also the "direct upstream" baseline in benchmarks. Handlers
    # stop when the client goes away, so a gateway that timed out does not leave a sleeper
    # behind, and shutdown does not wait long for one.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    return runner, int(bound)


async def start_mock_upstream(host: str, soap_port: int, rest_port: int) -> MockUpstream:
    """Start both services and return once they accept connections."""
    soap_runner, soap_bound = await _start(create_soap_app(), host, soap_port)
    try:
        rest_runner, rest_bound = await _start(create_rest_app(), host, rest_port)
    except BaseException:
        await soap_runner.cleanup()
        raise
    return MockUpstream(host, soap_bound, rest_bound, (soap_runner, rest_runner))


async def run_mock_upstream(
    host: str,
    soap_port: int,
    rest_port: int,
    on_started: Callable[[MockUpstream], None] | None = None,
) -> None:
    """Serve both services until cancelled."""
    upstream = await start_mock_upstream(host, soap_port, rest_port)
    log.info("mock SOAP services on %s, CRR REST on %s", upstream.soap_url, upstream.rest_url)
    try:
        if on_started is not None:
            on_started(upstream)
        await asyncio.Event().wait()
    finally:
        await upstream.close()


def _announce(upstream: MockUpstream) -> None:
    print(f"mock SOAP services (OMS, DRRS, SIBR, CMRI): {upstream.soap_url}/sst/<app>/<service>")
    print(f"mock CRR REST service: {upstream.rest_url}/auction/v1.0/portfolio", flush=True)


def serve_mock_upstream(host: str, soap_port: int, rest_port: int) -> None:
    """Blocking entry point for `aup-gateway mock-upstream`; returns on Ctrl-C."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_mock_upstream(host, soap_port, rest_port, _announce))
