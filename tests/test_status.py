"""The caller's own status (`GET /aup/v1/status`, SOAP `RetrieveAUPStatus_AUPv1_AP`) against
running gateways: real mutual TLS, the real Redis store where replicas must agree, zeep for the
SOAP form. What each test proves is in its name."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import http_sf
import pytest
import requests
import zeep
import zeep.transports
from lxml import etree

from gateway.config.settings import StoreSettings
from gateway.errors import ErrorCode
from gateway.limiter.base import Rate, identity_key_prefix, limiter_key
from gateway.limiter.factory import limiter_from_url
from gateway.proxy.status import STATUS_NS
from tests.support.ops import admin, samples, value
from tests.support.stack import DRRS, SOAP11, SOAP12, Stack, StackFactory

ROOT = Path(__file__).parent.parent
WSDL = ROOT / "gateway" / "proxy" / "status.wsdl"
JDOE = "CN=jdoex1234,OU=people,O=CAISO,C=US"
ASMITH = "CN=asmithx5678,OU=people,O=CAISO,C=US"
OMS_RETRIEVE = "RetrieveCurrentOutages_OMSv1_AP"
OMS_OTHER = "RetrieveOutageHistory_OMSv1_AP"
OMS_SUBMIT = "SubmitOutage_OMSv1_AP"
DRRS_RETRIEVE = "RetrieveDRLocations_DRRSv2_AP"
SOAP_PATH = "/sst/aup/RetrieveAUPStatus_AUPv1_AP"
OMS3 = """\
policies:
  - name: oms-retrieve
    application: OMS
    services: ["Retrieve*"]
    limit: 3
    per: 1m
