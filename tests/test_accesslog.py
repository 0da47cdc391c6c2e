"""The batched access log: every call's line reaches the handlers, in order, one write per batch
for plain file handlers, nothing lost at a stop, and a bounded queue."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from gateway.edge.identity import ClientIdentity
from gateway.ops.accesslog import AccessLogWriter
from gateway.outcome import Outcome

JDOE = "CN=jdoex1234,OU=people,O=CAISO,C=US"


def outcome(n: int) -> Outcome:
    who = ClientIdentity(JDOE, "jdoex1234", "CAISO", "ab" * 32, "")
    return Outcome(f"req-{n}", who, "OMS", "RetrieveOutages", "rejected", "oms", status=500)


class CountingStream:
    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass


def isolated_logger(name: str, handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


async def test_a_batch_is_one_write_and_the_stop_flushes(tmp_path: Path) -> None:
    stream = CountingStream()
    handler = logging.StreamHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    writer = AccessLogWriter(isolated_logger("test.access.batch", handler), interval=0.01)
    for n in range(300):
        writer.observe(outcome(n))
    assert stream.writes == []  # nothing written on the calls' path
    await asyncio.sleep(0.05)  # the writer's tick
    assert len(stream.writes) == 1 and writer.batches == 1
    lines = stream.writes[0].splitlines()
    assert [json.loads(line.split(": ", 1)[1])["request_id"] for line in lines] == [
        f"req-{n}" for n in range(300)
    ]
    writer.observe(outcome(300))
    writer.close()  # a graceful stop: written at once, not at the next tick
    assert json.loads(stream.writes[-1].split(": ", 1)[1])["request_id"] == "req-300"
    assert writer.dropped == 0


async def test_the_queue_is_bounded_and_other_handlers_get_records(tmp_path: Path) -> None:
    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    writer = AccessLogWriter(isolated_logger("test.access.bound", Capture()), max_queued=10)
    for n in range(15):
        writer.observe(outcome(n))
    assert writer.dropped == 5
    writer.close()
    assert [json.loads(r.getMessage())["request_id"] for r in records] == [
        f"req-{n}" for n in range(10)
    ]
    line = json.loads(records[0].getMessage())
    assert line["cn"] == "jdoex1234" and line["decision"] == "rejected" and line["status"] == 500
    assert abs(records[0].created - line["time"]) < 0.01  # the call's time, not the batch's
