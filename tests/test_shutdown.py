"""Graceful shutdown and workers, with the gateway as its own process (`python -m gateway
serve`): SIGTERM with calls in flight lets every one of them complete, refuses new connections,
writes the ledger out and exits 0; the drain is bounded; `--workers N` shares one port through
SO_REUSEPORT with exact limits across workers on Redis, and is refused for the memory store."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.demo.certs import DemoCerts
from gateway.demo.mock import create_soap_app
from gateway.ops.ledger import LedgerEntry
from tests.support.ops import (
    client_ssl,
    samples,
    serve_process,
    value,
    wait_for,
    wait_ready,
    write_gateway,
)
from tests.support.ports import free_port
from tests.support.redis import RedisServer
from tests.support.stack import ENVELOPE, OMS, SOAP11

OMS_RETRIEVE = "RetrieveCurrentOutages_OMSv1_AP"
SUBMIT = "SubmitOutage_OMSv1_AP"


class CountingUpstream:
    """The mock SOAP services, counting the calls that reached them and those that finished."""

    def __init__(self) -> None:
        self.arrived = 0
        self.finished = 0
        self.port = 0

    @web.middleware
    async def count(self, request: web.Request, handler: object) -> web.StreamResponse:
        self.arrived += 1
        response: web.StreamResponse = await handler(request)  # type: ignore[operator]
        self.finished += 1
        return response


@pytest.fixture
async def counting_upstream() -> AsyncIterator[CountingUpstream]:
    upstream = CountingUpstream()
    app = create_soap_app()
    app.middlewares.insert(0, upstream.count)  # outermost: counts before the mock's delay
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream.port = int(runner.addresses[0][1])
    yield upstream
    await runner.cleanup()


async def _call(
    certs: DemoCerts, port: int, service: str, delay: float = 0.0, user: str = "jdoex1234"
) -> tuple[int, str, str]:
    """One call on its own connection: (status, X-Request-Id, echo path or '')."""
    headers = {"Content-Type": SOAP11}
    if delay:
        headers["X-Mock-Delay"] = str(delay)
    connector = aiohttp.TCPConnector(ssl=client_ssl(certs, user), force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(
            f"https://localhost:{port}/sst/oms/{service}",
            data=ENVELOPE.format(op=service.split("_")[0]),
            headers=headers,
        ) as answer,
    ):
        await answer.read()
        return (
            answer.status,
            answer.headers.get("X-Request-Id", ""),
            answer.headers.get("X-Echo-Path", ""),
        )


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    return False


async def test_sigterm_lets_every_call_in_flight_complete_then_exits_0(
    certs: DemoCerts, counting_upstream: CountingUpstream, tmp_path: Path
) -> None:
    port, admin_port = free_port(), free_port()
    config = write_gateway(
        tmp_path,
        certs,
        counting_upstream.port,
        port=port,
        admin_port=admin_port,
        policies=OMS,
        extra="drain_timeout: 10s\n",
    )
    process = serve_process(config)
    try:
        await wait_ready(admin_port, process)
        # a fault just before the signal: the ledger must write it out on the way down
        assert (await _call(certs, port, OMS_RETRIEVE))[0] == 200
        status, fault_id, _ = await _call(certs, port, OMS_RETRIEVE)
        assert status == 500

        arrived = counting_upstream.arrived
        calls = [asyncio.create_task(_call(certs, port, SUBMIT, delay=1.0)) for _ in range(8)]
        await wait_for(
            lambda: counting_upstream.arrived == arrived + 8,
            timeout=10,
            what="8 calls in flight at the upstream",
        )
        assert counting_upstream.finished == arrived
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)

        await wait_for(lambda: _refused(port), timeout=2, what="the listener to close")
        results = await asyncio.gather(*calls)
        assert [r[0] for r in results] == [200] * 8
        assert all(r[2] == f"/sst/oms/{SUBMIT}" for r in results)
        assert len({r[1] for r in results}) == 8
        returncode = await asyncio.to_thread(process.wait, 15)
        assert returncode == 0
        assert time.monotonic() - signalled < 5  # it left once the calls were done
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = process.stderr.read() if process.stderr else ""
    assert "finishing in-flight calls" in log and "stopped after" in log
    entries = [
        LedgerEntry.from_json(line)
        for line in (tmp_path / "var" / "ledger.jsonl").read_text().splitlines()
    ]
    # the open episode, written at shutdown (its key is still locked: not final)
    assert [(e.first_request_id, e.count, e.final) for e in entries if e] == [(fault_id, 1, False)]


async def test_the_drain_is_bounded_by_drain_timeout(
    certs: DemoCerts, counting_upstream: CountingUpstream, tmp_path: Path
) -> None:
    port, admin_port = free_port(), free_port()
    config = write_gateway(
        tmp_path,
        certs,
        counting_upstream.port,
        port=port,
        admin_port=admin_port,
        policies=OMS,
        extra="drain_timeout: 500ms\n",
    )
    process = serve_process(config)
    try:
        await wait_ready(admin_port, process)
        stuck = asyncio.create_task(_call(certs, port, SUBMIT, delay=30))
        await wait_for(
            lambda: counting_upstream.arrived == 1, timeout=10, what="the call in flight"
        )
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(process.wait, 15)
        assert returncode == 0
        assert time.monotonic() - signalled < 4
        with pytest.raises(aiohttp.ClientError):
            await stuck  # cut off at the bound: the connection closes without an answer
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_workers_are_refused_for_the_memory_store(certs: DemoCerts, tmp_path: Path) -> None:
    config = write_gateway(
        tmp_path, certs, 9, port=free_port(), admin_port=free_port(), policies=OMS
    )
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--workers", "2", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).parents[1],
    )
    assert done.returncode == 1
    assert "--workers 2 needs a shared store (redis://...)" in done.stderr
    assert "memory store keeps its counters per process" in done.stderr


async def test_workers_share_one_port_with_exact_limits_on_redis(
    certs: DemoCerts,
    counting_upstream: CountingUpstream,
    tmp_path: Path,
    redis_url: str,
    redis_server: RedisServer,
) -> None:
    port, admin_port = free_port(), free_port(consecutive=2)
    config = write_gateway(
        tmp_path,
        certs,
        counting_upstream.port,
        port=port,
        admin_port=admin_port,
        policies=OMS,
        store=redis_url,
    )
    process = serve_process(config, "--workers", "2")
    try:
        first = await wait_ready(admin_port, process)
        second = await wait_ready(admin_port + 1, process)
        assert {first["worker"], second["worker"]} == {0, 1}
        assert first["pid"] != second["pid"] != process.pid

        results = await asyncio.gather(*(_call(certs, port, OMS_RETRIEVE) for _ in range(24)))
        statuses = sorted(r[0] for r in results)
        assert statuses == [200] + [500] * 23  # 1 per 5 s, however many workers decide

        counts = []
        async with aiohttp.ClientSession() as session:
            for admin in (admin_port, admin_port + 1):
                async with session.get(f"http://127.0.0.1:{admin}/metrics") as answer:
                    m = samples(await answer.text())
                counts.append(
                    sum(
                        value(
                            m,
                            "aup_requests_total",
                            application="OMS",
                            service=OMS_RETRIEVE,
                            decision=d,
                        )
                        for d in ("allowed", "rejected")
                    )
                )
        assert sum(counts) == 24 and min(counts) > 0  # both workers served calls

        async def ledgered() -> bool:
            with redis_server.client() as client:
                episodes = [LedgerEntry.from_json(e) for e in client.hvals("aup:{ledger}:open")]
            # each worker has its open episode of the key; their counts add up
            return sum(e.count for e in episodes if e) == 23

        await wait_for(ledgered, what="both workers' open episodes in the shared ledger")

        # SIGHUP to the supervisor reaches every worker
        (tmp_path / "policies" / "main.yaml").write_text(OMS.replace("5s", "7s"))
        process.send_signal(signal.SIGHUP)
        async with aiohttp.ClientSession() as session:
            for admin in (admin_port, admin_port + 1):

                async def reloaded(url: str = f"http://127.0.0.1:{admin}/policies") -> bool:
                    async with session.get(url) as answer:
                        body = await answer.json()
                    return bool(body["policies"][0]["per"] == 7.0)

                await wait_for(reloaded, what=f"worker on admin port {admin} to reload")

        # a worker that dies while serving is replaced; the others keep serving meanwhile
        os.kill(int(second["pid"]), signal.SIGKILL)
        replaced = await wait_ready_with_new_pid(admin_port + 1, int(second["pid"]))
        assert replaced["worker"] == 1 and process.poll() is None
        assert (await _call(certs, port, SUBMIT))[0] == 200

        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    for admin in (admin_port, admin_port + 1):
        assert await _refused(admin)


async def wait_ready_with_new_pid(admin_port: int, old_pid: int) -> dict[str, object]:
    async def replaced() -> bool:
        try:
            body = await wait_ready(admin_port, timeout=0.5)
        except AssertionError:
            return False
        return body["pid"] != old_pid

    await wait_for(replaced, timeout=30, what="the worker to be replaced")
    return await wait_ready(admin_port)


def test_a_worker_that_cannot_start_stops_the_set(
    certs: DemoCerts, tmp_path: Path, redis_url: str
) -> None:
    port, admin_port = free_port(), free_port(consecutive=2)
    config = write_gateway(
        tmp_path, certs, 9, port=port, admin_port=admin_port, policies=OMS, store=redis_url
    )
    with socket.socket() as taken:  # worker 1's admin port is in use
        taken.bind(("127.0.0.1", admin_port + 1))
        taken.listen()
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--workers", "2", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=Path(__file__).parents[1],
        )
    assert done.returncode == 1
    assert "worker 1 exited with 1 before it was serving: stopping all workers" in done.stderr
