"""Live policy reload: the folder watcher, SIGHUP, invalid sets that never apply, counters and
lockouts that survive, and a reload storm under load (50 edits, 5 of them invalid, while four
participants keep calling over real TLS)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from defusedxml import ElementTree

from gateway.demo.certs import DemoCerts
from gateway.limiter.memory import MemoryLimiter
from gateway.ops.reload import PolicyReloader
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
from tests.support.stack import DRRS, ENVELOPE, OMS, SOAP11, Stack, StackFactory, Upstream

OMS_RETRIEVE = "RetrieveCurrentOutages_OMSv1_AP"
DRRS_SERVICE = "RetrieveDRLocations_DRRSv2_AP"
JDOE = "CN=jdoex1234,OU=people,O=CAISO,C=US"


def write_atomically(path: Path, text: str) -> None:
    """How deployment tools replace a file: write beside it, then rename over it."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def fast_watcher(stack: Stack, interval: float = 0.02) -> PolicyReloader:
    reloader = stack.running.reloader
    reloader.interval = interval
    reloader.poke()
    return reloader


def oms_policy(limit: int, marker: str = "") -> str:
    return (
        f"policies:\n  - name: oms-retrieve\n    application: OMS\n"
        f'    services: ["Retrieve*"]\n    limit: {limit}\n    per: 5s\n'
        f'    message: "OMS AUP violation {marker}: retry in {{retry_after}} s"\n'
    )


async def test_the_watcher_applies_a_valid_edit(stack_factory: StackFactory) -> None:
    clock = FakeClock()
    stack = await stack_factory({"oms.yaml": oms_policy(1)}, limiter=MemoryLimiter(clock))
    reloader = fast_watcher(stack)
    client = stack.client()
    assert [(await stack.soap(client, "oms", OMS_RETRIEVE)).status for _ in range(2)] == [200, 500]

    before = stack.running.gateway.policies.version
    write_atomically(stack.folder / "policies" / "oms.yaml", oms_policy(3))
    await wait_for(
        lambda: stack.running.gateway.policies.version != before, what="the watcher to swap the set"
    )
    assert reloader.last.ok and reloader.last.reason == "watch" and reloader.last.changed
    # the one call already made still counts: two more fit in the new limit of 3
    assert [(await stack.soap(client, "oms", OMS_RETRIEVE)).status for _ in range(3)] == [
        200,
        200,
        500,
    ]
    m = samples((await admin(stack, "GET", "/metrics"))[1])
    assert value(m, "aup_policy_reloads_total", result="ok") == 1


