"""Per-identity overrides and shadow mode, over real TLS with the demo participants'
certificates: an exempt monitoring certificate, a participant with a negotiated limit, a policy
in shadow mode and the global shadow switch. Shadow hits go through, and are logged, counted
and written to the ledger with the request ids the callers saw."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gateway.config.policy import load_policies
from gateway.config.settings import load_settings
from gateway.limiter.memory import MemoryLimiter
from tests.support.clock import FakeClock
from tests.support.ops import admin, samples, value
from tests.support.stack import OMS, StackFactory

SIBR = """\
policies:
  - name: sibr-retrieve
    application: SIBR
    services: ["Retrieve*"]
    limit: 6
    per: 1m
    overrides:
      - identity: "CN=monitorx0001,OU=people,O=CAISO,C=US"
        exempt: true
"""
CMRI = """\
policies:
  - name: cmri-retrieve
    application: CMRI
    services: ["Retrieve*"]
    limit: 1
    per: 10s
    overrides:
      - identity: "cn=asmithx5678, ou=people, o=CAISO, c=US"
        limit: 2
        per: 10s
"""
OMS_SHADOW = OMS + "    mode: shadow\n"
SIBR_RETRIEVE = "RetrieveCleanBidSet_SIBRv5_AP"
CMRI_RETRIEVE = "RetrieveMarketAwards_CMRIv1_AP"
OMS_RETRIEVE = "RetrieveCurrentOutages_OMSv1_AP"
MONITOR = "CN=monitorx0001,OU=people,O=CAISO,C=US"
ASMITH = "CN=asmithx5678,OU=people,O=CAISO,C=US"


async def test_the_exempt_monitoring_certificate_is_never_limited(
    stack_factory: StackFactory,
) -> None:
    clock = FakeClock()
    stack = await stack_factory(
        {"cmri.yaml": CMRI, "sibr.yaml": SIBR}, limiter=MemoryLimiter(clock)
    )
    monitor, jdoe = stack.client("monitorx0001"), stack.client("jdoex1234")
    for _ in range(20):
        answer = await stack.soap(monitor, "sibr", SIBR_RETRIEVE)
        assert answer.status == 200 and answer.headers["X-Echo-Path"].endswith(SIBR_RETRIEVE)
    # everyone else has the policy's limit: 6 a minute
    statuses = [(await stack.soap(jdoe, "sibr", SIBR_RETRIEVE)).status for _ in range(7)]
    assert statuses == [200] * 6 + [500]
    # the exemption belongs to the SIBR policy only: on CMRI the monitor is limited as usual
    assert (await stack.soap(monitor, "cmri", CMRI_RETRIEVE)).status == 200
    assert (await stack.soap(monitor, "cmri", CMRI_RETRIEVE)).status == 500

    m = samples((await admin(stack, "GET", "/metrics"))[1])
    assert (
        value(m, "aup_requests_total", application="SIBR", service=SIBR_RETRIEVE, decision="exempt")
        == 20
    )
    explained = (
        await admin(
            stack, "GET", f"/explain?identity={MONITOR}&application=SIBR&service={SIBR_RETRIEVE}"
        )
    )[1]
    assert explained["policy"]["override"] == "exempt" and explained["state"] is None


async def test_a_negotiated_limit_applies_to_its_participant_only(
    stack_factory: StackFactory,
) -> None:
    clock = FakeClock()
    stack = await stack_factory({"cmri.yaml": CMRI}, limiter=MemoryLimiter(clock))
    asmith, jdoe = stack.client("asmithx5678"), stack.client("jdoex1234")

    assert [(await stack.soap(asmith, "cmri", CMRI_RETRIEVE)).status for _ in range(3)] == [
        200,
        200,
        500,
    ]
    assert [(await stack.soap(jdoe, "cmri", CMRI_RETRIEVE)).status for _ in range(2)] == [200, 500]
    explained = (
        await admin(
            stack, "GET", f"/explain?identity={ASMITH}&application=CMRI&service={CMRI_RETRIEVE}"
        )
    )[1]
    assert explained["policy"]["override"] == "negotiated"
    assert explained["rate"]["limit"] == 2
    assert explained["state"]["calls_in_window"] == 2

    clock.advance(10)  # a new window: two again for asmith, one for jdoe
    assert [(await stack.soap(asmith, "cmri", CMRI_RETRIEVE)).status for _ in range(3)] == [
        200,
        200,
        500,
    ]
    assert [(await stack.soap(jdoe, "cmri", CMRI_RETRIEVE)).status for _ in range(2)] == [200, 500]


def test_the_shipped_policies_carry_both_overrides() -> None:
    settings = load_settings(Path(__file__).parents[1] / "gateway.yaml")
    policies = {p.name: p for p in load_policies(settings).policies}
    sibr, cmri = policies["sibr-retrieve"], policies["cmri-retrieve"]
    assert sibr.rate_for(MONITOR) is None
    assert sibr.rate_for(ASMITH) == sibr.rate
    negotiated = cmri.rate_for(ASMITH)
    assert negotiated is not None and negotiated.limit == 2


async def test_a_shadow_policy_lets_calls_through_and_records_them(
    stack_factory: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.shadow")
    clock = FakeClock()
    stack = await stack_factory(OMS_SHADOW, limiter=MemoryLimiter(clock))
    client = stack.client()
    answers = [await stack.soap(client, "oms", OMS_RETRIEVE) for _ in range(3)]
    assert [a.status for a in answers] == [200, 200, 200]
    assert all(a.headers["X-Echo-Path"].endswith(OMS_RETRIEVE) for a in answers)  # forwarded
    assert all("Retry-After" not in a.headers for a in answers)
    shadow_ids = [a.headers["X-Request-Id"] for a in answers[1:]]

    m = samples((await admin(stack, "GET", "/metrics"))[1])
    assert (
        value(m, "aup_requests_total", application="OMS", service=OMS_RETRIEVE, decision="allowed")
        == 1
    )
    assert (
        value(m, "aup_requests_total", application="OMS", service=OMS_RETRIEVE, decision="shadow")
        == 2
    )
    assert (
        value(
            m, "aup_violations_total", policy="oms-retrieve", application="OMS", decision="shadow"
        )
        == 2
    )

    # one open episode: both shadow hits, the first and the last request id
    entries = (await admin(stack, "GET", "/ledger"))[1]["entries"]
    assert [(e["first_request_id"], e["last_request_id"]) for e in entries] == [
        (shadow_ids[0], shadow_ids[1])
    ]
    assert [(e["decision"], e["count"], e["final"]) for e in entries] == [("shadow", 2, False)]
    assert entries[0]["policy"] == "oms-retrieve"
    assert entries[0]["retry_after"] == pytest.approx(5)
    logged = [r.getMessage() for r in caplog.records if r.name == "gateway.shadow"]
    assert len(logged) == 1 and "oms-retrieve" in logged[0] and "2 times so far" in logged[0]
    assert shadow_ids[0] in logged[0]


async def test_the_global_shadow_switch_shadows_every_enforcing_policy(
    stack_factory: StackFactory,
) -> None:
    clock = FakeClock()
    stack = await stack_factory(OMS, limiter=MemoryLimiter(clock), extra="mode: shadow\n")
    client = stack.client()
    assert [(await stack.soap(client, "oms", OMS_RETRIEVE)).status for _ in range(3)] == [
        200,
        200,
        200,
    ]
    explained = (
        await admin(
            stack,
            "GET",
            "/explain?identity=CN=jdoex1234,OU=people,O=CAISO,"
            f"C=US&application=OMS&service={OMS_RETRIEVE}",
        )
    )[1]
    assert explained["policy"]["mode"] == "enforce"
    assert explained["policy"]["effective_mode"] == "shadow"
    assert "shadow" in explained["applies"]
    entries = (await admin(stack, "GET", "/ledger"))[1]["entries"]
    assert [(e["decision"], e["count"]) for e in entries] == [("shadow", 2)]
    assert (await admin(stack, "GET", "/policies"))[1]["mode"] == "shadow"
