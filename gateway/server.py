"""Running the gateway: listeners, the limiter, signals and a graceful stop.

`start()` brings up the TLS listener (and the admin listener) and returns a handle; `run()` is
what `aup-gateway serve` calls: start, wait for SIGTERM/SIGINT, stop gracefully.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field

from aiohttp import web

from gateway.app import Gateway
from gateway.connection import GuardedServer
from gateway.errors import ConfigError
from gateway.limiter.base import Limiter
from gateway.settings import Settings
from gateway.tls import ReloadingContext, TlsSite

log = logging.getLogger("gateway")


@dataclass
class Running:
    """A started gateway: its bound ports and what `stop()` tears down."""

    gateway: Gateway
    port: int
    admin_port: int | None
    _runners: list[web.BaseRunner] = field(default_factory=list)

    async def stop(self) -> None:
        """Stop accepting, let in-flight calls finish (up to drain_timeout), close the rest."""
        for runner in self._runners:
            await runner.cleanup()
        await self.gateway.close()


def make_limiter(settings: Settings) -> Limiter:
    from gateway.limiter.factory import limiter_from_url

    return limiter_from_url(settings.store, settings.on_store_error, time.time)


async def start(settings: Settings, *, limiter: Limiter | None = None,
                reuse_port: bool = False) -> Running:
    """Bind the listeners; ports 0 in settings pick free ports (see Running.port)."""
    gateway = Gateway(settings, limiter if limiter is not None else make_limiter(settings))
    await gateway.start()
    limits = settings.limits
    server = GuardedServer(  # adds read/send deadlines and the per-identity connection cap
        gateway.handle,
        limits=limits,
        identify=gateway.identities.get,
        identity_mode=settings.identity,
        access_log=None,
        keepalive_timeout=limits.idle_timeout,
        max_line_size=limits.max_line_size,
        max_field_size=limits.max_header_size,
        max_headers=limits.max_headers,
    )
    runner = web.ServerRunner(server, handle_signals=False,
                              shutdown_timeout=settings.drain_timeout)
    await runner.setup()
    tls = ReloadingContext(settings.tls)  # new handshakes pick up rotated files
    site = TlsSite(runner, settings.listen.host, settings.listen.port, tls.context,
                   handshake_timeout=limits.read_timeout, backlog=1024, reuse_port=reuse_port)
    await site.start()
    running = Running(gateway, _bound_port(runner), None, [runner])
    if settings.admin is not None:
        from gateway.admin import create_admin_app

        admin_runner = web.AppRunner(create_admin_app(gateway), access_log=None,
                                     handle_signals=False)
        await admin_runner.setup()
        await web.TCPSite(admin_runner, settings.admin.host, settings.admin.port).start()
        running._runners.append(admin_runner)
        running.admin_port = _bound_port(admin_runner)
    log.info("gateway listening on https://%s:%d (store %s, %d applications, %d policies)",
             settings.listen.host, running.port, gateway.limiter.name,
             len(settings.applications), len(gateway.policies.policies))
    return running


async def serve(settings: Settings, reuse_port: bool = False) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    running = await start(settings, reuse_port=reuse_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("stopping: finishing in-flight calls")
    await running.stop()


def run(settings: Settings, reuse_port: bool = False) -> None:
    """The blocking entry point behind `aup-gateway serve`: uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(settings, reuse_port))
    else:
        uvloop.run(serve(settings, reuse_port))


def _bound_port(runner: web.BaseRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("listener has no TCP address")


def run_workers(settings: Settings, workers: int) -> None:
    """`serve --workers N`: N processes on one port. The memory store's state is per process,
    so several workers would each allow N calls: refused with a clear error."""
    if workers < 1:
        raise ConfigError([f"{settings.source}:1: --workers must be at least 1"])
    if workers == 1:
        run(settings)
        return
    if settings.store.url.startswith("memory:"):
        raise ConfigError([
            f"{settings.source}:1: store: --workers {workers} needs a shared store (redis://...);"
            " the memory store keeps its counters per process"
        ])
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker, args=(settings,), daemon=False)
                 for _ in range(workers)]
    for process in processes:
        process.start()
    stop_all = lambda *_: [p.terminate() for p in processes if p.is_alive()]  # noqa: E731
    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    for process in processes:
        process.join()


def _worker(settings: Settings) -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    run(settings, reuse_port=True)
