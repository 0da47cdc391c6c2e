"""Running the gateway: listeners, the limiter, signals and a graceful stop.

`start()` brings up the TLS listener (and the admin listener), the policy watcher, the metrics
and the violation ledger, and returns a handle; `run()` is what `aup-gateway serve` calls: start,
then SIGHUP reloads policies (and TLS files), SIGTERM/SIGINT stop gracefully: the listener closes
at once, calls in flight get up to `drain_timeout` to finish, then the process exits 0.

`run_workers()` is `serve --workers N`: N processes share the TLS port through SO_REUSEPORT,
under a supervisor that forwards SIGTERM, SIGINT and SIGHUP to them and restarts a worker that
dies after it was serving (one that dies before it got its listeners up stops the whole set: that
is a start-up problem, such as a port in use, not a crash to retry). Each worker has its own
admin listener, worker i on `admin.port + i`, because each worker has its own metrics:
Prometheus scrapes every worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType
from typing import cast

from aiohttp import web

from gateway.clock import Clock, wall_clock
from gateway.config.settings import Settings
from gateway.edge.connection import GuardedRunner, GuardedServer
from gateway.edge.tls import ReloadingContext, TlsSite
from gateway.errors import ConfigError
from gateway.limiter.base import Limiter
from gateway.ops.accesslog import AccessLogWriter
from gateway.ops.admin import AdminState, create_admin_app
from gateway.ops.history import History
from gateway.ops.ledger import LedgerWriter, excess_entry, ledger_writer
from gateway.ops.metrics import GatewayMetrics, StateSources
from gateway.ops.reload import PolicyReloader, ReloadResult
from gateway.proxy.app import Gateway

log = logging.getLogger("gateway")


RESTART_DELAY = 0.5  # a worker that keeps crashing is not restarted in a tight loop


@dataclass
class Running:
    """A started gateway: its bound ports, its operational parts and what `stop()` tears down."""

    gateway: Gateway
    port: int
    admin_port: int | None
    ops: AdminState
    tls: ReloadingContext | None = None
    access: AccessLogWriter | None = None
    _runners: list[web.BaseRunner] = field(default_factory=list)
    _stopped: bool = False

    @property
    def metrics(self) -> GatewayMetrics:
        return self.ops.metrics

    @property
    def reloader(self) -> PolicyReloader:
        return self.ops.reloader

    @property
    def ledger(self) -> LedgerWriter:
        return self.ops.ledger

    async def reload(self) -> ReloadResult:
        """What SIGHUP does: policies now (validated, swapped whole) and the TLS files."""
        if self.tls is not None:
            self.tls.reload()
        return await self.reloader.reload("sighup")

    async def stop(self) -> None:
        """Stop accepting, let in-flight calls finish (up to drain_timeout), close the rest.

        The TLS listener goes first; the admin listener stays up while calls drain, answering
        /readyz with 503 "draining". The ledger writes what it still holds before the store
        connection closes.
        """
        if self._stopped:
            return
        self._stopped = True
        self.ops.draining = True
        await self.reloader.stop()
        if self.ops.history is not None:
            await self.ops.history.stop()
        for runner in self._runners:
            await runner.cleanup()
        await self.ledger.close()
        if self.access is not None:
            self.access.close()  # every call's line is written before the process exits
        await self.gateway.close()


def make_limiter(settings: Settings, clock: Clock = wall_clock) -> Limiter:
    from gateway.limiter.factory import limiter_from_url

    return limiter_from_url(settings.store, settings.on_store_error, clock)


async def start(
    settings: Settings,
    *,
    limiter: Limiter | None = None,
    reuse_port: bool = False,
    worker: int = 0,
    reload_interval: float = 1.0,
    clock: Clock = wall_clock,
) -> Running:
    """Bind the listeners; ports 0 in settings pick free ports (see Running.port). `clock` is
    the wall clock every part reads (the limiter's, when it is made here)."""
    gateway = Gateway(
        settings, limiter if limiter is not None else make_limiter(settings, clock), clock=clock
    )
    await gateway.start()
    await gateway.limiter.start()  # load scripts now; never fails (ResilientLimiter)
    metrics = GatewayMetrics()
    ledger = ledger_writer(settings, clock)
    reloader = PolicyReloader(
        gateway, reload_interval, on_result=lambda result: metrics.reload_result(result.ok)
    )
    ops = AdminState(gateway, metrics, reloader, ledger, worker)
    ops.history = History(metrics, ops.store_status, clock=clock)  # the ops page's last hour
    metrics.add_state(
        StateSources(
            store=ops.store_status,
            policies=lambda: _policy_state(ops),
            ledger=ledger.status,
            draining=lambda: ops.draining,
        )
    )
    # Observers run after every call, in order: access log (if on), metrics, ledger queue.
    access = AccessLogWriter(clock=clock) if settings.access_log else None
    if access is not None:
        gateway.observers.append(access.observe)
    gateway.observers.extend([metrics.observe, ledger.observe])
    # Keys the local fallback let past their policy, found when the store returns.
    gateway.limiter.on_excess.append(lambda excess: ledger.record(excess_entry(excess, clock())))
    limits = settings.limits
    server = GuardedServer(  # adds read/send deadlines and the per-identity connection cap
        gateway.handle,
        limits=limits,
        identify=gateway.identities.get,
        identity_mode=settings.identity,
        server_name=settings.server_name,
    )
    runner = GuardedRunner(server, shutdown_timeout=settings.drain_timeout)
    await runner.setup()
    # New handshakes pick up rotated files; a connection without a certificate is answered in
    # HTTP by the GuardedServer (so it learns why), never forwarded.
    tls = ReloadingContext(settings.tls, missing_certificate="answer")
    site = TlsSite(
        runner,
        settings.listen.host,
        settings.listen.port,
        tls.handshake_context,  # one per connection: no TLS session is ever resumed
        handshake_timeout=limits.read_timeout,
        backlog=1024,
        reuse_port=reuse_port,
        on_refused=lambda refusal: metrics.handshake_refused(refusal.reason),
    )
    await site.start()
    running = Running(gateway, _bound_port(runner), None, ops, tls, access, [runner])
    if settings.admin is not None:
        admin_runner = web.AppRunner(create_admin_app(ops), access_log=None, handle_signals=False)
        await admin_runner.setup()
        # One admin listener per worker (each has its own metrics): worker i on port + i.
        admin_port = settings.admin.port + worker if settings.admin.port else 0
        await web.TCPSite(admin_runner, settings.admin.host, admin_port).start()
        running._runners.append(admin_runner)
        running.admin_port = _bound_port(admin_runner)
    ledger.start()
    reloader.start()
    ops.history.start()
    log.info(
        "gateway listening on https://%s:%d (store %s, %d applications, %d policies)",
        settings.listen.host,
        running.port,
        gateway.limiter.name,
        len(settings.applications),
        len(gateway.policies.policies),
    )
    return running


def _policy_state(ops: AdminState) -> dict[str, object]:
    last = ops.reloader.last
    return {
        "version": ops.gateway.policies.version,
        "count": len(ops.gateway.policies.policies),
        "last_ok": last.ok,
        "last_at": last.at,
    }


async def serve(
    settings: Settings,
    reuse_port: bool = False,
    worker: int = 0,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully; SIGHUP reloads."""
    running = await start(settings, reuse_port=reuse_port, worker=worker)
    if on_started is not None:
        on_started()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloads: set[asyncio.Task[ReloadResult]] = set()

    def on_sighup() -> None:
        task = loop.create_task(running.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await stop.wait()
    loop.remove_signal_handler(signal.SIGHUP)
    log.info(
        "stopping: closed the listener, finishing in-flight calls (at most %gs)",
        settings.drain_timeout,
    )
    started = time.monotonic()
    await running.stop()
    log.info("stopped after %.2fs", time.monotonic() - started)


def run(
    settings: Settings,
    reuse_port: bool = False,
    worker: int = 0,
    on_started: Callable[[], None] | None = None,
) -> None:
    """The blocking entry point behind `aup-gateway serve`: uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(settings, reuse_port, worker, on_started))
    else:
        uvloop.run(serve(settings, reuse_port, worker, on_started))


def _bound_port(runner: web.BaseRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("listener has no TCP address")


def run_workers(settings: Settings, workers: int) -> int:
    """`serve --workers N`: N processes on one port; the exit status. The memory store's state
    is per process, so several workers would each allow N calls: refused with a clear error."""
    if workers < 1:
        raise ConfigError([f"{settings.source}:1: --workers must be at least 1"])
    if workers == 1:
        run(settings)
        return 0
    if settings.store.url.startswith("memory:"):
        raise ConfigError(
            [
                f"{settings.source}:1: store: --workers {workers} needs a shared store (redis://...);"
                " the memory store keeps its counters per process"
            ]
        )
    return _Supervisor(settings, workers).run()


class _Supervisor:
    """Starts the workers, forwards signals to them, restarts one that dies after start-up."""

    def __init__(self, settings: Settings, workers: int) -> None:
        import multiprocessing

        self._context = multiprocessing.get_context("spawn")
        self._settings = settings
        self._count = workers
        self._processes: dict[int, BaseProcess] = {}
        self._serving: dict[int, EventType] = {}  # set by each worker once it listens
        self._stopping = False
        self._failed = False

    def run(self) -> int:
        from multiprocessing.connection import wait

        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._forward)
        for index in range(self._count):
            self._spawn(index)
        log.info(
            "supervisor %d: %d workers on port %d",
            os.getpid(),
            self._count,
            self._settings.listen.port,
        )
        while self._processes:
            sentinels = {p.sentinel: i for i, p in self._processes.items()}
            for ready in wait(list(sentinels), timeout=1.0):
                index = sentinels[cast(int, ready)]
                self._exited(index)
        return 1 if self._failed else 0

    def _spawn(self, index: int) -> None:
        serving = self._context.Event()
        process = self._context.Process(
            target=_worker,
            args=(self._settings, index, serving),
            name=f"aup-gateway-worker-{index}",
            daemon=False,
        )
        process.start()
        self._processes[index] = process
        self._serving[index] = serving

    def _exited(self, index: int) -> None:
        process = self._processes.pop(index)
        process.join()
        if self._stopping:
            return
        if not self._serving[index].is_set() or process.exitcode == 0:
            log.error(
                "worker %d exited with %s %s: stopping all workers",
                index,
                process.exitcode,
                "before it was serving" if not self._serving[index].is_set() else "on its own",
            )
            self._failed = process.exitcode != 0
            self._stop(signal.SIGTERM, None)
            return
        log.error("worker %d died (exit %s): restarting it", index, process.exitcode)
        time.sleep(RESTART_DELAY)
        self._spawn(index)

    def _stop(self, signum: int, frame: object) -> None:
        self._stopping = True
        for process in self._processes.values():
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    def _forward(self, signum: int, frame: object) -> None:
        for process in self._processes.values():
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signum)


def _worker(settings: Settings, index: int, serving: EventType) -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    run(settings, reuse_port=True, worker=index, on_started=serving.set)
