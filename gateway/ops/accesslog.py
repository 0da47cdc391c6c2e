"""The JSON access log, written in batches off the request's path.

A call's observer only appends the finished Outcome (and the wall-clock time) to a bounded queue;
a callback a few milliseconds later turns everything queued into JSON lines and hands them to the
`gateway.access` logger's handlers at once. Records, levels, filters and handlers stay the
logging module's, so operators route the log as before; what is saved per call is the logging
machinery and, for plain stream and file handlers (what `serve` configures), a write and a flush
per line: those handlers get one write and one flush per batch.

What can be lost: nothing at a graceful stop (`close` flushes); on a crash (SIGKILL, OOM) the
lines of the last flush interval (at most `interval` seconds, at most `max_queued` lines). When
the queue is full (a handler that cannot keep up) new lines are dropped and counted, never
allowed to grow memory or to slow the calls down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from json.encoder import encode_basestring_ascii as _json_string

from gateway.clock import Clock, wall_clock
from gateway.outcome import Outcome

ACCESS_LOGGER = "gateway.access"
_BATCHED_HANDLERS = (logging.StreamHandler, logging.FileHandler)
_FRAGMENTS = 4096  # distinct (identity, key, decision, ...) shapes kept encoded
_DEFAULT_FORMATTER = logging.Formatter()  # what a handler without a formatter uses


def access_line(outcome: Outcome, at: float, fragments: dict[tuple[str, ...], str]) -> str:
    """One call as one JSON line (the fields `simulate` replays and operators grep).

    The fields that repeat from call to call (who, which key and service, the decision) are
    encoded once into `fragments` and reused: JSON-encoding them each time was most of the
    line's cost.
    """
    identity = outcome.identity
    cn, subject = (identity.cn, identity.subject) if identity else ("", "")
    shape = (
        cn,
        subject,
        outcome.key,
        outcome.method,
        outcome.application,
        outcome.service,
        outcome.decision,
        outcome.policy,
    )
    fragment = fragments.get(shape)
    if fragment is None:
        if len(fragments) >= _FRAGMENTS:
            fragments.clear()
        fragment = fragments[shape] = json.dumps(
            {
                "cn": cn if identity else None,
                "identity": subject if identity else None,
                "key": outcome.key or None,
                "method": outcome.method,
                "application": outcome.application,
                "service": outcome.service,
                "decision": outcome.decision,
                "policy": outcome.policy,
            },
            separators=(",", ":"),
        )[1:-1]
    retry_after = f"{outcome.retry_after:.3f}" if outcome.retry_after else "null"
    return (
        f'{{"time":{at:.3f},"request_id":{_json_string(outcome.request_id)},{fragment},'
        f'"status":{outcome.status},"upstream_status":{outcome.upstream_status or "null"},'
        f'"retry_after":{retry_after},"latency_ms":{outcome.elapsed * 1000:.3f}}}'
    )


class AccessLogWriter:
    """The access log's observer and its background writer (one per gateway process)."""

    def __init__(
        self,
        logger: logging.Logger | None = None,
        interval: float = 0.005,
        max_queued: int = 65_536,
        clock: Clock = wall_clock,
    ) -> None:
        self._logger = logger or logging.getLogger(ACCESS_LOGGER)
        self._clock = clock
        self._interval = interval
        self._max = max_queued
        self._queued: list[tuple[Outcome, float]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._fragments: dict[tuple[str, ...], str] = {}
        self.dropped = 0
        self.batches = 0

    def observe(self, outcome: Outcome) -> None:
        """The per-call cost: one append (the Outcome is finished and no longer changes)."""
        queued = self._queued
        if len(queued) >= self._max:
            self.dropped += 1
            return
        queued.append((outcome, self._clock()))
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a synchronous caller): write now
                self.flush()
                return
            self._timer = loop.call_later(self._interval, self.flush)

    def flush(self) -> None:
        """Write everything queued: one batch per handler. `close` calls this at a stop."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queued, self._queued = self._queued, []
        logger = self._logger
        if not queued or logger.disabled or not logger.isEnabledFor(logging.INFO):
            return
        self.batches += 1
        fragments = self._fragments
        lines = [(access_line(o, at, fragments), at) for o, at in queued]
        # One LogRecord's fields are made per batch; each line changes only its message and time
        # (a record's __init__, which inspects the thread, the process and the caller's file,
        # was a third of a line's cost).
        base = logger.makeRecord(logger.name, logging.INFO, __file__, 0, "", (), None).__dict__
        records: list[logging.LogRecord] | None = None  # for handlers that need records
        for handler in _handlers(logger):
            if handler.level > logging.INFO:
                continue
            if not logger.filters and _plain(handler):
                _write(handler, lines, base)
                continue
            if records is None:
                records = [_record(base, text, at) for text, at in lines]
                if logger.filters:
                    records = [r for r in records if logger.filter(r)]
            for record in records:
                handler.handle(record)

    def close(self) -> None:
        self.flush()


def _handlers(logger: logging.Logger) -> list[logging.Handler]:
    """The handlers a record of `logger` reaches (Logger.callHandlers' walk)."""
    found: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        found.extend(current.handlers)
        if not current.propagate:
            break
        current = current.parent
    if not found and logging.lastResort is not None:
        found.append(logging.lastResort)
    return found


def _record(base: dict[str, object], text: str, at: float) -> logging.LogRecord:
    record = logging.LogRecord.__new__(logging.LogRecord)
    record.__dict__.update(base)
    record.msg = text
    record.created = at
    record.msecs = (at - int(at)) * 1000
    return record


def _plain(handler: logging.Handler) -> bool:
    """A stream or file handler with an open stream, no filters and a plain Formatter: what
    `serve` configures. Its batch is formatted here and written at once."""
    return (
        type(handler) in _BATCHED_HANDLERS
        and getattr(handler, "stream", None) is not None
        and not handler.filters
        and type(handler.formatter or _DEFAULT_FORMATTER) is logging.Formatter
    )


class _Fields:
    """What Formatter.formatMessage and formatTime read: a record's fields, nothing else."""


def _write(
    handler: logging.Handler, lines: list[tuple[str, float]], base: dict[str, object]
) -> None:
    """Format the lines as `handler.format` would for their records (a plain Formatter: the
    fields, `asctime` and the message; the time text made once per second), then one write and
    one flush."""
    assert isinstance(handler, logging.StreamHandler)
    formatter = handler.formatter or _DEFAULT_FORMATTER
    uses_time = formatter.usesTime()
    fields = _Fields()
    fields.__dict__ = values = dict(base)  # the same fields for every line but these four:
    second, stamp = -1, ""
    out: list[str] = []
    for text, at in lines:
        msecs = (at - int(at)) * 1000
        values["msg"] = values["message"] = text
        values["created"] = at
        values["msecs"] = msecs
        if uses_time:
            if formatter.datefmt is not None:
                values["asctime"] = formatter.formatTime(fields, formatter.datefmt)  # type: ignore[arg-type]
            else:
                if int(at) != second:
                    second = int(at)
                    stamp = time.strftime(formatter.default_time_format, formatter.converter(at))
                msec_format = formatter.default_msec_format
                values["asctime"] = msec_format % (stamp, msecs) if msec_format else stamp
        out.append(formatter.formatMessage(fields) + handler.terminator)  # type: ignore[arg-type]
    handler.acquire()
    try:
        handler.stream.write("".join(out))
        handler.flush()
    except Exception:  # as logging does: a broken stream never fails the gateway
        handler.handleError(_record(base, lines[0][0], lines[0][1]))
    finally:
        handler.release()