"""
ST = "{" + STATUS_NS + "}"


async def status(
    stack: Stack, client: aiohttp.ClientSession, query: str = ""
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with client.get(f"{stack.url}/aup/v1/status{query}") as response:
        body = await response.json(content_type=None)
        return response.status, body, response


def service_state(body: dict[str, Any], service: str) -> dict[str, Any]:
    found = [s for s in body["services"] if s["service"] == service]
    assert len(found) == 1, body
    return found[0]


def remaining(response: aiohttp.ClientResponse) -> int:
    """`r` of the RateLimit header, parsed as the Structured Field it is."""
    parsed = http_sf.parse(response.headers["RateLimit"].encode(), tltype="list")
    assert isinstance(parsed, list)
    [(_, params)] = parsed
    return int(params["r"])


async def test_status_lists_the_callers_policies_and_agrees_with_the_ratelimit_header(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory({"oms.yaml": OMS3, "drrs.yaml": DRRS.format(per="30s")})
    stack.running.gateway.status.guard = Rate(100, 60.0)
    jdoe = stack.client()
    code, body, response = await status(stack, jdoe)
    assert code == 200 and response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    assert body["identity"] == JDOE and body["cn"] == "jdoex1234" and body["services"] == []
    assert datetime.fromisoformat(body["now"]).tzinfo is not None
    policies = {p["name"]: p for p in body["policies"]}
    assert policies["oms-retrieve"] == {
        "name": "oms-retrieve",
        "application": "OMS",
        "services": ["Retrieve*"],
        "methods": None,
        "mode": "enforce",
        "limit": 3,
        "per": 60.0,
        "reset_on_early_retry": False,
        "override": None,
    }
    assert policies["drrs-per-service"]["reset_on_early_retry"] is True

    call = await stack.soap(jdoe, "oms", OMS_RETRIEVE)
    assert call.status == 200 and remaining(call) == 2
    _, body, _ = await status(stack, jdoe)
    state = service_state(body, OMS_RETRIEVE)
    assert state == {
        "application": "OMS",
        "service": OMS_RETRIEVE,
        "policy": "oms-retrieve",
        "mode": "enforce",
        "limited": True,
        "limit": 3,
        "per": 60.0,
        "reset_on_early_retry": False,
        "calls_in_window": 1,
        "calls_left": remaining(call),
        "retry_after": 0,
        "locked_until": None,
        "allowed_now": True,
    }
    for _ in range(2):
        call = await stack.soap(jdoe, "oms", OMS_RETRIEVE)
    assert remaining(call) == 0
    rejected = await stack.soap(jdoe, "oms", OMS_RETRIEVE)
    assert rejected.status == 500
    _, body, _ = await status(stack, jdoe)
    state = service_state(body, OMS_RETRIEVE)
    assert state["calls_left"] == 0 and state["allowed_now"] is False
    # the same whole seconds as the Retry-After of the rejection (a moment later: not more)
    assert 0 < state["retry_after"] <= int(rejected.headers["Retry-After"])

    # One service asked by name is reported even with no state; one no policy covers, unlimited.
    _, one, _ = await status(stack, jdoe, f"?application=oms&service={OMS_OTHER}")
    assert one["services"] == [
        {
            "application": "OMS",
            "service": OMS_OTHER,
            "policy": "oms-retrieve",
            "mode": "enforce",
            "limited": True,
            "limit": 3,
            "per": 60.0,
            "reset_on_early_retry": False,
            "calls_in_window": 0,
            "calls_left": 3,
            "retry_after": 0,
            "locked_until": None,
            "allowed_now": True,
        }
    ]
    assert [p["application"] for p in one["policies"]] == ["OMS"]
    _, free, _ = await status(stack, jdoe, f"?application=OMS&service={OMS_SUBMIT}")
    assert free["services"] == [
        {
            "application": "OMS",
            "service": OMS_SUBMIT,
            "policy": None,
            "mode": None,
            "limited": False,
        }
    ]


async def test_status_never_counts_and_never_extends_a_drrs_lockout(
    stack_factory: StackFactory, redis_url: str
) -> None:
    stack = await stack_factory(DRRS.format(per="2s"), store=redis_url)
    stack.running.gateway.status.guard = Rate(100, 60.0)
    jdoe = stack.client()
    assert (await stack.soap(jdoe, "drrs", DRRS_RETRIEVE)).status == 200
    assert (await stack.soap(jdoe, "drrs", DRRS_RETRIEVE)).status == 500  # early: locked 2 s
    ends = set()
    for _ in range(5):
        code, body, _ = await status(stack, jdoe)
        assert code == 200
        state = service_state(body, DRRS_RETRIEVE)
        assert state["reset_on_early_retry"] is True and state["allowed_now"] is False
        assert state["calls_left"] == 0 and state["retry_after"] in (1, 2)
        ends.add(state["locked_until"])
    assert len(ends) == 1 and None not in ends  # asking did not move the lock's end
    locked_until = datetime.fromisoformat(ends.pop()).timestamp()
    await asyncio.sleep(max(locked_until - time.time(), 0) + 0.1)
    assert (await stack.soap(jdoe, "drrs", DRRS_RETRIEVE)).status == 200


async def test_status_requests_do_not_count_toward_any_limit(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory(OMS3)
    stack.running.gateway.status.guard = Rate(100, 60.0)
    jdoe = stack.client()
    for _ in range(20):
        assert (await status(stack, jdoe, f"?application=OMS&service={OMS_RETRIEVE}"))[0] == 200
    for expected in (2, 1, 0):  # the three calls of the window are all still there
        call = await stack.soap(jdoe, "oms", OMS_RETRIEVE)
        assert call.status == 200 and remaining(call) == expected
    _, body, _ = await status(stack, jdoe, "?application=OMS")
    assert service_state(body, OMS_RETRIEVE)["calls_in_window"] == 3
    # counted apart from calls: under application "aup", decision "status"
    parsed = samples((await admin(stack, "GET", "/metrics"))[1])
    requests_total = "aup_requests_total"
    assert (
        value(parsed, requests_total, application="aup", service="status", decision="status") == 21
    )
    assert (
        value(parsed, requests_total, application="OMS", service=OMS_RETRIEVE, decision="allowed")
        == 3
    )


async def test_another_identitys_state_is_never_shown(stack_factory: StackFactory) -> None:
    stack = await stack_factory(
        OMS3
        + "    overrides:\n"
        + f'      - {{identity: "{ASMITH}", limit: 10, per: 1m}}\n'
        + 'access:\n  - {name: all, organisations: [CAISO], applications: ["*"]}\n'
    )
    stack.running.gateway.status.guard = Rate(100, 60.0)
    jdoe, asmith = stack.client("jdoex1234"), stack.client("asmithx5678")
    assert (await stack.soap(jdoe, "oms", OMS_RETRIEVE)).status == 200
    code, body, _ = await status(stack, asmith)
    assert code == 200 and body["identity"] == ASMITH and body["services"] == []
    assert body["policies"][0]["limit"] == 10 and body["policies"][0]["override"] == "negotiated"
    _, own, _ = await status(stack, asmith, f"?application=OMS&service={OMS_RETRIEVE}")
    assert service_state(own, OMS_RETRIEVE)["calls_in_window"] == 0  # jdoe's call is jdoe's

    # Naming someone else is refused outright, in JSON and in SOAP, and says nothing of them.
    for query in (f"?identity={JDOE}", f"?identity={JDOE}&application=OMS", "?cn=jdoex1234"):
        code, refused, response = await status(stack, asmith, query)
        assert code == 400 and response.content_type == "application/problem+json"
        assert refused["code"] == ErrorCode.BAD_REQUEST and "jdoex1234" not in str(refused)
    envelope = soap_request(SOAP11, f"<identity>{JDOE}</identity>")
    async with asmith.post(
        f"{stack.url}{SOAP_PATH}", data=envelope, headers={"Content-Type": SOAP11}
    ) as response:
        text = await response.text()
    assert response.status == 500 and "AUP-BAD-REQUEST" in text and "OU=people" not in text, text


async def test_access_list_and_exemptions_shape_the_answer(stack_factory: StackFactory) -> None:
    policies = (
        OMS3
        + "    overrides:\n      - {identity: 'CN=monitorx0001,OU=people,O=CAISO,C=US', "
        + "exempt: true}\n"
        + DRRS.format(per="30s").removeprefix("policies:\n")
        + "access:\n  - {name: jdoe-oms, subjects: ['"
        + JDOE
        + "'], applications: [OMS]}\n"
        + "  - {name: monitor, subjects: ['CN=monitorx0001,OU=people,O=CAISO,C=US'],"
        + " applications: ['*']}\n"
    )
    stack = await stack_factory(policies)
    stack.running.gateway.status.guard = Rate(100, 60.0)
    jdoe, monitor = stack.client("jdoex1234"), stack.client("monitorx0001")
    _, body, _ = await status(stack, jdoe)
    assert [p["application"] for p in body["policies"]] == ["OMS"]  # not provisioned for DRRS
    code, refused, _ = await status(stack, jdoe, "?application=DRRS")
    assert code == 403 and refused["code"] == ErrorCode.NOT_PROVISIONED
    code, unknown, _ = await status(stack, jdoe, "?application=NOPE")
    assert code == 404 and unknown["code"] == ErrorCode.UNKNOWN_APPLICATION
    code, _, _ = await status(stack, jdoe, f"?service={OMS_RETRIEVE}")
    assert code == 400

    _, mon, _ = await status(stack, monitor, f"?application=OMS&service={OMS_RETRIEVE}")
    oms = next(p for p in mon["policies"] if p["name"] == "oms-retrieve")
    assert oms["override"] == "exempt" and oms["limit"] is None
    assert mon["services"][0]["limited"] is False


async def test_no_certificate_gets_the_usual_no_certificate_fault(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory()
    anonymous = stack.client(None)
    async with anonymous.get(f"{stack.url}/aup/v1/status") as response:
        text = await response.text()
    async with anonymous.get(f"{stack.url}/sst/oms/{OMS_RETRIEVE}") as usual:
        usual_text = await usual.text()
    assert response.status == usual.status == 403  # problem+json: a GET, not a SOAP message
    assert ErrorCode.NO_CERTIFICATE in text and ErrorCode.NO_CERTIFICATE in usual_text
    assert response.headers["Content-Type"] == usual.headers["Content-Type"]


async def test_the_guard_answers_429_per_identity(stack_factory: StackFactory) -> None:
    stack = await stack_factory()
    stack.running.gateway.status.guard = Rate(3, 60.0)
    jdoe, asmith = stack.client("jdoex1234"), stack.client("asmithx5678")
    for _ in range(3):
        assert (await status(stack, jdoe))[0] == 200
    code, body, response = await status(stack, jdoe)
    assert code == 429 and response.content_type == "application/problem+json"
    assert body["code"] == ErrorCode.VIOLATION and body["application"] == "aup"
    assert int(response.headers["Retry-After"]) == body["retry_after"] > 0
    assert response.headers["RateLimit-Policy"] == '"aup-status";q=3;w=60'
    assert remaining(response) == 0
    # SOAP callers get a SOAP fault for the same guard (SOAP 1.1: HTTP 500)
    async with jdoe.post(
        f"{stack.url}{SOAP_PATH}", data=soap_request(SOAP11), headers={"Content-Type": SOAP11}
    ) as soap:
        assert soap.status == 500 and ErrorCode.VIOLATION in await soap.text()
    # another identity has its own guard, and real calls are not guarded by it
    assert (await status(stack, asmith))[0] == 200
    assert (await stack.soap(jdoe, "oms", OMS_RETRIEVE)).status == 200


async def test_two_replicas_on_one_redis_answer_the_same(
    stack_factory: StackFactory, redis_url: str
) -> None:
    one = await stack_factory(DRRS.format(per="30s"), store=redis_url)
    two = await stack_factory(DRRS.format(per="30s"), store=redis_url)
    for stack in (one, two):
        stack.running.gateway.status.guard = Rate(100, 60.0)
    caller_one, caller_two = one.client(), two.client()
    assert (await one.soap(caller_one, "drrs", DRRS_RETRIEVE)).status == 200
    _, seen_by_two, _ = await status(two, caller_two)
    state = service_state(seen_by_two, DRRS_RETRIEVE)
    assert state["calls_in_window"] == 1 and state["calls_left"] == 0
    assert (await two.soap(caller_two, "drrs", DRRS_RETRIEVE)).status == 500  # locks it
    _, a, _ = await status(one, caller_one)
    _, b, _ = await status(two, caller_two)
    first, second = service_state(a, DRRS_RETRIEVE), service_state(b, DRRS_RETRIEVE)
    assert first["locked_until"] is not None and first["locked_until"] == second["locked_until"]
    assert first == second


# --- the SOAP form -----------------------------------------------------------------------------


def soap_request(content_type: str, inner: str = "") -> str:
    ns = (
        "http://www.w3.org/2003/05/soap-envelope"
        if content_type == SOAP12
        else "http://schemas.xmlsoap.org/soap/envelope/"
    )
    return (
        f'<e:Envelope xmlns:e="{ns}"><e:Body>'
        f'<RetrieveAUPStatus xmlns="{STATUS_NS}">{inner}</RetrieveAUPStatus>'
        "</e:Body></e:Envelope>"
    )


@pytest.mark.parametrize("content_type", [SOAP11, SOAP12])
async def test_the_soap_form_answers_the_same_facts_valid_against_the_wsdl_schema(
    stack_factory: StackFactory, content_type: str
) -> None:
    stack = await stack_factory(DRRS.format(per="30s"))
    jdoe = stack.client()
    assert (await stack.soap(jdoe, "drrs", DRRS_RETRIEVE)).status == 200
    assert (await stack.soap(jdoe, "drrs", DRRS_RETRIEVE)).status == 500
    async with jdoe.post(
        f"{stack.url}{SOAP_PATH}",
        data=soap_request(content_type),
        headers={"Content-Type": content_type},
    ) as response:
        xml = await response.read()
    assert response.status == 200
    assert response.headers["Content-Type"] == content_type
    _, body, _ = await status(stack, jdoe)
    json_state = service_state(body, DRRS_RETRIEVE)

    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    answer = etree.fromstring(xml, parser)[0][0]  # Envelope/Body/RetrieveAUPStatusResponse
    assert answer.tag == f"{ST}RetrieveAUPStatusResponse"
    schema_root = etree.parse(str(WSDL), parser).find(
        "{http://schemas.xmlsoap.org/wsdl/}types/{http://www.w3.org/2001/XMLSchema}schema"
    )
    schema = etree.XMLSchema(schema_root)
    schema.assertValid(answer)
    state = answer.find(f"{ST}serviceState")
    assert state is not None
    assert state.findtext(f"{ST}service") == DRRS_RETRIEVE
    assert state.findtext(f"{ST}callsLeft") == str(json_state["calls_left"]) == "0"
    assert state.findtext(f"{ST}lockedUntil") == json_state["locked_until"]
    assert state.findtext(f"{ST}resetOnEarlyRetry") == "true"
    assert answer.findtext(f"{ST}identity") == JDOE


def zeep_service(stack: Stack, binding: str) -> Any:
    session = requests.Session()
    session.trust_env = False  # the machine's REQUESTS_CA_BUNDLE would override `verify`
    cert, key = stack.certs.clients["jdoex1234"]
    session.cert, session.verify = (str(cert), str(key)), str(stack.certs.ca)
    client = zeep.Client(str(WSDL), transport=zeep.transports.Transport(session=session))
    return client.create_service(f"{{{STATUS_NS}}}{binding}", f"{stack.url}{SOAP_PATH}")


@pytest.mark.parametrize("binding", ["AUPStatusSoap11", "AUPStatusSoap12"])
async def test_zeep_calls_the_status_service_typed(
    stack_factory: StackFactory, binding: str
) -> None:
    stack = await stack_factory(DRRS.format(per="30s"))
    jdoe = stack.client()
    assert (await stack.soap(jdoe, "drrs", DRRS_RETRIEVE)).status == 200
    service = zeep_service(stack, binding)
    answer = await asyncio.to_thread(service.RetrieveAUPStatus)
    assert answer.identity == JDOE and answer.storeState == "ok"
    assert [p.name for p in answer.policy] == ["drrs-per-service"]
    assert answer.policy[0].limit == 1 and answer.policy[0].per == 30.0
    [state] = answer.serviceState
    assert state.service == DRRS_RETRIEVE and state.callsLeft == 0 and state.limited is True
    assert state.lockedUntil is None and state.retryAfter >= 29

    one = await asyncio.to_thread(
        service.RetrieveAUPStatus, application="DRRS", service="SubmitDRRegistrations_DRRSv2_AP"
    )
    assert one.serviceState[0].callsLeft == 1 and one.serviceState[0].allowedNow is True


async def test_the_wsdl_is_served_and_other_requests_are_refused_clearly(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory()
    stack.running.gateway.status.guard = Rate(100, 60.0)
    jdoe = stack.client()
    async with jdoe.get(f"{stack.url}{SOAP_PATH}?wsdl") as response:
        assert response.status == 200 and await response.read() == WSDL.read_bytes()
    async with jdoe.post(f"{stack.url}/aup/v1/status") as response:
        assert response.status == 405
    hostile = '<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x "y">]>' + soap_request(SOAP11).replace(
        "<e:Body>", "<e:Body>&x;"
    )
    for body, code in (
        (hostile, ErrorCode.UNSAFE_XML),
        ("<not-xml", ErrorCode.BAD_XML),
        (soap_request(SOAP11).replace("RetrieveAUPStatus", "Other"), ErrorCode.BAD_REQUEST),
    ):
        async with jdoe.post(
            f"{stack.url}{SOAP_PATH}", data=body, headers={"Content-Type": SOAP11}
        ) as response:
            assert response.status == 500 and code in await response.text()


# --- listing one identity's keys (both stores) -------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_keys_lists_one_identitys_keys_only(store: str, redis_url: str) -> None:
    limiter = (
        limiter_from_url(StoreSettings(url=redis_url, key_prefix="t", timeout=1.0))
        if store == "redis"
        else limiter_from_url(StoreSettings(url="memory://"))
    )
    rate = Rate(1, 60.0)
    # glob characters and a prefix of another identity: neither may leak into the listing
    names = ["CN=a*b", "CN=a", "CN=axb", "CN=a*b2", "CN=a|OMS|x"]
    try:
        for name in names:
            await limiter.decide(limiter_key(name, "OMS", "S1"), rate)
        await limiter.decide(limiter_key("CN=a*b", "DRRS", "S2"), rate)
        found = await limiter.keys(identity_key_prefix("CN=a*b"), 100)
        assert sorted(found) == sorted(
            [limiter_key("CN=a*b", "OMS", "S1"), limiter_key("CN=a*b", "DRRS", "S2")]
        )
        # a prefix match is not enough: "CN=a" also sees "CN=a|OMS|x"'s key, which the status
        # service drops (its service part holds a "|"; no service name does)
        assert limiter_key("CN=a|OMS|x", "OMS", "S1") in await limiter.keys(
            identity_key_prefix("CN=a"), 100
        )
        assert len(await limiter.keys(identity_key_prefix("CN=a*b"), 1)) == 1
    finally:
        for name in names:
            await limiter.clear(limiter_key(name, "OMS", "S1"))
        await limiter.clear(limiter_key("CN=a*b", "DRRS", "S2"))
        await limiter.close()


async def test_a_lookalike_identitys_keys_never_show_in_status(
    stack_factory: StackFactory,
) -> None:
    """A key of an identity that starts with the caller's name and a "|" is not the caller's."""
    stack = await stack_factory(OMS3)
    gateway = stack.running.gateway
    lookalike = f"{JDOE}|OMS|{OMS_RETRIEVE}"
    await gateway.limiter.decide(limiter_key(lookalike, "OMS", OMS_RETRIEVE), Rate(3, 60.0))
    code, body, _ = await status(stack, stack.client())
    assert code == 200 and body["services"] == []
