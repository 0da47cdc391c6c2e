"""The violation ledger: its entries match the faults that were sent (same request ids as the
faults' X-Request-Id), in a JSON-lines file with the memory store and a capped Redis stream with
the Redis store; `aup-gateway ledger` reads both; a store outage never blocks a call and loses
no entry once the store is back."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Outcome
from gateway.identity import ClientIdentity
from gateway.ledger import (
    FileSink,
    LedgerEntry,
    LedgerWriter,
    Query,
    ledger_path,
    parse_since,
    print_ledger,
)
from gateway.limiter.memory import MemoryLimiter
from gateway.settings import load_settings
from tests.support.clock import FakeClock
from tests.support.ops import wait_for
from tests.support.redis import RedisServer
from tests.support.stack import DRRS, OMS, Stack, StackFactory

OMS_RETRIEVE = "RetrieveCurrentOutages_OMSv1_AP"
DRRS_SERVICE = "RetrieveDRLocations_DRRSv2_AP"
JDOE = "CN=jdoex1234,OU=people,O=CAISO,C=US"


async def _send_faults(stack: Stack) -> list[dict[str, object]]:
    """Two participants, two applications; returns what each fault told its caller."""
    sent: list[dict[str, object]] = []
    for user in ("jdoex1234", "asmithx5678"):
        client = stack.client(user)
        for app, service in (("oms", OMS_RETRIEVE), ("drrs", DRRS_SERVICE)):
            for _ in range(3):
                answer = await stack.soap(client, app, service)
                if answer.status != 200:
                    assert answer.status == 500
                    sent.append(
                        {
                            "request_id": answer.headers["X-Request-Id"],
                            "cn": user,
                            "service": service,
                            "retry_after": int(answer.headers["Retry-After"]),
                        }
                    )
    return sent


async def _cli(config: Path, **options: Any) -> int:
    """`aup-gateway ledger` in-process; in a thread, as it runs its own event loop."""
    return await asyncio.to_thread(functools.partial(print_ledger, config, **options))


def _check_entries(entries: list[LedgerEntry], sent: list[dict[str, object]]) -> None:
    assert [e.request_id for e in entries] == [s["request_id"] for s in sent]
    for entry, fault in zip(entries, sent, strict=True):
        assert entry.decision == "rejected" and entry.status == 500
        assert entry.cn == fault["cn"] and entry.service == fault["service"]
        assert entry.identity == entry.subject == f"CN={fault['cn']},OU=people,O=CAISO,C=US"
        assert math.ceil(entry.retry_after) == fault["retry_after"]
        assert entry.policy == (
            "oms-retrieve" if entry.application == "OMS" else "drrs-per-service"
        )
        assert entry.store_time > 0 and entry.time > 0


async def test_memory_store_ledger_is_a_jsonl_file_matching_the_faults(
    stack_factory: StackFactory,
) -> None:
    clock = FakeClock()
    stack = await stack_factory(
        {"a.yaml": OMS, "b.yaml": DRRS.format(per="30s")}, limiter=MemoryLimiter(clock)
    )
    sent = await _send_faults(stack)
    assert len(sent) == 8  # 2 users x 2 services x 2 refused retries
    await stack.running.ledger.flush()

    path = ledger_path(stack.running.gateway.settings)
    assert path == stack.folder / "var" / "ledger.jsonl"
    lines = path.read_text().splitlines()
    entries = [LedgerEntry.from_json(line) for line in lines]
    assert all(entries)
    _check_entries([e for e in entries if e is not None], sent)
    assert all(e is not None and e.store_time == clock.now for e in entries)
    assert json.loads(lines[0])["application"] == "OMS"


async def test_the_cli_prints_a_table_or_json_filtered_by_identity_and_time(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory({"a.yaml": OMS, "b.yaml": DRRS.format(per="30s")})
    sent = await _send_faults(stack)
    await stack.running.ledger.flush()
    config = stack.folder / "gateway.yaml"

    out = io.StringIO()
    assert await _cli(config, identity="jdoex1234", since="1h", as_json=True, out=out) == 0
    printed = json.loads(out.getvalue())
    assert [e["request_id"] for e in printed] == [
        s["request_id"] for s in sent if s["cn"] == "jdoex1234"
    ]

    out = io.StringIO()
    assert (
        await _cli(
            config, identity="cn=asmithx5678, ou=people,O=CAISO,C=US", out=out, err=io.StringIO()
        )
        == 0
    )
    table = out.getvalue().splitlines()
    assert table[0].split() == [
        "time",
        "decision",
        "cn",
        "application",
        "service",
        "policy",
        "retry_after",
        "request_id",
    ]
    assert len(table) == 1 + 4 and all("asmithx5678" in row for row in table[1:])
    assert [row.split()[-1] for row in table[1:]] == [
        s["request_id"] for s in sent if s["cn"] == "asmithx5678"
    ]

    out = io.StringIO()
    assert await _cli(config, since="2999-01-01T00:00:00Z", as_json=True, out=out) == 0
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
            "--since",
            "10m",
            "--json",
            "--limit",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert [e["request_id"] for e in json.loads(done.stdout)] == [
        s["request_id"] for s in sent if s["cn"] == "jdoex1234"
    ][-2:]


def test_since_takes_durations_and_iso_times() -> None:
    assert parse_since("1h", now=10_000.0) == 6_400.0
    assert parse_since("90s", now=100.0) == 10.0
    assert parse_since("2026-01-01T00:00:00Z") == 1_767_225_600.0
    assert parse_since("2026-01-01T00:00:00") == 1_767_225_600.0  # no zone: UTC
    with pytest.raises(ValueError):
        parse_since("last tuesday")


async def test_redis_store_ledger_is_a_capped_stream_matching_the_faults(
    stack_factory: StackFactory, redis_url: str, redis_server: RedisServer
) -> None:
    stack = await stack_factory(
        {"a.yaml": OMS, "b.yaml": DRRS.format(per="30s")},
        store=redis_url,
        extra="ledger: {max_entries: 150}\n",
    )
    assert stack.running.ledger.sink.name == "redis-stream"
    sent = await _send_faults(stack)
    await stack.running.ledger.flush()
    with redis_server.client() as client:
        raw = client.xrange("aup:ledger")
    entries = [LedgerEntry.from_json(fields[b"e"]) for _, fields in raw]
    assert all(entries)
    _check_entries([e for e in entries if e is not None], sent)

    out = io.StringIO()
    config = stack.folder / "gateway.yaml"
    assert await _cli(config, identity="asmithx5678", as_json=True, out=out) == 0
    assert [e["request_id"] for e in json.loads(out.getvalue())] == [
        s["request_id"] for s in sent if s["cn"] == "asmithx5678"
    ]

    # capped: MAXLEN ~ 150 trims whole stream nodes (100 entries each by default)
    writer = stack.running.ledger
    entry = LedgerEntry(
        1.0, 1.0, "x", "rejected", JDOE, JDOE, "jdoex1234", "OMS", "s", "p", 1.0, 500
    )
    for _ in range(2_000):
        writer.record(entry)
    await writer.flush()
    with redis_server.client() as client:
        length = client.xlen("aup:ledger")
    assert 150 <= length < 300


async def test_a_store_outage_never_blocks_calls_and_loses_no_entry(
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
        assert status["pending"] == 3 and status["errors"] >= 1
    finally:
        redis_server.start()
    await wait_for(
        lambda: stack.running.ledger.status()["pending"] == 0,
        timeout=10,
        what="the queued entries to be written after the outage",
    )
    with redis_server.client() as redis:
        written = [
            json.loads(fields[b"e"])["request_id"] for _, fields in redis.xrange("aup:ledger")
        ]
    assert written == faults


def _outcome(decision: str, request_id: str = "r") -> Outcome:
    identity = ClientIdentity(JDOE, "jdoex1234", "CAISO", "ab" * 32, "")
    return Outcome(
        request_id,
        identity,
        "OMS",
        OMS_RETRIEVE,
        decision,
        "oms-retrieve",
        status=500 if decision == "rejected" else 200,
        retry_after=2.5,
        store_time=123.0,
    )


class _BrokenSink:
    name = "broken"
    where = "nowhere"
    batch = 100

    async def append(self, lines: list[str]) -> None:
        raise OSError("disk full")

    async def read(self, query: Query) -> list[LedgerEntry]:
        return []

    async def recent(self, seconds: float, limit: int) -> list[LedgerEntry]:
        return []

    async def close(self) -> None:
        pass


async def test_only_violations_are_queued_and_the_queue_is_bounded() -> None:
    writer = LedgerWriter(_BrokenSink(), "subject", max_pending=10)
    for decision in ("allowed", "forwarded", "exempt", "refused"):
        writer.observe(_outcome(decision))
    assert writer.status()["pending"] == 0
    for index in range(15):
        writer.observe(_outcome("rejected" if index % 2 else "shadow", f"r{index}"))
    assert writer.status()["pending"] == 10 and writer.dropped == 5
    await writer.flush()
    assert writer.errors == 1 and writer.status()["pending"] == 10
    assert writer.last_error == "disk full"


async def test_the_file_rotates_at_max_entries(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "var" / "ledger.jsonl", max_entries=4)
    writer = LedgerWriter(sink, "subject")
    for index in range(12):
        writer.observe(_outcome("rejected", f"r{index}"))
        if index % 4 == 3:
            await writer.flush()
    rotated = tmp_path / "var" / "ledger.jsonl.1"
    assert rotated.exists()
    kept = await sink.read(Query())
    assert [e.request_id for e in kept] == [f"r{i}" for i in range(4, 12)]
    recent = await sink.recent(3600 * 24 * 365 * 100, 5)
    assert [e.request_id for e in recent] == ["r11", "r10", "r9", "r8", "r7"]


def test_the_default_path_is_next_to_the_gateway_yaml(tmp_path: Path) -> None:
    settings = load_settings(Path(__file__).parents[1] / "gateway.yaml")
    assert ledger_path(settings) == settings.source.parent / "var" / "ledger.jsonl"
    assert os.path.isabs(ledger_path(settings)) == os.path.isabs(settings.source)


async def test_observing_costs_no_io(monkeypatch: pytest.MonkeyPatch) -> None:
    writer = LedgerWriter(_BrokenSink(), "subject")

    async def no_io(*args: object) -> None:
        raise AssertionError("observe() must not do I/O")

    monkeypatch.setattr(asyncio, "to_thread", no_io)
    writer.observe(_outcome("rejected"))
    assert writer.status()["pending"] == 1


async def test_a_cluster_store_ledger_is_one_stream_on_the_cluster(
    stack_factory: StackFactory, redis_cluster_url: str
) -> None:
    stack = await stack_factory(
        {"a.yaml": OMS, "b.yaml": DRRS.format(per="30s")}, store=redis_cluster_url
    )
    assert stack.running.ledger.sink.name == "redis-stream"
    sent = await _send_faults(stack)
    await stack.running.ledger.flush()
    out = io.StringIO()
    assert await _cli(stack.folder / "gateway.yaml", as_json=True, out=out) == 0
    entries = [LedgerEntry(**e) for e in json.loads(out.getvalue())]
    _check_entries(entries, sent)


async def test_a_sentinel_store_ledger_is_a_stream_on_the_master(
    stack_factory: StackFactory, redis_sentinel_url: str
) -> None:
    stack = await stack_factory(OMS, store=redis_sentinel_url)
    assert stack.running.ledger.sink.name == "redis-stream"
    client = stack.client()
    answers = [await stack.soap(client, "oms", OMS_RETRIEVE) for _ in range(3)]
    faults = [a.headers["X-Request-Id"] for a in answers if a.status == 500]
    assert len(faults) == 2
    await stack.running.ledger.flush()
    entries = await stack.running.ledger.sink.read(Query(identity="jdoex1234"))
    assert [e.request_id for e in entries] == faults
