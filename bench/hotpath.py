"""The gateway's own cost per call, without TLS, sockets or a load generator: the data plane's
protocol (edge/connection.py) fed ab's request bytes in-process, the realistic configuration
(access log on, ledger on) on the memory store, against the bench's upstream (one nginx worker,
plain HTTP on loopback) for the allowed row. The figure is the gateway process's CPU time per
call; what is left of a `make bench` row's CPU per call is the TLS layer's and the kernel's.

    python -m bench.hotpath [--calls 20000] [--profile]

`--profile` prints cProfile's top 25 for each row (cProfile slows every Python call, so its
times are shares, not costs). The access log is formatted and written to /dev/null, or to the
file named by HOTPATH_LOG.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import logging
import os
import pstats
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench import configs
from bench.procs import free_port, listeners
from gateway.config.settings import load_settings
from gateway.demo.certs import DemoCerts, write_demo_certs
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


@contextlib.contextmanager
def upstream(folder: Path, certs: DemoCerts) -> Iterator[int]:
    """The bench's upstream: one nginx worker answering a small SOAP body over plain HTTP."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = folder / "nginx.conf"
    conf.write_text(configs.upstream_nginx_conf(folder, certs, port, free_port()))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen(
        [nginx, "-p", f"{folder}/", "-e", str(folder / "error.log"), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while listeners(port) < 1:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start: {(folder / 'error.log').read_text()}")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


async def measure(
    folder: Path, kind: str, rest: bool, calls: int, profile: bool, connections: int = 1
) -> float:
    certs = write_demo_certs(ROOT / "certs")
    with upstream(folder / "upstream", certs) as up_port:
        return await _measure(folder, certs, up_port, kind, rest, calls, profile, connections)


async def _measure(
    folder: Path,
    certs: DemoCerts,
    up_port: int,
    kind: str,
    rest: bool,
    calls: int,
    profile: bool,
    connections: int,
) -> float:
    config = configs.write_gateway_config(
        folder / kind, certs, 0, up_port, "memory://", kind, realistic=True
    )
    settings = load_settings(config)
    running = await start(settings)
    try:
        der = ssl.PEM_cert_to_DER_cert(certs.clients["jdoex1234"][0].read_text())
        path, body, ctype = (
            (configs.REST_PATH, configs.REST_BODY, configs.REST_CONTENT_TYPE)
            if rest
            else (configs.SERVICE_PATH, configs.REQUEST_BODY, configs.CONTENT_TYPE)
        )
        request = ab_request(path, body, ctype)
        loop = asyncio.get_running_loop()
        make_protocol = running._runners[0]._guarded  # type: ignore[attr-defined]

        async def connection(n: int) -> Peer:
            """One client connection: n calls, one at a time."""
            peer = Peer(der)
            protocol = make_protocol()
            protocol.connection_made(peer)
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
            return peer

        async def run(n: int) -> Peer:
            peers = await asyncio.gather(
                *(connection(n // connections) for _ in range(connections))
            )
            return peers[0]

        peer = await run(500)  # warm-up (and the first, allowed, call of a "rejected" key)
        status = peer.last.split(b"\r\n", 1)[0].decode()
        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        started = time.process_time()
        await run(calls)
        elapsed = time.process_time() - started
        if profiler:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        print(f"  last answer: {status}")
        return elapsed / calls * 1e6
    finally:
        await running.stop()


async def main_async(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, filename=os.environ.get("HOTPATH_LOG", "/dev/null"))
    with tempfile.TemporaryDirectory() as tmp:
        for kind, rest in (("rejected", False), ("rejected", True), ("allowed", False)):
            name = f"{kind}{', REST' if rest else ''}"
            # Allowed calls wait for the upstream: 32 connections at once, as ab runs them.
            connections = 32 if kind == "allowed" else 1
            folder = Path(tmp) / name.replace(", ", "-")
            us = await measure(folder, kind, rest, args.calls, args.profile, connections)
            print(f"{name:16} {us:7.1f} µs of CPU per call (in-process, no TLS)")


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
