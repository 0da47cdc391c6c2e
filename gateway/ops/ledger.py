"""The violation ledger, kept by lockout episode, for settling disputes with participants.

An episode is one key's run of violations: the rejections (or shadow-mode hits) of one
(identity, application, service, policy) from the first until the key is free again. Its entry
names who (the identity the limiter keyed on, the subject DN and the CN), what (application,
service, policy), when (first and last rejection on the store's clock, and `ends_at`, when the
key is free again), how much (`count`, the longest `retry_after`), the request ids of the first
and the last fault (a participant quotes one of them), the decision (rejected | shadow), and
whether any of it was decided without the store (`fallback`). docs/ledger.md is the schema.

An episode is *open* while its key is locked: it is written every `ledger.flush_interval` (1 s
by default) while it changes, with `final: false`, and readers see it. Once its key is free (the
store's clock passed `ends_at`) it is written once more with `final: true` and never again. A
later rejection of the same key starts a new episode. Each gateway process keeps its own
episodes: two replicas rejecting one key write two episodes (their ids differ).

Nothing in the call path waits for the ledger: `LedgerWriter.observe` updates the key's open
episode in memory (a dict look-up and a few assignments); a background task writes. A process
killed with SIGKILL therefore loses at most what it observed since its last write: one flush
interval. A crashed writer's open episode stays readable, and the next writer start writes it
final once its key has long been free.

Retention is by time and fair: `ledger.retention` (400 days by default) after an episode's last
write, and at most `ledger.max_per_identity` final episodes per identity. One identity's
episodes are never evicted by another's: the bound is per identity. Reaching it drops that
identity's oldest episodes, and is counted (`evicted`), logged, shown in /readyz and exported as
`aup_ledger_evicted_episodes`.

Where entries go follows the store:

- every Redis store (one server, Cluster, Sentinel): keys under the one hash tag
  `<key_prefix>:{ledger}`, so that a cluster keeps them on one node: a stream of final episodes
  per identity (`...:i:<identity>`, trimmed by time and by the per-identity bound, expiring after
  the retention), a hash of open episodes (`...:open`), and a sorted set of identities by last
  write (`...:who`). One script call writes a batch.
- the memory store: a JSON-lines file, `ledger.path` (by default `var/ledger.jsonl` next to the
  gateway YAML), one line per written version; readers keep the last version of each episode.
  The file is compacted (old versions, expired and over-bound episodes dropped) whenever it has
  grown to twice what it held after the last compaction, or an identity is a tenth over its
  bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import datetime as dt
import json
import logging
import os
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TextIO, cast
from urllib.parse import urlsplit

from gateway.clock import Clock, wall_clock
from gateway.config.settings import LedgerSettings, Settings
from gateway.config.yamlread import parse_duration
from gateway.edge.identity import IdentityMode, normalise_dn
from gateway.limiter.redis import lua_source
from gateway.outcome import VIOLATIONS, Violation

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster

    from gateway.limiter.fallback import Excess
    from gateway.outcome import Outcome

log = logging.getLogger("gateway.ledger")
shadow_log = logging.getLogger("gateway.shadow")
MAX_PENDING = 100_000  # final episodes waiting to be written
MAX_OPEN = 200_000  # open episodes held in memory; past it the oldest is ended early
# A crashed writer's open episode is written final by the next writer this long after its end
# (long enough that a live writer, flushing every second or so, always does it first).
ADOPT_AFTER = 60.0
_COMPACT_MIN = 10_000
_DEFAULTS = LedgerSettings()
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
Format = Literal["table", "json", "jsonl", "csv"]
# What an entry records: a violation episode (rejected | shadow), a support action (cleared) or
# calls the local fallback let past a policy during a store outage (excess, reconciliation).
LedgerDecision = Literal[Violation, "cleared", "excess"]


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One episode as written (docs/ledger.md). Times are epoch seconds; `first`, `last` and
    `ends_at` are on the store's clock, `time` is the writer's wall clock at this write."""

    id: str  # the episode: its first fault's request id (support actions: admin:<peer>:...)
    decision: LedgerDecision
    identity: str  # what the limiter keyed on: the subject DN, fingerprint or CN
    subject: str
    cn: str
    application: str
    service: str
    policy: str
    first: float  # the first rejection
    last: float  # the last rejection so far
    ends_at: float  # when the key is free again (the episode is over once the store passes it)
    count: int  # rejections in the episode (excess: calls allowed beyond the policy)
    retry_after: float  # the longest retry-after the episode's faults carried
    first_request_id: str
    last_request_id: str
    fallback: bool  # some of it was decided without the store (on_store_error)
    final: bool  # written for the last time
    status: int  # the HTTP status of the faults (200 for shadow hits)
    time: float
    note: str = ""  # support actions: the reason the operator gave (older entries lack it)

    @classmethod
    def from_json(cls, text: str | bytes) -> LedgerEntry | None:
        """An entry from its JSON form; None for a line that is not one (e.g. torn by a crash)."""
        try:
            data = json.loads(text)
            return cls(**{name: data[name] for name in cls.__slots__ if name in data})
        except (ValueError, TypeError, KeyError):
            return None

    def to_json(self) -> str:
        return _ENCODE(self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


COLUMNS: tuple[str, ...] = LedgerEntry.__slots__


class _Open:
    """An open episode, updated in place by every rejection of its key (the hot path)."""

    __slots__ = (
        "count",
        "decision",
        "dirty",
        "ends_at",
        "fallback",
        "first",
        "id",
        "last",
        "last_request_id",
        "offset",
        "outcome",
        "retry_after",
        "written",
    )

    def __init__(self, outcome: Outcome, wall: float) -> None:
        t = outcome.store_time
        self.id = outcome.request_id
        self.decision = cast("Violation", outcome.decision)  # observe() admits only these
        self.outcome = outcome  # the first call: who, what, the first request id
        self.first = self.last = t
        self.ends_at = t + outcome.retry_after
        self.count = 1
        self.retry_after = outcome.retry_after
        self.last_request_id = outcome.request_id
        self.fallback = outcome.fallback
        self.offset = t - wall  # store clock minus wall clock, to tell when the key is free
        self.dirty = True
        self.written = False

    def add(self, outcome: Outcome, wall: float) -> None:
        t = outcome.store_time
        self.count += 1
        if t > self.last:
            self.last = t
        ends_at = t + outcome.retry_after
        if ends_at > self.ends_at:
            self.ends_at = ends_at
        if outcome.retry_after > self.retry_after:
            self.retry_after = outcome.retry_after
        self.last_request_id = outcome.request_id
        if outcome.fallback:
            self.fallback = True
        self.offset = t - wall
        self.dirty = True

    def entry(self, mode: IdentityMode, wall: float, final: bool) -> LedgerEntry:
        outcome = self.outcome
        identity = outcome.identity
        return LedgerEntry(
            id=self.id,
            decision=self.decision,
            identity=identity.key(mode) if identity else "",
            subject=identity.subject if identity else "",
            cn=identity.cn if identity else "",
            application=outcome.application,
            service=outcome.service,
            policy=outcome.policy,
            first=round(self.first, 6),
            last=round(self.last, 6),
            ends_at=round(self.ends_at, 6),
            count=self.count,
            retry_after=round(self.retry_after, 6),
            first_request_id=outcome.request_id,
            last_request_id=self.last_request_id,
            fallback=self.fallback,
            final=final,
            status=outcome.status,
            time=round(wall, 6),
        )


def support_entry(
    identity: str, application: str, service: str, request_id: str, at: float, note: str = ""
) -> LedgerEntry:
    """A support action (a cleared key) in the episode shape: final at once, count 1; `note`
    is the reason the operator gave."""
    return _final_entry(
        f"{request_id}:{int(at * 1000)}", "cleared", identity, application, service, at,
        policy="", count=1, request_id=request_id, fallback=False, note=note[:500],
    )  # fmt: skip


def excess_entry(excess: Excess, at: float) -> LedgerEntry:
    """A key the local fallback let past its policy during a store outage, found when its calls
    were merged into the store: `count` is the calls beyond the policy (docs/outage.md)."""
    inner = excess.key.partition("{")[2].rpartition("}")[0]
    identity, application, service = [*inner.rsplit("|", 2), "", ""][:3]
    entry = _final_entry(
        f"excess:{excess.key}:{int(excess.store_time * 1000)}", "excess", identity, application,
        service, excess.store_time, policy=f"{excess.rate.limit} per {excess.rate.per:g}s",
        count=excess.calls, request_id="", fallback=True,
    )  # fmt: skip
    return replace(entry, time=at)


def _final_entry(
    id_prefix: str,
    decision: LedgerDecision,
    identity: str,
    application: str,
    service: str,
    at: float,
    *,
    policy: str,
    count: int,
    request_id: str,
    fallback: bool,
    note: str = "",
) -> LedgerEntry:
    """An entry that is final when written (support actions, excess): one instant, no faults."""
    return LedgerEntry(
        id=f"{id_prefix}:{os.urandom(4).hex()}",
        decision=decision,
        identity=identity,
        subject=identity if "=" in identity else "",
        cn=_attribute(identity, "CN") if "=" in identity else identity,
        application=application,
        service=service,
        policy=policy,
        first=at,
        last=at,
        ends_at=at,
        count=count,
        retry_after=0.0,
        first_request_id=request_id,
        last_request_id=request_id,
        fallback=fallback,
        final=True,
        status=0,
        time=at,
        note=note,
    )


def _attribute(dn: str, wanted: str) -> str:
    for part in dn.split(","):
        name, _, value = part.partition("=")
        if name.strip().upper() == wanted:
            return value.strip()
    return ""


@dataclass(frozen=True, slots=True)
class Query:
    """Which episodes to read: by identity (a DN, a CN or a fingerprint), application, service,
    and a time range that the episode overlaps (store clock)."""

    identity: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int | None = None
    application: str | None = None
    service: str | None = None

    def matches(self, entry: LedgerEntry) -> bool:
        if self.since is not None and entry.last < self.since:
            return False
        if self.until is not None and entry.first > self.until:
            return False
        if self.application and entry.application.lower() != self.application.lower():
            return False
        if self.service and entry.service != self.service:
            return False
        if self.identity:
            wanted = self.identity
            if "=" in wanted:
                with contextlib.suppress(ValueError):
                    wanted = normalise_dn(wanted)
                return wanted in (entry.identity, entry.subject)
            return wanted in (entry.cn, entry.identity) or wanted.lower() == entry.identity
        return True

    def select(self, entries: Iterable[LedgerEntry]) -> list[LedgerEntry]:
        """The matching episodes, each in its last written version, oldest first."""
        latest = _latest(entries)
        found = sorted((e for e in latest if self.matches(e)), key=lambda e: (e.first, e.id))
        return found[-self.limit :] if self.limit else found


def _latest(entries: Iterable[LedgerEntry]) -> list[LedgerEntry]:
    """Each episode's last version: a final one wins, then the latest write."""
    latest: dict[str, LedgerEntry] = {}
    for entry in entries:
        seen = latest.get(entry.id)
        if seen is None or (entry.final, entry.time, entry.count) >= (
            seen.final,
            seen.time,
            seen.count,
        ):
            latest[entry.id] = entry
    return list(latest.values())


class LedgerSink(Protocol):
    """Where episodes are kept: write versions, read the latest of each back."""

    name: str
    where: str
    batch: int  # at most this many entries per write

    async def write(self, entries: list[LedgerEntry]) -> dict[str, int]:
        """Write; returns, per identity, the episodes its bound evicted."""
        ...

    async def read(self, query: Query) -> list[LedgerEntry]: ...

    async def recent(self, seconds: float, limit: int) -> list[LedgerEntry]: ...

    async def stale(self, before: float) -> list[LedgerEntry]:
        """Open episodes whose key was free before `before` (their writer died)."""
        ...

    async def close(self) -> None: ...


class FileSink:
    """A JSON-lines file of episode versions, compacted as it grows (memory store)."""

    name = "file"
    batch = 1_000

    def __init__(
        self, path: Path, retention: float = _DEFAULTS.retention, max_per_identity: int = 0
    ) -> None:
        self.path = path
        self.where = str(path)
        self.retention = retention
        self.max_per_identity = max_per_identity or _DEFAULTS.max_per_identity
        self._lines: int | None = None  # counted on first write, in the worker thread
        self._finals: dict[str, int] = {}  # final episodes per identity in the file
        self._compact_at = _COMPACT_MIN

    async def write(self, entries: list[LedgerEntry]) -> dict[str, int]:
        lines = [entry.to_json() for entry in entries]
        finals = [entry.identity for entry in entries if entry.final]
        return await asyncio.to_thread(self._append, lines, finals)

    def _append(self, lines: list[str], finals: list[str]) -> dict[str, int]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._lines is None:
            self._compact()  # counts the lines and each identity's final episodes
        with self.path.open("a", encoding="utf-8") as out:
            out.write("".join(line + "\n" for line in lines))
        self._lines = (self._lines or 0) + len(lines)
        over = False
        for identity in finals:
            count = self._finals[identity] = self._finals.get(identity, 0) + 1
            # A tenth of slack, so that an identity at its bound does not rewrite every write.
            over = over or count > self.max_per_identity + self.max_per_identity // 10
        if over or self._lines >= self._compact_at:
            return self._compact()
        return {}

    async def compact(self) -> dict[str, int]:
        return await asyncio.to_thread(self._compact)

    def _compact(self) -> dict[str, int]:
        """Rewrite the file with each episode's last version, within the retention and the
        per-identity bound; returns the episodes the bound evicted, per identity."""
        if not self.path.exists():
            self._lines, self._finals = 0, {}
            return {}
        kept = _latest(self._entries())
        cutoff = wall_clock() - self.retention
        kept = [e for e in kept if e.time >= cutoff]
        evicted: dict[str, int] = {}
        by_identity: dict[str, list[LedgerEntry]] = {}
        for entry in kept:
            if entry.final:
                by_identity.setdefault(entry.identity, []).append(entry)
        for identity, finals in by_identity.items():
            over = len(finals) - self.max_per_identity
            if over > 0:
                finals.sort(key=lambda e: (e.last, e.id))
                dropped = {e.id for e in finals[:over]}
                kept = [e for e in kept if e.id not in dropped]
                evicted[identity] = over
        kept.sort(key=lambda e: (e.time, e.id))
        temporary = self.path.with_name(self.path.name + ".compacting")
        with temporary.open("w", encoding="utf-8") as out:
            out.write("".join(e.to_json() + "\n" for e in kept))
        os.replace(temporary, self.path)
        self._finals = {}
        for entry in kept:
            if entry.final:
                self._finals[entry.identity] = self._finals.get(entry.identity, 0) + 1
        self._lines = len(kept)
        self._compact_at = max(_COMPACT_MIN, 2 * len(kept))
        return evicted

    def _entries(self) -> Iterable[LedgerEntry]:
        try:
            lines = self.path.open("rb")
        except FileNotFoundError:
            return
        with lines:
            for line in lines:
                entry = LedgerEntry.from_json(line)
                if entry is not None:
                    yield entry

    async def read(self, query: Query) -> list[LedgerEntry]:
        return await asyncio.to_thread(lambda: query.select(self._entries()))

    async def recent(self, seconds: float, limit: int) -> list[LedgerEntry]:
        return await asyncio.to_thread(
            lambda: _newest(_latest(self._entries()), wall_clock() - seconds, limit)
        )

    async def stale(self, before: float) -> list[LedgerEntry]:
        return await asyncio.to_thread(
            lambda: [e for e in _latest(self._entries()) if not e.final and e.ends_at < before]
        )

    async def close(self) -> None:
        pass


class StreamSink:
    """Per-identity Redis streams of final episodes, plus a hash of open ones (Redis store)."""

    name = "redis-stream"
    # A script runs alone in Redis: a hundred entries hold it about a millisecond, so limiter
    # decisions queued behind a write never wait long.
    batch = 100

    def __init__(
        self,
        client: Redis | RedisCluster,
        prefix: str,
        where: str,
        retention: float = _DEFAULTS.retention,
        max_per_identity: int = _DEFAULTS.max_per_identity,
        closer: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._client = client
        self._closer = closer
        base = f"{prefix}:{{ledger}}"  # one hash tag: one cluster slot for every ledger key
        self.open_key = f"{base}:open"
        self.who_key = f"{base}:who"
        self.stream_prefix = f"{base}:i:"
        self.retention = retention
        self.max_per_identity = max_per_identity
        self.where = f"{where} {base}"
        self._write_script = client.register_script(lua_source("ledger_write.lua"))

    def stream_key(self, identity: str) -> str:
        return self.stream_prefix + identity

    async def write(self, entries: list[LedgerEntry]) -> dict[str, int]:
        args: list[str | int] = [
            round(self.retention * 1000),
            self.max_per_identity,
            self.stream_prefix,
        ]
        for entry in entries:
            args += ["f" if entry.final else "o", entry.id, entry.identity, entry.to_json()]
        reply = await self._write_script(keys=[self.open_key, self.who_key], args=args)
        pairs = list(reply or ())
        return {_text(pairs[i]): int(pairs[i + 1]) for i in range(0, len(pairs) - 1, 2)}

    async def _all(self, since: float | None) -> list[LedgerEntry]:
        """Every open episode, and the final ones written since `since` (stream ids are write
        times, and an episode is written no earlier than its last rejection)."""
        low = "-inf" if since is None else int(since * 1000)
        identities = await self._client.zrangebyscore(self.who_key, low, "+inf")
        start = "-" if since is None else f"{int(since * 1000)}-0"
        found: list[LedgerEntry] = []
        for raw in identities:
            key = self.stream_key(_text(raw))
            position = start
            while True:
                batch = await self._client.xrange(key, position, "+", count=1000)
                for _, fields in batch or ():
                    entry = LedgerEntry.from_json((fields or {}).get(b"e", b""))
                    if entry is not None:
                        found.append(entry)
                if not batch or len(batch) < 1000:
                    break
                position = "(" + _text(batch[-1][0])
        for raw in (await self._client.hvals(self.open_key)) or ():
            entry = LedgerEntry.from_json(raw)
            if entry is not None:
                found.append(entry)
        return found

    async def read(self, query: Query) -> list[LedgerEntry]:
        return query.select(await self._all(query.since))

    async def recent(self, seconds: float, limit: int) -> list[LedgerEntry]:
        cutoff = wall_clock() - seconds
        return _newest(_latest(await self._all(cutoff)), cutoff, limit)

    async def stale(self, before: float) -> list[LedgerEntry]:
        found = []
        for raw in (await self._client.hvals(self.open_key)) or ():
            entry = LedgerEntry.from_json(raw)
            if entry is not None and entry.ends_at < before:
                found.append(entry)
        return found

    async def close(self) -> None:
        if self._closer is not None:
            await self._closer()
        else:
            await self._client.aclose()


def _newest(entries: list[LedgerEntry], cutoff: float, limit: int) -> list[LedgerEntry]:
    found = sorted((e for e in entries if e.time >= cutoff), key=lambda e: -e.time)
    return found[:limit]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class LedgerWriter:
    """The observer that keeps open episodes, and the task that writes them out."""

    def __init__(
        self,
        sink: LedgerSink,
        mode: IdentityMode,
        *,
        flush_interval: float = _DEFAULTS.flush_interval,
        max_pending: int = MAX_PENDING,
        max_open: int = MAX_OPEN,
        clock: Clock = wall_clock,
    ) -> None:
        self.sink = sink
        self._mode = mode
        self.flush_interval = flush_interval
        self._clock = clock
        self._open: dict[tuple[str, str], _Open] = {}
        self._done: deque[LedgerEntry] = deque()  # final entries not yet written
        self._max_pending = max_pending
        self._max_open = max_open
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()  # the timer and an admin read may both flush
        self._in_flight = 0
        self._stop = asyncio.Event()
        self._failing = False
        self.written = 0  # entry versions written
        self.episodes = 0  # episodes written final
        self.dropped = 0  # final episodes dropped because the queue overflowed
        self.evicted = 0  # final episodes dropped by the per-identity bound
        self.evicted_by: dict[str, int] = {}
        self.errors = 0
        self.last_error: str | None = None

    def observe(self, outcome: Outcome) -> None:
        """The per-call observer: a rejection or shadow hit joins its key's open episode."""
        if outcome.decision not in VIOLATIONS:
            return
        wall = self._clock()
        key = (outcome.key, outcome.policy)
        episode = self._open.get(key)
        if episode is not None:
            if outcome.store_time < episode.ends_at and outcome.decision == episode.decision:
                episode.add(outcome, wall)
                return
            self._finish(key, episode, wall)  # the key was free again: a new episode
        elif len(self._open) >= self._max_open:
            oldest = next(iter(self._open))
            self._finish(oldest, self._open[oldest], wall)
        self._open[key] = _Open(outcome, wall)

    def record(self, entry: LedgerEntry) -> None:
        """Queue an entry made elsewhere (a support action, a reconciliation)."""
        self._queue(entry)

    def _finish(self, key: tuple[str, str], episode: _Open, wall: float) -> None:
        del self._open[key]
        self._queue(episode.entry(self._mode, wall, final=True))

    def _queue(self, entry: LedgerEntry) -> None:
        self._done.append(entry)
        if len(self._done) > self._max_pending:
            self._done.popleft()
            self.dropped += 1

    def status(self) -> dict[str, Any]:
        return {
            "sink": self.sink.name,
            "where": self.sink.where,
            "flush_interval": self.flush_interval,
            "retention": getattr(self.sink, "retention", None),
            "max_per_identity": getattr(self.sink, "max_per_identity", None),
            "open_episodes": len(self._open),
            "written": self.written,
            "episodes": self.episodes,
            "dropped": self.dropped,
            "evicted": self.evicted,
            "evicted_identities": len(self.evicted_by),
            "errors": self.errors,
            "pending": len(self._done) + self._in_flight,
            "last_error": self.last_error,
        }

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Let the task finish the write in progress (never cut one: a cut write may have
        reached the store), write what is left, open episodes included, close the sink."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self.flush()
        if self._done:
            log.error(
                "ledger: %d episodes could not be written to %s at shutdown",
                len(self._done),
                self.sink.where,
            )
        await self.sink.close()

    async def flush(self) -> None:
        """Write every final episode queued and every open one that changed; on failure the
        entries stay queued, in order."""
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        wall = self._clock()
        for key, episode in list(self._open.items()):
            if wall + episode.offset >= episode.ends_at:  # the store's clock passed its end
                self._finish(key, episode, wall)
        done = self._done
        while done:
            batch = [done.popleft() for _ in range(min(len(done), self.sink.batch))]
            if not await self._write(batch):
                done.extendleft(reversed(batch))
                while len(done) > self._max_pending:
                    done.popleft()
                    self.dropped += 1
                return
            self.episodes += sum(1 for e in batch if e.final)
            self._log_shadow(batch)
        changed = [episode for episode in self._open.values() if episode.dirty]
        for start in range(0, len(changed), self.sink.batch):
            part = changed[start : start + self.sink.batch]
            for episode in part:
                episode.dirty = False
            entries = [e.entry(self._mode, wall, final=False) for e in part]
            if not await self._write(entries):
                for episode in changed[start:]:
                    episode.dirty = True
                return
            for episode, entry in zip(part, entries, strict=True):
                if not episode.written:
                    episode.written = True
                    if entry.decision == "shadow":
                        self._log_shadow([entry])
            await asyncio.sleep(0)  # many open episodes never hold the loop for long

    async def _write(self, batch: list[LedgerEntry]) -> bool:
        self._in_flight = len(batch)
        try:
            evicted = await self.sink.write(batch)
        except Exception as exc:  # kept for the next try
            self.errors += 1
            self.last_error = str(exc) or type(exc).__name__
            if not self._failing:
                log.warning(
                    "ledger: writing to %s failed (%s); %d episodes kept queued",
                    self.sink.where,
                    self.last_error,
                    len(self._done) + len(batch),
                )
            self._failing = True
            return False
        finally:
            self._in_flight = 0
        if self._failing:
            log.info("ledger: writing to %s again", self.sink.where)
            self._failing = False
        self.written += len(batch)
        for identity, count in evicted.items():
            self.evicted += count
            self.evicted_by[identity] = self.evicted_by.get(identity, 0) + count
            log.warning(
                "ledger: %s reached its bound of %s episodes: its %d oldest were dropped "
                "(%d so far for this identity)",
                identity,
                getattr(self.sink, "max_per_identity", "?"),
                count,
                self.evicted_by[identity],
            )
        return True

    def _log_shadow(self, entries: list[LedgerEntry]) -> None:
        for entry in entries:
            if entry.decision == "shadow":
                # The rollout signal, also when the access log is off; logged here, off the
                # call path: when an episode is first written, and when it is over.
                shadow_log.info(
                    "shadow: %s would have been rejected %d times%s by %s on %s/%s (longest "
                    "retry after %.3fs, requests %s .. %s)",
                    entry.cn or entry.identity,
                    entry.count,
                    "" if entry.final else " so far",
                    entry.policy,
                    entry.application,
                    entry.service,
                    entry.retry_after,
                    entry.first_request_id,
                    entry.last_request_id,
                )

    async def adopt_stale(self) -> int:
        """Write final the open episodes a crashed writer left behind, long after their end."""
        now = self._clock()
        stale = await self.sink.stale(now - ADOPT_AFTER)
        for entry in stale:
            self._queue(dataclasses.replace(entry, final=True, time=round(now, 6)))
        return len(stale)

    async def _run(self) -> None:
        with contextlib.suppress(Exception):
            await self.adopt_stale()
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.flush_interval)
            try:
                await self.flush()
            except Exception:  # the writer must outlive any one bad batch
                log.exception("ledger: flush failed")


def ledger_writer(settings: Settings, clock: Clock = wall_clock) -> LedgerWriter:
    return LedgerWriter(
        ledger_sink(settings),
        settings.identity,
        flush_interval=settings.ledger.flush_interval,
        clock=clock,
    )


def ledger_path(settings: Settings) -> Path:
    """The file ledger's path: `ledger.path`, else var/ledger.jsonl next to the gateway YAML."""
    if settings.ledger.path is not None:
        return settings.ledger.path
    return settings.source.parent / "var" / "ledger.jsonl"


def ledger_sink(settings: Settings) -> LedgerSink:
    """The sink that goes with the store: Redis streams for every Redis store (one server,
    Cluster or Sentinel), a file for the memory store."""
    ledger = settings.ledger
    if urlsplit(settings.store.url).scheme == "memory":
        return FileSink(ledger_path(settings), ledger.retention, ledger.max_per_identity)
    from gateway.limiter.factory import redis_client_from_url

    # A pool of its own, with timeouts made for background writes rather than decisions.
    store = dataclasses.replace(settings.store, timeout=2.0, connect_timeout=1.0, pool_size=4)
    owner = redis_client_from_url(store)
    return StreamSink(
        owner.client,
        settings.store.key_prefix,
        owner.label,
        ledger.retention,
        ledger.max_per_identity,
        owner.close,
    )


def parse_since(text: str, now: float | None = None) -> float:
    """`1h`, `30m`, `90s`, `7d` (ago) or an ISO 8601 time (UTC when it names no zone) -> epoch."""
    now = wall_clock() if now is None else now
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (1h, 30m, 7d) nor an ISO 8601 time "
            "(2026-05-01T12:00:00Z)"
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


TABLE = (
    "first",
    "last",
    "count",
    "decision",
    "cn",
    "application",
    "service",
    "policy",
    "retry_after",
    "state",
    "first_request_id",
    "last_request_id",
)


def print_ledger(
    config: Path,
    *,
    identity: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: int | None = None,
    application: str | None = None,
    service: str | None = None,
    output: Format = "table",
    as_json: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """`aup-gateway ledger`: the episodes the configured gateway wrote; the exit status."""
    from gateway.config.settings import load_settings

    out, err = out or sys.stdout, err or sys.stderr
    settings = load_settings(config)
    try:
        query = Query(
            identity,
            parse_since(since) if since else None,
            parse_since(until) if until else None,
            limit,
            application,
            service,
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
        output = "json"
    if output == "json":
        json.dump([entry.as_dict() for entry in entries], out, indent=2)
        print(file=out)
    elif output == "jsonl":
        out.writelines(entry.to_json() + "\n" for entry in entries)
    elif output == "csv":
        print_csv(entries, out)
    else:
        print_table(entries, out)
        print(f"{len(entries)} episodes", file=err)
    return 0


def ledger_sink_label(settings: Settings) -> str:
    if urlsplit(settings.store.url).scheme != "memory":
        return f"the Redis ledger {settings.store.key_prefix}:{{ledger}}"
    return str(ledger_path(settings))


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def print_table(entries: Iterable[LedgerEntry], out: TextIO) -> None:
    rows = [TABLE] + [
        (
            _iso(e.first),
            _iso(e.last),
            str(e.count),
            e.decision,
            e.cn or e.identity,
            e.application,
            e.service,
            e.policy,
            f"{e.retry_after:.3f}",
            ("final" if e.final else "open") + (",fallback" if e.fallback else ""),
            e.first_request_id,
            e.last_request_id,
        )
        for e in entries
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(),
            file=out,
        )


def print_csv(entries: Iterable[LedgerEntry], out: TextIO) -> None:
    """Every field, in the schema's order, with ISO 8601 times beside the epoch ones."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*COLUMNS, "first_iso", "last_iso"])
    for e in entries:
        writer.writerow([*(getattr(e, name) for name in COLUMNS), _iso(e.first), _iso(e.last)])
