"""End to end over real TLS and HTTP: client -> gateway -> mock market services -> client.

Limits are driven by a hand-moved clock injected into the limiter, so the 5 s and 30 s windows
are exercised exactly, without sleeping.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl

import aiohttp
import pytest
from defusedxml import ElementTree

from gateway.demo.mock import pattern_chunks
from gateway.limiter.memory import MemoryLimiter
from tests.support.clock import FakeClock
from tests.support.ports import free_port
from tests.support.stack import DRRS, OMS, SOAP11, SOAP12, StackFactory

SOAP_ENV = "{http://schemas.xmlsoap.org/soap/envelope/}"
SOAP12_ENV = "{http://www.w3.org/2003/05/soap-envelope}"
STD = "{http://www.caiso.com/soa/2006-06-13/StandardOutput.xsd}"
DRRS_TEXT = (
    "CAISO DRRS Acceptable Use Policy Violation. Please retry your request again in 30 "
    "seconds from now. Note: Time resets each time you request before expiration."
)
OMS_RETRIEVE = "RetrieveCurrentOutages_OMSv1_AP"


def event_description(body: bytes) -> str:
    root = ElementTree.fromstring(body)
    event = root.find(
        f"{SOAP_ENV}Body/{SOAP_ENV}Fault/detail/{STD}outputDataType/{STD}EventLog/{STD}Event"
    )
    assert event is not None, body
    return str(event.findtext(f"{STD}description"))


async def test_oms_second_retrieve_within_window_gets_the_soap_fault(
    stack_factory: StackFactory,
) -> None:
    clock = FakeClock()
    stack = await stack_factory(OMS, limiter=MemoryLimiter(clock))
    client = stack.client("jdoex1234")

    first = await stack.soap(client, "oms", OMS_RETRIEVE)
    assert first.status == 200
    assert first.headers["X-Echo-Path"] == f"/sst/oms/{OMS_RETRIEVE}"

    clock.advance(2.2)
    second = await stack.soap(client, "oms", OMS_RETRIEVE)
    assert second.status == 500
    assert second.headers["Content-Type"].startswith("text/xml")
    assert second.headers["Retry-After"] == "3"
    assert "X-Echo-Path" not in second.headers  # answered by the gateway, never forwarded
    root = ElementTree.fromstring(await second.read())
    fault = root.find(f"{SOAP_ENV}Body/{SOAP_ENV}Fault")
    assert fault is not None
    assert str(fault.findtext("faultcode")).endswith(":Client")
    assert "5 seconds" in event_description(await second.read())

    clock.advance(2.8)  # exactly 5 s after the allowed call: the window has passed
    assert (await stack.soap(client, "oms", OMS_RETRIEVE)).status == 200


async def test_oms_submits_other_services_and_other_certificates_are_unaffected(
    stack_factory: StackFactory,
) -> None:
    clock = FakeClock()
    stack = await stack_factory(OMS, limiter=MemoryLimiter(clock))
    jdoe, asmith = stack.client("jdoex1234"), stack.client("asmithx5678")

    assert (await stack.soap(jdoe, "oms", OMS_RETRIEVE)).status == 200
    assert (await stack.soap(jdoe, "oms", OMS_RETRIEVE)).status == 500
    for _ in range(3):
        assert (await stack.soap(jdoe, "oms", "SubmitOutage_OMSv1_AP")).status == 200
    assert (await stack.soap(jdoe, "oms", "RetrieveOutageStatus_OMSv1_AP")).status == 200
    assert (await stack.soap(asmith, "oms", OMS_RETRIEVE)).status == 200
    assert (await stack.soap(asmith, "OMS", OMS_RETRIEVE)).status == 500  # case-insensitive app


async def test_drrs_early_retries_keep_extending_the_lockout(stack_factory: StackFactory) -> None:
    clock = FakeClock()
    stack = await stack_factory(DRRS.format(per="30s"), limiter=MemoryLimiter(clock))
    client = stack.client("jdoex1234")
    service = "RetrieveDRLocations_DRRSv2_AP"

    assert (await stack.soap(client, "drrs", service)).status == 200
    for step in (10, 25, 29.5, 29.9):  # each retry lands inside the lockout the last one set
        clock.advance(step)
        retry = await stack.soap(client, "drrs", service)
        assert retry.status == 500, step
        assert retry.headers["Retry-After"] == "30"
        assert event_description(await retry.read()) == DRRS_TEXT
        assert "x-reset-on-early-retry" in retry.headers["RateLimit-Policy"]
    # another DRRS service is allowed in the same period
    assert (await stack.soap(client, "drrs", "SubmitDRRegistrations_DRRSv2_AP")).status == 200
    clock.advance(30)  # a full quiet window after the last retry
    assert (await stack.soap(client, "drrs", service)).status == 200


async def test_soap12_and_rest_violations_use_their_own_shapes(stack_factory: StackFactory) -> None:
    clock = FakeClock()
    crr = """\
    policies:
      - {name: crr-read, application: CRR, services: [getPortfolio], methods: [GET],
         limit: 1, per: 5s}
    """
    stack = await stack_factory({"a.yaml": OMS, "b.yaml": crr}, limiter=MemoryLimiter(clock))
    client = stack.client()
    assert (await stack.soap(client, "oms", OMS_RETRIEVE, content_type=SOAP12)).status == 200
    soap12 = await stack.soap(client, "oms", OMS_RETRIEVE, content_type=SOAP12)
    assert soap12.headers["Content-Type"].startswith("application/soap+xml")
    root = ElementTree.fromstring(await soap12.read())
    code = root.findtext(f"{SOAP12_ENV}Body/{SOAP12_ENV}Fault/{SOAP12_ENV}Code/{SOAP12_ENV}Value")
    assert code is not None and code.endswith(":Sender")

    url = f"{stack.url}/crr/auction/v1.0/portfolio"
    async with client.get(url, headers={"caiso-request-id": "c0ffee"}) as ok:
        assert ok.status == 200
        assert ok.headers["X-Echo-Path"] == "/auction/v1.0/portfolio"
    async with client.get(url) as limited:
        assert limited.status == 429
        assert limited.headers["Content-Type"].startswith("application/problem+json")
        problem = await limited.json(content_type=None)
        assert problem["policy"] == "crr-read" and problem["service"] == "getPortfolio"
        assert problem["retry_after"] == 5 and limited.headers["Retry-After"] == "5"
    async with client.post(url, json={"portfolioName": "demo", "positions": []}) as submit:
        assert submit.status == 200  # the policy covers GET only


async def test_forwarded_headers_are_the_gateways_own(stack_factory: StackFactory) -> None:
    stack = await stack_factory(OMS)
    client = stack.client("jdoex1234")
    spoofed = {
        "X-Forwarded-Client-Cert": 'Hash=00;Subject="CN=victimx0001,OU=people,O=CAISO,C=US"',
        "X-Forwarded-For": "10.9.9.9",
        "X-Request-Id": "forged",
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "must not pass",
        "Keep-Alive": "timeout=5",
        "X-Custom": "kept",
    }
    response = await stack.soap(client, "oms", "SubmitOutage_OMSv1_AP", headers=spoofed)
    assert response.status == 200
    seen = {k.lower(): v for k, v in json.loads(response.headers["X-Echo-Headers"]).items()}
    assert seen["x-forwarded-client-cert"].startswith("Hash=")
    assert 'Subject="CN=jdoex1234,OU=people,O=CAISO,C=US"' in seen["x-forwarded-client-cert"]
    assert "victimx0001" not in json.dumps(seen)
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert (
        seen["x-request-id"] != "forged"
        and seen["x-request-id"] == response.headers["X-Request-Id"]
    )
    assert "x-secret-hop" not in seen and "keep-alive" not in seen
    assert seen["x-custom"] == "kept"


async def test_five_megabyte_soap_with_attachments_passes_intact(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory(OMS)
    client = stack.client()
    attachment = os.urandom(5 * 2**20)
    boundary = "MIMEBoundary_aup"
    body = (
        (
            f"--{boundary}\r\nContent-Type: text/xml; charset=UTF-8\r\nContent-ID: <root>\r\n\r\n"
            '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
            "<soapenv:Body/></soapenv:Envelope>\r\n"
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            "Content-ID: <payload>\r\n\r\n"
        ).encode()
        + attachment
        + f"\r\n--{boundary}--\r\n".encode()
    )
    content_type = f'multipart/related; type="text/xml"; boundary="{boundary}"; start="<root>"'
    for data in (body, _chunks(body)):  # with a Content-Length, and chunked
        response = await stack.soap(
            client, "sibr", "SubmitRawBidSet_SIBRv5_AP", content_type=content_type, data=data
        )
        assert response.status == 200
        assert response.headers["X-Echo-Body-Length"] == str(len(body))
        assert response.headers["X-Echo-Body-Sha256"] == hashlib.sha256(body).hexdigest()


async def _chunks(body: bytes, size: int = 256 * 1024):  # type: ignore[no-untyped-def]
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def test_large_upstream_answer_streams_back(stack_factory: StackFactory) -> None:
    stack = await stack_factory(OMS)
    size = 3 * 2**20 + 17
    url = f"{stack.url}/crr/_mock/big?bytes={size}&sha256=1"
    async with stack.client().get(url) as response:
        assert response.status == 200
        body = await response.read()
    assert len(body) == size
    assert (
        hashlib.sha256(body).hexdigest()
        == hashlib.sha256(b"".join(pattern_chunks(size))).hexdigest()
    )


async def test_soap_action_fallback_routes_and_limits(stack_factory: StackFactory) -> None:
    clock = FakeClock()
    stack = await stack_factory(OMS, limiter=MemoryLimiter(clock))
    client = stack.client()
    headers = {"SOAPAction": f'"http://www.caiso.com/soa/{OMS_RETRIEVE}"'}
    url = f"{stack.url}/sst/oms"
    async with client.post(url, data="<x/>", headers={"Content-Type": SOAP11, **headers}) as r:
        assert r.status == 200
    async with client.post(url, data="<x/>", headers={"Content-Type": SOAP11, **headers}) as r:
        assert r.status == 500
        assert OMS_RETRIEVE in await r.text()


async def test_unknown_application_and_service_are_refused_not_forwarded(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory(OMS)
    client = stack.client()
    unknown = await stack.soap(client, "nosuchapp", "RetrieveThings_Xv1_AP")
    assert unknown.status == 500 and "X-Echo-Path" not in unknown.headers  # SOAP 1.1 binding
    assert b"<result>AUP-UNKNOWN-APPLICATION</result>" in await unknown.read()
    assert (
        ElementTree.fromstring(await unknown.read()).find(f"{SOAP_ENV}Body/{SOAP_ENV}Fault")
        is not None
    )
    async with client.get(f"{stack.url}/crr/auction/v1.0/secret") as route:
        assert route.status == 404 and "X-Echo-Path" not in route.headers
        assert route.headers["Content-Type"].startswith("application/problem+json")


async def test_dead_and_slow_upstreams_answer_502_and_504(stack_factory: StackFactory) -> None:
    closed_port = free_port()  # a port that nothing listens on
    dead = await stack_factory(OMS, oms_port=closed_port)
    refused = await dead.soap(dead.client(), "oms", OMS_RETRIEVE)
    assert refused.status == 500  # SOAP 1.1 binding; the code says which error
    assert b"<result>AUP-UPSTREAM-UNAVAILABLE</result>" in await refused.read()
    root = ElementTree.fromstring(await refused.read())
    assert str(root.findtext(f"{SOAP_ENV}Body/{SOAP_ENV}Fault/faultcode")).endswith(":Server")

    slow = await stack_factory(OMS, oms_extra=", timeout: 300ms")
    late = await slow.soap(
        slow.client(), "oms", "SubmitOutage_OMSv1_AP", headers={"X-Mock-Delay": "2"}
    )
    assert late.status == 500
    assert b"<result>AUP-UPSTREAM-TIMEOUT</result>" in await late.read()
    assert (
        ElementTree.fromstring(await late.read()).find(f"{SOAP_ENV}Body/{SOAP_ENV}Fault")
        is not None
    )
    # the gateway keeps serving
    assert (await slow.soap(slow.client(), "oms", "SubmitOutage_OMSv1_AP")).status == 200


async def test_bad_certificates_are_refused_at_the_handshake_and_none_in_http(
    stack_factory: StackFactory,
) -> None:
    stack = await stack_factory(OMS)
    for user in ("expired", "otherca", "revoked", "selfsigned", "notyet"):
        client = stack.client(user)
        with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
            await stack.soap(client, "oms", OMS_RETRIEVE)
    anonymous = await stack.soap(stack.client(None), "oms", OMS_RETRIEVE)
    assert anonymous.status == 500 and "X-Echo-Path" not in anonymous.headers  # SOAP 1.1
    assert "AUP-NO-CERTIFICATE" in await anonymous.text()
    assert (await stack.soap(stack.client("jdoex1234"), "oms", OMS_RETRIEVE)).status == 200


async def test_a_policys_on_store_error_overrides_the_global_choice(
    stack_factory: StackFactory,
) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"  # a Redis that is not there
    policies = """\
    policies:
      - {name: oms-local, application: OMS, services: [RetrieveA*], limit: 1, per: 5s}
      - {name: oms-deny, application: OMS, services: [RetrieveB*], limit: 1, per: 5s,
         on_store_error: deny}
    """
    stack = await stack_factory(policies, store=dead_redis)
    client = stack.client()
    assert (await stack.soap(client, "oms", "RetrieveA_OMSv1_AP")).status == 200  # local
    assert (await stack.soap(client, "oms", "RetrieveA_OMSv1_AP")).status == 500  # local, exact
    denied = await stack.soap(client, "oms", "RetrieveB_OMSv1_AP")
    body = await denied.text()
    # Refused because the store is down, not a violation: its own code and a retry time.
    assert denied.status == 500 and "AUP-STORE-UNAVAILABLE" in body  # SOAP 1.1: the binding
    assert "AUP-VIOLATION" not in body and int(denied.headers["Retry-After"]) >= 1
