"""The violation ledger: every rejection and every shadow-mode hit, appended for disputes.

An entry names who (the identity the limiter keyed on, the subject DN and the CN), what
(application, service, the policy), when (the wall clock, and the store's own time of the
decision), the answer (decision, status, retry-after) and the request id that the fault carried
in `X-Request-Id`, so an entry can be matched to the exact fault a participant quotes.

Where entries go follows the store:

- every Redis store (one server, Cluster, Sentinel): a capped stream, `<key_prefix>:ledger`
  (`XADD ... MAXLEN ~ ledger.max_entries`), shared by every replica and worker, one JSON entry
  per stream entry in field `e`;
- the memory store: a JSON-lines file, `ledger.path`, by default `var/ledger.jsonl` next to the
  gateway YAML. When it holds `max_entries` lines it is renamed to `<name>.1` (replacing the one
  before) and a new file starts, so the disk holds at most twice `max_entries` entries.

Nothing in the call path waits for the ledger: `LedgerWriter.observe` appends the finished
call's Outcome to an in-memory queue (bounded; the oldest are dropped and counted if the store
stays away for long), and a background task writes the queue out a few times a second. A failed
write keeps its entries queued and is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO
from urllib.parse import urlsplit

from gateway.errors import ConfigError
from gateway.identity import normalise_dn
from gateway.settings import IdentityMode, Settings
from gateway.yamlread import parse_duration

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster

    from gateway.app import Outcome

log = logging.getLogger("gateway.ledger")
shadow_log = logging.getLogger("gateway.shadow")
RECORDED = frozenset({"rejected", "shadow"})
FLUSH_INTERVAL = 0.25
MAX_PENDING = 100_000
_ENCODE_SLICE = 256  # entries encoded between yields to the event loop
_READ_BLOCK = 64 * 1024
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# XADD cannot take several entries; one script call appends a whole batch in one round trip.
_APPEND_SCRIPT = """
for i = 2, #ARGV do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[i])
end
return #ARGV - 1
"""


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    time: float  # the gateway's wall clock when the call finished
    store_time: float  # the limiter's clock at the decision (Redis TIME with the Redis store)
    request_id: str
    decision: str  # rejected | shadow | cleared (a support action)
    identity: str  # what the limiter keyed on: the subject DN, fingerprint or CN
    subject: str
    cn: str
    application: str
    service: str
    policy: str
    retry_after: float
    status: int

    @classmethod
    def from_outcome(cls, outcome: Outcome, mode: IdentityMode, at: float) -> LedgerEntry:
        identity = outcome.identity
        return cls(
            time=round(at, 6),
            store_time=round(outcome.store_time, 6),
            request_id=outcome.request_id,
            decision=outcome.decision,
            identity=identity.key(mode) if identity else "",
            subject=identity.subject if identity else "",
            cn=identity.cn if identity else "",
            application=outcome.application,
            service=outcome.service,
            policy=outcome.policy,
            retry_after=round(outcome.retry_after, 6),
            status=outcome.status,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> LedgerEntry | None:
        """An entry from its JSON form; None for a line that is not one (e.g. torn by a crash)."""
        try:
            data = json.loads(text)
            return cls(**{name: data[name] for name in cls.__slots__})
        except (ValueError, TypeError, KeyError):
            return None

    def to_json(self) -> str:
        return _ENCODE(self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        # By hand: dataclasses.asdict deep-copies every field and costs several times more,
        # and this runs once per ledger entry.
        return {
            "time": self.time,
            "store_time": self.store_time,
            "request_id": self.request_id,
            "decision": self.decision,
            "identity": self.identity,
            "subject": self.subject,
            "cn": self.cn,
            "application": self.application,
            "service": self.service,
            "policy": self.policy,
            "retry_after": self.retry_after,
            "status": self.status,
        }


@dataclass(frozen=True, slots=True)
class Query:
    """Which entries to read: by identity (a DN, a CN or a fingerprint) and time."""

    identity: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int | None = None

    def matches(self, entry: LedgerEntry) -> bool:
        if self.since is not None and entry.time < self.since:
            return False
        if self.until is not None and entry.time > self.until:
            return False
        if self.identity:
            wanted = self.identity
            if "=" in wanted:
                with contextlib.suppress(ValueError):
                    wanted = normalise_dn(wanted)
                return wanted in (entry.identity, entry.subject)
            return wanted in (entry.cn, entry.identity) or wanted.lower() == entry.identity
        return True


class LedgerSink(Protocol):
    """Where entries are kept: append a batch, read them back."""

    name: str
    where: str
    batch: int  # at most this many entries per append

    async def append(self, lines: list[str]) -> None: ...

    async def read(self, query: Query) -> list[LedgerEntry]: ...

    async def recent(self, seconds: float, limit: int) -> list[LedgerEntry]: ...

    async def close(self) -> None: ...


class FileSink:
    """A JSON-lines file, rotated to `<name>.1` at `max_entries` lines (memory store)."""

    name = "file"
    batch = 1_000

    def __init__(self, path: Path, max_entries: int) -> None:
        self.path = path
        self.where = str(path)
        self.max_entries = max_entries
        self._lines: int | None = None  # counted on first append, in the worker thread

    async def append(self, lines: list[str]) -> None:
        await asyncio.to_thread(self._append, lines)

    def _append(self, lines: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._lines is None:
            self._lines = _count_lines(self.path)
        if self._lines >= self.max_entries:
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self._lines = 0
        with self.path.open("a", encoding="utf-8") as out:
            out.write("".join(line + "\n" for line in lines))
        self._lines += len(lines)

    async def read(self, query: Query) -> list[LedgerEntry]:
        return await asyncio.to_thread(self._read, query)

    def _read(self, query: Query) -> list[LedgerEntry]:
        found: list[LedgerEntry] = []
        for path in (self.path.with_name(self.path.name + ".1"), self.path):
            if not path.exists():
                continue
            with path.open("rb") as lines:
                for line in lines:
                    entry = LedgerEntry.from_json(line)
                    if entry is not None and query.matches(entry):
                        found.append(entry)
        return found[-query.limit :] if query.limit else found

    async def recent(self, seconds: float, limit: int) -> list[LedgerEntry]:
        return await asyncio.to_thread(self._recent, time.time() - seconds, limit)

    def _recent(self, cutoff: float, limit: int) -> list[LedgerEntry]:
        """The newest entries back to `cutoff`, newest first, reading the file from its end."""
        found: list[LedgerEntry] = []
        for path in (self.path, self.path.with_name(self.path.name + ".1")):
            for line in _lines_backwards(path):
                entry = LedgerEntry.from_json(line)
                if entry is None:
                    continue
                if entry.time < cutoff or len(found) >= limit:
                    return found
                found.append(entry)
        return found

    async def close(self) -> None:
        pass


class StreamSink:
    """A capped Redis stream shared by every gateway on the store (Redis store)."""

    name = "redis-stream"
    # A script runs alone in Redis: 100 XADDs hold it about a millisecond, so limiter
    # decisions queued behind an append never wait long.
    batch = 100

    def __init__(
        self,
        client: Redis | RedisCluster,
        key: str,
        max_entries: int,
        where: str,
        closer: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._client = client
        self._closer = closer
        self.key = key
        self.max_entries = max_entries
        self.where = f"{where} {key}"
        self._append_script = client.register_script(_APPEND_SCRIPT)

    async def append(self, lines: list[str]) -> None:
        await self._append_script(keys=[self.key], args=[self.max_entries, *lines])

    async def read(self, query: Query) -> list[LedgerEntry]:
        start = "-" if query.since is None else f"{int(query.since * 1000)}-0"
        end = "+" if query.until is None else f"{int(query.until * 1000) + 1}-0"
        found: list[LedgerEntry] = []
        async for entry in self._range(start, end):
            if query.matches(entry):
                found.append(entry)
        return found[-query.limit :] if query.limit else found

    async def _range(self, start: str, end: str) -> AsyncIterator[LedgerEntry]:
        while True:
            batch = _stream_entries(await self._client.xrange(self.key, start, end, count=1000))
            for _, entry in batch:
                if entry is not None:
                    yield entry
            if len(batch) < 1000:
                return
            start = "(" + batch[-1][0]

    async def recent(self, seconds: float, limit: int) -> list[LedgerEntry]:
        start = f"{int((time.time() - seconds) * 1000)}-0"
        batch = _stream_entries(await self._client.xrevrange(self.key, "+", start, count=limit))
        return [entry for _, entry in batch if entry is not None]

    async def close(self) -> None:
        if self._closer is not None:
            await self._closer()
        else:
            await self._client.aclose()


class LedgerWriter:
    """The observer that queues violations, and the task that writes them out."""

    def __init__(
        self,
        sink: LedgerSink,
        mode: IdentityMode,
        *,
        flush_interval: float = FLUSH_INTERVAL,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.sink = sink
        self._mode = mode
        self._interval = flush_interval
        self._pending: deque[LedgerEntry | tuple[float, Outcome]] = deque()
        self._max_pending = max_pending
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()  # the timer and an admin read may both flush
        self._in_flight = 0  # entries taken off the queue by a write not yet finished
        self._stop = asyncio.Event()
        self._failing = False
        self.written = 0
        self.dropped = 0
        self.errors = 0
        self.last_error: str | None = None

    def observe(self, outcome: Outcome) -> None:
        """The per-call observer: queue rejections and shadow hits, nothing else."""
        if outcome.decision in RECORDED:
            self._pending.append((time.time(), outcome))
            if len(self._pending) > self._max_pending:
                self._pending.popleft()
                self.dropped += 1

    def record(self, entry: LedgerEntry) -> None:
        """Queue an entry made elsewhere (a support action)."""
        self._pending.append(entry)

    def status(self) -> dict[str, Any]:
        return {
            "sink": self.sink.name,
            "where": self.sink.where,
            "written": self.written,
            "dropped": self.dropped,
            "errors": self.errors,
            "pending": len(self._pending) + self._in_flight,
            "last_error": self.last_error,
        }

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Let the task finish the write in progress (never cut one: a cut write may have
        reached the store and would be written twice), write what is left, close the sink."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self.flush()
        if self._pending:
            log.error(
                "ledger: %d entries could not be written to %s at shutdown",
                len(self._pending),
                self.sink.where,
            )
        await self.sink.close()

    async def flush(self) -> None:
        """Write everything queued so far; on failure the entries stay queued, in order."""
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        pending = self._pending
        while pending:
            batch = [pending.popleft() for _ in range(min(len(pending), self.sink.batch))]
            self._in_flight = len(batch)
            entries: list[LedgerEntry] = []
            try:
                for index, item in enumerate(batch):
                    entries.append(
                        item
                        if isinstance(item, LedgerEntry)
                        else LedgerEntry.from_outcome(item[1], self._mode, item[0])
                    )
                    if index % _ENCODE_SLICE == _ENCODE_SLICE - 1:
                        await asyncio.sleep(0)  # a big batch never holds the loop for long
                await self.sink.append([entry.to_json() for entry in entries])
            except BaseException as exc:  # keep the entries, in order, for the next try
                pending.extendleft(reversed(batch))
                while len(pending) > self._max_pending:
                    pending.popleft()
                    self.dropped += 1
                if not isinstance(exc, Exception):
                    raise  # cancelled (shutdown): close() makes the last try
                self.errors += 1
                self.last_error = str(exc) or type(exc).__name__
                if not self._failing:
                    log.warning(
                        "ledger: writing to %s failed (%s); %d entries kept queued",
                        self.sink.where,
                        self.last_error,
                        len(pending),
                    )
                self._failing = True
                return
            finally:
                self._in_flight = 0
            if self._failing:
                log.info("ledger: writing to %s again", self.sink.where)
                self._failing = False
            self.written += len(entries)
            for entry in entries:
                if entry.decision == "shadow":
                    # The rollout signal, also when the access log is off; logged here, off
                    # the call path, once the entry is safely written.
                    shadow_log.info(
                        "shadow: %s would have been rejected by %s on %s/%s (retry after "
                        "%.3fs, request %s)",
                        entry.cn or entry.identity,
                        entry.policy,
                        entry.application,
                        entry.service,
                        entry.retry_after,
                        entry.request_id,
                    )

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval)
            try:
                await self.flush()
            except Exception:  # the writer must outlive any one bad batch
                log.exception("ledger: flush failed")


def ledger_path(settings: Settings) -> Path:
    """The file ledger's path: `ledger.path`, else var/ledger.jsonl next to the gateway YAML."""
    if settings.ledger.path is not None:
        return settings.ledger.path
    return settings.source.parent / "var" / "ledger.jsonl"


