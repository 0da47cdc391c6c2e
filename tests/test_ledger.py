"""The violation ledger by lockout episode: one entry per (identity, application, service, policy)
episode whose first and last request ids are the faults' X-Request-Id; open episodes visible and
updated, final once the key is free; the same entries on the file and the Redis sinks; fair
retention (a flood never evicts another identity's episodes, a bound reached is counted and
logged); export as a table, JSON, JSON lines or CSV; a store outage never blocks a call; a SIGKILL
loses at most the last flush interval."""

from __future__ import annotations

import asyncio
import csv
import functools
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway.config.settings import load_settings
from gateway.demo.certs import DemoCerts
from gateway.edge.identity import ClientIdentity
from gateway.limiter.base import limiter_key
from gateway.limiter.memory import MemoryLimiter
from gateway.ops.ledger import (
    FileSink,
    LedgerEntry,
    LedgerSink,
    LedgerWriter,
    Query,
    StreamSink,
    ledger_path,
    parse_since,
    print_ledger,
    support_entry,
)
from gateway.outcome import Outcome
from tests.support.clock import FakeClock
from tests.support.ops import (
    admin,
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
from tests.support.stack import DRRS, ENVELOPE, OMS, SOAP11, Stack, StackFactory, Upstream

OMS_RETRIEVE = "RetrieveCurrentOutages_OMSv1_AP"
DRRS_SERVICE = "RetrieveDRLocations_DRRSv2_AP"
JDOE = "CN=jdoex1234,OU=people,O=CAISO,C=US"
ASMITH = "CN=asmithx5678,OU=people,O=CAISO,C=US"
BLEE = "CN=bleex4242,OU=people,O=CAISO,C=US"


async def _send_faults(stack: Stack) -> dict[tuple[str, str], list[str]]:
    """Two participants, two applications, three calls each: (cn, service) -> fault ids."""
    sent: dict[tuple[str, str], list[str]] = {}
    for user in ("jdoex1234", "asmithx5678"):
        client = stack.client(user)
        for app, service in (("oms", OMS_RETRIEVE), ("drrs", DRRS_SERVICE)):
            for _ in range(3):
                answer = await stack.soap(client, app, service)
                if answer.status != 200:
                    assert answer.status == 500
                    sent.setdefault((user, service), []).append(answer.headers["X-Request-Id"])
    return sent


async def _cli(config: Path, **options: Any) -> int:
    """`aup-gateway ledger` in-process; in a thread, as it runs its own event loop."""
    return await asyncio.to_thread(functools.partial(print_ledger, config, **options))


def _check_episodes(entries: list[LedgerEntry], sent: dict[tuple[str, str], list[str]]) -> None:
    """One open episode per participant and service, naming its first and last fault."""
    assert len(entries) == len(sent)
    for entry in entries:
        faults = sent[(entry.cn, entry.service)]
        assert (entry.first_request_id, entry.last_request_id) == (faults[0], faults[-1])
        assert entry.id == faults[0] and entry.count == len(faults)
        assert entry.decision == "rejected" and entry.status == 500
        assert entry.identity == entry.subject == f"CN={entry.cn},OU=people,O=CAISO,C=US"
        assert not entry.final and not entry.fallback
        assert entry.first <= entry.last < entry.ends_at
        if entry.application == "OMS":
            assert entry.policy == "oms-retrieve" and entry.retry_after <= 5
        else:  # each early retry resets the 30 s lockout
            assert entry.policy == "drrs-per-service" and entry.retry_after == 30
            assert entry.ends_at == pytest.approx(entry.last + 30)


async def test_memory_store_ledger_is_a_jsonl_file_of_episodes_matching_the_faults(
    stack_factory: StackFactory,
) -> None:
    clock = FakeClock()
    stack = await stack_factory(
        {"a.yaml": OMS, "b.yaml": DRRS.format(per="30s")}, limiter=MemoryLimiter(clock)
    )
    sent = await _send_faults(stack)
    assert sum(len(ids) for ids in sent.values()) == 8  # 2 users x 2 services x 2 refused
    await stack.running.ledger.flush()

    path = ledger_path(stack.running.gateway.settings)
    assert path == stack.folder / "var" / "ledger.jsonl"
    entries = [LedgerEntry.from_json(line) for line in path.read_text().splitlines()]
    assert all(entries)
    _check_episodes([e for e in entries if e is not None], sent)
    assert all(e is not None and e.first == clock.now for e in entries)  # the store's clock


async def test_an_open_episode_is_updated_and_final_once_the_key_is_free(tmp_path: Path) -> None:
    wall = FakeClock()
    sink = FileSink(tmp_path / "ledger.jsonl")
    writer = LedgerWriter(sink, "subject", clock=wall)
    t = wall.now
    writer.observe(_outcome(request_id="a", store_time=t, retry_after=5.0))
    await writer.flush()
    (entry,) = await sink.read(Query())
    assert (entry.count, entry.final, entry.ends_at) == (1, False, t + 5.0)

    wall.advance(1.0)
    writer.observe(_outcome(request_id="b", store_time=t + 1.0, retry_after=4.0))
    writer.observe(_outcome(request_id="c", store_time=t + 2.0, retry_after=3.0))
    await writer.flush()
    (entry,) = await sink.read(Query())
    assert (entry.count, entry.last_request_id, entry.final) == (3, "c", False)
    assert entry.retry_after == 5.0 and entry.last == t + 2.0

    wall.advance(4.0)  # the store's clock passes ends_at: the key is free, the episode is over
    await writer.flush()
    (entry,) = await sink.read(Query())
    assert entry.final and entry.count == 3 and entry.first_request_id == "a"
    assert writer.status()["open_episodes"] == 0 and writer.episodes == 1

    # the next rejection of the same key starts a new episode
    writer.observe(_outcome(request_id="d", store_time=t + 6.0, retry_after=5.0))
    await writer.flush()
    assert [(e.id, e.count, e.final) for e in await sink.read(Query())] == [
        ("a", 3, True),
        ("d", 1, False),
    ]
    # a rejection that arrives after the end but before a flush also starts a new one
    writer.observe(_outcome(request_id="e", store_time=t + 11.0, retry_after=5.0))
    await writer.flush()
    assert [(e.id, e.count, e.final) for e in await sink.read(Query())] == [
        ("a", 3, True),
        ("d", 1, True),
        ("e", 1, False),
    ]


async def test_the_cli_exports_a_table_json_jsonl_or_csv_filtered_by_who_what_and_when(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory({"a.yaml": OMS, "b.yaml": DRRS.format(per="30s")})
    sent = await _send_faults(stack)
    await stack.running.ledger.flush()
    config = stack.folder / "gateway.yaml"

    out = io.StringIO()
    assert await _cli(config, identity="jdoex1234", since="1h", as_json=True, out=out) == 0
    printed = json.loads(out.getvalue())
    assert sorted(e["first_request_id"] for e in printed) == sorted(
        ids[0] for (cn, _), ids in sent.items() if cn == "jdoex1234"
    )

    out = io.StringIO()
    assert await _cli(config, application="drrs", output="jsonl", out=out) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert {(e["cn"], e["service"]) for e in lines} == {
        ("jdoex1234", DRRS_SERVICE),
        ("asmithx5678", DRRS_SERVICE),
    }

    out = io.StringIO()
    assert await _cli(config, service=OMS_RETRIEVE, identity=ASMITH, output="csv", out=out) == 0
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert len(rows) == 1 and rows[0]["cn"] == "asmithx5678"
    assert rows[0]["count"] == "2" and rows[0]["final"] == "False"
    assert rows[0]["last_request_id"] == sent[("asmithx5678", OMS_RETRIEVE)][-1]
    assert rows[0]["first_iso"].endswith("Z")

    out = io.StringIO()
    table_err = io.StringIO()
    assert (
        await _cli(
            config, identity="cn=asmithx5678, ou=people,O=CAISO,C=US", out=out, err=table_err
        )
        == 0
    )
    table = out.getvalue().splitlines()
    assert table[0].split()[:4] == ["first", "last", "count", "decision"]
    assert len(table) == 1 + 2 and all("asmithx5678" in row for row in table[1:])
    assert "2 episodes" in table_err.getvalue()

    for window in ({"since": "2999-01-01T00:00:00Z"}, {"until": "2000-01-01T00:00:00Z"}):
        out = io.StringIO()
        assert await _cli(config, output="json", out=out, **window) == 0
        assert json.loads(out.getvalue()) == []
    err = io.StringIO()
    assert await _cli(config, since="yesterday-ish", out=io.StringIO(), err=err) == 2
    assert "ISO 8601" in err.getvalue()

    # the real command line, in its own process
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "ledger",
            "--config",
            str(config),
            "--identity",
            JDOE,
            "--application",
            "OMS",
            "--service",
            OMS_RETRIEVE,
            "--since",
            "10m",
            "--until",
            "2999-01-01T00:00:00Z",
            "--format",
            "jsonl",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (episode,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert episode["first_request_id"] == sent[("jdoex1234", OMS_RETRIEVE)][0]


def test_since_takes_durations_and_iso_times() -> None:
    assert parse_since("1h", now=10_000.0) == 6_400.0
    assert parse_since("90s", now=100.0) == 10.0
    assert parse_since("2d", now=200_000.0) == 27_200.0
    assert parse_since("2026-01-01T00:00:00Z") == 1_767_225_600.0
    assert parse_since("2026-01-01T00:00:00") == 1_767_225_600.0  # no zone: UTC
    with pytest.raises(ValueError):
        parse_since("last tuesday")


async def test_redis_store_ledger_holds_the_same_episodes(
    stack_factory: StackFactory, redis_url: str, redis_server: RedisServer
) -> None:
    stack = await stack_factory({"a.yaml": OMS, "b.yaml": DRRS.format(per="30s")}, store=redis_url)
    assert stack.running.ledger.sink.name == "redis-stream"
    sent = await _send_faults(stack)
    await stack.running.ledger.flush()
    with redis_server.client() as client:
        raw = client.hvals("aup:{ledger}:open")  # open episodes: their keys are still locked
    entries = [LedgerEntry.from_json(value) for value in raw]
    assert all(entries)
    _check_episodes([e for e in entries if e is not None], sent)

    out = io.StringIO()
    config = stack.folder / "gateway.yaml"
    assert await _cli(config, identity="asmithx5678", as_json=True, out=out) == 0
    assert sorted(e["last_request_id"] for e in json.loads(out.getvalue())) == sorted(
        ids[-1] for (cn, _), ids in sent.items() if cn == "asmithx5678"
    )


# ---------------------------------------------------------------- sinks driven directly


def _outcome(
    decision: str = "rejected",
    request_id: str = "r",
    *,
    subject: str = JDOE,
    store_time: float = 123.0,
    retry_after: float = 2.5,
    service: str = OMS_RETRIEVE,
    fallback: bool = False,
) -> Outcome:
    cn = subject.split(",")[0].removeprefix("CN=")
    identity = ClientIdentity(subject, cn, "CAISO", "ab" * 32, "")
    return Outcome(
        request_id,
        identity,
        "OMS",
        service,
        decision,
        "oms-retrieve",
        key=limiter_key(subject, "OMS", service),
        status=500 if decision == "rejected" else 200,
        retry_after=retry_after,
        store_time=store_time,
        fallback=fallback,
    )


SinkMaker = Callable[..., Awaitable[LedgerSink]]


@pytest.fixture
async def make_sink(redis_url: str, tmp_path: Path) -> AsyncIterator[SinkMaker]:
    """`await make_sink("file" | "stream", retention=..., max_per_identity=...)`."""
    made: list[LedgerSink] = []

    async def make(kind: str, **options: Any) -> LedgerSink:
        sink: LedgerSink
        if kind == "file":
            sink = FileSink(tmp_path / f"ledger{len(made)}.jsonl", **options)
        else:
            client = Redis.from_url(redis_url)
            sink = StreamSink(client, f"t{len(made)}", "test", **options)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        await sink.close()


@pytest.mark.parametrize("kind", ["file", "stream"])
async def test_a_flood_never_evicts_another_identitys_episode(
    kind: str, make_sink: SinkMaker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.ledger")
    sink = await make_sink(kind, max_per_identity=3)
    wall = FakeClock(time.time())  # the file's retention is reckoned on the real clock
    writer = LedgerWriter(sink, "subject", clock=wall)
    t = wall.now
    # bleex4242 first breaks the policy in ten separate lockouts (the key free in between)...
    for i in range(10):
        writer.observe(_outcome(request_id=f"n{i}", subject=BLEE, store_time=t, retry_after=1.0))
        t += 2.0
    await writer.flush()
    # ... jdoex1234 once ...
    writer.observe(_outcome(request_id="jdoe", subject=JDOE, store_time=t, retry_after=5.0))
    # ... then bleex4242 floods: 50,000 rejections, each before the key is free
    for i in range(50_000):
        writer.observe(
            _outcome(request_id=f"f{i}", subject=BLEE, store_time=t + i * 1e-4, retry_after=5.0)
        )
        if i % 10_000 == 9_999:
            await writer.flush()  # the open episode is written (updated) as it grows
    wall.advance(60.0)  # every key free again: every episode final
    await writer.flush()

    episodes = await sink.read(Query())
    assert [(e.id, e.count, e.final) for e in episodes if e.cn == "jdoex1234"] == [
        ("jdoe", 1, True)
    ]
    flood = [e for e in episodes if e.first_request_id.startswith("f")]
    assert sum(e.count for e in flood) == 50_000 and len(flood) == 1
    assert (flood[0].first_request_id, flood[0].last_request_id) == ("f0", "f49999")
    # bleex4242 keeps its newest three of eleven; the eight it lost are counted and logged
    assert len([e for e in episodes if e.cn == "bleex4242"]) == 3
    assert writer.evicted == 8 and writer.status()["evicted"] == 8
    assert writer.status()["evicted_identities"] == 1
    warned = [r.getMessage() for r in caplog.records if "reached its bound" in r.getMessage()]
    assert warned and all(BLEE in line for line in warned)


async def test_the_file_and_the_stream_sink_give_the_same_entries(make_sink: SinkMaker) -> None:
    results = []
    start = round(time.time())
    for kind in ("file", "stream"):
        sink = await make_sink(kind)
        wall = FakeClock(start)
        writer = LedgerWriter(sink, "subject", clock=wall)
        t = wall.now
        writer.observe(_outcome("shadow", "s0", subject=ASMITH, store_time=t, retry_after=5.0))
        writer.observe(_outcome("allowed", "x", subject=ASMITH, store_time=t))  # not a violation
        writer.observe(
            _outcome(request_id="l0", subject=BLEE, store_time=t, retry_after=9.0, fallback=True)
        )
        for i in range(5):
            wall.now = t + i
            writer.observe(_outcome(request_id=f"a{i}", store_time=t + i, retry_after=3.0))
        await writer.flush()
        wall.now = t + 8  # jdoe's and asmith's episodes are over, bleex's is still open
        await writer.flush()
        results.append([e.as_dict() for e in await sink.read(Query())])
    assert results[0] == results[1]
    assert [(e["id"], e["count"], e["final"], e["fallback"]) for e in results[0]] == [
        ("a0", 5, True, False),
        ("l0", 1, False, True),
        ("s0", 1, True, False),
    ]


async def test_the_stream_keeps_final_episodes_for_the_retention_only(
    make_sink: SinkMaker, redis_server: RedisServer
) -> None:
    sink = await make_sink("stream", retention=0.5)
    assert isinstance(sink, StreamSink)
    wall = FakeClock()
    writer = LedgerWriter(sink, "subject", clock=wall)
    writer.observe(_outcome(request_id="old", store_time=wall.now, retry_after=1.0))
    wall.advance(2.0)
    await writer.flush()  # the key is free: written final
    assert [e.id for e in await sink.read(Query())] == ["old"]
    with redis_server.client() as client:
        assert client.pttl(sink.stream_key(JDOE)) > 0  # expires with the retention

    async def gone() -> bool:
        return await sink.read(Query()) == []

    await wait_for(gone, timeout=10, what="the episode to leave with the retention")


async def test_only_violations_are_kept_and_the_final_queue_is_bounded() -> None:
    wall = FakeClock()
    writer = LedgerWriter(_BrokenSink(), "subject", max_pending=10, clock=wall)
    for decision in ("allowed", "forwarded", "exempt", "refused"):
        writer.observe(_outcome(decision))
    assert writer.status()["open_episodes"] == 0
    for index in range(15):  # fifteen keys, one episode each
        writer.observe(_outcome("rejected", f"r{index}", service=f"S{index}", store_time=wall.now))
    assert writer.status()["open_episodes"] == 15
    wall.advance(10.0)  # all over: fifteen final episodes for a queue of ten
    await writer.flush()
    assert writer.status()["pending"] == 10 and writer.dropped == 5
    assert writer.errors == 1 and writer.last_error == "disk full"


class _BrokenSink:
    name = "broken"
    where = "nowhere"
    batch = 100

    async def write(self, entries: list[LedgerEntry]) -> dict[str, int]:
        raise OSError("disk full")

    async def read(self, query: Query) -> list[LedgerEntry]:
        return []

    async def recent(self, seconds: float, limit: int) -> list[LedgerEntry]:
        return []

    async def stale(self, before: float) -> list[LedgerEntry]:
        return []

    async def close(self) -> None:
        pass


def test_the_default_path_is_next_to_the_gateway_yaml(tmp_path: Path) -> None:
    settings = load_settings(Path(__file__).parents[1] / "gateway.yaml")
    assert ledger_path(settings) == settings.source.parent / "var" / "ledger.jsonl"
    assert os.path.isabs(ledger_path(settings)) == os.path.isabs(settings.source)
    assert settings.ledger.retention == 400 * 86_400 and settings.ledger.flush_interval == 1.0


async def test_observing_costs_no_io(monkeypatch: pytest.MonkeyPatch) -> None:
    writer = LedgerWriter(_BrokenSink(), "subject")

    async def no_io(*args: object) -> None:
        raise AssertionError("observe() must not do I/O")

    monkeypatch.setattr(asyncio, "to_thread", no_io)
    writer.observe(_outcome("rejected"))
    writer.observe(_outcome("rejected", "r2"))
    assert writer.status()["open_episodes"] == 1


# ---------------------------------------------------------------- end to end


async def test_a_flood_through_the_gateway_is_one_episode_beside_anothers(
    stack_factory: StackFactory, redis_url: str
) -> None:
    stack = await stack_factory(OMS, store=redis_url, extra="ledger: {max_per_identity: 2}\n")
    flooder, other = stack.client("bleex4242"), stack.client("jdoex1234")
    faults: list[str] = []
    for _ in range(201):
        answer = await stack.soap(flooder, "oms", OMS_RETRIEVE)
        if answer.status == 500:
            faults.append(answer.headers["X-Request-Id"])
    assert len(faults) >= 195  # all but the allowed one(s): 1 per 5 s
    other_faults = []
    for _ in range(2):
        answer = await stack.soap(other, "oms", OMS_RETRIEVE)
        if answer.status == 500:
            other_faults.append(answer.headers["X-Request-Id"])
    assert len(other_faults) == 1
    await stack.running.ledger.flush()

    out = io.StringIO()
    assert await _cli(stack.folder / "gateway.yaml", output="jsonl", out=out) == 0
    episodes = [json.loads(line) for line in out.getvalue().splitlines()]
    flood = [e for e in episodes if e["cn"] == "bleex4242"]
    assert sum(e["count"] for e in flood) == len(faults) and len(flood) <= 2
    assert flood[0]["first_request_id"] == faults[0]
    assert flood[-1]["last_request_id"] == faults[-1]
    assert [(e["first_request_id"], e["count"]) for e in episodes if e["cn"] == "jdoex1234"] == [
        (other_faults[0], 1)
    ]

    # an identity at its bound (2 final episodes): counted in /readyz and the metrics
    for n in range(3):
        stack.running.ledger.record(support_entry(BLEE, "OMS", f"S{n}", "admin:test", time.time()))
    await stack.running.ledger.flush()
    ready = (await admin(stack, "GET", "/readyz"))[1]["ledger"]
    assert ready["evicted"] == 1 and ready["evicted_identities"] == 1
    m = samples((await admin(stack, "GET", "/metrics"))[1])
    assert value(m, "aup_ledger_evicted_episodes_total") == 1
    assert value(m, "aup_ledger_identities_at_bound") == 1


async def test_a_store_outage_never_blocks_calls_and_its_episode_says_fallback(
    stack_factory: StackFactory, redis_url: str, redis_server: RedisServer
) -> None:
    stack = await stack_factory(OMS, store=redis_url)
    client = stack.client()
    assert (await stack.soap(client, "oms", OMS_RETRIEVE)).status == 200
    await stack.running.ledger.flush()
    redis_server.stop()
    try:
        answers = [await stack.soap(client, "oms", OMS_RETRIEVE) for _ in range(4)]
        # the local fallback decides: its first call is allowed, the rest are faults
        faults = [a.headers["X-Request-Id"] for a in answers if a.status == 500]
        assert len(faults) == 3
        await stack.running.ledger.flush()
        status = stack.running.ledger.status()
        assert status["errors"] >= 1 and status["open_episodes"] == 1
    finally:
        redis_server.start()

    def written() -> list[LedgerEntry]:
        with redis_server.client() as redis:
            found = [LedgerEntry.from_json(v) for v in redis.hvals("aup:{ledger}:open")]
        return [e for e in found if e is not None]

    await wait_for(lambda: bool(written()), timeout=10, what="the episode written after")
    (episode,) = written()
    assert (episode.first_request_id, episode.last_request_id) == (faults[0], faults[-1])
    assert episode.count == 3 and episode.fallback


async def test_sigkill_loses_at_most_the_last_flush_interval(
    certs: DemoCerts, upstream: Upstream, tmp_path: Path
) -> None:
    """A gateway killed mid-episode: what it wrote on its own timer (every flush_interval, 1 s by
    default) survives, readable as an open episode; the next start writes it final."""
    port, admin_port = free_port(), free_port()
    config = write_gateway(
        tmp_path,
        certs,
        upstream.soap_port,
        port=port,
        admin_port=admin_port,
        policies=DRRS.format(per="30s"),
    )
    process = serve_process(config)
    path = tmp_path / "var" / "ledger.jsonl"
    faults: list[str] = []
    try:
        await wait_ready(admin_port, process)
        connector = aiohttp.TCPConnector(ssl=client_ssl(certs))
        async with aiohttp.ClientSession(connector=connector) as session:

            async def call() -> None:
                async with session.post(
                    f"https://localhost:{port}/sst/drrs/{DRRS_SERVICE}",
                    data=ENVELOPE.format(op="RetrieveDRLocations"),
                    headers={"Content-Type": SOAP11},
                ) as answer:
                    await answer.read()
                    if answer.status == 500:
                        faults.append(answer.headers["X-Request-Id"])

            for _ in range(21):
                await call()
            assert len(faults) == 20  # each early retry resets the lockout: one episode

            def on_disk() -> int:
                lines = path.read_text().splitlines() if path.exists() else []
                entries = [LedgerEntry.from_json(line) for line in lines]
                return max((e.count for e in entries if e), default=0)

            # written by the gateway's own timer (nobody asked it to flush)
            await wait_for(lambda: on_disk() == 20, timeout=15, what="the timer's write")
            for _ in range(5):  # answered, then killed before the timer can run again: lost
                await call()
            process.send_signal(signal.SIGKILL)
            process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    out = io.StringIO()
    assert await _cli(config, output="jsonl", out=out) == 0
    (episode,) = [LedgerEntry(**json.loads(line)) for line in out.getvalue().splitlines()]
    assert episode.first_request_id == faults[0] and not episode.final
    assert 20 <= episode.count <= 25 and episode.last_request_id in faults[19:]

    # the next writer, once the key has long been free, writes the crashed episode final
    later = FakeClock(episode.ends_at + 61.0)
    writer = LedgerWriter(FileSink(path), "subject", clock=later)
    assert await writer.adopt_stale() == 1
    await writer.flush()
    (final,) = await writer.sink.read(Query())
    assert final.final and final.count == episode.count and final.id == episode.id


async def test_a_cluster_store_ledger_lives_on_one_slot(
    stack_factory: StackFactory, redis_cluster_url: str
) -> None:
    # A store timeout well above the default 50 ms: this test is about where the ledger lives,
    # and a first cluster call slower than 50 ms on a loaded machine would decide in fallback.
    store = f'{{url: "{redis_cluster_url}", timeout: 2s}}'
    stack = await stack_factory({"a.yaml": OMS, "b.yaml": DRRS.format(per="30s")}, store=store)
    assert stack.running.ledger.sink.name == "redis-stream"
    sent = await _send_faults(stack)
    await stack.running.ledger.flush()
    out = io.StringIO()
    assert await _cli(stack.folder / "gateway.yaml", as_json=True, out=out) == 0
    _check_episodes([LedgerEntry(**e) for e in json.loads(out.getvalue())], sent)


async def test_a_sentinel_store_ledger_is_on_the_master(
    stack_factory: StackFactory, redis_sentinel_url: str
) -> None:
    stack = await stack_factory(OMS, store=redis_sentinel_url)
    assert stack.running.ledger.sink.name == "redis-stream"
    client = stack.client()
    answers = [await stack.soap(client, "oms", OMS_RETRIEVE) for _ in range(3)]
    faults = [a.headers["X-Request-Id"] for a in answers if a.status == 500]
    assert len(faults) == 2
    await stack.running.ledger.flush()
    (episode,) = await stack.running.ledger.sink.read(Query(identity="jdoex1234"))
    assert (episode.first_request_id, episode.last_request_id, episode.count) == (
        faults[0],
        faults[1],
        2,
    )
