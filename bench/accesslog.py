"""The access log's cost per call: the per-call logging.Logger line it replaced, against the
batched writer (ops/accesslog.py), both into a file with `serve`'s log format.

    python -m bench.accesslog

Prints µs per call on the request's path and in total (the batch's write amortised).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from pathlib import Path

from gateway.edge.identity import ClientIdentity
from gateway.ops.accesslog import AccessLogWriter, access_line
from gateway.outcome import Outcome

CALLS = 50_000
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _outcome(n: int) -> Outcome:
    who = ClientIdentity("CN=jdoex1234,OU=people,O=CAISO,C=US", "jdoex1234", "CAISO", "ab", "")
    return Outcome(f"req-{n}", who, "OMS", "RetrieveOutages", "rejected", "oms", status=500)


def _logger(name: str, path: Path) -> tuple[logging.Logger, logging.Handler]:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, handler


def per_call_logger(path: Path) -> float:
    """What the gateway did before: one Logger.info of a JSON line per call."""
    logger, handler = _logger("bench.access.percall", path)
    outcomes = [_outcome(n) for n in range(CALLS)]
    started = time.perf_counter()
    for o in outcomes:
        logger.info(access_line(o, time.time(), {}))  # encoded whole each time, as before
    elapsed = time.perf_counter() - started
    handler.close()
    return elapsed / CALLS * 1e6


async def batched(path: Path) -> tuple[float, float]:
    """The batched writer, calls arriving over loop iterations as a server's do."""
    logger, handler = _logger("bench.access.batched", path)
    writer = AccessLogWriter(logger)
    outcomes = [_outcome(n) for n in range(CALLS)]
    on_path = 0.0
    started = time.perf_counter()
    for i in range(0, CALLS, 32):  # 32 calls per loop iteration, as with 32 connections
        t = time.perf_counter()
        for o in outcomes[i : i + 32]:
            writer.observe(o)
        on_path += time.perf_counter() - t
        await asyncio.sleep(0)
    writer.close()
    total = time.perf_counter() - started
    handler.close()
    return on_path / CALLS * 1e6, total / CALLS * 1e6


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        before = per_call_logger(Path(tmp, "percall.log"))
        path_us, total_us = asyncio.run(batched(Path(tmp, "batched.log")))
        lines = len(Path(tmp, "batched.log").read_text().splitlines())
    assert lines == CALLS, lines
    print(f"access log, {CALLS:,} calls into a file:")
    print(f"  per-call logging.Logger line (before):     {before:6.2f} µs per call")
    print(f"  batched writer, on the request's path:     {path_us:6.2f} µs per call")
    print(f"  batched writer, total (writes amortised):  {total_us:6.2f} µs per call")


if __name__ == "__main__":
    main()
