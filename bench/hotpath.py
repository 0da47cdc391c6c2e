"""The gateway's own cost per call, without TLS, sockets or a load generator: the data plane's
protocol (edge/connection.py) fed ab's request bytes in-process, the realistic configuration
(access log on, ledger on) on the memory store, against a plain-HTTP upstream on loopback for
the allowed row. What is left of a `make bench` row's CPU per call is the TLS layer's and the
kernel's.

    python -m bench.hotpath [--calls 20000] [--profile]

`--profile` prints cProfile's top 25 for each row (cProfile slows every Python call, so its
times are shares, not costs).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import pstats
import ssl
import tempfile
import time
from pathlib import Path

from aiohttp import web

from bench import configs
from gateway.config.settings import load_settings
from gateway.demo.certs import write_demo_certs
from gateway.ops.server import start

ROOT = Path(__file__).resolve().parent.parent


def ab_request(path: str, body: str, content_type: str) -> bytes:
    """What `ab -k -p body -T type` sends for one call (HTTP/1.0, keep-alive)."""
    data = body.encode()
    return (
        f"POST {path} HTTP/1.0\r\nContent-length: {len(data)}\r\n"
        f"Content-type: {content_type}\r\nHost: 127.0.0.1:8443\r\n"
        "User-Agent: ApacheBench/2.3\r\nAccept: */*\r\nConnection: Keep-Alive\r\n\r\n"
    ).encode() + data


class Peer:
    """The client's side of one connection: an SSL object with the client certificate, and the
    answers written to it."""

    def __init__(self, der: bytes) -> None:
        self._der = der
        self.answers = 0
        self.waiter: asyncio.Future[None] | None = None
        self.last = b""
        self.closed = False

    # ssl_object
    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self._der

    # transport
    def get_extra_info(self, name: str, default: object = None) -> object:
        if name == "ssl_object":
            return self
        if name == "peername":
            return ("127.0.0.1", 50000)
        return default

    def write(self, data: bytes) -> None:
        self.answers += 1
        self.last = data
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    abort = close

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def get_write_buffer_size(self) -> int:
        return 0


async def upstream(port: int) -> web.AppRunner:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text=configs.RESPONSE_BODY, content_type="text/xml")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def measure(folder: Path, kind: str, rest: bool, calls: int, profile: bool) -> float:
    certs = write_demo_certs(ROOT / "certs")
    from bench.procs import free_port

    up_port = free_port()
    up = await upstream(up_port)
    config = configs.write_gateway_config(
        folder / kind, certs, 0, up_port, "memory://", kind, realistic=True
    )
    settings = load_settings(config)
    running = await start(settings)
    try:
        der = ssl.PEM_cert_to_DER_cert(certs.clients["jdoex1234"][0].read_text())
        peer = Peer(der)
        protocol = running._runners[0]._guarded()  # type: ignore[attr-defined]
        protocol.connection_made(peer)
        path, body, ctype = (
            (configs.REST_PATH, configs.REST_BODY, configs.REST_CONTENT_TYPE)
            if rest
            else (configs.SERVICE_PATH, configs.REQUEST_BODY, configs.CONTENT_TYPE)
        )
        request = ab_request(path, body, ctype)
        loop = asyncio.get_running_loop()

        async def run(n: int) -> None:
            for _ in range(n):
                before = peer.answers
                peer.waiter = loop.create_future()
                protocol.data_received(request)
                if peer.answers == before:
                    await peer.waiter
                else:
                    await asyncio.sleep(0)  # a server's loop turns once per read: timers run
                while protocol.busy:  # the task finishes after its write
                    await asyncio.sleep(0)
                if peer.closed:
                    raise AssertionError(f"the gateway closed the connection: {peer.last[:300]!r}")

        await run(500)  # warm-up (and the first, allowed, call of a "rejected" key)
        status = peer.last.split(b"\r\n", 1)[0].decode()
        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        started = time.perf_counter()
        await run(calls)
        elapsed = time.perf_counter() - started
        if profiler:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        print(f"  last answer: {status}")
        return elapsed / calls * 1e6
    finally:
        await running.stop()
        await up.cleanup()


async def main_async(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, filename=os.environ.get("HOTPATH_LOG", "/dev/null"))
    with tempfile.TemporaryDirectory() as tmp:
        for kind, rest in (("rejected", False), ("rejected", True), ("allowed", False)):
            name = f"{kind}{', REST' if rest else ''}"
            us = await measure(
                Path(tmp) / name.replace(", ", "-"), kind, rest, args.calls, args.profile
            )
            print(f"{name:16} {us:7.1f} µs per call (in-process, no TLS)")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath")
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
