"""`aup-gateway simulate`: an access log recorded from a real gateway run (real TLS, real
upstream) replayed against a stricter candidate set gives exact counts; the replay of the
current set reproduces every recorded decision; bad input is an error with file and line."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.ops.simulate import simulate
from tests.support.ops import restart_with
from tests.support.stack import ENVELOPE, SOAP11, Stack, StackFactory

OMS_RETRIEVE = "RetrieveCurrentOutages_OMSv1_AP"
OMS_SUBMIT = "SubmitOutage_OMSv1_AP"
DRRS_RETRIEVE = "RetrieveDRLocations_DRRSv2_AP"
JDOE = "CN=jdoex1234,OU=people,O=CAISO,C=US"
ASMITH = "CN=asmithx5678,OU=people,O=CAISO,C=US"
# Hour-long windows: the recorded decisions do not depend on how fast the machine runs.
CURRENT = {
    "oms.yaml": """\
        policies:
          - {name: oms-retrieve, application: OMS, services: ["Retrieve*"], limit: 2, per: 1h}
        """,
    "drrs.yaml": """\
        policies:
          - {name: drrs-per-service, application: DRRS, services: ["*"], limit: 1, per: 1h,
             reset_on_early_retry: true, mode: shadow}
        """,
}
CANDIDATE = {
    "crr.yaml": """\
        policies:
          - {name: crr-write, application: CRR, services: ["*"], methods: [POST], limit: 1, per: 1h}
          - {name: crr-read, application: CRR, services: ["*"], methods: [GET], limit: 1,
             per: 1h, mode: shadow}
        """,
    "drrs.yaml": """\
        policies:
          - {name: drrs-per-service, application: DRRS, services: ["*"], limit: 1, per: 1h,
             reset_on_early_retry: true}
        """,
    "oms.yaml": """\
        policies:
          - {name: oms-all, application: OMS, services: ["*"], limit: 1, per: 1h}
        """,
}


async def record_calls(stack_factory: StackFactory, log_file: Path) -> Stack:
    """Real calls through a gateway with its access log on, logged as `serve` logs them."""
    stack = await stack_factory(CURRENT)
    running = await restart_with(stack, access_log=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    access = logging.getLogger("gateway.access")
    level = access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        stack.running, original = running, stack.running
        jdoe, asmith = stack.client("jdoex1234"), stack.client("asmithx5678")
        statuses = [(await stack.soap(jdoe, "oms", OMS_RETRIEVE)).status for _ in range(4)]
        assert statuses == [200, 200, 500, 500]
        for _ in range(2):
            assert (await stack.soap(jdoe, "oms", OMS_SUBMIT)).status == 200
        assert (await stack.soap(asmith, "oms", OMS_RETRIEVE)).status == 200
        for _ in range(3):  # shadow: recorded as allowed, shadow, shadow; all let through
            assert (await stack.soap(jdoe, "drrs", DRRS_RETRIEVE)).status == 200
        for _ in range(2):
            async with jdoe.get(f"{stack.url}/crr/auction/v1.0/portfolio") as answer:
                assert answer.status == 200
        async with jdoe.post(  # forwarded, whatever the mock thinks of the body
            f"{stack.url}/crr/auction/v1.0/portfolio",
            data=b"{}",
            headers={"Content-Type": "application/json"},
        ) as answer:
            assert answer.headers["X-Request-Id"]
        body = ENVELOPE.format(op="Nothing")
        refused = await jdoe.post(
            f"{stack.url}/sst/nope/X", data=body, headers={"Content-Type": SOAP11}
        )
        assert refused.status == 500  # a SOAP 1.1 fault: the binding's status
    finally:
        stack.running = original
        await running.stop()
        access.removeHandler(handler)
        access.setLevel(level)
        handler.close()
    return stack


def write_policies(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text))
    return folder


async def test_replay_of_a_recorded_run_against_a_stricter_set(
    stack_factory: StackFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log_file = tmp_path / "access.log"
    stack = await record_calls(stack_factory, log_file)
    with log_file.open("a") as log:  # another logger's line, as a shared log file has them
        log.write("2026-12-05 13:00:00,000 INFO gateway.reload: policies reloaded (watch)\n")
    lines = log_file.read_text().splitlines()[:-1]
    records = [json.loads(line[line.index("{") :]) for line in lines]
    assert {record["method"] for record in records} == {"POST", "GET"}  # the log has the method
    candidate = write_policies(tmp_path / "candidate", CANDIDATE)
    config = stack.folder / "gateway.yaml"

    replay = simulate(config, candidate, log_file)
    assert replay.calls == 13 and replay.refused == 1 and replay.passed_over == 1
    assert replay.reproduces_recorded()
    rows = {(row.application, row.service, row.identity): row for row in replay.rows}
    expected = {  # (application, service, identity): recorded/current, candidate as {verdict: n}
        ("CRR", "getPortfolio", JDOE): ({"unlimited": 2}, {"allowed": 1, "shadow": 1}),
        ("CRR", "portfolioSubmission", JDOE): ({"unlimited": 1}, {"allowed": 1}),
        ("DRRS", DRRS_RETRIEVE, JDOE): ({"allowed": 1, "shadow": 2}, {"allowed": 1, "rejected": 2}),
        ("OMS", OMS_RETRIEVE, ASMITH): ({"allowed": 1}, {"allowed": 1}),
        ("OMS", OMS_RETRIEVE, JDOE): ({"allowed": 2, "rejected": 2}, {"allowed": 1, "rejected": 3}),
        ("OMS", OMS_SUBMIT, JDOE): ({"unlimited": 2}, {"allowed": 1, "rejected": 1}),
    }
    assert set(rows) == set(expected)
    for key, (recorded, stricter) in expected.items():
        counts = rows[key].counts
        assert dict(+counts["recorded"]) == recorded, key
        assert dict(+counts["current"]) == recorded, key
        assert dict(+counts["candidate"]) == stricter, key
    assert rows[("CRR", "getPortfolio", JDOE)].policies["candidate"] == {"crr-read"}
    assert rows[("OMS", OMS_SUBMIT, JDOE)].policies == {"current": set(), "candidate": {"oms-all"}}

    # The CLI: a table, and the same facts as JSON.
    args = ["simulate", "--config", str(config), "--policies", str(candidate)]
    assert main([*args, "--calls", str(log_file)]) == 0
    table = capsys.readouterr().out
    assert (
        "replayed 13 calls (1 refused before any policy, 1 other log line(s) passed over)" in table
    )
    lines = {tuple(line.split()[:3]): line.split()[3:] for line in table.splitlines()}
    assert lines[("OMS", OMS_RETRIEVE, "jdoex1234")] == ["4", "2/2/0", "2/2/0", "1/3/0"]
    assert lines[("DRRS", DRRS_RETRIEVE, "jdoex1234")] == ["3", "1/0/2", "1/0/2", "1/2/0"]
    assert lines[("CRR", "getPortfolio", "jdoex1234")] == ["2", "2/0/0", "2/0/0", "1/0/1"]
    assert lines[("total", "13", "9/2/2")] == ["9/2/2", "6/6/1"]
    assert "does not reproduce" not in table

    assert main([*args, "--calls", str(log_file), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["calls"] == 13 and document["reproduces_recorded"] is True
    assert document["totals"]["candidate"] == {
        "allowed": 6,
        "rejected": 6,
        "shadow": 1,
        "exempt": 0,
        "unlimited": 0,
    }
    assert document["candidate"]["names"] == [
        "crr-write",
        "crr-read",
        "drrs-per-service",
        "oms-all",
    ]


def test_a_bad_candidate_set_is_an_error_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "tls: {cert: s.pem, key: k.pem, client_ca: ca.pem}\n"
        "policies: policies/\n"
        "applications:\n"
        '  OMS: {upstream: "http://127.0.0.1:9080", protocol: soap}\n'
    )
    write_policies(tmp_path / "policies", {"oms.yaml": CANDIDATE["oms.yaml"]})
    bad = write_policies(
        tmp_path / "bad",
        {"oms.yaml": "policies:\n  - name: oms\n    application: OMS\n    per: soon\n"},
    )
    calls = tmp_path / "calls.log"
    record = {"time": 1.0, "request_id": "r", "identity": JDOE, "cn": "jdoex1234"}
    record |= {"application": "OMS", "service": OMS_RETRIEVE, "decision": "allowed"}
    calls.write_text(json.dumps(record) + "\n")

    argv = ["simulate", "--config", str(config), "--calls", str(calls)]
    assert main([*argv, "--policies", str(bad)]) == 1
    assert f"{bad / 'oms.yaml'}:4: policies[oms].per:" in capsys.readouterr().err

    assert main([*argv, "--policies", str(tmp_path / "missing")]) == 1
    assert "is not a directory" in capsys.readouterr().err

    # An old log without `method`: SOAP calls are POSTs; a bad record names its line.
    assert main([*argv, "--policies", str(tmp_path / "policies")]) == 0
    capsys.readouterr()
    calls.write_text(json.dumps(record) + "\n" + json.dumps(record | {"time": "noon"}) + "\n")
    assert main([*argv, "--policies", str(tmp_path / "policies")]) == 1
    assert f"{calls}:2: time: must be a number" in capsys.readouterr().err