async def test_an_invalid_edit_keeps_the_running_set_and_says_where(
    stack_factory: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.reload")
    clock = FakeClock()
    stack = await stack_factory({"oms.yaml": oms_policy(1)}, limiter=MemoryLimiter(clock))
    reloader = fast_watcher(stack)
    running_set = stack.running.gateway.policies
    policy_file = stack.folder / "policies" / "oms.yaml"

    write_atomically(
        policy_file, oms_policy(1).replace("limit: 1", "limit: 0") + "    colour: blue\n"
    )
    await wait_for(lambda: reloader.last.seq == 1, what="the failed reload")
    assert reloader.last.ok is False
    assert stack.running.gateway.policies is running_set  # not even a copy: untouched
    problems = reloader.last.problems
    assert any(p.startswith(f"{policy_file}:5:") and "limit" in p for p in problems), problems
    assert any(p.startswith(f"{policy_file}:8:") and "colour" in p for p in problems), problems
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(f"{policy_file}:5:" in line for line in logged)

    client = stack.client()
    assert [(await stack.soap(client, "oms", OMS_RETRIEVE)).status for _ in range(2)] == [
        200,
        500,
    ]  # still limit 1

    # the same bad content is not retried every second; a fix applies
    await asyncio.sleep(0.1)
    assert reloader.last.seq == 1
    write_atomically(policy_file, oms_policy(2))
    await wait_for(lambda: reloader.last.seq == 2, what="the fixed reload")
    assert reloader.last.ok and stack.running.gateway.policies is not running_set
    m = samples((await admin(stack, "GET", "/metrics"))[1])
    assert value(m, "aup_policy_reloads_total", result="failed") == 1
    assert value(m, "aup_policy_reloads_total", result="ok") == 1


async def test_a_missing_folder_or_unreadable_yaml_keeps_the_set(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory({"oms.yaml": oms_policy(1)})
    reloader = stack.running.reloader
    (stack.folder / "policies" / "oms.yaml").write_bytes(b"policies: [\xff\xfe")
    result = await reloader.reload("admin")
    assert not result.ok and result.problems
    (stack.folder / "policies" / "oms.yaml").unlink()
    (stack.folder / "policies").rmdir()
    result = await reloader.reload("admin")
    assert not result.ok and "is not a directory" in result.problems[0]
    assert len(stack.running.gateway.policies.policies) == 1


async def test_counters_and_lockouts_survive_reloads(stack_factory: StackFactory) -> None:
    clock = FakeClock()
    stack = await stack_factory(
        {"a-oms.yaml": OMS, "b-drrs.yaml": DRRS.format(per="30s")}, limiter=MemoryLimiter(clock)
    )
    client = stack.client()
    assert (await stack.soap(client, "drrs", DRRS_SERVICE)).status == 200
    clock.advance(5)
    assert (await stack.soap(client, "drrs", DRRS_SERVICE)).status == 500  # locked for 30 s
    assert (await stack.soap(client, "oms", OMS_RETRIEVE)).status == 200  # counted

    # an unrelated edit (a new file), then an edit of the OMS policy's own message
    (stack.folder / "policies" / "c-sibr.yaml").write_text(
        "policies:\n  - {name: sibr, application: SIBR, limit: 5, per: 1m}\n"
    )
    assert (await stack.running.reloader.reload("admin")).changed
    write_atomically(
        stack.folder / "policies" / "a-oms.yaml", OMS + '    message: "OMS again: {retry_after}"\n'
    )
    assert (await stack.running.reloader.reload("admin")).changed

    clock.advance(2)  # inside the lockout (30 s from the retry) and the OMS window (5 s)
    explained = (
        await admin(
            stack, "GET", f"/explain?identity={JDOE}&application=DRRS&service={DRRS_SERVICE}"
        )
    )[1]
    assert explained["state"]["locked_until"] == pytest.approx(clock.now + 28)
    rejected = await stack.soap(client, "oms", OMS_RETRIEVE)
    assert rejected.status == 500
    assert "OMS again" in (await rejected.read()).decode()  # the new set's message
    locked = await stack.soap(client, "drrs", DRRS_SERVICE)
    assert locked.status == 500 and locked.headers["Retry-After"] == "30"


async def test_reload_under_load_never_fails_a_call(stack_factory: StackFactory) -> None:
    """Four participants call continuously while the policy file is replaced 50 times (5 of
    them invalid). Every answer is a 200 or a proper AUP fault; every fault carries the message
    of a valid version no older than the one applied when the call was sent; invalid versions
    never answer anything; the final version's limit applies."""
    invalid = {7, 18, 29, 36, 44}
    edits = {
        7: lambda text: text.replace("limit: 1", "limit: 0"),
        18: lambda text: text + "    burst: 3\n",
        29: lambda text: text.replace("application: OMS", "application: NOPE"),
        36: lambda text: text.replace("per: 1h", "per: soon"),
        44: lambda text: text.replace("policies:", "policies: [", 1),
    }

    def version(index: int) -> str:
        text = (
            f"policies:\n  - name: load\n    application: OMS\n"
            f'    services: ["Retrieve*"]\n    limit: {3 if index == 50 else 1}\n'
            f"    per: 1h\n"
            f'    message: "AUP violation v{index}: retry in {{retry_after}} s"\n'
        )
        return edits[index](text) if index in invalid else text

    stack = await stack_factory({"load.yaml": version(0)})
    reloader = fast_watcher(stack)
    policy_file = stack.folder / "policies" / "load.yaml"
    applied = 0  # the newest version known to be swapped in
    answers: list[tuple[int, int, str]] = []  # (version applied at send, status, marker)
    problems: list[str] = []
    stop = asyncio.Event()
    marker = re.compile(r"AUP violation v(\d+)")

    async def participant(user: str) -> None:
        session = stack.client(user)
        rng = random.Random(user)
        while not stop.is_set():
            service = f"Retrieve{rng.randrange(6)}_OMSv1_AP"
            slow = rng.random() < 0.2
            if slow:  # a forwarded call in flight across a swap
                service = "SubmitOutage_OMSv1_AP"
            sent_under = applied
            try:
                answer = await stack.soap(
                    session, "oms", service, headers={"X-Mock-Delay": "0.03"} if slow else {}
                )
                body = (await answer.read()).decode()
            except aiohttp.ClientError as exc:
                problems.append(f"{user}: {exc!r}")
                continue
            found = marker.search(body)
            if answer.status == 500 and found:
                ElementTree.fromstring(body)  # a well-formed SOAP fault
                answers.append((sent_under, 500, found[1]))
            elif answer.status == 200:
                answers.append((sent_under, 200, ""))
            else:
                problems.append(f"{user}: {answer.status} {body[:200]}")

    clients = [
        asyncio.create_task(participant(user))
        for user in ("jdoex1234", "asmithx5678", "bleex4242", "monitorx0001")
    ]
    started = time.monotonic()

    def answered_by(version: str) -> bool:
        return any(seen == version for _, _, seen in answers)

    try:
        await wait_for(lambda: answered_by("0"), what="faults under the first version")
        for index in range(1, 51):
            before_set, before_seq = stack.running.gateway.policies, reloader.last.seq
            write_atomically(policy_file, version(index))
            await wait_for(
                lambda seq=before_seq: reloader.last.seq > seq,  # type: ignore[misc]
                timeout=5,
                what=f"the reload of version {index}",
            )
            if index in invalid:
                assert not reloader.last.ok, index
                assert stack.running.gateway.policies is before_set, index
            else:
                assert reloader.last.ok, (index, reloader.last.problems)
                assert stack.running.gateway.policies is not before_set
                applied = index
            await asyncio.sleep(0.01)  # let some calls land under this version
        await wait_for(lambda: answered_by("50"), what="faults under the last version")
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert time.monotonic() - started < 30

    assert not problems, problems[:5]
    faults = [(under, int(seen)) for under, status, seen in answers if status == 500]
    assert len(answers) > 200 and len(faults) > 100
    assert not [seen for _, seen in faults if seen in invalid]
    stale = [(under, seen) for under, seen in faults if seen < under]
    assert not stale, stale[:5]
    assert {seen for _, seen in faults} >= {0, 50}  # the first and the last version answered

    fresh = stack.client("jdoex1234")
    statuses = [
        (await stack.soap(fresh, "oms", "RetrieveNeverCalled_OMSv1_AP")).status for _ in range(4)
    ]
    assert statuses == [200, 200, 200, 500]  # version 50's limit of 3
    m = samples((await admin(stack, "GET", "/metrics"))[1])
    assert value(m, "aup_policy_reloads_total", result="ok") == 45
    assert value(m, "aup_policy_reloads_total", result="failed") == 5


async def test_sighup_reloads_a_running_server(
    certs: DemoCerts, upstream: Upstream, tmp_path: Path
) -> None:
    port, admin_port = free_port(), free_port()
    config = write_gateway(
        tmp_path,
        certs,
        upstream.soap_port,
        port=port,
        admin_port=admin_port,
        policies=oms_policy(1, "first"),
    )
    process = serve_process(config)
    base = f"http://127.0.0.1:{admin_port}"
    try:
        await wait_ready(admin_port, process)
        write_atomically(tmp_path / "policies" / "main.yaml", oms_policy(1, "second"))
        process.send_signal(signal.SIGHUP)
        async with aiohttp.ClientSession() as session:

            async def reloaded_by_sighup() -> bool:
                async with session.get(f"{base}/policies") as answer:
                    return bool((await answer.json())["last_reload"]["reason"] == "sighup")

            await wait_for(reloaded_by_sighup, timeout=10, what="the SIGHUP reload")
        connector = aiohttp.TCPConnector(ssl=client_ssl(certs))
        async with aiohttp.ClientSession(connector=connector) as client:
            for _ in range(2):
                async with client.post(
                    f"https://localhost:{port}/sst/oms/{OMS_RETRIEVE}",
                    data=ENVELOPE.format(op="RetrieveCurrentOutages"),
                    headers={"Content-Type": SOAP11},
                ) as answer:
                    body = await answer.text()
        assert answer.status == 500 and "OMS AUP violation second" in body
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 20) == 0