def ledger_sink(settings: Settings) -> LedgerSink:
    """The sink that goes with the store: a Redis stream for every Redis store (one server,
    Cluster or Sentinel), a file for the memory store."""
    if urlsplit(settings.store.url).scheme == "memory":
        return FileSink(ledger_path(settings), settings.ledger.max_entries)
    from gateway.limiter.factory import limiter_from_url
    from gateway.limiter.redis import RedisLimiter

    # The store URL is read exactly as the limiter reads it (one parser for every scheme), but
    # into a pool of its own, with timeouts made for background writes rather than decisions:
    # a write timed out after it reached Redis would be written twice on its retry.
    store = dataclasses.replace(settings.store, timeout=2.0, connect_timeout=1.0, pool_size=4)
    owner = limiter_from_url(store)
    if not isinstance(owner.primary, RedisLimiter):
        raise ConfigError(
            [f"{settings.source}:1: store: {owner.label} has no Redis client for the ledger stream"]
        )
    return StreamSink(
        owner.primary.client,
        f"{settings.store.key_prefix}:ledger",
        settings.ledger.max_entries,
        owner.label,
        owner.close,
    )


def parse_since(text: str, now: float | None = None) -> float:
    """`1h`, `30m`, `90s` (ago) or an ISO 8601 time (UTC when it names no zone) -> epoch."""
    now = time.time() if now is None else now
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (1h, 30m) nor an ISO 8601 time (2026-05-01T12:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


async def query_ledger(settings: Settings, query: Query) -> list[LedgerEntry]:
    """Read the ledger the configured gateway writes (for `aup-gateway ledger`)."""
    sink = ledger_sink(settings)
    try:
        return await sink.read(query)
    finally:
        await sink.close()


COLUMNS = (
    "time",
    "decision",
    "cn",
    "application",
    "service",
    "policy",
    "retry_after",
    "request_id",
)


def print_ledger(
    config: Path,
    *,
    identity: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: int | None = None,
    as_json: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """`aup-gateway ledger`: the entries the configured gateway wrote; the exit status."""
    from gateway.settings import load_settings

    out, err = out or sys.stdout, err or sys.stderr
    settings = load_settings(config)
    try:
        query = Query(
            identity,
            parse_since(since) if since else None,
            parse_since(until) if until else None,
            limit,
        )
    except ValueError as exc:
        print(f"ledger: {exc}", file=err)
        return 2
    try:
        entries = asyncio.run(query_ledger(settings, query))
    except Exception as exc:  # an unreachable store, an unreadable file: say which, exit 1
        print(f"ledger: cannot read {ledger_sink_label(settings)}: {exc}", file=err)
        return 1
    if as_json:
        print_json(entries, out)
    else:
        print_table(entries, out)
        print(f"{len(entries)} entries", file=err)
    return 0


def ledger_sink_label(settings: Settings) -> str:
    if urlsplit(settings.store.url).scheme != "memory":
        return f"the Redis stream {settings.store.key_prefix}:ledger"
    return str(ledger_path(settings))


def print_table(entries: Iterable[LedgerEntry], out: TextIO) -> None:
    rows = [COLUMNS] + [
        (
            dt.datetime.fromtimestamp(e.time, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z",
            e.decision,
            e.cn or e.identity,
            e.application,
            e.service,
            e.policy,
            f"{e.retry_after:.3f}",
            e.request_id,
        )
        for e in entries
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(),
            file=out,
        )


def print_json(entries: Iterable[LedgerEntry], out: TextIO) -> None:
    json.dump([entry.as_dict() for entry in entries], out, indent=2)
    print(file=out)


def _stream_entries(reply: Any) -> list[tuple[str, LedgerEntry | None]]:
    """XRANGE / XREVRANGE reply -> (stream id, entry or None when it is not one of ours)."""
    found: list[tuple[str, LedgerEntry | None]] = []
    for stream_id, fields in reply or ():
        raw = (fields or {}).get(b"e", b"")
        ident = stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)
        found.append((ident, LedgerEntry.from_json(raw)))
    return found


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as data:
            return sum(block.count(b"\n") for block in iter(lambda: data.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def _lines_backwards(path: Path) -> Iterable[bytes]:
    """The file's complete lines, last first, read in blocks from the end."""
    try:
        data = path.open("rb")
    except FileNotFoundError:
        return
    with data:
        position = data.seek(0, os.SEEK_END)
        rest = b""
        while position > 0:
            size = min(_READ_BLOCK, position)
            position -= size
            data.seek(position)
            block = data.read(size) + rest
            lines = block.split(b"\n")
            rest = lines[0]
            for line in reversed(lines[1:]):
                if line:
                    yield line
        if rest:
            yield rest
